"""ITM, image-text matching with hard negatives (MVPTR stage two): is this text about this image?

Why: VSC aligns whole vectors; ITM makes the cross-modal encoder judge a pair token by token, and hard
negatives (pairs VSC finds similar) force it to look at the details (attribute binding, relations).

Per METHODS.md: for each text the most similar non-matching image by VSC similarity, and for each image the
hardest text; a random half of the batch takes (text, its hard image), the other half (hard text, image);
the negatives go through the cross-modal encoder only (the uni-modal outputs are reused); Linear(hidden -> 2)
on the pooler; cross-entropy over the B positives (label 1) and the negatives (label 0).

Options:
    sampling        "argmax" (hardest, the paper) | "softmax" (draw from softmax(similarity / temperature)
                    over the allowed candidates, as ALBEF) | "random" (uniform over the allowed candidates:
                    the no-hard-negative ablation)
    released_quirk  False: a pair that shares the image (image_ids) or the caption (caption_ids or identical
                    token ids) is never a negative. True: only the diagonal is excluded, as the released code,
                    so a duplicate can be picked as a "negative".
A sample left with no allowed candidate contributes no negative. Negatives come from the rank's own batch:
the cross-modal pass needs their uni-modal outputs, which are not gathered.

Batch keys: input_ids, attention_mask, tag_ids, tag_mask, region_feats, region_boxes, region_mask, image_ids
(+ caption_ids if known).

Use: `loss, logs = itm_loss(model, batch, encoded, sampling="argmax", generator=g)`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mvptr.tasks import Batch, Logs, PairEncoding, allowed_negatives, permutation, pick_negatives
from mvptr.tasks.vsc import similarity

if TYPE_CHECKING:
    from mvptr.models.mvptr import MVPTRModel


def itm_logits(model: MVPTRModel, cross_hidden: Tensor) -> Tensor:
    """(N, 2) match logits from the pooler on the cross-modal output; class 1 = the pair matches."""
    return model.itm_head(model.pooler(cross_hidden))


def negative_pairs(scores: Tensor, allowed: Tensor, sampling: str = "argmax",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(text index, image index) of the negative pairs, from (B texts, B images) scores.

    A random half of the rows pairs text i with its picked image, the other half image j with its picked text.
    """
    image_for_text, text_valid = pick_negatives(scores, allowed, sampling, generator)
    text_for_image, image_valid = pick_negatives(scores.T, allowed.T, sampling, generator)
    order = permutation(scores.shape[0], scores, generator)
    half = scores.shape[0] // 2
    texts_side, images_side = order[:half], order[half:]
    text_index = torch.cat([texts_side, text_for_image[images_side]])
    image_index = torch.cat([image_for_text[texts_side], images_side])
    keep = torch.cat([text_valid[texts_side], image_valid[images_side]])
    return text_index[keep], image_index[keep]


def itm_loss(model: MVPTRModel, batch: Batch, encoded: PairEncoding | None = None, *, sampling: str = "argmax",
             released_quirk: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, Logs]:
    """Cross-entropy of the ITM head on the matched pairs and one negative per sample."""
    if encoded is None:
        encoded = PairEncoding(model, batch)
    scores = similarity(model, encoded)
    if sampling == "softmax":
        scores = scores / model.temperature.detach()
    allowed = allowed_negatives(batch, released_quirk).to(scores.device)
    text_index, image_index = negative_pairs(scores, allowed, sampling, generator)
    joint = encoded.cross
    num_negatives = text_index.shape[0]
    if num_negatives:  # a batch of one image's captions has none, and BERT layers reject an empty batch
        text_mask, region_mask = batch["attention_mask"], batch["region_mask"]
        negatives = model.cross(encoded.text[text_index], text_mask[text_index],
                                encoded.image.regions[image_index], region_mask[image_index])
        joint = torch.cat([joint, negatives])
    logits = itm_logits(model, joint)
    labels = torch.zeros(joint.shape[0], dtype=torch.long, device=logits.device)
    labels[: encoded.cross.shape[0]] = 1
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, {"itm": loss.detach(), "itm_accuracy": accuracy.detach(),
                  "itm_negatives": torch.tensor(float(num_negatives))}
