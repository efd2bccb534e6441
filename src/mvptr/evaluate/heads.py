"""The task heads put on a pre-trained MVPTR model for fine-tuning, and the forward passes that feed them.

Why: every downstream task reads the same pre-trained stacks in its own way (METHODS.md, "Downstream"):
    vqa      MLPHead(H -> answers) on the pooled cross-modal [CLS]; soft-score BCE
    ve       MLPHead(H -> 3) on the pooled cross-modal [CLS]
    nlvr2    the text through the cross-modal encoder with each image, the two pooled vectors concatenated,
             MLPHead(2H -> 2)
    rec      no parameters: each region's score is cosine(text [CLS], region) after the first `layer`
             cross-modal layers (an early layer, where the regions still carry their own content)
    retrieval  the model's own VSC projections and ITM head (no new head)
MLPHead is VinVL/Oscar's classifier: Linear(in -> 2 in) - GELU - LayerNorm - Linear(2 in -> out).

Use:
    text = model.encode_text(input_ids, attention_mask)
    logits = head(pooled(model, text, attention_mask, image_batch))           # image_batch: collate_image
    scores = region_scores(model, text, attention_mask, image_batch, layer=1)  # (B, R), masked regions -inf
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from mvptr.models.mvptr import MVPTRModel
from mvptr.tasks import encode_image


class MLPHead(nn.Sequential):
    """Linear(in -> 2 in) - GELU - LayerNorm - Linear(2 in -> out), BERT-initialised (N(0, std), zero bias)."""

    def __init__(self, in_dim: int, out_dim: int, layer_norm_eps: float = 1e-12, std: float = 0.02) -> None:
        hidden = 2 * in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=layer_norm_eps),
                         nn.Linear(hidden, out_dim))
        for module in (self[0], self[3]):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)


def pooled(model: MVPTRModel, text_hidden: Tensor, text_mask: Tensor, images: Mapping[str, Tensor]) -> Tensor:
    """(B, H) pooler output of the cross-modal encoder over each text and its image (a collate_image batch)."""
    image = encode_image(model, images)
    return model.pooler(model.cross(text_hidden, text_mask, image.regions, images["region_mask"]))


def early_cross(model: MVPTRModel, text_hidden: Tensor, text_mask: Tensor, region_hidden: Tensor,
                region_mask: Tensor, num_layers: int) -> Tensor:
    """(B, L + R, H) output of the first `num_layers` cross-modal layers (`model.cross` runs all of them)."""
    layers = model.cross_encoder.layer
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"evaluate.rec.layer must be in [1, {len(layers)}] (the cross-modal layers), "
                         f"got {num_layers}")
    hidden = torch.cat([text_hidden, region_hidden], dim=1)
    mask = torch.cat([text_mask.bool(), region_mask.bool()], dim=1)
    attention = create_bidirectional_mask(config=model.cross_encoder.config, inputs_embeds=hidden,
                                          attention_mask=mask)
    for layer in layers[:num_layers]:
        hidden = layer(hidden, attention)
    return hidden


def region_scores(model: MVPTRModel, text_hidden: Tensor, text_mask: Tensor, images: Mapping[str, Tensor],
                  layer: int) -> Tensor:
    """(B, R) cosine of the text [CLS] with each region after `layer` cross-modal layers; -inf on padding."""
    image = encode_image(model, images)
    hidden = early_cross(model, text_hidden, text_mask, image.regions, images["region_mask"], layer)
    text_cls, regions = hidden[:, 0], hidden[:, text_hidden.shape[1]:]
    scores = F.cosine_similarity(regions.float(), text_cls.float()[:, None, :], dim=-1)
    return scores.masked_fill(~images["region_mask"].bool(), float("-inf"))
