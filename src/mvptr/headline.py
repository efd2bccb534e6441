"""The flat metric names of `mvptr evaluate run` (`flat_metrics`) and the headline numbers of each downstream task,
as patterns over them.

Why a module of its own: the comparison table (`mvptr compare`) and the MLflow parent runs (`mvptr.tracking`)
must pick the same numbers, and neither may import the other (tracking sits below the evaluation code that
the comparison imports).

Use: `fnmatch.fnmatchcase(f"{task}/{key}", pattern)` for a key of flat_metrics(result) and a pattern in
HEADLINE_METRICS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Retrieval's R@1 and R-sum zero-shot, fine-tuned and re-ranked, and its ITM head's hard-negative accuracy and
# ranking; VQA's overall accuracy; the others' accuracy per split; grounding's accuracy per concept kind.
HEADLINE_METRICS = ["retrieval/splits/*/*/r_sum", "retrieval/splits/*/*/*_r_at_1",
                    "retrieval/splits/*/itm_hard_negative_*", "vqa/splits/*/overall",
                    "ve/splits/*/accuracy", "rec/splits/*/accuracy", "nlvr2/splits/*/accuracy",
                    "grounding/splits/*/object", "grounding/splits/*/attribute", "grounding/splits/*/relation"]


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of an evaluation result, keys joined with '/' and made MLflow-safe (no '@', quotes, ...):
    the metric names the runs log and the summary's columns (lists, such as item_scores, are no metrics)."""
    out: dict[str, float] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = prefix + "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(key))
            if isinstance(value, Mapping):
                walk(value, name + "/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[name] = float(value)

    walk(result, "")
    return out
