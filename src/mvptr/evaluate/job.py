"""The submitit job that fine-tunes and evaluates one downstream task, and requeues itself when preempted.

Why: fine-tuning is GPU-class work, submitted through submitit (`mvptr.launch`) like pre-training
(`mvptr.train.job`): a small picklable callable whose `__call__` imports the fine-tuning code lazily and runs
it, and whose `checkpoint()` (inherited from `submitit.helpers.Checkpointable`) resubmits the same call on
preemption or timeout. A fine-tuning is short and deterministic (batch order and dropout are seeded), so a
requeued job simply starts again from the given weights and computes the same result.

Use: `result = launch(FinetuneJob(cfg, "vqa", paths), name="evaluate_vqa", folder=job_dir, settings=settings)`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import submitit

from mvptr.evaluate.finetune import TaskPaths


class FinetuneJob(submitit.helpers.Checkpointable):
    def __init__(self, cfg: Mapping[str, Any], task: str, paths: TaskPaths) -> None:
        self.cfg = dict(cfg)
        self.task = task
        self.paths = paths

    def __call__(self) -> dict[str, Any]:
        import torch

        from mvptr.evaluate.finetune import finetune

        torch.set_num_threads(max(1, int(self.cfg["launch"]["cpus_per_task"])))
        return finetune(self.cfg, self.task, self.paths)
