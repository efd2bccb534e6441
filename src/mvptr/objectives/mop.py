"""MOP, masked object prediction (SemVLP): masked regions recovered from the fusion of the step's stream mode.

Why: MLM makes the text borrow from the image; MOP makes the image borrow from the text, in whichever mode the
step runs (single-stream: through full self-attention; two-stream: through the top layers' cross-attention).
SemVLP reports feature regression and label classification of the masked objects (METHODS.md, SemVLP), as
LXMERT: the target of a masked region is its own detector feature (MSE) and its object tag, as its first word
piece (cross-entropy over the shared table), or one of the two (`target`).

Per step: each real region is masked with probability `mask_prob` (at least one per image,
`mvptr.objectives.reconstruction.mask_regions`), its embedding replaced by the model's learned mask embedding;
the unmasked caption and the masked image are fused (`model.fuse`, the step's mode); the fusion's states at the
masked regions go through the MOP head. The caption is not masked in the same pass (MLM masks the text and
keeps the image whole: one modality is masked at a time, as UNITER's conditional masking).

Batch keys: input_ids, attention_mask, region_feats, region_boxes, region_mask, region_tags. Needs a model whose
`encode_image` honours `batch["masked_regions"]` (SIMLA, SemVLP).

Options (`pretrain.objectives.mop`): weight, mask_prob, target (tag | feature | both).

Use: `loss, logs = MOP(options, model.config)(model, batch, encoded, ctx)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, share
from mvptr.objectives.reconstruction import TARGETS, ReconstructionHead, mask_regions, reconstruction_loss

if TYPE_CHECKING:
    from mvptr.models.base import VLModel


def masked_region_outputs(model: VLModel, batch: Batch, masked: Tensor, encoded: PairEncoding | None) -> Tensor:
    """(N, H) the fusion's states at the masked regions (the caption unmasked)."""
    text = encoded.text if encoded is not None else model.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encode_image({**batch, "masked_regions": masked})
    return model.fuse(text.tokens, batch["attention_mask"], image).regions[masked]


class MOP(Objective):
    name = "mop"
    head_name = "mop"
    options_schema = {
        "mask_prob": share("share of each image's regions masked (at least one; LXMERT 0.15)"),
        "target": {"enum": list(TARGETS),
                   "description": "what a masked region is predicted as: its tag, its feature, or both (SemVLP)"},
    }
    head = staticmethod(ReconstructionHead)

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        masked = mask_regions(batch["region_mask"], self.options["mask_prob"], ctx.generator)
        states = masked_region_outputs(model, batch, masked, encoded)
        return reconstruction_loss(model.heads["mop"], states, batch, masked, self.options["target"], "mop")


OBJECTIVE = MOP
