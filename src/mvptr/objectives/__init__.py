"""Pre-training objectives as plug-ins: one module each, found by the name a method's config gives it.

Why: an objective is its loss, the head it needs, its options and their schema, all in one module
`mvptr.objectives.<name>` that exports `OBJECTIVE` (a subclass of `Objective`). A method's config
(`configs/methods/<method>.yaml`, `pretrain.objectives`) names the objectives it trains, with their weights and
options; nothing else lists them. From the modules the project derives what was kept by hand before:
    the objectives of each stage       `Objective.stage` (1: uni-modal, MVPTR's stage one; 2: cross-modal)
    which share the pair encoding      `Objective.uses_pairs` (one `PairEncoding` per step for all of them)
    the schema of their options        `Objective.options_schema` (added to the config schema, see config.py)
    the model's heads                  `Objective.head_name` / `Objective.head(config)` (`build_heads`)
    the momentum model                 `Objective.uses_momentum` (SIMLA's distillation; `mvptr.objectives.momentum`)
    questions in the batches           `Objective.uses_questions` (SemVLP's QA; `mvptr.questions`)
Lookup is by module name (`load_objective`): no registry filled by import side effects.

Batch (a mapping of tensors; B pairs, L text slots, T tag slots, R region slots):
    input_ids       (B, L) long   [CLS] words concepts [SEP], then padding (concepts take the next positions)
    attention_mask  (B, L)        1 on real tokens
    concept_mask    (B, L) bool   True on the textual-concept positions
    concept_links   (B, L, L) bool  [b, c, w] True when the concept at position c was parsed from the word at
                                  position w (the word -> concept map: masking word w masks concept c)
    tag_ids         (B, T) long   [CLS] tags [SEP], then padding (tags as word pieces)
    tag_mask        (B, T)
    region_feats    (B, R, D)     region features (float16 is fine)
    region_boxes    (B, R, 6)     [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
    region_mask     (B, R)
    region_tags     (B, R) long   each region's object tag as its first word piece (0 on padding)
    image_ids       (B,) long     which image each pair shows (duplicates are never negatives)
    caption_ids     (B,) long     optional: which caption (identical token ids also count as the same caption)
    question_ids, question_mask, answer_scores, has_question   when an objective uses questions (`mvptr.questions`)

An objective's `forward(model, batch, encoded, ctx)` returns `(loss, logs)`: a scalar tensor and a dict of
detached scalars; `mvptr.objectives.step.PretrainStep` sums the weighted losses.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mvptr.models.base import ImageEncoding, TextEncoding, VLConfig, VLModel

Batch = Mapping[str, Tensor]
Logs = dict[str, Tensor]
# Modules of this package that are helpers, not objectives.
_HELPERS = {"heads", "masking", "momentum", "reconstruction", "sampling", "step"}


@dataclass
class StepContext:
    """What an objective may read besides the model and the batch."""

    generator: torch.Generator | None = None  # masking and sampling draws (checkpointed by the trainer)
    step: int = 0  # optimiser steps done before this one
    momentum: VLModel | None = None  # the EMA copy of the model, when an objective uses one
    # Factor of the distillation weights, min(1, step / ramp steps): ALBEF and SIMLA ramp alpha up from 0.
    ramp: float = 1.0
    _teacher: PairEncoding | None = field(default=None, repr=False)

    def teacher(self, batch: Batch) -> PairEncoding:
        """The momentum model's uni-modal encodings of the batch, computed once per step for every objective
        that distils or queues (ITC, MLM, PSL), without gradient."""
        if self._teacher is None:
            with torch.no_grad():
                self._teacher = PairEncoding(self.momentum, batch)
        return self._teacher


class PairEncoding:
    """The uni-modal encodings of a batch's matched pairs, and their fusion computed once, on first use, so
    that the objectives of a step share one forward of each encoder."""

    def __init__(self, model: VLModel, batch: Batch) -> None:
        self.model = model
        self.batch = batch
        self.text: TextEncoding = model.encode_text(batch["input_ids"], batch["attention_mask"])
        self.image: ImageEncoding = model.encode_image(batch)

    @cached_property
    def fused(self):
        """The cross-modal output of the matched pairs (`mvptr.models.base.Fusion`)."""
        return self.model.fuse(self.text.tokens, self.batch["attention_mask"], self.image)


class Objective(nn.Module):
    """One objective: `forward(model, batch, encoded, ctx) -> (loss, logs)` with its validated options.

    An objective that keeps state across steps (SIMLA's queues) registers it as buffers: the trainer saves the
    step's whole state dict in the checkpoint, so a resumed run continues with the same state.
    """

    name: ClassVar[str]
    stage: ClassVar[int] = 2
    uses_pairs: ClassVar[bool] = True
    uses_momentum: ClassVar[bool] = False
    # The pairs' batches carry a VQA training question each (`mvptr.questions`, SemVLP's QA).
    uses_questions: ClassVar[bool] = False
    head_name: ClassVar[str | None] = None
    # JSON-schema properties of the options besides `weight` (all required).
    options_schema: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Mapping[str, Any], config: VLConfig) -> None:
        super().__init__()
        self.options = dict(options)

    @classmethod
    def schema_with(cls, objectives: Sequence[str]) -> dict[str, Any]:
        """`options_schema` given the method's other objectives (an option may need one of them)."""
        return cls.options_schema

    @classmethod
    def head(cls, config: VLConfig) -> nn.Module | None:
        """The head this objective adds to the model under `head_name` (shared by objectives naming it)."""
        return None

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,  # type: ignore[override]
                ctx: StepContext) -> tuple[Tensor, Logs]:
        raise NotImplementedError


def share(description: str) -> dict[str, Any]:
    """The schema of an option that is a share in (0, 1] (a masking probability)."""
    return {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": description}


def distill_weight(description: str) -> dict[str, Any]:
    """The schema of a distillation weight in [0, 1] (0 = no distillation; SIMLA 0.4)."""
    return {"type": "number", "minimum": 0, "maximum": 1, "description": description}


def available_objectives() -> list[str]:
    """The objective modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _HELPERS)


def load_objective(name: str) -> type[Objective]:
    """The `OBJECTIVE` class of `mvptr.objectives.<name>`; ValueError naming the choices if there is none."""
    if name not in available_objectives():
        raise ValueError(f"unknown objective {name!r}; objectives: {', '.join(available_objectives())}")
    return importlib.import_module(f"{__name__}.{name}").OBJECTIVE


def options_schema(name: str, objectives: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON schema of `pretrain.objectives.<name>`: its weight and its own options, all required, given the
    method's `objectives`."""
    cls = load_objective(name)
    properties = {"weight": {"type": "number", "minimum": 0,
                             "description": "weight of the objective in the summed loss (0 = off)"},
                  **cls.schema_with(objectives)}
    return {"type": "object", "additionalProperties": False, "required": sorted(properties),
            "properties": properties}


def uses_questions(names: list[str]) -> bool:
    """Whether any of the objectives `names` reads questions from the batches."""
    return any(load_objective(name).uses_questions for name in names)


def build_heads(config: VLConfig) -> nn.ModuleDict:
    """One head per distinct `head_name` of the config's objectives (those that declare one)."""
    heads = nn.ModuleDict()
    for name in config.objectives or []:
        cls = load_objective(name)
        if cls.head_name and cls.head_name not in heads:
            head = cls.head(config)
            if head is not None:
                heads[cls.head_name] = head
    return heads
