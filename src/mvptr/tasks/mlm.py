"""MLM, masked language modelling conditioned on the image (MVPTR stage two).

Why: predicting a masked word from the cross-modal outputs makes the text borrow from the regions. Caption
word pieces are masked BERT-style (special tokens and concepts are not candidates), and every textual concept
parsed from a masked word is replaced by [MASK] too (the word -> concept map `concept_links`), so the concept
("dog", or "red circle") cannot give the word away. The masked text goes through the text encoder, then the
cross-modal encoder with the matched image's regions; the tied LM head predicts the original words at the
masked word positions (concept positions are masked but not predicted, as in the released code).

Batch keys: input_ids, attention_mask, concept_mask, concept_links, tag_ids, tag_mask, region_feats,
region_boxes, region_mask.

Use: `loss, logs = mlm_loss(model, batch, encoded, generator=g)` (only `encoded.image` is reused: the text is
encoded again, masked)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mvptr.tasks import Batch, Logs, PairEncoding, encode_image
from mvptr.tasks.masking import IGNORE_INDEX, mask_linked_concepts, mask_tokens, maskable, token_prediction_loss

if TYPE_CHECKING:
    from mvptr.models.mvptr import MVPTRConfig, MVPTRModel


def mask_caption(batch: Batch, config: MVPTRConfig, mask_prob: float = 0.15,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(masked input_ids, labels): words masked BERT-style, and the concepts linked to a masked word -> [MASK]."""
    ids = batch["input_ids"]
    words = maskable(ids, batch["attention_mask"], config.special_token_ids) & ~batch["concept_mask"].bool()
    masked, labels = mask_tokens(ids, words, config.mask_token_id, config.vocab_size, generator, mask_prob)
    masked = mask_linked_concepts(masked, labels != IGNORE_INDEX, batch["concept_links"], config.mask_token_id)
    return masked, labels


def mlm_loss(model: MVPTRModel, batch: Batch, encoded: PairEncoding | None = None, *, mask_prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[Tensor, Logs]:
    """Cross-entropy of the masked words, predicted from the cross-modal outputs of the matched pairs."""
    image = encoded.image if encoded is not None else encode_image(model, batch)
    masked, labels = mask_caption(batch, model.config, mask_prob, generator)
    attention_mask = batch["attention_mask"]
    text = model.encode_text(masked, attention_mask)
    joint = model.cross(text, attention_mask, image.regions, batch["region_mask"])
    loss = token_prediction_loss(model.lm_head, joint[:, : masked.shape[1]], labels)
    return loss, {"mlm": loss.detach()}
