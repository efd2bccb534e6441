"""QA, image question answering as a pre-training objective (SemVLP), on the VQA training questions only.

Why: SemVLP pre-trains with image QA besides MLM, MOP and ITM (METHODS.md, SemVLP): answering a question about
the image forces the fusion to carry what the question asks for (counts, colours, relations). The questions
are the world's VQA *training* questions of pre-training images; `mvptr.questions.QuestionBank` keeps out
every question of a validation or test image and builds the answer vocabulary from the kept questions, so the
evaluation's questions are never seen.

Per step: each pair of the batch carries one question about its image (or none); the question (`[CLS]
question [SEP]`, no concepts) is fused with the pair's image in the step's stream mode, and the QA head
(`MLPHead`, VinVL's classifier, over `model.config.qa_answers` answers) on the pooled joint vector is trained
with the soft-score BCE of VQA fine-tuning (summed over answers, averaged over questions).

Batch keys: question_ids, question_mask, answer_scores, has_question (`mvptr.questions`), region_feats,
region_boxes, region_mask. Options (`pretrain.objectives.qa`): weight.

Use: `loss, logs = QA(options, model.config)(model, batch, encoded, ctx)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig, VLModel


def qa_head(config: VLConfig) -> nn.Module:
    from mvptr.objectives.heads import MLPHead

    if not hasattr(config, "qa_answers"):
        raise ValueError(f"objective qa needs a model config with qa_answers (SemVLP's); {type(config).__name__} "
                         "has none")
    return MLPHead(config.hidden_size, config.qa_answers, config.layer_norm_eps, config.initializer_range)


class QA(Objective):
    name = "qa"
    head_name = "qa"
    uses_questions = True
    head = staticmethod(qa_head)

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        head = model.heads["qa"]
        has = batch["has_question"].bool()
        if not has.any():
            # No pair of this batch has a question: a zero that still reaches the head (DDP sees every rank's).
            return sum(p.sum() for p in head.parameters()) * 0.0, {"qa_questions": has.float().sum()}
        image = encoded.image if encoded is not None else model.encode_image(batch)
        ids, mask = batch["question_ids"][has], batch["question_mask"][has]
        fusion = model.fuse(model.encode_text(ids, mask).tokens, mask, image.rows(has))
        logits = head(model.pool(fusion)).float()
        targets = batch["answer_scores"][has].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
        best = targets.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return loss, {"qa": loss.detach(), "qa_questions": has.float().sum(), "qa_score": best.detach()}


OBJECTIVE = QA
