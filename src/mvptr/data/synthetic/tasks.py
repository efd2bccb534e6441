"""Downstream task files of the synthetic world, in the public formats of VQA v2, SNLI-VE, RefCOCO and NLVR2.

Why: MVPTR is evaluated by fine-tuning on these four tasks; writing them in their public formats
lets the same readers serve the real datasets and this world. Every question, hypothesis,
expression and statement is derived from the scenes, and its answer or label is computed from
them, so the files are correct by construction (the tests re-derive them independently).

- VQA v2: `vqa/v2_OpenEnded_mscoco_{split}_questions.json` and `vqa/v2_mscoco_{split}_annotations.json`
  for split in train/val/test. Of the 10 "human" answers 0-3 are plausible wrong answers, so the
  majority answer (`multiple_choice_answer`) is always the true one; the number of wrong answers
  cycles through shuffled blocks of 0,1,2,3, so each split has questions with 10, 9, 8 and 7
  correct humans.
- SNLI-VE: `snli_ve/snli_ve_{train,dev,test}.jsonl`, two hypotheses per class per image.
- RefCOCO: `refcoco/refs.json`. Refs of train/val images have split "train"/"val". Refs of test
  images are "testA" when attributes alone single out the object ("the small red circle") and
  "testB" when a relation to another object is needed ("the circle to the left of the blue
  square") - the real RefCOCO splits testA/testB by people vs. other objects; here they split by
  difficulty. Objects that cannot be singled out get no ref.
- NLVR2: `nlvr2/{train,dev,test1}.json` (JSON lines, like NLVR2), one true and one false statement
  about each pair of images of a split.

Use:
    files = build_tasks(scenes, splits, captions, np.random.SeedSequence([seed, 3]))
    for path, task_file in files.items(): ...   # write task_file.payload as JSON or JSON lines
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvptr.data.synthetic.captions import (
    NUMBER_WORDS,
    RELATION_PHRASES,
    Caption,
    indefinite,
    noun_phrase,
    plural,
    random_description,
    tokenize,
)
from mvptr.data.synthetic.scene import (
    CATEGORY_IDS,
    COLOURS,
    INVERSE_RELATION,
    REFERRING_FORMS,
    RELATIONS,
    SHAPES,
    Description,
    Object,
    Scene,
    choose,
    describe,
    pick_objects,
    relation,
    unique_description,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# The public datasets name their evaluation splits differently.
SNLI_VE_SPLITS = {"train": "train", "val": "dev", "test": "test"}
NLVR2_SPLITS = {"train": "train", "val": "dev", "test": "test1"}

# The "info" and licence of every file of the world (COCO and VQA files carry them).
INFO = {"description": "MVPTR synthetic world", "version": "1.0", "contributor": "mvptr.data.synthetic"}
LICENSE = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
_HUMANS = 10
_MAX_WRONG_HUMANS = 3
_HYPOTHESES_PER_CLASS = 2
_MAX_TRIES = 20
# Predicates that the picture can neither confirm nor refute: they make SNLI-VE's "neutral" class.
_UNVERIFIABLE = ("is made of paper", "was drawn by a child", "is the artist's favourite shape",
                 "is about to move", "is heavier than it looks", "was painted yesterday")
# Descriptions for VQA that leave out what the question asks about.
_WITHOUT_COLOUR = (("shape",), ("size", "shape"))
_WITHOUT_SHAPE = (("colour",), ("size",), ("size", "colour"))


@dataclass(frozen=True)
class TaskFile:
    """What to write at one path: a JSON value, or a list of records written one per line."""

    payload: Any
    json_lines: bool
    count: int


def build_tasks(scenes: Sequence[Scene], splits: Mapping[int, str], captions: Mapping[int, Sequence[Caption]],
                seed_sequence: np.random.SeedSequence) -> dict[str, TaskFile]:
    """All task files, by path relative to the world folder; each task draws from its own stream."""
    vqa, snli, refs, nlvr2 = (np.random.default_rng(s) for s in seed_sequence.spawn(4))
    return {**vqa_files(vqa, scenes, splits), **snli_ve_files(snli, scenes, splits, captions),
            **refcoco_files(refs, scenes, splits), **nlvr2_files(nlvr2, scenes, splits)}


def _count_sentence(desc: Description, n: int, suffix: str = "") -> str:
    """"there is one circle{suffix}." / "there are two red circles{suffix}."."""
    if n == 1:
        return f"there is one {noun_phrase(desc)}{suffix}."
    return f"there are {NUMBER_WORDS[n]} {noun_phrase(desc, plural_form=True)}{suffix}."


def _absent_variant(rng: np.random.Generator, scene: Scene, obj: Object) -> Description:
    """`obj`'s colour and shape with one of them changed so that nothing in the scene fits."""
    options = ([Description(obj.shape, colour) for colour in COLOURS]
               + [Description(shape, obj.colour) for shape in SHAPES])
    return choose(rng, [d for d in options if not scene.matching(d)])


# ---------------------------------------------------------------- VQA v2


@dataclass(frozen=True)
class _Question:
    text: str
    question_type: str  # one of VQA v2's question-type prefixes
    answer_type: str  # "yes/no" | "number" | "other"
    answer: str
    wrong: tuple[str, ...]  # plausible wrong answers a careless annotator might give


def _yes_no(text: str, question_type: str, truth: bool) -> _Question:
    return _Question(text, question_type, "yes/no", "yes" if truth else "no", ("no" if truth else "yes",))


def _colour_question(rng: np.random.Generator, scene: Scene) -> _Question | None:
    """"what color is the small circle?", asked only when the description fits one object."""
    options = [(o, d) for o in scene.objects if (d := unique_description(scene, o, _WITHOUT_COLOUR))]
    if not options:
        return None
    obj, desc = choose(rng, options)
    return _Question(f"what color is the {noun_phrase(desc)}?", "what color is the", "other", obj.colour,
                     tuple(c for c in COLOURS if c != obj.colour))


def _shape_question(rng: np.random.Generator, scene: Scene) -> _Question | None:
    """"what shape is the red object?", asked only when the description fits one object."""
    options = [(o, d) for o in scene.objects if (d := unique_description(scene, o, _WITHOUT_SHAPE))]
    if not options:
        return None
    obj, desc = choose(rng, options)
    return _Question(f"what shape is the {noun_phrase(desc)}?", "what", "other", obj.shape,
                     tuple(s for s in SHAPES if s != obj.shape))


def _count_question(rng: np.random.Generator, scene: Scene) -> _Question | None:
    """"how many (red) squares are there?"; sometimes about a shape that is absent (answer 0)."""
    obj = choose(rng, scene.objects)
    absent = [s for s in SHAPES if not scene.matching(Description(s))]
    if absent and rng.random() < 0.2:
        desc = Description(choose(rng, absent))
    else:
        desc = Description(obj.shape, obj.colour if rng.random() < 0.3 else None)
    n = len(scene.matching(desc))
    return _Question(f"how many {noun_phrase(desc, plural_form=True)} are there?", "how many", "number", str(n),
                     tuple(str(m) for m in (n - 1, n + 1) if m >= 0))


def _existence_question(rng: np.random.Generator, scene: Scene) -> _Question | None:
    """"is there a blue triangle?", yes or no with equal probability."""
    obj = choose(rng, scene.objects)
    truth = bool(rng.random() < 0.5)
    desc = random_description(rng, obj) if truth else _absent_variant(rng, scene, obj)
    return _yes_no(f"is there {indefinite(desc)}?", "is there a", truth)


def _relation_question(rng: np.random.Generator, scene: Scene) -> _Question | None:
    """"what shape is to the left of the red circle?" or "is the red circle to the left of the blue square?"."""
    named = {o.id: d for o in scene.objects if (d := unique_description(scene, o))}
    what = []
    for anchor in (o for o in scene.objects if o.id in named):
        for rel in RELATIONS:
            fits = [o for o in scene.objects if o.id != anchor.id and relation(o, anchor) == rel]
            if len(fits) == 1:
                what.append((fits[0], rel, anchor))
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a.id != b.id and a.id in named and b.id in named]
    forms = (["what"] if what else []) + (["is"] if pairs else [])
    if not forms:
        return None
    if choose(rng, forms) == "what":
        target, rel, anchor = choose(rng, what)
        return _Question(f"what shape is {RELATION_PHRASES[rel]} the {noun_phrase(named[anchor.id])}?", "what",
                         "other", target.shape, tuple(s for s in SHAPES if s != target.shape))
    a, b = choose(rng, pairs)
    truth = bool(rng.random() < 0.5)
    # A "no" asks the opposite relation: unlike e.g. "above" for a pair that is mostly side by side,
    # it is false in plain English too, not only under the dominant-axis definition.
    rel = relation(a, b) if truth else INVERSE_RELATION[relation(a, b)]
    text = f"is the {noun_phrase(named[a.id])} {RELATION_PHRASES[rel]} the {noun_phrase(named[b.id])}?"
    return _yes_no(text, "is the", truth)


_QUESTION_MAKERS: tuple[Callable[[np.random.Generator, Scene], _Question | None], ...] = (
    _colour_question, _shape_question, _count_question, _existence_question, _relation_question)


def _human_answers(rng: np.random.Generator, question: _Question, n_wrong: int) -> list[dict[str, Any]]:
    answers = [question.answer] * (_HUMANS - n_wrong) + [choose(rng, question.wrong) for _ in range(n_wrong)]
    order = rng.permutation(_HUMANS)
    return [{"answer": answers[int(i)], "answer_confidence": "yes", "answer_id": k + 1} for k, i in enumerate(order)]


def vqa_files(rng: np.random.Generator, scenes: Sequence[Scene], splits: Mapping[int, str]) -> dict[str, TaskFile]:
    """Up to one question of each kind per image; question ids are image_id * 1000 + k as in VQA."""
    questions: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    annotations: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    wrong_counts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for scene in scenes:
        split = splits[scene.image_id]
        asked = [q for q in (make(rng, scene) for make in _QUESTION_MAKERS) if q is not None]
        for k, q in enumerate(asked):
            if not wrong_counts[split]:  # refill with a shuffled block 0..3 so every count occurs
                wrong_counts[split].extend(int(n) for n in rng.permutation(_MAX_WRONG_HUMANS + 1))
            question_id = scene.image_id * 1000 + k
            questions[split].append({"image_id": scene.image_id, "question": q.text, "question_id": question_id})
            annotations[split].append({
                "question_id": question_id, "image_id": scene.image_id, "question_type": q.question_type,
                "answer_type": q.answer_type, "multiple_choice_answer": q.answer,
                "answers": _human_answers(rng, q, wrong_counts[split].pop())})
    files = {}
    for split in SPLITS:
        files[f"vqa/v2_OpenEnded_mscoco_{split}_questions.json"] = TaskFile(
            {"info": INFO, "license": LICENSE, "task_type": "Open-Ended", "data_type": "mscoco",
             "data_subtype": split, "questions": questions[split]}, False, len(questions[split]))
        files[f"vqa/v2_mscoco_{split}_annotations.json"] = TaskFile(
            {"info": INFO, "license": LICENSE, "data_subtype": split, "annotations": annotations[split]},
            False, len(annotations[split]))
    return files


# ---------------------------------------------------------------- SNLI-VE


def _true_existence(rng: np.random.Generator, scene: Scene) -> str | None:
    return f"there is {indefinite(random_description(rng, choose(rng, scene.objects)))}."


def _relation_statement(rng: np.random.Generator, scene: Scene, *, reverse: bool) -> str | None:
    """"a red circle is to the left of a blue square." about two objects, or with the relation reversed."""
    if len(scene.objects) < 2:
        return None
    a, b = pick_objects(rng, scene, 2)
    s, o = random_description(rng, a), random_description(rng, b)
    rel = INVERSE_RELATION[relation(a, b)] if reverse else relation(a, b)
    if reverse and scene.exists_relation(s, rel, o):  # another pair fitting the same words may make it true
        return None
    return f"{indefinite(s)} is {RELATION_PHRASES[rel]} {indefinite(o)}."


def _true_relation(rng: np.random.Generator, scene: Scene) -> str | None:
    return _relation_statement(rng, scene, reverse=False)


def _true_count(rng: np.random.Generator, scene: Scene) -> str | None:
    desc = Description(choose(rng, scene.objects).shape)
    return _count_sentence(desc, len(scene.matching(desc)))


def _wrong_colour(rng: np.random.Generator, scene: Scene) -> str | None:
    obj = choose(rng, scene.objects)
    colours = [c for c in COLOURS if not scene.matching(Description(obj.shape, c))]
    return f"there is {indefinite(Description(obj.shape, choose(rng, colours)))}."


def _reversed_relation(rng: np.random.Generator, scene: Scene) -> str | None:
    return _relation_statement(rng, scene, reverse=True)


def _wrong_count(rng: np.random.Generator, scene: Scene) -> str | None:
    desc = Description(choose(rng, scene.objects).shape)
    n = len(scene.matching(desc))
    return _count_sentence(desc, choose(rng, [m for m in range(1, 5) if m != n]))


def _absent_object(rng: np.random.Generator, scene: Scene) -> str | None:
    absent = [s for s in SHAPES if not scene.matching(Description(s))]
    return f"there is {indefinite(Description(choose(rng, absent)))}." if absent else None


def _unverifiable(rng: np.random.Generator, scene: Scene) -> str | None:
    obj = choose(rng, scene.objects)
    desc = unique_description(scene, obj)
    subject = f"the {noun_phrase(desc)}" if desc else indefinite(random_description(rng, obj))
    return f"{subject} {choose(rng, _UNVERIFIABLE)}."


_HYPOTHESIS_MAKERS: dict[str, tuple[Callable[[np.random.Generator, Scene], str | None], ...]] = {
    "entailment": (_true_existence, _true_relation, _true_count),
    "neutral": (_unverifiable,),
    "contradiction": (_wrong_colour, _reversed_relation, _wrong_count, _absent_object),
}


def _hypotheses(rng: np.random.Generator, scene: Scene, label: str) -> list[str]:
    """Up to _HYPOTHESES_PER_CLASS distinct hypotheses of one class."""
    found: list[str] = []
    for _ in range(_MAX_TRIES):
        text = choose(rng, _HYPOTHESIS_MAKERS[label])(rng, scene)
        if text is not None and text not in found:
            found.append(text)
            if len(found) == _HYPOTHESES_PER_CLASS:
                break
    return found


def snli_ve_files(rng: np.random.Generator, scenes: Sequence[Scene], splits: Mapping[int, str],
                  captions: Mapping[int, Sequence[Caption]]) -> dict[str, TaskFile]:
    """Premise = one of the image's captions (as in SNLI-VE, where the image replaces it)."""
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for scene in scenes:
        hypotheses = [(label, text) for label in _HYPOTHESIS_MAKERS for text in _hypotheses(rng, scene, label)]
        for j, (label, text) in enumerate(hypotheses, start=1):
            k = int(rng.integers(len(captions[scene.image_id])))
            caption_id = f"{scene.file_name}#{k}"
            records[splits[scene.image_id]].append({
                "Flikr30kID": scene.file_name, "image_id": scene.image_id, "captionID": caption_id,
                "pairID": f"{caption_id}r{j}{label[0]}", "sentence1": captions[scene.image_id][k].text,
                "sentence2": text, "gold_label": label, "annotator_labels": [label]})
    return {f"snli_ve/snli_ve_{SNLI_VE_SPLITS[s]}.jsonl": TaskFile(records[s], True, len(records[s])) for s in SPLITS}


# ---------------------------------------------------------------- RefCOCO


def referring_expression(scene: Scene, obj: Object) -> tuple[str, bool] | None:
    """(expression, needs a relation) singling out `obj`, or None if it cannot be singled out.

    The shortest attribute description that fits only `obj`; failing that, the shortest
    "<description> <relation> the <unique description of another object>" that fits only `obj`.
    """
    desc = unique_description(scene, obj)
    if desc is not None:
        return f"the {noun_phrase(desc)}", False
    best: tuple[int, str] | None = None
    for anchor in scene.objects:
        anchor_desc = unique_description(scene, anchor) if anchor.id != obj.id else None
        if anchor_desc is None:
            continue
        rel = relation(obj, anchor)
        for fields in REFERRING_FORMS:
            own = describe(obj, fields)
            fits = [o for o in scene.matching(own) if o.id != anchor.id and relation(o, anchor) == rel]
            if fits == [obj]:
                text = f"the {noun_phrase(own)} {RELATION_PHRASES[rel]} the {noun_phrase(anchor_desc)}"
                if best is None or len(text.split()) < best[0]:
                    best = (len(text.split()), text)
                break
    return (best[1], True) if best else None


def refcoco_files(rng: np.random.Generator, scenes: Sequence[Scene], splits: Mapping[int, str]) -> dict[str, TaskFile]:
    """One ref per object that can be singled out, with two phrasings: "the red circle", "red circle"."""
    refs: list[dict[str, Any]] = []
    sent_id = 0
    for scene in scenes:
        for obj in scene.objects:
            found = referring_expression(scene, obj)
            if found is None:
                continue
            expression, needs_relation = found
            split = splits[scene.image_id]
            if split == "test":
                split = "testB" if needs_relation else "testA"
            # Both phrasings, in random order, so that neither is always sentence 0.
            raws = [expression, expression.removeprefix("the ")]
            sentences = []
            for i in rng.permutation(len(raws)):
                tokens = tokenize(raws[int(i)])
                sentences.append({"sent": " ".join(tokens), "raw": raws[int(i)], "tokens": tokens, "sent_id": sent_id})
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": obj.id, "image_id": scene.image_id,
                         "category_id": CATEGORY_IDS[obj.shape], "split": split, "file_name": scene.file_name,
                         "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
    return {"refcoco/refs.json": TaskFile(refs, False, len(refs))}


# ---------------------------------------------------------------- NLVR2


def _statements(left: Scene, right: Scene) -> dict[str, list[tuple[str, bool]]]:
    """Every statement of each NLVR2 template about the pair, with its truth value, by template."""
    found: dict[str, list[tuple[str, bool]]] = {"both": [], "exactly one": [], "more": [], "total": []}
    objects = left.objects + right.objects
    descriptions = sorted({d for o in objects for d in (Description(o.shape), Description(o.shape, o.colour))},
                          key=noun_phrase)
    for desc in descriptions:
        in_left, in_right = bool(left.matching(desc)), bool(right.matching(desc))
        found["both"].append((f"both images contain {indefinite(desc)}.", in_left and in_right))
        found["exactly one"].append((f"exactly one image contains {indefinite(desc)}.", in_left != in_right))
    for shape in sorted({o.shape for o in objects}):
        desc = Description(shape)
        n_left, n_right = len(left.matching(desc)), len(right.matching(desc))
        found["more"].append((f"the left image has more {plural(shape)} than the right image.", n_left > n_right))
        found["more"].append((f"the right image has more {plural(shape)} than the left image.", n_right > n_left))
        total = n_left + n_right
        found["total"].extend((_count_sentence(desc, n, " in total"), n == total)
                              for n in (total - 1, total, total + 1) if n >= 1)
    return found


def _texts_by_truth(statements: Sequence[tuple[str, bool]]) -> tuple[list[str], list[str]]:
    """(texts of the true statements, texts of the false ones)."""
    return [t for t, truth in statements if truth], [t for t, truth in statements if not truth]


def _true_and_false(rng: np.random.Generator, by_template: Mapping[str, Sequence[tuple[str, bool]]]
                    ) -> list[tuple[str, bool]]:
    """One true and one false statement of the same template, in random order.

    Taking both from one template keeps every template balanced, so that the wording alone
    ("exactly one image ..." is usually true) does not give the label away. A pair where no
    template has both (rare) contributes whatever single statements it has.
    """
    balanced = [name for name, statements in by_template.items() if all(_texts_by_truth(statements))]
    pool = by_template[choose(rng, balanced)] if balanced else [s for group in by_template.values() for s in group]
    picked = [(choose(rng, texts), truth) for texts, truth in zip(_texts_by_truth(pool), (True, False)) if texts]
    return [picked[int(i)] for i in rng.permutation(len(picked))]


def nlvr2_files(rng: np.random.Generator, scenes: Sequence[Scene], splits: Mapping[int, str]) -> dict[str, TaskFile]:
    """Each image of a split is paired with the next in a random cycle; one true and one false statement per pair."""
    files = {}
    for split in SPLITS:
        members = [s for s in scenes if splits[s.image_id] == split]
        cycle = [members[int(i)] for i in rng.permutation(len(members))]
        pairs = [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))] if len(cycle) >= 2 else []
        records: list[dict[str, Any]] = []
        for left, right in pairs:
            for text, truth in _true_and_false(rng, _statements(left, right)):
                records.append({"identifier": f"{NLVR2_SPLITS[split]}-{len(records)}-0-0", "sentence": text,
                                "left_image_id": left.image_id, "right_image_id": right.image_id,
                                "left_file": left.file_name, "right_file": right.file_name,
                                "label": "True" if truth else "False"})
        files[f"nlvr2/{NLVR2_SPLITS[split]}.json"] = TaskFile(records, True, len(records))
    return files
