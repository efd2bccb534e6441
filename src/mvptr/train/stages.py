"""Which objectives each pre-training stage trains, derived from the objectives' modules.

Why: a method's config (`pretrain.objectives`) names its objectives with their weights and options; each
objective's module says whether it is uni-modal (`Objective.stage` 1, MVPTR's stage one) or cross-modal (2).
The schedule then decides:

    two_stage  stage 1: the uni-modal objectives          stage 2: the cross-modal objectives (MVPTR's paper)
    joint      stage 1: nothing (the initialised model    stage 2: every objective in one pass (MVPTR's
               is saved)                                            released code; SIMLA)
An objective with weight 0 is left out of its stage altogether (no forward pass). The order is the order of
`pretrain.objectives` in the method's config.

Use: `stage_objectives(cfg, 2)`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mvptr.objectives import load_objective


def stage_objectives(cfg: Mapping[str, Any], stage: int) -> list[str]:
    """The objectives (weight > 0) that `stage` (1 or 2) trains under `pretrain.schedule`."""
    pcfg = cfg["pretrain"]
    joint = pcfg["schedule"] == "joint"
    if joint and stage == 1:
        return []
    return [name for name, options in pcfg["objectives"].items()
            if options["weight"] > 0 and (joint or load_objective(name).stage == stage)]
