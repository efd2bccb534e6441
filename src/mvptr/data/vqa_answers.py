"""VQA v2 answers as the official evaluation script reads them: normalisation, accuracy, soft targets, vocabulary.

Why a module of its own, in `mvptr.data`: the evaluation's metric (`mvptr.evaluate.metrics.vqa_report`), the
VQA fine-tuning's training targets and answer vocabulary (`mvptr.evaluate.finetune`) and SemVLP's pre-training
QA objective (`mvptr.objectives.qa`, with `mvptr.pairs.QuestionBank`) must spell and score answers the same
way; the pre-training side may not import the evaluation (tests/test_imports.py), so the rules live here.
Source: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py.

    prediction      newlines and tabs to spaces, strip, punctuation handling, then lower case, number words
                    to digits, articles dropped, contractions restored (`normalize_answer`)
    human answers   punctuation handling only, and only when the 10 answers are not all the same (the
                    annotations are already normalised; this is what the script does)
    accuracy        mean over the 10 leave-one-out subsets of min(#humans in the other 9 who gave the
                    prediction / 3, 1): 0, 0.3, 0.6, 0.9 and 1.0 for 0, 1, 2, 3 and 4+ matching humans
`vqa_soft_scores(answers)` is {a: vqa_accuracy(a, answers)} over the distinct normalised human answers a (the
vocabulary's spelling), the soft BCE target: training rewards an answer exactly as the metric will score it, so
"Two" among the humans scores nothing (the script compares "2" with the humans' "Two"), as it does officially.
`answer_vocabulary(examples, max_answers)` is every normalised training answer, most frequent first.

Use:
    vqa_accuracy("Two", ["2"] * 10)                    # 1.0
    vqa_soft_scores(["2"] * 3 + ["3"] * 7)              # {"2": 0.9, "3": 1.0}
    vqa_soft_scores(["Two", "2", "2", "3"] + ["no"] * 6)   # {"2": 0.6, "3": 0.3, "no": 1.0}
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvptr.data.task_files import VQAExample

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


def _scored_humans(answers: Iterable[str | Mapping[str, Any]]) -> list[str]:
    """The human answers as the script compares them: punctuation handling only, and only when they differ."""
    humans = [_answer_text(answer) for answer in answers]
    if not humans:
        raise ValueError("no human answers")
    return [_process_punctuation(answer) for answer in humans] if len(set(humans)) > 1 else humans


def _accuracy(pred: str, humans: Sequence[str]) -> float:
    """Mean over the (scored) humans of min(#other humans who gave the normalised prediction / 3, 1)."""
    candidate = normalize_answer(pred)
    matches = sum(answer == candidate for answer in humans)
    return sum(min(1.0, (matches - (answer == candidate)) / 3) for answer in humans) / len(humans)


def vqa_accuracy(pred: str, answers: Iterable[str | Mapping[str, Any]]) -> float:
    """The official VQA accuracy in [0, 1] of one predicted answer against the human answers (10 in VQA v2)."""
    return _accuracy(pred, _scored_humans(answers))


def vqa_soft_scores(answers: Iterable[str | Mapping[str, Any]]) -> dict[str, float]:
    """{normalised human answer: `vqa_accuracy` of predicting it}: the soft BCE target. 1, 2, 3 and 4+ matching
    humans give 0.3, 0.6, 0.9 and 1.0 (for 10 answers)."""
    answers = list(answers)
    humans = _scored_humans(answers)
    return {answer: _accuracy(answer, humans)
            for answer in dict.fromkeys(normalize_answer(_answer_text(raw)) for raw in answers)}


def answer_vocabulary(examples: Sequence[VQAExample], max_answers: int | None = None) -> list[str]:
    """Every normalised human answer of the (training) questions, most frequent first (ties alphabetical),
    the `max_answers` first if given."""
    counts = Counter(normalize_answer(answer) for ex in examples for answer in ex.answers)
    ranked = sorted(counts, key=lambda answer: (-counts[answer], answer))
    return ranked[:max_answers] if max_answers else ranked
