"""The downstream metrics of the MVPTR protocol, as pure functions over numpy arrays or torch tensors.

Why: the numbers compared with the published ones (METHODS.md, "Downstream") must be computed the way the
papers and the official scripts compute them; one tested module does it for every task.

Retrieval (COCO, Flickr30k): `retrieval_recalls(scores, text_to_image)` with scores (n_images, n_texts),
higher = better, and text_to_image[t] the image of text t (several texts per image). Text retrieval ranks
the texts of each image and counts the best-ranked right one; image retrieval ranks the images of each text.
Re-ranking gives one matrix per direction: pass the second as `t2i_scores`. A tie with a wrong candidate
counts against the model (the wrong one is ranked first), so a constant score matrix gets no credit.
Recalls are percentages, as papers report; keys `tr_r_at_1`, ..., `ir_r_at_10`, `r_sum` (MLflow metric
names may not contain '@').

VQA v2: `vqa_report(records)` averages the official accuracy (`mvptr.data.vqa_answers`, where the answer
normalisation and the soft targets live) in % overall, per question type and per answer type.

Grounding and classification: `box_iou` (xyxy, (N, 4) x (M, 4) -> (N, M)), `grounding_accuracy` (% of
predicted boxes with IoU >= 0.5 with their gold box, RefCOCO+), `classification_report` (% overall and per
gold class, SNLI-VE).

Use:
    metrics = retrieval_recalls(scores, text_to_image)                 # {"tr_r_at_1": 77.3, ...}
    vqa_accuracy("Two", ["2"] * 10)                                    # 1.0
    report = vqa_report([{"question_type": "how many", "prediction": "2", "answers": [...]}, ...])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mvptr.data.vqa_answers import vqa_accuracy

ArrayLike = Tensor | np.ndarray | Sequence[Any]

# --- Retrieval ----------------------------------------------------------------------------------------------

# Elements compared at once when ranking, to bound memory on COCO-5k (5,000 x 25,000 scores).
_CHUNK_ELEMENTS = 1 << 24


def _as_tensor(values: ArrayLike) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))


def _score_matrix(scores: ArrayLike, name: str) -> Tensor:
    matrix = _as_tensor(scores)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: expected (n_images, n_texts) scores, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        matrix = matrix.double()
    if torch.isnan(matrix).any():
        raise ValueError(f"{name} contains NaN")
    return matrix


def retrieval_ranks(scores: ArrayLike, text_to_image: ArrayLike, *,
                    t2i_scores: ArrayLike | None = None) -> tuple[Tensor, Tensor]:
    """0-based ranks: (n_images,) of each image's best-ranked right text among its scores (text retrieval),
    and (n_texts,) of each text's image among its scores (image retrieval). A rank counts the wrong
    candidates scored at least as high as the right one, so ties go against the model."""
    i2t = _score_matrix(scores, "scores")
    t2i = i2t if t2i_scores is None else _score_matrix(t2i_scores, "t2i_scores")
    if t2i.shape != i2t.shape:
        raise ValueError(f"t2i_scores has shape {tuple(t2i.shape)}, scores {tuple(i2t.shape)}")
    n_images, n_texts = i2t.shape
    owner = _as_tensor(text_to_image).long().reshape(-1).to(i2t.device)
    if owner.numel() != n_texts:
        raise ValueError(f"text_to_image has {owner.numel()} entries for {n_texts} texts")
    if n_texts and (int(owner.min()) < 0 or int(owner.max()) >= n_images):
        raise ValueError(f"text_to_image holds an image index outside [0, {n_images})")
    lonely = (torch.bincount(owner, minlength=n_images) == 0).nonzero().flatten()
    if lonely.numel():
        raise ValueError(f"{lonely.numel()} image(s) have no text, e.g. image {int(lonely[0])}")
    texts = torch.arange(n_texts, device=i2t.device)

    # Text retrieval: wrong texts scoring >= the best right one = all texts scoring >= it, less the right
    # texts that reach it (at least the best one itself; more when right texts tie).
    right = i2t[owner, texts]
    best = torch.full((n_images,), float("-inf"), dtype=i2t.dtype, device=i2t.device)
    best = best.scatter_reduce(0, owner, right, reduce="amax")
    right_at_best = torch.zeros(n_images, dtype=torch.long, device=i2t.device)
    right_at_best.scatter_add_(0, owner, (right >= best[owner]).long())
    text_ranks = torch.empty(n_images, dtype=torch.long, device=i2t.device)
    step = max(1, _CHUNK_ELEMENTS // max(n_texts, 1))
    for start in range(0, n_images, step):
        stop = start + step
        at_least = (i2t[start:stop] >= best[start:stop, None]).sum(dim=1)
        text_ranks[start:stop] = at_least - right_at_best[start:stop]

    # Image retrieval: one right image per text, so the rank is the images scoring >= it, less itself.
    right = t2i[owner, texts]
    image_ranks = torch.empty(n_texts, dtype=torch.long, device=i2t.device)
    step = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    for start in range(0, n_texts, step):
        stop = start + step
        image_ranks[start:stop] = (t2i[:, start:stop] >= right[None, start:stop]).sum(dim=0) - 1
    return text_ranks, image_ranks


def retrieval_recalls(scores: ArrayLike, text_to_image: ArrayLike, ks: Sequence[int] = (1, 5, 10), *,
                      t2i_scores: ArrayLike | None = None) -> dict[str, float]:
    """R@K in % for text retrieval (`tr_r_at_K`, image -> texts) and image retrieval (`ir_r_at_K`, text ->
    images), and their sum `r_sum`. `scores` ranks texts per image; `t2i_scores` (default: `scores`) ranks
    images per text."""
    text_ranks, image_ranks = retrieval_ranks(scores, text_to_image, t2i_scores=t2i_scores)
    metrics = {f"tr_r_at_{k}": 100.0 * (text_ranks < k).double().mean().item() for k in ks}
    metrics.update({f"ir_r_at_{k}": 100.0 * (image_ranks < k).double().mean().item() for k in ks})
    metrics["r_sum"] = sum(metrics.values())
    return metrics


# --- VQA v2 -------------------------------------------------------------------------------------------------

def vqa_report(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Official VQA accuracy in %: `overall`, `per_question_type` and (when records carry `answer_type`)
    `per_answer_type`, and the `count` of questions. Each record: question_type, prediction, answers.
    Values are not rounded (the official script rounds to 2 decimals for display)."""
    overall: list[float] = []
    by_question: dict[str, list[float]] = defaultdict(list)
    by_answer: dict[str, list[float]] = defaultdict(list)
    for record in records:
        accuracy = vqa_accuracy(record["prediction"], record["answers"])
        overall.append(accuracy)
        by_question[str(record["question_type"])].append(accuracy)
        if record.get("answer_type") is not None:
            by_answer[str(record["answer_type"])].append(accuracy)
    if not overall:
        raise ValueError("no VQA records")

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    report: dict[str, Any] = {"overall": percent(overall), "count": len(overall),
                              "per_question_type": {key: percent(v) for key, v in sorted(by_question.items())}}
    if by_answer:
        report["per_answer_type"] = {key: percent(v) for key, v in sorted(by_answer.items())}
    return report


# --- Boxes and classes --------------------------------------------------------------------------------------


def _boxes(boxes: ArrayLike, name: str) -> Tensor:
    tensor = _as_tensor(boxes)
    if tensor.ndim != 2 or tensor.shape[-1] != 4:
        raise ValueError(f"{name}: expected (N, 4) xyxy boxes, got shape {tuple(tensor.shape)}")
    return tensor if tensor.is_floating_point() else tensor.double()


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcast xyxy boxes (..., 4); a pair whose union is empty (degenerate boxes) gets 0, not NaN."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def box_iou(a: ArrayLike, b: ArrayLike) -> Tensor | np.ndarray:
    """(N, M) IoU of xyxy boxes a (N, 4) and b (M, 4), in continuous coordinates (no +1); numpy in, numpy out."""
    iou = _iou(_boxes(a, "a")[:, None, :], _boxes(b, "b")[None, :, :])
    return iou if isinstance(a, Tensor) or isinstance(b, Tensor) else iou.numpy()


def grounding_accuracy(pred_boxes: ArrayLike, gold_boxes: ArrayLike, threshold: float = 0.5) -> float:
    """% of predicted boxes whose IoU with their gold box (row by row) is >= `threshold` (RefCOCO+)."""
    pred, gold = _boxes(pred_boxes, "pred_boxes"), _boxes(gold_boxes, "gold_boxes")
    if pred.shape != gold.shape or not pred.shape[0]:
        raise ValueError(f"expected as many predicted as gold boxes (at least one), got {pred.shape[0]} and "
                         f"{gold.shape[0]}")
    return 100.0 * (_iou(pred, gold) >= threshold).double().mean().item()


def classification_report(pred: ArrayLike, gold: ArrayLike, labels: Sequence[str]) -> dict[str, float]:
    """`accuracy` (%) and `accuracy_<label>` (% of that gold class predicted right) for label indices into
    `labels`; a class without a gold example gets no key (its accuracy is undefined)."""
    pred_ids = _as_tensor(pred).long().reshape(-1)
    gold_ids = _as_tensor(gold).long().reshape(-1).to(pred_ids.device)
    if pred_ids.shape != gold_ids.shape or not gold_ids.numel():
        raise ValueError(f"expected as many predictions as gold labels (at least one), got {pred_ids.numel()} "
                         f"and {gold_ids.numel()}")
    if int(gold_ids.min()) < 0 or int(gold_ids.max()) >= len(labels):
        raise ValueError(f"a gold label is outside [0, {len(labels)})")
    correct = (pred_ids == gold_ids).double()
    report = {"accuracy": 100.0 * correct.mean().item()}
    for index, label in enumerate(labels):
        chosen = gold_ids == index
        if chosen.any():
            report[f"accuracy_{label}"] = 100.0 * correct[chosen].mean().item()
    return report
