"""The module that computes the weighted sum of a stage's objectives for one batch.

Why: a schedule (`two_stage`, `joint`) or an ablation (`no_mcr`, `no_itm_hard`, ...) is only a choice of task
list, weights and options in the config; this file turns that choice into one `nn.Module` whose `forward`
returns the step's loss, so that DistributedDataParallel can wrap it and every task's loss is logged.

Which tasks a stage trains is `mvptr.train.stages.stage_tasks`.

Use:
    step = PretrainStep(model, stage_tasks(cfg, 2), cfg["pretrain"]["tasks"], generator)
    loss, logs = step(batch)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mvptr.models.mvptr import MVPTRModel
from mvptr.tasks import PairEncoding
from mvptr.tasks.itm import itm_loss
from mvptr.tasks.mcr import mcr_loss
from mvptr.tasks.mlm import mlm_loss
from mvptr.tasks.vsc import vsc_loss
from mvptr.tasks.wpg import wpg_loss
from mvptr.train.stages import TASKS

# Tasks whose loss reads the matched pairs' uni-modal (and cross-modal) encodings, shared within a step.
_PAIR_TASKS = ("vsc", "itm", "mlm", "wpg")


class PretrainStep(nn.Module):
    """`forward(batch)` -> (weighted sum of the stage's task losses, detached logs of every task)."""

    def __init__(self, model: MVPTRModel, tasks: Sequence[str], options: Mapping[str, Mapping[str, Any]],
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown pre-training task(s) {unknown}; allowed: {', '.join(TASKS)}")
        if not tasks:
            raise ValueError("a training stage needs at least one task with a weight above 0")
        self.model = model
        self.tasks = list(tasks)
        self.options = {name: dict(options[name]) for name in self.tasks}
        self.generator = generator

    def _loss(self, name: str, batch: Mapping[str, Tensor], encoded: PairEncoding | None) -> tuple[Tensor, dict]:
        opts, gen = self.options[name], self.generator
        if name == "mcr":
            return mcr_loss(self.model, batch, text=opts["text"], mask_prob=opts["mask_prob"], generator=gen)
        if name == "vsc":
            return vsc_loss(self.model, batch, encoded, gather=opts["gather"])
        if name == "itm":
            return itm_loss(self.model, batch, encoded, sampling=opts["sampling"],
                            released_quirk=opts["released_quirk"], generator=gen)
        if name == "mlm":
            return mlm_loss(self.model, batch, encoded, mask_prob=opts["mask_prob"], generator=gen)
        return wpg_loss(self.model, batch, encoded, margin=opts["margin"], topk=opts["topk"],
                        released_quirk=self.options.get("itm", {}).get("released_quirk", False), generator=gen)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        encoded = PairEncoding(self.model, batch) if any(t in _PAIR_TASKS for t in self.tasks) else None
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for name in self.tasks:
            loss, task_logs = self._loss(name, batch, encoded)
            weighted = self.options[name]["weight"] * loss
            total = weighted if total is None else total + weighted
            logs.update({f"loss_{name}": loss.detach(), **{k: v for k, v in task_logs.items() if k != name}})
        logs["loss"] = total.detach()
        return total, logs
