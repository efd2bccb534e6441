"""QA, image question answering as a pre-training objective (SemVLP), on the VQA training questions only.

Why: SemVLP pre-trains with image QA besides MLM, MOP and ITM (METHODS.md, SemVLP): answering a question about
the image forces the fusion to carry what the question asks for (counts, colours, relations). The questions
are the world's VQA *training* questions of pre-training images; `mvptr.questions.QuestionBank` keeps out
every question of a validation or test image and builds the answer vocabulary from the kept questions, so the
evaluation's questions are never seen.

Per step: each pair of the batch carries one question about its image (or none); the question (`[CLS]
question [SEP]`, no concepts) is fused with the pair's image in the step's stream mode, and the QA head
(`MLPHead`, VinVL's classifier, over `model.config.qa_answers` answers) on the pooled joint vector is trained
with (`loss`, an assumption: the paper does not say)
    softmax   cross-entropy against the soft scores normalised to a distribution, averaged over questions: about
              ln(answers) at the start whatever the head's size (8.0 for VQA v2's 3,129), so that QA sits beside
              MLM, MOP and ITM in the unweighted sum (the default)
    bce       the soft-score BCE of VQA fine-tuning (summed over the answers, averaged over questions, as VinVL):
              answers x ln 2 at the start (2,169 for 3,129 answers), which swamps the other objectives' gradients
              in an unweighted sum until the head has pushed every unused answer down

Batch keys: question_ids, question_mask, answer_scores, has_question (`mvptr.questions`), region_feats,
region_boxes, region_mask. Options (`pretrain.objectives.qa`): weight, loss (softmax | bce).

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


def qa_loss(logits: Tensor, scores: Tensor, kind: str) -> Tensor:
    """Loss of (N, A) answer logits against (N, A) soft scores, averaged over the N questions (`kind`: softmax |
    bce, module docstring)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / logits.shape[0]
    # A question whose every answer is outside the vocabulary has no target distribution: it adds nothing.
    total = scores.sum(dim=1, keepdim=True)
    target = scores / total.clamp(min=1e-12)
    per_question = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return per_question.sum() / logits.shape[0]


class QA(Objective):
    name = "qa"
    head_name = "qa"
    uses_questions = True
    options_schema = {"loss": {"enum": ["softmax", "bce"], "description": "softmax: cross-entropy against the "
                                                                        "normalised soft scores; bce: VQA "
                                                                        "fine-tuning's soft-score BCE"}}
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
        loss = qa_loss(logits, targets, self.options["loss"])
        best = targets.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return loss, {"qa": loss.detach(), "qa_questions": has.float().sum(), "qa_score": best.detach()}


OBJECTIVE = QA
