"""Retrieval scoring with ITM re-ranking (ALBEF / MVPTR), and exhaustive ITM scoring to compare against.

Why: the cross-modal ITM head judges a pair better than the VSC similarity of two [CLS] vectors, but it needs
one cross-modal forward per pair: 5,000 images x 25,000 texts is 125M forwards on COCO-5k. The protocol
(METHODS.md, "Downstream") ranks every pair by VSC, which costs one uni-modal encoding per image and per text,
then re-scores with ITM only the top k_text texts of each image and the top k_image images of each text:
k_text * n_images + k_image * n_texts forwards. A pair that is a candidate both ways is scored twice, as in
ALBEF, so that the two directions stay independent and the count is exactly that.

`rerank` returns one score matrix per direction, shaped (n_images, n_texts) like the similarity:
    i2t  row i: the candidates of image i carry their ITM score; every other text keeps its VSC order, shifted
         below the lowest candidate score of that row (non-candidates never outrank a candidate)
    t2i  column t: the same for the candidate images of text t
so `metrics.retrieval_recalls(result.i2t, text_to_image, t2i_scores=result.t2i)` gives the recalls. Beyond
rank k the order is VSC's; R@K needs only the top K, so any k >= 10 gives exact R@1/5/10 for these scores.
`add_similarity=True` adds the VSC similarity to the candidates' ITM score, as ALBEF's evaluation does.

The model-specific part is `pair_scores(image_idx, text_idx) -> (P,) scores` (higher = match): the caller
encodes every image and text once and scores pairs from the cached uni-modal outputs; `itm_pair_scorer` builds
it for any method's model (`model.fuse` + `model.match_logits`). Calls come in batches of at most
`batch_size` pairs, under `torch.no_grad()`.

Use:
    enc = encode_split(model, pairs, device)                                   # once per text and image
    scorer = itm_pair_scorer(model, enc)
    result = rerank(similarity, k_text=128, k_image=64, pair_scores=scorer, batch_size=256)
    result.i2t, result.t2i, result.pairs_scored
    full = exhaustive_scores(n_images, n_texts, scorer, batch_size=256)         # every pair, for comparison
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mvptr.evaluate.encode import SplitEncoding
    from mvptr.models.base import VLModel

# (image indices (P,), text indices (P,)) -> (P,) match scores, higher = better.
PairScorer = Callable[[Tensor, Tensor], Tensor]


class RerankResult(NamedTuple):
    i2t: Tensor  # (n_images, n_texts) scores ranking the texts of each image (text retrieval)
    t2i: Tensor  # (n_images, n_texts) scores ranking the images of each text (image retrieval)
    pairs_scored: int  # pair_scores evaluations: k_text * n_images + k_image * n_texts


def score_pairs(image_idx: Tensor, text_idx: Tensor, pair_scores: PairScorer, batch_size: int = 256) -> Tensor:
    """(P,) float32 scores of the pairs (image_idx[p], text_idx[p]), `batch_size` pairs per call."""
    if image_idx.shape != text_idx.shape or image_idx.ndim != 1:
        raise ValueError(f"expected two (P,) index tensors, got {tuple(image_idx.shape)} and "
                         f"{tuple(text_idx.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = torch.empty(image_idx.shape[0], dtype=torch.float32, device=image_idx.device)
    with torch.no_grad():
        for start in range(0, image_idx.shape[0], batch_size):
            images, texts = image_idx[start:start + batch_size], text_idx[start:start + batch_size]
            scores = pair_scores(images, texts).reshape(-1)
            if scores.shape[0] != images.shape[0]:
                raise ValueError(f"pair_scores returned {scores.shape[0]} scores for {images.shape[0]} pairs")
            out[start:start + images.shape[0]] = scores.to(device=out.device, dtype=out.dtype)
    return out


def _merge(similarity: Tensor, candidates: Tensor, candidate_scores: Tensor) -> Tensor:
    """Rows of `similarity` with the (R, k) `candidates` set to `candidate_scores` and every other entry
    shifted so that the row's highest non-candidate lands 1 below its lowest candidate score."""
    is_candidate = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, candidates, True)
    best_other = similarity.masked_fill(is_candidate, float("-inf")).amax(dim=1)
    shift = candidate_scores.amin(dim=1) - 1 - best_other
    # A row whose entries are all candidates has no other entry to shift (and best_other is -inf).
    shift = torch.where(torch.isfinite(best_other), shift, torch.zeros_like(shift))
    return (similarity + shift[:, None]).scatter_(1, candidates, candidate_scores)


def rerank(similarity: Tensor, k_text: int, k_image: int, pair_scores: PairScorer, batch_size: int = 256, *,
           add_similarity: bool = False) -> RerankResult:
    """Re-score the top `k_text` texts of each image and the top `k_image` images of each text (by the
    (n_images, n_texts) `similarity`) with `pair_scores`. k larger than the candidates available is cut to
    them. Returns float32 matrices on the similarity's device."""
    if k_text < 1 or k_image < 1:
        raise ValueError(f"k_text and k_image must be positive, got {k_text} and {k_image}")
    sim = torch.as_tensor(similarity).float()
    if sim.ndim != 2:
        raise ValueError(f"similarity: expected (n_images, n_texts), got shape {tuple(sim.shape)}")
    if not torch.isfinite(sim).all():
        raise ValueError("similarity must be finite (non-candidates keep their order by shifting it)")
    n_images, n_texts = sim.shape
    k_text, k_image = min(k_text, n_texts), min(k_image, n_images)

    # Image -> texts: row i's candidates are its k_text most similar texts.
    top_sim, texts = sim.topk(k_text, dim=1)  # (n_images, k_text)
    images = torch.arange(n_images, device=sim.device).repeat_interleave(k_text)
    scores = score_pairs(images, texts.reshape(-1), pair_scores, batch_size).view(n_images, k_text)
    i2t = _merge(sim, texts, scores + top_sim if add_similarity else scores)

    # Text -> images: the same on the transposed matrix (rows are texts).
    top_sim, images_top = sim.T.topk(k_image, dim=1)  # (n_texts, k_image)
    texts = torch.arange(n_texts, device=sim.device).repeat_interleave(k_image)
    scores = score_pairs(images_top.reshape(-1), texts, pair_scores, batch_size).view(n_texts, k_image)
    t2i = _merge(sim.T.contiguous(), images_top, scores + top_sim if add_similarity else scores).T.contiguous()
    return RerankResult(i2t=i2t, t2i=t2i, pairs_scored=k_text * n_images + k_image * n_texts)


def exhaustive_scores(n_images: int, n_texts: int, pair_scores: PairScorer, batch_size: int = 256,
                      device: torch.device | str | None = None) -> Tensor:
    """(n_images, n_texts) float32 scores of every pair, row by row; the indices are built per batch, so
    memory stays that of the output."""
    total = n_images * n_texts
    out = torch.empty(total, dtype=torch.float32, device=device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    with torch.no_grad():
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(start + batch_size, total), device=out.device)
            out[start:start + flat.shape[0]] = score_pairs(flat // n_texts, flat % n_texts, pair_scores,
                                                           batch_size)
    return out.view(n_images, n_texts)


def itm_pair_scorer(model: VLModel, enc: SplitEncoding, trim_padding: bool = True, margin: bool = False) -> PairScorer:
    """`pair_scores` from a split's cached uni-modal outputs (`mvptr.evaluate.encode.SplitEncoding`, on the
    model's device). The score is the ITM logit of "match" (class 1), or with `margin` that logit less the one
    of "no match" (> 0: the head calls the pair a match).

    trim_padding drops the positions that are padding in every pair of the batch before the cross-modal
    layers: masked positions do not change the others' outputs, so only the cost changes."""

    def score(image_idx: Tensor, text_idx: Tensor) -> Tensor:
        text_idx, image_idx = text_idx.to(enc.text_hidden.device), image_idx.to(enc.region_hidden.device)
        texts, t_mask = enc.text_hidden[text_idx], enc.text_mask[text_idx]
        image = enc.images(image_idx)
        if trim_padding:
            keep = t_mask.bool().any(dim=0)
            keep[0] = True  # the pooler reads position 0
            texts, t_mask = texts[:, keep], t_mask[:, keep]
            keep = image.region_mask.any(dim=0)
            image = image._replace(regions=image.regions[:, keep], region_mask=image.region_mask[:, keep])
            if image.tag_mask is not None:
                keep = image.tag_mask.any(dim=0)
                image = image._replace(tags=image.tags[:, keep], tag_mask=image.tag_mask[:, keep])
        logits = model.match_logits(model.fuse(texts, t_mask, image))
        return logits[:, 1] - logits[:, 0] if margin else logits[:, 1]

    return score
