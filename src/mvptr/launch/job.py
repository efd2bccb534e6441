"""The submitit job of every GPU-class step: call one library function with the config, requeue on preemption.

Why: following the FAIR launchers (dino, mae), a job is a small picklable callable whose `__call__` imports the
training code lazily and runs it; `checkpoint()` (inherited from `submitit.helpers.Checkpointable`) is called by
submitit on preemption or timeout and resubmits the same call, which resumes from the step's own checkpoint
directory (pre-training) or starts again and computes the same numbers (fine-tuning, deterministic on CPU).
Ranks come from submitit's JobEnvironment inside the function. The function is named `module:function`, so
that the job pickles without importing torch in the rule's process.

Use: `launch(ConfigJob("mvptr.jobs:run_stage", cfg, 2, paths), name=..., folder=..., settings=...)`
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import submitit


class ConfigJob(submitit.helpers.Checkpointable):
    def __init__(self, target: str, cfg: Mapping[str, Any], *args: Any) -> None:
        self.target = target
        self.cfg = dict(cfg)
        self.args = args

    def __call__(self) -> Any:
        import torch

        torch.set_num_threads(max(1, int(self.cfg["launch"]["cpus_per_task"])))
        if self.cfg["launch"].get("deterministic"):
            from mvptr.launch.determinism import enter_deterministic_job

            enter_deterministic_job()
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(self.cfg, *self.args)
