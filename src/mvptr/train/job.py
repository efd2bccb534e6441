"""What the submitit job of a pre-training stage runs: the stage, then (stage two) zero-shot retrieval.

Why: the rule's process only submits and waits (`mvptr.launch`); everything a stage computes happens in the
job, on the cluster's node: `ConfigJob("mvptr.train.job:run_stage", cfg, stage, paths)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mvptr.train.loop import StagePaths, train_stage


def run_stage(cfg: Mapping[str, Any], stage: int, paths: StagePaths) -> dict[str, Any]:
    result = train_stage(cfg, stage, paths)
    if stage == 2 and result.get("completed", True):
        from mvptr.evaluate.zero_shot import zero_shot_retrieval

        result["zero_shot"] = zero_shot_retrieval(cfg, paths, split="test")
    return result
