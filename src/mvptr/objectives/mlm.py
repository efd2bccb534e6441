"""MLM, masked language modelling conditioned on the image (MVPTR stage two).

Why: predicting a masked word from the cross-modal outputs makes the text borrow from the regions. Caption
word pieces are masked BERT-style (special tokens and concepts are not candidates), and every textual concept
parsed from a masked word is replaced by [MASK] too (the word -> concept map `concept_links`), so the concept
("dog", or "red circle") cannot give the word away. The masked text goes through the text encoder, then the
cross-modal encoder with the matched image's regions; the tied LM head predicts the original words at the
masked word positions (concept positions are masked but not predicted, as in the released code).

Batch keys: input_ids, attention_mask, concept_mask, concept_links, tag_ids, tag_mask, region_feats,
region_boxes, region_mask.

Options (`pretrain.objectives.mlm`): weight, mask_prob. SIMLA's MLM (with distillation) is `mvptr.objectives.xmm`.

Use: `loss, logs = mlm_loss(model, batch, encoded, generator=g)` (only `encoded.image` is reused: the text is
encoded again, masked)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, distill_weight, share
from mvptr.objectives.heads import lm_head
from mvptr.objectives.masking import IGNORE_INDEX, mask_linked_concepts, mask_tokens, maskable, token_prediction_loss

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig, VLModel


def mask_caption(batch: Batch, config: VLConfig, mask_prob: float = 0.15,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(masked input_ids, labels): words masked BERT-style, and the concepts linked to a masked word -> [MASK]."""
    ids = batch["input_ids"]
    words = maskable(ids, batch["attention_mask"], config.special_token_ids) & ~batch["concept_mask"].bool()
    masked, labels = mask_tokens(ids, words, config.mask_token_id, config.vocab_size, generator, mask_prob)
    masked = mask_linked_concepts(masked, labels != IGNORE_INDEX, batch["concept_links"], config.mask_token_id)
    return masked, labels


def fused_masked_text(model: VLModel, batch: Batch, image: Any, masked: Tensor) -> Tensor:
    """(B, L, H) the masked text, encoded and fused with `image`, at the text positions."""
    attention_mask = batch["attention_mask"]
    return model.fuse(model.encode_text(masked, attention_mask).tokens, attention_mask, image).text


def distilled_cross_entropy(logits: Tensor, labels: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """(1 - alpha) * CE(logits, labels) + alpha * CE(logits, softmax(teacher_logits)) (ALBEF's distillation)."""
    hard = F.cross_entropy(logits, labels)
    soft = -(F.softmax(teacher_logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return (1 - alpha) * hard + alpha * soft


def mlm_loss(model: VLModel, batch: Batch, encoded: PairEncoding | None = None, *, mask_prob: float = 0.15,
             generator: torch.Generator | None = None, teacher: VLModel | None = None,
             teacher_image: Any = None, alpha: float = 0.0) -> tuple[Tensor, Logs]:
    """Cross-entropy of the masked words, predicted from the cross-modal outputs of the matched pairs; with a
    `teacher` (the momentum model) and alpha > 0, distilled towards the teacher's predictions on the same
    masked input (`teacher_image`: the teacher's encoding of the images, if already computed)."""
    image = encoded.image if encoded is not None else model.encode_image(batch)
    masked, labels = mask_caption(batch, model.config, mask_prob, generator)
    picked = labels != IGNORE_INDEX
    hidden = fused_masked_text(model, batch, image, masked)
    if not picked.any() or teacher is None or alpha == 0:
        loss = token_prediction_loss(model.heads["lm"], hidden, labels)
    else:
        with torch.no_grad():
            if teacher_image is None:
                teacher_image = teacher.encode_image(batch)
            teacher_hidden = fused_masked_text(teacher, batch, teacher_image, masked)
            teacher_logits = teacher.heads["lm"](teacher_hidden[picked]).float()
        logits = model.heads["lm"](hidden[picked]).float()
        loss = distilled_cross_entropy(logits, labels[picked], teacher_logits, alpha)
    return loss, {"mlm": loss.detach()}


class MLM(Objective):
    name = "mlm"
    head_name = "lm"
    options_schema = {
        "mask_prob": share("share of the caption's word pieces masked"),
        "distill": distill_weight("weight of the momentum model's soft targets (SIMLA 0.4; 0 = none)"),
    }
    head = staticmethod(lm_head)

    @property
    def uses_momentum(self) -> bool:  # type: ignore[override]
        return self.options["distill"] > 0

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        alpha = self.options["distill"] * ctx.ramp
        teacher_image = ctx.teacher(batch).image if alpha > 0 and ctx.momentum is not None else None
        return mlm_loss(model, batch, encoded, mask_prob=self.options["mask_prob"], generator=ctx.generator,
                        teacher=ctx.momentum, teacher_image=teacher_image, alpha=alpha)


OBJECTIVE = MLM
