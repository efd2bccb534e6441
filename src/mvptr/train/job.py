"""The submitit job that runs one pre-training stage, and requeues itself from its checkpoint.

Why: GPU steps are submitted through submitit (`mvptr.launch`). Following the FAIR launchers (dino, mae), the
job is a small picklable callable: `__call__` imports the training code lazily and runs the stage (ranks come
from submitit's JobEnvironment inside `train_stage`); `checkpoint()` (inherited from
`submitit.helpers.Checkpointable`) is called by submitit on preemption or timeout and resubmits the same
callable, which resumes from the stage's checkpoint directory, where `train_stage` saves every N steps.

Use: `result = launch(StageJob(cfg, 2, paths), name="pretrain_stage2", folder=job_dir, settings=settings)`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import submitit

from mvptr.train.loop import StagePaths


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, cfg: Mapping[str, Any], stage: int, paths: StagePaths) -> None:
        self.cfg = dict(cfg)
        self.stage = stage
        self.paths = paths

    def __call__(self) -> dict[str, Any]:
        import torch

        from mvptr.train.loop import train_stage

        torch.set_num_threads(max(1, int(self.cfg["launch"]["cpus_per_task"])))
        result = train_stage(self.cfg, self.stage, self.paths)
        if self.stage == 2 and result.get("completed", True):
            from mvptr.evaluate.zero_shot import zero_shot_retrieval

            result["zero_shot"] = zero_shot_retrieval(self.cfg, self.paths, split="test")
        return result
