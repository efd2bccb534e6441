"""The heads that several objectives (and methods) share: the tied LM head, the ITM head, the contrastive head.

Why one place: MVPTR's MCR and MLM and SIMLA's MLM and XMM all predict word pieces with the LM head tied to the
shared word embeddings; MVPTR's VSC and SIMLA's ITC both project the text [CLS] and the image vector for a
contrastive loss; every method's ITM judges a pair from the pooled joint vector. An objective names the head
it needs (`Objective.head_name`: "lm", "itm", "contrastive"); the model builds each named head once. `MLPHead` is
VinVL's classifier, on the pooled joint vector of SemVLP's QA objective and of the downstream task heads.

Use: `model.heads["lm"](hidden)`, `model.match_logits(fusion)`, `model.contrastive_embeddings(text, image)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig

def upcast(x: Tensor) -> Tensor:
    """At least float32 (the similarities of a bf16 model are computed in float32; a float64 model keeps its
    precision, as the gradient tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


# ALBEF's bounds for a learnable temperature.
TEMPERATURE_RANGE = (0.001, 0.5)


def lm_head(config: VLConfig) -> nn.Module:
    """BERT's LM head over the whole shared table (words, concepts, tags); the model ties its decoder weight to
    the word embeddings."""
    # transformers is imported when a model is built, not when the config is validated (objectives' schemas).
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    return BertLMPredictionHead(config.bert_config())


def itm_head(config: VLConfig) -> nn.Module:
    """Linear(hidden -> 2) on the pooled joint vector; class 1 = the pair matches."""
    return nn.Linear(config.hidden_size, 2)


class ContrastiveHead(nn.Module):
    """Projections of the text [CLS] and of the image vector to `embedding_dim`, L2-normalised, and a
    learnable temperature (initialised at `temperature_init`, clamped to TEMPERATURE_RANGE by the losses)."""

    def __init__(self, config: VLConfig) -> None:
        super().__init__()
        hidden, dim, bias = config.hidden_size, config.embedding_dim, config.projection_bias
        self.text_proj = nn.Linear(hidden, dim, bias=bias)
        self.image_proj = nn.Linear(hidden, dim, bias=bias)
        self.temperature_init = config.temperature_init
        self.temperature = nn.Parameter(torch.tensor(config.temperature_init))

    def reset_extra_parameters(self) -> None:
        """The model's weight initialisation calls this: the temperature is not a Linear/LayerNorm weight."""
        with torch.no_grad():
            self.temperature.fill_(self.temperature_init)

    def embed_text(self, text_cls: Tensor) -> Tensor:
        return F.normalize(upcast(self.text_proj(text_cls)), dim=-1)

    def embed_image(self, image_cls: Tensor) -> Tensor:
        return F.normalize(upcast(self.image_proj(image_cls)), dim=-1)

    @torch.no_grad()
    def clamp_temperature(self, low: float = TEMPERATURE_RANGE[0], high: float = TEMPERATURE_RANGE[1]) -> None:
        self.temperature.clamp_(low, high)


class MLPHead(nn.Sequential):
    """Linear(in -> 2 in) - GELU - LayerNorm - Linear(2 in -> out), BERT-initialised (N(0, std), zero bias)."""

    def __init__(self, in_dim: int, out_dim: int, layer_norm_eps: float = 1e-12, std: float = 0.02) -> None:
        hidden = 2 * in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=layer_norm_eps),
                         nn.Linear(hidden, out_dim))
        for module in (self[0], self[3]):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)
