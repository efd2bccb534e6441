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

VQA v2: the official accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
    prediction      newlines and tabs to spaces, strip, punctuation handling, then lower case, number words
                    to digits, articles dropped, contractions restored (`normalize_answer`)
    human answers   punctuation handling only, and only when the 10 answers are not all the same (the
                    annotations are already normalised; this is what the script does)
    accuracy        mean over the 10 leave-one-out subsets of min(#humans in the other 9 who gave the
                    prediction / 3, 1): 0, 0.3, 0.6, 0.9 and 1.0 for 0, 1, 2, 3 and 4+ matching humans
`vqa_soft_scores(answers)` gives the same accuracy for every distinct (normalised) answer: the soft target of
the BCE head. `vqa_report(records)` averages (in %) overall, per question type and per answer type.

Grounding and classification: `box_iou` (xyxy, (N, 4) x (M, 4) -> (N, M)), `grounding_accuracy` (% of
predicted boxes with IoU >= 0.5 with their gold box, RefCOCO+), `classification_report` (% overall and per
gold class, SNLI-VE).

Use:
    metrics = retrieval_recalls(scores, text_to_image)                 # {"tr_r_at_1": 77.3, ...}
    vqa_accuracy("Two", ["2"] * 10)                                    # 1.0
    report = vqa_report([{"question_type": "how many", "prediction": "2", "answers": [...]}, ...])
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

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

# The official script's tables. Punctuation marks, in its order ('.' and the apostrophe are handled apart).
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Its contractions map, written as the targets: a target with one apostrophe is reached from the word without
# it ("dont" -> "don't"); one with several from each spelling that lacks exactly one of them ("couldnt've" and
# "couldn'tve" -> "couldn't've", but not "couldntve"). Case is kept: "Im" is a key, so "im" (answers are lower
# cased first) is never restored, as in the script.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# The script's three entries outside that rule: two map a word to itself, one drops the apostrophe.
_CONTRACTION_ODDITIES = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}


def _contraction_keys(target: str) -> list[str]:
    quotes = [i for i, char in enumerate(target) if char == "'"]
    if len(quotes) == 1:
        return [target.replace("'", "")]
    return [target[:i] + target[i + 1:] for i in quotes]


_CONTRACTIONS = {key: target for target in _CONTRACTED for key in _contraction_keys(target)}
_CONTRACTIONS.update(_CONTRACTION_ODDITIES)

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The script means "a period not preceded by a digit" but wrote a lookahead `(?!<=\d)`, which always holds,
# so a period is dropped unless a digit follows ("3.5" stays, "1." and "dog." lose it). Kept as written.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The script passes re.UNICODE (32) where `sub` takes the count: at most 32 periods go. Kept as well.
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """The script's processPunctuation: a mark next to a space (or any mark, when the text has a comma
    between digits, "1,000") is deleted, any other mark becomes a space ("left-hand" -> "left hand")."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # The test reads the original text, the replacement the running one: as the script does.
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """The script's processDigitArticle: lower case, number words to digits, no articles, contractions."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official script compares it: "Two" -> "2", "a dog." -> "dog"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _answer_text(answer: str | Mapping[str, Any]) -> str:
    # Annotations hold {"answer": ..., "answer_id": ...} records; plain strings are accepted as well.
    return answer if isinstance(answer, str) else str(answer["answer"])


def _leave_one_out(candidate: str, answers: Sequence[str]) -> float:
    """Mean over the humans of min(#other humans who gave `candidate` / 3, 1)."""
    if not answers:
        raise ValueError("no human answers")
    matches = sum(answer == candidate for answer in answers)
    return sum(min(1.0, (matches - (answer == candidate)) / 3) for answer in answers) / len(answers)


def vqa_accuracy(pred: str, answers: Iterable[str | Mapping[str, Any]]) -> float:
    """The official VQA accuracy in [0, 1] of one predicted answer against the human answers (10 in VQA v2)."""
    humans = [_answer_text(answer) for answer in answers]
    if len(set(humans)) > 1:
        humans = [_process_punctuation(answer) for answer in humans]
    return _leave_one_out(normalize_answer(pred), humans)


def vqa_soft_scores(answers: Iterable[str | Mapping[str, Any]], normalize: bool = True) -> dict[str, float]:
    """{answer: accuracy a prediction of it would get} over the distinct answers: the soft BCE target.
    Answers are normalised like predictions (so that they match the answer vocabulary's spelling) unless
    `normalize=False`. 1, 2, 3 and 4+ humans give 0.3, 0.6, 0.9 and 1.0 (for 10 answers)."""
    humans = [_answer_text(answer) for answer in answers]
    if normalize:
        humans = [normalize_answer(answer) for answer in humans]
    return {answer: _leave_one_out(answer, humans) for answer in Counter(humans)}


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
