"""The VQA training questions that SemVLP's image-question-answering objective pre-trains on, and nothing else.

Why: SemVLP pre-trains with image QA (METHODS.md, SemVLP). A question is a caption-like text about an image,
so the pairs' batches carry one (`mvptr.pairs.PairDataset`, keys below) and the QA objective
(`mvptr.objectives.qa`) predicts its answers from the fusion of the question with the pair's image. Taking
questions into pre-training must never let the downstream evaluation's questions or images in; the bank keeps a
question only when
    it is a VQA *training* question (vqa/v2_OpenEnded_mscoco_train_questions.json + annotations), and
    its image is a pre-training image (the dataset's `train` split), and
    its image is not an image of any evaluated split: the dataset's val and test images, and the images of
    the VQA val and test questions (a public VQA train image can also sit in a Karpathy test split)
and reports how many it dropped. Answers: the `max_answers` most frequent normalised answers of the kept
questions (`mvptr.data.vqa_answers.answer_vocabulary`), the soft targets `vqa_soft_scores` (what the VQA
metric would give each answer), an answer outside the vocabulary scoring nothing.

Pair i of an image with n kept questions carries question i mod n; a pair of an image without one carries
none (`has_question` False).

Batch keys added by `collate_questions` (`mvptr.pairs.collate` calls it when the items carry a question):
    question_ids    (B, Q) long   [CLS] question word pieces [SEP], padded (no concepts)
    question_mask   (B, Q)
    answer_scores   (B, A) float  soft scores over the answer vocabulary (A = the QA head's outputs)
    has_question    (B,) bool

Use:
    bank = QuestionBank.from_dataset(dataset_dir, tokenizer, splits, max_answers=3129, max_words=35)
    bank.counts                    # {"questions": ..., "images": ..., "dropped_held_out": ..., "answers": ...}
    item.update(bank.item(index, image_id))   # PairDataset does this for pair `index`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mvptr.data.task_files import EVAL_SPLITS, TRAIN_SPLIT, read_vqa
from mvptr.data.vqa_answers import answer_vocabulary, vqa_soft_scores

PRETRAIN_SPLIT = "train"


@dataclass(frozen=True)
class Question:
    question_id: int
    input_ids: np.ndarray  # (Q,) int64
    answer_index: np.ndarray  # (k,) int64 vocabulary index of each answer with a score
    answer_score: np.ndarray  # (k,) float32


class QuestionBank:
    """The kept training questions by image, and the answer vocabulary."""

    def __init__(self, questions: Mapping[int, Sequence[Question]], answers: Sequence[str], num_outputs: int,
                 counts: Mapping[str, int]) -> None:
        if len(answers) > num_outputs:
            raise ValueError(f"{len(answers)} answers for a QA head of {num_outputs} outputs")
        self.questions = {image_id: list(qs) for image_id, qs in questions.items() if qs}
        self.answers = list(answers)
        self.num_outputs = num_outputs
        self.counts = dict(counts)

    @classmethod
    def from_dataset(cls, dataset_dir: Path | str, tokenizer: Any, splits: Mapping[int, str], num_outputs: int,
                     max_words: int) -> QuestionBank:
        """The bank of a prepared dataset whose images are in `splits` (image id -> split)."""
        dataset_dir = Path(dataset_dir)
        train = read_vqa(dataset_dir, TRAIN_SPLIT["vqa"])
        held_out = {image_id for image_id, split in splits.items() if split != PRETRAIN_SPLIT}
        for split in EVAL_SPLITS["vqa"]:
            held_out |= {ex.image_id for ex in read_vqa(dataset_dir, split)}
        kept = [ex for ex in train if splits.get(ex.image_id) == PRETRAIN_SPLIT and ex.image_id not in held_out]
        answers = answer_vocabulary(kept, num_outputs)
        index = {answer: i for i, answer in enumerate(answers)}
        tokens = tokenizer([ex.question for ex in kept], truncation=True, max_length=max_words + 2)["input_ids"]
        questions: dict[int, list[Question]] = {}
        for ex, ids in zip(kept, tokens, strict=True):
            scored = [(index[a], s) for a, s in vqa_soft_scores(ex.answers).items() if a in index and s > 0]
            questions.setdefault(ex.image_id, []).append(Question(
                ex.question_id, np.asarray(ids, dtype=np.int64), np.asarray([i for i, _ in scored], dtype=np.int64),
                np.asarray([s for _, s in scored], dtype=np.float32)))
        counts = {"train_questions": len(train), "questions": len(kept), "images": len(questions),
                  "dropped_held_out": sum(ex.image_id in held_out for ex in train),
                  "dropped_not_pretraining": sum(ex.image_id not in held_out and
                                                 splits.get(ex.image_id) != PRETRAIN_SPLIT for ex in train),
                  "answers": len(answers)}
        return cls(questions, answers, num_outputs, counts)

    def question_ids(self) -> set[int]:
        return {q.question_id for qs in self.questions.values() for q in qs}

    def item(self, index: int, image_id: int) -> dict[str, np.ndarray]:
        """The question pair `index` of image `image_id` carries (empty ids and zero scores: none)."""
        qs = self.questions.get(image_id)
        scores = np.zeros(self.num_outputs, dtype=np.float32)
        if not qs:
            return {"question_ids": np.zeros(0, dtype=np.int64), "answer_scores": scores}
        question = qs[index % len(qs)]
        scores[question.answer_index] = question.answer_score
        return {"question_ids": question.input_ids, "answer_scores": scores}


def collate_questions(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The question keys of a batch (items of `QuestionBank.item`)."""
    rows = [it["question_ids"] for it in items]
    ids = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, question in enumerate(rows):
        ids[row, :len(question)] = torch.from_numpy(question)
        mask[row, :len(question)] = 1
    return {"question_ids": ids, "question_mask": mask,
            "answer_scores": torch.from_numpy(np.stack([it["answer_scores"] for it in items])),
            "has_question": torch.tensor([len(r) > 0 for r in rows])}
