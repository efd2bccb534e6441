"""MCR, masked concept recovering (MVPTR stage one): recover masked concepts from a uni-modal encoder.

Why: before the modalities meet, each encoder should learn the link between its low level (regions, words)
and its concepts. Object tags are masked BERT-style and their word pieces predicted from the visual
encoder's outputs with the LM head tied to the word embeddings. The paper also recovers textual concepts
from the text encoder; the released code turns that side off, so it is the option `text=True` (config
`mcr.text`). Concept rows are part of the shared table, so one head scores tags, words and concepts.

Batch keys: tag_ids, tag_mask, region_feats, region_boxes, region_mask; with text=True also input_ids,
attention_mask, concept_mask (see `mvptr.objectives`). Needs a model that encodes tags (`ImageEncoding.tags`).

Options (`pretrain.objectives.mcr`): weight, text, mask_prob. Stage one (uni-modal).

Use: `loss, logs = mcr_loss(model, batch, text=False, generator=g)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, share
from mvptr.objectives.heads import lm_head
from mvptr.objectives.masking import mask_tokens, maskable, token_prediction_loss

if TYPE_CHECKING:
    from mvptr.models.base import VLModel


def _visual_loss(model: VLModel, batch: Batch, mask_prob: float, generator: torch.Generator | None) -> Tensor:
    config = model.config
    tag_ids = batch["tag_ids"]
    candidates = maskable(tag_ids, batch["tag_mask"], config.special_token_ids)
    masked, labels = mask_tokens(tag_ids, candidates, config.mask_token_id, config.vocab_size, generator, mask_prob)
    image = model.encode_image({**batch, "tag_ids": masked})
    return token_prediction_loss(model.heads["lm"], image.tags, labels)


def _text_loss(model: VLModel, batch: Batch, mask_prob: float, generator: torch.Generator | None) -> Tensor:
    config = model.config
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    candidates = maskable(ids, attention_mask, config.special_token_ids) & batch["concept_mask"].bool()
    masked, labels = mask_tokens(ids, candidates, config.mask_token_id, config.vocab_size, generator, mask_prob)
    return token_prediction_loss(model.heads["lm"], model.encode_text(masked, attention_mask).tokens, labels)


def mcr_loss(model: VLModel, batch: Batch, *, text: bool = False, mask_prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[Tensor, Logs]:
    """Masked tag recovery from the visual encoder (+ masked textual-concept recovery from the text encoder
    when `text`); the two cross-entropies are added."""
    loss = _visual_loss(model, batch, mask_prob, generator)
    logs = {"mcr_visual": loss.detach()}
    if text:
        text_loss = _text_loss(model, batch, mask_prob, generator)
        logs["mcr_text"] = text_loss.detach()
        loss = loss + text_loss
    return loss, logs


class MCR(Objective):
    name = "mcr"
    stage = 1
    uses_pairs = False
    head_name = "lm"
    options_schema = {
        "text": {"type": "boolean", "description": "also recover textual concepts (the paper; released code: false)"},
        "mask_prob": share("share of the tags (and concepts) masked"),
    }
    head = staticmethod(lm_head)

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        return mcr_loss(model, batch, text=self.options["text"], mask_prob=self.options["mask_prob"],
                        generator=ctx.generator)


OBJECTIVE = MCR
