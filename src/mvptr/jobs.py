"""What the submitit job of a pre-training stage runs: the stage, then (stage two) zero-shot retrieval.

Why: the rule's process only submits and waits (`mvptr.launch`); everything a stage computes happens in the
job, on the cluster's node: `ConfigJob("mvptr.jobs:run_stage", cfg, stage, paths)`. A module of its own,
above both packages, because it joins the trainer (`mvptr.train`) and the evaluation (`mvptr.evaluate`),
which do not import each other (tests/test_imports.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvptr.train.loop import FINAL_WEIGHTS, StagePaths, train_stage


def run_stage(cfg: Mapping[str, Any], stage: int, paths: StagePaths) -> dict[str, Any]:
    result = train_stage(cfg, stage, paths)
    if stage == 2 and result.get("completed", True):
        from mvptr.evaluate.zero_shot import zero_shot_retrieval

        zero_shot = zero_shot_retrieval(cfg, paths, Path(paths.ckpt_dir) / FINAL_WEIGHTS, split="test")
        if zero_shot is not None:  # a method without contrastive embeddings has no zero-shot retrieval
            result["zero_shot"] = zero_shot
    return result
