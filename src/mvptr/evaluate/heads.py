"""The task heads put on a pre-trained model for fine-tuning, and the forward passes that feed them.

Why: every downstream task reads the same pre-trained model in its own way (METHODS.md, "Downstream"), through
the interface every method implements (`mvptr.models.base`), so that all methods get the same protocol:
    vqa      MLPHead(H -> answers) on the pooled joint vector (`model.pool`); soft-score BCE
    ve       MLPHead(H -> 3) on the pooled joint vector
    nlvr2    the text fused with each image, the two pooled vectors concatenated, MLPHead(2H -> 2)
    rec      no parameters: each region's score is cosine(text [CLS], region) after the first `layer`
             cross-modal layers (`model.fuse(..., num_layers=layer)`; an early layer, where the regions
             still carry their own content)
    retrieval  the model's own contrastive embeddings and ITM head (no new head)
MLPHead (`mvptr.objectives.heads`) is VinVL/Oscar's classifier: Linear(in -> 2 in) - GELU - LayerNorm -
Linear(2 in -> out).

Use:
    tokens = model.encode_text(input_ids, attention_mask).tokens
    logits = head(pooled(model, tokens, attention_mask, image_batch))           # image_batch: collate_image
    scores = region_scores(model, tokens, attention_mask, image_batch, layer=1)  # (B, R), masked regions -inf
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from mvptr.models.base import VLModel


def pooled(model: VLModel, text_hidden: Tensor, text_mask: Tensor, images: Mapping[str, Tensor]) -> Tensor:
    """(B, H) the model's pooled joint vector of each text and its image (a collate_image batch)."""
    return model.pool(model.fuse(text_hidden, text_mask, model.encode_image(images)))


def region_scores(model: VLModel, text_hidden: Tensor, text_mask: Tensor, images: Mapping[str, Tensor],
                  layer: int) -> Tensor:
    """(B, R) cosine of the text [CLS] with each region after `layer` cross-modal layers; -inf on padding."""
    if not 1 <= layer <= model.num_fusion_layers:
        raise ValueError(f"evaluate.rec.layer must be in [1, {model.num_fusion_layers}] (the model's cross-modal "
                         f"layers), got {layer}")
    fusion = model.fuse(text_hidden, text_mask, model.encode_image(images), num_layers=layer)
    scores = F.cosine_similarity(fusion.regions.float(), fusion.text[:, 0].float()[:, None, :], dim=-1)
    return scores.masked_fill(~images["region_mask"].bool(), float("-inf"))
