"""Masked region modelling, shared by SIMLA's XMM (image side) and SemVLP's masked object prediction (MOP).

Why one place: both objectives mask regions the same way, reconstruct a masked region as its object tag
(classification over the shared word-piece table), its feature (regression), or both, from a head of the same
shape; only where the reconstructed states come from differs (XMM: the image tokens cross-attending to the
caption, `SIMLAModel.reconstruct_image`; MOP: the fusion's region outputs in the step's stream mode).

    mask_regions         each real region with probability p, and at least one of every image that has one
    region_targets       the masked regions' targets: their tag (first word piece) and their own feature
    reconstruction_loss  CE on the tags and/or MSE on the features, with an optional soft tag target (XMM's
                         distillation from the momentum model)

Use:
    masked = mask_regions(batch["region_mask"], 0.15, generator)
    states = ...                                                   # (N, H) the masked regions' states
    loss, logs = reconstruction_loss(model.heads["mop"], states, batch, masked, "both", prefix="mop")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvptr.objectives import Batch, Logs
from mvptr.objectives.sampling import uniform

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig

TARGETS = ("tag", "feature", "both")


class ReconstructionHead(nn.Module):
    """From a reconstructed region state: tag logits over the shared table, and the region's feature."""

    def __init__(self, config: VLConfig) -> None:
        super().__init__()
        self.tag = nn.Linear(config.hidden_size, config.vocab_size)
        self.feature = nn.Linear(config.hidden_size, config.region_feature_dim)


def mask_regions(region_mask: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """(B, R) bool: each real region with probability `prob`, and one uniformly chosen real region of every
    image where none was picked (an image of 1-4 regions would often get none otherwise)."""
    real = region_mask.bool()
    picked = real & (uniform(real.shape, region_mask, generator) < prob)
    # A fallback pick per image: the real region with the highest uniform draw.
    draws = uniform(real.shape, region_mask, generator).masked_fill(~real, -1.0)
    fallback = torch.zeros_like(real).scatter_(1, draws.argmax(dim=1, keepdim=True), True) & real
    need = real.any(dim=1) & ~picked.any(dim=1)
    return picked | (fallback & need[:, None])


def region_targets(batch: Batch, masked: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) the masked regions' tags as word pieces and (N, D) float32 their original features, in the order of
    `states = fusion_regions[masked]` (row-major over (B, R))."""
    return batch["region_tags"][masked], batch["region_feats"][masked].float()


def reconstruction_loss(head: nn.Module, states: Tensor, batch: Batch, masked: Tensor, target: str,
                        prefix: str, teacher_logits: Tensor | None = None, alpha: float = 0.0) -> tuple[Tensor, Logs]:
    """Loss of the masked regions' `states` (N, H) against `region_targets`: CE on the tags (`target` tag or
    both; mixed with softmax(`teacher_logits`) at weight `alpha` when given) and/or MSE on the features
    (feature or both). A batch with nothing masked gives a zero that still reaches the states' graph."""
    from mvptr.objectives.mlm import distilled_cross_entropy

    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    loss = states.sum() * 0.0
    logs: Logs = {f"{prefix}_masked": masked.float().sum()}
    if not states.shape[0]:
        return loss, logs
    tags, features = region_targets(batch, masked)
    if target in ("tag", "both"):
        logits = head.tag(states).float()
        if teacher_logits is not None and alpha > 0:
            tag_loss = distilled_cross_entropy(logits, tags, teacher_logits, alpha)
        else:
            tag_loss = F.cross_entropy(logits, tags)
        logs[f"{prefix}_tag"] = tag_loss.detach()
        logs[f"{prefix}_tag_accuracy"] = (logits.argmax(dim=1) == tags).float().mean()
        loss = loss + tag_loss
    if target in ("feature", "both"):
        feature_loss = F.mse_loss(head.feature(states).float(), features)
        logs[f"{prefix}_feature"] = feature_loss.detach()
        loss = loss + feature_loss
    return loss, logs
