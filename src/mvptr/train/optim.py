"""AdamW without weight decay on biases and LayerNorms, and warmup followed by linear or cosine decay.

Why: BERT's recipe, which MVPTR's released code follows (AdamW, wd 0.01, linear decay); the schedules are
transformers' own (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`).

Use: `optimizer, scheduler = build_optimizer(model, cfg["pretrain"]["stage2"])`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

_SCHEDULES = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


def no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases, LayerNorm weights and scalars (the VSC temperature) are not decayed."""
    return parameter.ndim < 2 or name.endswith(".bias") or "LayerNorm" in name or "layernorm" in name.lower()


def build_optimizer(model: nn.Module, stage: Mapping[str, Any]) -> tuple[torch.optim.AdamW, Any]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": stage["weight_decay"]},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    # On a GPU the fused kernel: one launch for every parameter's update instead of a few per parameter.
    fused = bool(named) and all(p.is_cuda for _, p in named)
    optimizer = torch.optim.AdamW(groups, lr=stage["lr"], fused=fused)
    scheduler = _SCHEDULES[stage["decay"]](optimizer, num_warmup_steps=stage["warmup_steps"],
                                           num_training_steps=max(1, stage["steps"]))
    return optimizer, scheduler
