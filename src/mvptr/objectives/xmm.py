"""XMM, the image side of SIMLA's cross-modality reconstruction: masked regions recovered with the caption's help.

Why: MLM makes the text borrow from the image; XMM's image side makes the image borrow from the text. The
released code masks BEiT blocks of patches and predicts their dVAE tokens; this project has regions and tags
(METHODS.md, SIMLA), so a masked region is reconstructed as its object tag (classification over the shared
word-piece table), its feature (regression), or both (`target`).

Per step:
    masked     each real region with probability `mask_prob`, and at least one region of every image that has
               one (an image of 1-4 regions would often get none otherwise); the masked regions' embeddings
               are replaced by the model's learned mask embedding before the image encoder
    reconstruct  the image tokens through the shared stack as queries, cross-attending to the caption's
               embeddings (`SIMLAModel.reconstruct_image`, as the released code), at the masked regions
    tag        CE(xmm head's tag logits, the region's tag as its first word piece); with `distill` > 0 mixed
               with the momentum model's predictions: (1 - a) CE(hard) + a CE(softmax(teacher logits)),
               a = distill x the ramp (the released code distils its MIM the same way)
    feature    MSE(xmm head's feature prediction, the region's own feature), no distillation
    both       the sum of the two
Needs a model with `reconstruct_image`, `embed_tokens` and masked-region support in `encode_image`
(`mvptr.models.simla`). Batch keys: input_ids, attention_mask, region_feats, region_boxes, region_mask,
region_tags.

Options (`pretrain.objectives.xmm`): weight, mask_prob, target (tag | feature | both), distill.

Use: `loss, logs = XMM(options, model.config)(model, batch, encoded, ctx)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, distill_weight, share
from mvptr.objectives.reconstruction import TARGETS, ReconstructionHead, mask_regions, reconstruction_loss

if TYPE_CHECKING:
    from mvptr.models.base import VLModel


def reconstructed(model: VLModel, batch: Batch, masked: Tensor) -> Tensor:
    """(N, H) the masked regions' states after `reconstruct_image` (the caption unmasked)."""
    image = model.encode_image({**batch, "masked_regions": masked})
    text = model.embed_tokens(batch["input_ids"])
    return model.reconstruct_image(image, text, batch["attention_mask"])[masked]


class XMM(Objective):
    name = "xmm"
    head_name = "xmm"
    options_schema = {
        "mask_prob": share("share of each image's regions masked (at least one)"),
        "target": {"enum": list(TARGETS),
                   "description": "what a masked region is reconstructed as: its tag, its feature, or both"},
        "distill": distill_weight("weight of the momentum model's tag predictions as soft targets (SIMLA 0.4)"),
    }
    head = staticmethod(ReconstructionHead)

    @property
    def uses_momentum(self) -> bool:  # type: ignore[override]
        return self.options["distill"] > 0 and self.options["target"] != "feature"

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        target = self.options["target"]
        masked = mask_regions(batch["region_mask"], self.options["mask_prob"], ctx.generator)
        states = reconstructed(model, batch, masked)
        alpha = self.options["distill"] * ctx.ramp
        teacher_logits = None
        if states.shape[0] and target != "feature" and alpha > 0 and ctx.momentum is not None:
            with torch.no_grad():
                teacher_logits = ctx.momentum.heads["xmm"].tag(reconstructed(ctx.momentum, batch, masked)).float()
        return reconstruction_loss(model.heads["xmm"], states, batch, masked, target, "xmm", teacher_logits, alpha)


OBJECTIVE = XMM
