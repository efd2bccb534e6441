"""ITM, image-text matching with hard negatives (MVPTR stage two): is this text about this image?

Why: VSC aligns whole vectors; ITM makes the cross-modal encoder judge a pair token by token, and hard
negatives (pairs VSC finds similar) force it to look at the details (attribute binding, relations).

Per METHODS.md: for each text the most similar non-matching image by VSC similarity, and for each image the
hardest text; a random half of the batch takes (text, its hard image), the other half (hard text, image);
the negatives go through the cross-modal encoder only (the uni-modal outputs are reused); Linear(hidden -> 2)
on the pooler; cross-entropy over the B positives (label 1) and the negatives (label 0).

Options (`pretrain.objectives.itm`):
    sampling          "argmax" (hardest, the paper) | "softmax" (draw from softmax(similarity / temperature)
                      over the allowed candidates, as ALBEF and SIMLA) | "random" (uniform over the allowed
                      candidates: the no-hard-negative ablation)
    allow_duplicates  False: a pair that shares the image (image_ids) or the caption (caption_ids or identical
                      token ids) is never a negative. True: only the diagonal is excluded, as MVPTR's released
                      code, so a duplicate can be picked as a "negative".
    negatives         "half" (MVPTR, above) | "both": every text gets a negative image and every image a negative
                      text (ALBEF, SIMLA: 2B negatives)
A sample left with no allowed candidate contributes no negative. Negatives come from the rank's own batch:
the cross-modal pass needs their uni-modal outputs, which are not gathered.

Batch keys: input_ids, attention_mask, tag_ids, tag_mask, region_feats, region_boxes, region_mask, image_ids
(+ caption_ids if known).

The similarity that picks the negatives is the model's contrastive embeddings (VSC or ITC).

Use: `loss, logs = itm_loss(model, batch, encoded, sampling="argmax", generator=g)`
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, load_objective
from mvptr.objectives.heads import itm_head
from mvptr.objectives.sampling import allowed_negatives, permutation, pick_negatives
from mvptr.objectives.vsc import similarity

if TYPE_CHECKING:
    from mvptr.models.base import Fusion, VLModel


def negative_pairs(scores: Tensor, allowed: Tensor, sampling: str = "argmax",
                   generator: torch.Generator | None = None, both: bool = False) -> tuple[Tensor, Tensor]:
    """(text index, image index) of the negative pairs, from (B texts, B images) scores.

    A random half of the rows pairs text i with its picked image, the other half image j with its picked text
    (MVPTR: B negatives); `both` pairs every text with its picked image and every image with its picked text
    (ALBEF, SIMLA: 2B negatives).
    """
    image_for_text, text_valid = pick_negatives(scores, allowed, sampling, generator)
    text_for_image, image_valid = pick_negatives(scores.T, allowed.T, sampling, generator)
    if both:
        rows = torch.arange(scores.shape[0], device=scores.device)
        keep = torch.cat([text_valid, image_valid])
        return torch.cat([rows, text_for_image])[keep], torch.cat([image_for_text, rows])[keep]
    order = permutation(scores.shape[0], scores, generator)
    half = scores.shape[0] // 2
    texts_side, images_side = order[:half], order[half:]
    text_index = torch.cat([texts_side, text_for_image[images_side]])
    image_index = torch.cat([image_for_text[texts_side], images_side])
    keep = torch.cat([text_valid[texts_side], image_valid[images_side]])
    return text_index[keep], image_index[keep]


def _concat(first: Fusion, second: Fusion) -> Fusion:
    return type(first)(*(torch.cat([a, b]) for a, b in zip(first, second, strict=True)))


def itm_loss(model: VLModel, batch: Batch, encoded: PairEncoding | None = None, *, sampling: str = "argmax",
             allow_duplicates: bool = False, both: bool = False,
             generator: torch.Generator | None = None) -> tuple[Tensor, Logs]:
    """Cross-entropy of the ITM head on the matched pairs and one negative per sample."""
    if encoded is None:
        encoded = PairEncoding(model, batch)
    if sampling == "random":  # the scores are not read: a model without contrastive embeddings can sample too
        scores = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[0],
                             device=batch["input_ids"].device)
    else:
        scores = similarity(model, encoded)
    if sampling == "softmax":
        scores = scores / model.heads["contrastive"].temperature.detach()
    allowed = allowed_negatives(batch, allow_duplicates).to(scores.device)
    text_index, image_index = negative_pairs(scores, allowed, sampling, generator, both)
    joint = encoded.fused
    num_positives = joint.text.shape[0]
    num_negatives = text_index.shape[0]
    if num_negatives:  # a batch of one image's captions has none, and BERT layers reject an empty batch
        negatives = model.fuse(encoded.text.tokens[text_index], batch["attention_mask"][text_index],
                               encoded.image.rows(image_index))
        joint = _concat(joint, negatives)
    logits = model.match_logits(joint)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positives] = 1
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, {"itm": loss.detach(), "itm_accuracy": accuracy.detach(),
                  "itm_negatives": torch.tensor(float(num_negatives))}


class ITM(Objective):
    name = "itm"
    head_name = "itm"
    options_schema = {
        "sampling": {"enum": ["argmax", "softmax", "random"], "description": "how negatives are picked"},
        "allow_duplicates": {"type": "boolean", "description": "exclude only the diagonal from the negatives "
                                                               "(MVPTR's released code)"},
        "negatives": {"enum": ["half", "both"], "description": "half: one negative per sample, half of them "
                                                                "for the text (MVPTR); both: one for the text "
                                                                "and one for the image (ALBEF, SIMLA)"},
    }
    head = staticmethod(itm_head)

    @classmethod
    def schema_with(cls, objectives: Sequence[str]) -> dict[str, Any]:
        """Hard (argmax) and similarity-sampled (softmax) negatives need contrastive embeddings: without an
        objective that gives the model some (SemVLP), only random."""
        if any(load_objective(name).head_name == "contrastive" for name in objectives):
            return cls.options_schema
        return {**cls.options_schema, "sampling": {
            "enum": ["random"], "description": "how negatives are picked (random only: no objective of the method "
                                               "gives it contrastive embeddings to pick hard negatives by)"}}

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        return itm_loss(model, batch, encoded, sampling=self.options["sampling"],
                        allow_duplicates=self.options["allow_duplicates"],
                        both=self.options["negatives"] == "both", generator=ctx.generator)


OBJECTIVE = ITM
