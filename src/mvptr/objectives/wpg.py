"""WPG, weakly-supervised phrase grounding (MVPTR stage two): phrases should find their regions.

Why: ITM only says whether a pair matches; WPG asks every phrase of a caption to find a region of its image
that is more similar to it than any region of another image, without box annotations (weak supervision).

Per METHODS.md, on L2-normalised cross-modal outputs of the matched pairs:
    s(P_i, R_j) = mean over the phrases p of text i of (a random pick among the top-k cosine similarities
                  of p to the regions of image j)                                  (k = `topk`, 3)
    loss_i      = max(0, margin + s(P_i, R_j) - s(P_i, R_i))                       (margin 0.2)
for one random other sample j of the batch. `topk=1` makes the score deterministic (the best region).

Choices, documented here because the paper leaves them open:
- Phrases are the textual-concept positions of the text (objects, attribute pairs, relation triples are the
  caption's phrases); a caption with no concept uses its word positions instead.
- P_i and R_j both come from the cross-modal output of their own matched pair (text i with image i, text j
  with image j), so WPG costs no extra forward pass.
- j is drawn uniformly among the pairs that do not share image i or caption i
  (`mvptr.objectives.sampling.allowed_negatives`; `allow_duplicates=True` only excludes i itself, as the
  released code); a sample with no such j, no phrase or no region is skipped.

Options (`pretrain.objectives.wpg`): weight, margin, topk, allow_duplicates.

Batch keys: input_ids, attention_mask, concept_mask, region_mask, image_ids (+ caption_ids), and the model
inputs of `mvptr.objectives.PairEncoding` when `encoded` is not given.

Use: `loss, logs = wpg_loss(model, batch, encoded, generator=g)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext
from mvptr.objectives.masking import maskable
from mvptr.objectives.sampling import allowed_negatives, pick_negatives, uniform

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig, VLModel

# Below every cosine (>= -1): padded regions rank last without infinities (which would make NaN at 0 weight).
_NO_REGION = -2.0


def phrase_positions(batch: Batch, config: VLConfig) -> Tensor:
    """(B, L) bool: the textual-concept positions, or the word positions for a caption without concepts."""
    real = maskable(batch["input_ids"], batch["attention_mask"], config.special_token_ids)
    concepts = real & batch["concept_mask"].bool()
    words = real & ~batch["concept_mask"].bool()
    return torch.where(concepts.any(dim=1, keepdim=True), concepts, words)


def grounding_scores(phrases: Tensor, phrase_mask: Tensor, regions: Tensor, region_mask: Tensor, topk: int = 3,
                     generator: torch.Generator | None = None) -> Tensor:
    """(B,) s(P_b, R_b): phrases (B, L, H) and regions (B, R, H) L2-normalised; masks (B, L) and (B, R)."""
    cosines = torch.einsum("blh,brh->blr", phrases, regions).masked_fill(~region_mask[:, None, :], _NO_REGION)
    k = min(topk, regions.shape[1])
    best = cosines.topk(k, dim=-1).values  # (B, L, k)
    # The pick is uniform among the top-k of the regions that exist (fewer than k for a small image).
    available = region_mask.sum(dim=1).clamp(min=1, max=k)
    pick = (uniform(phrase_mask.shape, best, generator) * available[:, None]).long()
    picked = best.gather(-1, pick.unsqueeze(-1)).squeeze(-1)  # (B, L)
    weights = phrase_mask.float()
    return (picked * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def grounding_hinge(phrases: Tensor, phrase_mask: Tensor, regions: Tensor, region_mask: Tensor, partner: Tensor, *,
                    margin: float = 0.2, topk: int = 3, generator: torch.Generator | None = None) -> Tensor:
    """(B,) max(0, margin + s(P_i, R_partner(i)) - s(P_i, R_i))."""
    positive = grounding_scores(phrases, phrase_mask, regions, region_mask, topk, generator)
    negative = grounding_scores(phrases, phrase_mask, regions[partner], region_mask[partner], topk, generator)
    return F.relu(margin + negative - positive)


def wpg_loss(model: VLModel, batch: Batch, encoded: PairEncoding | None = None, *, margin: float = 0.2,
             topk: int = 3, allow_duplicates: bool = False,
             generator: torch.Generator | None = None) -> tuple[Tensor, Logs]:
    """Mean hinge over the samples that have phrases, regions and an allowed partner."""
    if encoded is None:
        encoded = PairEncoding(model, batch)
    phrases = F.normalize(encoded.fused.text.float(), dim=-1)
    regions = F.normalize(encoded.fused.regions.float(), dim=-1)
    phrase_mask = phrase_positions(batch, model.config)
    region_mask = batch["region_mask"].bool()
    allowed = allowed_negatives(batch, allow_duplicates) & region_mask.any(dim=1)[None, :]
    partner, valid = pick_negatives(phrases.new_zeros(allowed.shape), allowed, "random", generator)
    valid = valid & phrase_mask.any(dim=1) & region_mask.any(dim=1)
    hinge = grounding_hinge(phrases, phrase_mask, regions, region_mask, partner, margin=margin, topk=topk,
                            generator=generator)
    weights = valid.float()
    loss = (hinge * weights).sum() / weights.sum().clamp(min=1.0)
    return loss, {"wpg": loss.detach()}


class WPG(Objective):
    name = "wpg"
    options_schema = {
        "margin": {"type": "number", "minimum": 0, "description": "hinge margin (METHODS.md: 0.2)"},
        "topk": {"type": "integer", "minimum": 1, "description": "top-k regions a phrase picks from (3)"},
        "allow_duplicates": {"type": "boolean", "description": "a partner may share the image or caption "
                                                               "(only i itself excluded, the released code)"},
    }

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        return wpg_loss(model, batch, encoded, margin=self.options["margin"], topk=self.options["topk"],
                        allow_duplicates=self.options["allow_duplicates"], generator=ctx.generator)


OBJECTIVE = WPG
