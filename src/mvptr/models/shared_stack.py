"""What the methods built on one shared BERT stack have in common: SIMLA (text / multimodal mode) and SemVLP
(single- / two-stream mode).

Why: both spend MVPTR's layer budget on one stack of model.num_text_layers + model.num_cross_layers layers
(12 at BERT-base), whose every layer a fusion can run (so REC's `evaluate.rec.layer` may go up to all of them);
keeping the depth and its bounds in one place keeps the two methods' budgets the same.

Use: `class SIMLAConfig(SharedStackConfig)`, `class SIMLAModel(SharedStackModel)`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mvptr.models.base import VLConfig, VLModel


class SharedStackConfig(VLConfig):
    """`VLConfig` with the depth of the shared stack."""

    num_text_layers: int = 6
    num_cross_layers: int = 6

    @property
    def num_shared_layers(self) -> int:
        return self.num_text_layers + self.num_cross_layers


class SharedStackModel(VLModel):
    """A model whose fusion runs the shared stack (`self.encoder`, `config.num_shared_layers` layers)."""

    config: SharedStackConfig

    @classmethod
    def fusion_layers(cls, cfg: Mapping[str, Any]) -> int:
        return cfg["model"]["num_text_layers"] + cfg["model"]["num_cross_layers"]

    @property
    def num_fusion_layers(self) -> int:
        return self.config.num_shared_layers
