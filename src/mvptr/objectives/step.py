"""The module that computes the weighted sum of a stage's objectives for one batch, and their after-step hooks.

Why: a schedule (`two_stage`, `joint`) or an ablation (`no_mcr`, `simla_no_xmm`, ...) is only a choice of
objectives, weights and options in the config; this file turns that choice into one `nn.Module` whose
`forward` returns the step's loss, so that DistributedDataParallel can wrap it and every objective's loss is
logged. It holds everything a step changes besides the optimiser: the model, the objectives (with their
state, e.g. SIMLA's queues, as buffers) and, when an objective distils, the momentum copy of the model. The
trainer checkpoints its whole state dict, so a resumed run continues with the same queues and momentum.

Which objectives a stage trains is `mvptr.train.stages.stage_objectives`.

Use:
    step = PretrainStep(model, stage_objectives(cfg, 2), cfg["pretrain"]["objectives"], generator,
                        **momentum_options(cfg))
    loss, logs = step(batch, step=done)      # then backward, optimizer.step(), and:
                                             # (a method with modes runs the step in its mode, logged apart)
    step.after_step()                        # the EMA update of the momentum model
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mvptr.objectives import PairEncoding, StepContext, load_objective
from mvptr.objectives.momentum import Momentum

if TYPE_CHECKING:
    from mvptr.models.base import VLModel


def momentum_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method's momentum decay and distillation ramp (`method.momentum`, `method.distill_ramp_steps`), for
    the methods that have them."""
    method = cfg["method"]
    return {"momentum": method.get("momentum"), "ramp_steps": method.get("distill_ramp_steps", 0)}


class PretrainStep(nn.Module):
    """`forward(batch, step)` -> (weighted sum of the objectives' losses, detached logs of every objective)."""

    def __init__(self, model: VLModel, objectives: Sequence[str], options: Mapping[str, Mapping[str, Any]],
                 generator: torch.Generator | None = None, momentum: float | None = None,
                 ramp_steps: int = 0, scheduled_modes: bool = True) -> None:
        """`scheduled_modes`: run each step in the mode the method's schedule gives it (`VLModel.step_mode`,
        pre-training); False keeps the model's own mode (fine-tuning, in the method's downstream mode)."""
        super().__init__()
        if not objectives:
            raise ValueError("a training stage needs at least one objective with a weight above 0")
        self.model = model
        self.objectives = nn.ModuleDict({name: load_objective(name)(options[name], model.config)
                                         for name in objectives})
        self.weights = {name: float(options[name]["weight"]) for name in objectives}
        self.generator = generator
        distils = [name for name, objective in self.objectives.items() if objective.uses_momentum]
        if distils and momentum is None:
            raise ValueError(f"objective(s) {distils} distil from a momentum model: the method needs "
                             "method.momentum")
        self.momentum = Momentum(model, momentum) if distils else None
        self.ramp_steps = ramp_steps
        self.uses_pairs = any(objective.uses_pairs for objective in self.objectives.values())
        self.scheduled_modes = scheduled_modes

    def forward(self, batch: Mapping[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        ctx = StepContext(generator=self.generator, step=step,
                          momentum=self.momentum.model if self.momentum is not None else None,
                          ramp=min(1.0, step / self.ramp_steps) if self.ramp_steps else 1.0)
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        with self.model.step_mode(step) if self.scheduled_modes else contextlib.nullcontext() as mode:
            encoded = PairEncoding(self.model, batch) if self.uses_pairs else None
            for name, objective in self.objectives.items():
                loss, objective_logs = objective(self.model, batch, encoded, ctx)
                weighted = self.weights[name] * loss
                total = weighted if total is None else total + weighted
                logs.update({f"loss_{name}": loss.detach(), **{k: v for k, v in objective_logs.items() if k != name}})
        logs["loss"] = total.detach()
        if mode is not None:
            # Each mode's losses apart as well (SemVLP): `loss_mlm/single`, `loss/two`, ... (averaged by the
            # trainer over the steps of that mode only).
            logs.update({f"{key}/{mode}": value for key, value in list(logs.items())})
        return total, logs

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimiser step: the momentum model follows the model."""
        if self.momentum is not None:
            self.momentum.update(self.model)
