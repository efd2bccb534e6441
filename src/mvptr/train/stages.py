"""Which objectives each pre-training stage trains, and which config keys stage one depends on.

Why: a schedule (`two_stage`, `joint`) or an ablation (`no_mcr`, ...) is a choice of task lists and weights in
the config. The workflow (`workflow/rules/common.smk`) keys stage one's output path by the hash of the keys
that change what stage one computes, so ablations that differ only in stage-two settings share one stage-one
job. Kept free of torch so that Snakemake reads it quickly.

    two_stage  stage 1: pretrain.stage1_tasks (MCR: uni-modal)    stage 2: pretrain.stage2_tasks (VSC, ITM, MLM, WPG)
    joint      stage 1: nothing (the initialised model is saved)   stage 2: both lists in one pass (released code)
A task with weight 0 is left out of its stage altogether (no forward pass).

Use: `stage_tasks(cfg, 2)`, `config_hash(cfg, stage1_keys(cfg))`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TASKS = ("mcr", "vsc", "itm", "mlm", "wpg")


def stage_tasks(cfg: Mapping[str, Any], stage: int) -> list[str]:
    """The objectives (weight > 0) that `stage` (1 or 2) trains under `pretrain.schedule`."""
    pcfg = cfg["pretrain"]
    if pcfg["schedule"] == "joint":
        names = [] if stage == 1 else [*pcfg["stage1_tasks"], *pcfg["stage2_tasks"]]
    else:
        names = pcfg[f"stage{stage}_tasks"]
    return [name for name in TASKS if name in names and pcfg["tasks"][name]["weight"] > 0]


# The config keys that change what stage one computes: its output path carries their hash, so ablations that
# differ only in stage-two settings share one stage-one job. (Logging and checkpoint cadence are left out.)
STAGE1_KEYS = ("seed", "dataset", "concepts.min_count", "concepts.spacy_model", "regions", "model",
               "pretrain.schedule", "pretrain.init", "pretrain.max_words", "pretrain.max_concepts",
               "pretrain.max_tags", "pretrain.stage1_tasks", "pretrain.stage1", "pretrain.grad_clip",
               "pretrain.grad_accum")


def stage1_keys(cfg: Mapping[str, Any]) -> list[str]:
    """STAGE1_KEYS plus the weights and options of the tasks stage one trains."""
    return [*STAGE1_KEYS, *(f"pretrain.tasks.{name}" for name in stage_tasks(cfg, 1))]
