"""The momentum (EMA) copy of a model that SIMLA's (and ALBEF's) distillation and queues read.

Why: ITC's queue holds momentum embeddings, and ITC, MLM and PSL distil from the momentum model's outputs
(METHODS.md, SIMLA). The copy starts equal to the model, is never trained by the optimiser, and after every
optimiser step becomes `decay * momentum + (1 - decay) * model` (decay 0.995). It is part of the step module's
state dict, so the checkpoint saves it and a resumed run continues from the same copy. It runs in eval mode
(no dropout): its outputs are targets.

Use:
    momentum = Momentum(model, decay=0.995)
    ... optimizer.step(); momentum.update(model)
    teacher = momentum.model
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Momentum(nn.Module):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"momentum decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> Momentum:
        """Always eval: the momentum model's outputs are targets, without dropout."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """momentum <- decay * momentum + (1 - decay) * model, parameter by parameter (buffers copied)."""
        mine = dict(self.model.named_parameters())
        for name, parameter in model.named_parameters():
            mine[name].mul_(self.decay).add_(parameter.detach(), alpha=1.0 - self.decay)
        buffers = dict(self.model.named_buffers())
        for name, buffer in model.named_buffers():
            buffers[name].copy_(buffer)
