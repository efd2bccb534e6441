"""Readers of the downstream task files (VQA v2, SNLI-VE, RefCOCO, NLVR2) in their public formats -> examples.

Why: fine-tuning (`mvptr.evaluate.finetune`) works on plain examples - a text, the image(s) it is about and
its label - whatever the dataset. The synthetic world writes its task files in the public formats
(`mvptr.data.synthetic.tasks`), so the same readers serve it and the real datasets. Records carry image ids
where the synthetic world writes them; public SNLI-VE and NLVR2 name image files instead, which `by_file`
(file name -> image id, `image_ids_by_file`) resolves.

    vqa      vqa/v2_OpenEnded_mscoco_{split}_questions.json + vqa/v2_mscoco_{split}_annotations.json
             (split: train | val | test), one example per question with its 10 human answers
    ve       snli_ve/snli_ve_{split}.jsonl (train | dev | test), the hypothesis against the image
    rec      refcoco/refs.json (split field: train | val | testA | testB), one example per sentence; the gold
             box is the referred annotation's (annotations/instances.json), as normalised [x1, y1, x2, y2]
    nlvr2    nlvr2/{split}.json, JSON lines (train | dev | test1), a statement about a left and a right image

Every field a reader takes is checked: a file that is not UTF-8 JSON, a record that is not an object, a
missing field, an id that is no integer, a text that is no string, a box or image size that cannot make a
normalised box is a DataError naming the file, the record and the field.

Use:
    examples = read_task(dataset_dir, "vqa", "train")         # list[VQAExample]
    TRAIN_SPLIT["ve"], EVAL_SPLITS["rec"]                      # "train", ("val", "testA", "testB")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvptr.data.coco import dataset_paths, finite_number, load_coco, read_json
from mvptr.errors import DataError

TASKS = ("retrieval", "vqa", "ve", "rec", "nlvr2")
# Where each task's files sit in a prepared dataset folder, and the names each file has there.
TASK_FOLDERS = {"vqa": "vqa", "ve": "snli_ve", "rec": "refcoco", "nlvr2": "nlvr2"}
TASK_FILE_NAMES = {
    "vqa": [f"v2_OpenEnded_mscoco_{s}_questions.json" for s in ("train", "val", "test")]
    + [f"v2_mscoco_{s}_annotations.json" for s in ("train", "val", "test")],
    "ve": [f"snli_ve_{s}.jsonl" for s in ("train", "dev", "test")],
    "rec": ["refs.json"],
    "nlvr2": [f"{s}.json" for s in ("train", "dev", "test1")],
}
# Each task's training split and the splits it is evaluated on, in the task's own split names.
TRAIN_SPLIT = {"retrieval": "train", "vqa": "train", "ve": "train", "rec": "train", "nlvr2": "train"}
EVAL_SPLITS = {"retrieval": ("test",), "vqa": ("val", "test"), "ve": ("dev", "test"),
               "rec": ("val", "testA", "testB"), "nlvr2": ("dev", "test1")}
VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = ("false", "true")


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    image_id: int
    question: str
    question_type: str
    answer_type: str | None
    answers: tuple[str, ...]  # the human answers (10 in VQA v2)


@dataclass(frozen=True)
class VEExample:
    pair_id: str
    image_id: int
    hypothesis: str
    label: int  # index into VE_LABELS


@dataclass(frozen=True)
class RefExample:
    ref_id: int
    sent_id: int
    image_id: int
    expression: str
    gold_box: tuple[float, float, float, float]  # [x1/W, y1/H, x2/W, y2/H] of the referred object


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    left_image_id: int
    right_image_id: int
    sentence: str
    label: int  # index into NLVR2_LABELS


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Records (objects) of a JSON-lines file; a malformed line is named by its number."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: byte {err.start}: {err.reason}") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"malformed JSON in {path} line {number}: {err.msg}") from err
            except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep
                raise DataError(f"cannot read JSON in {path} line {number}: {type(err).__name__}: {err}") from err
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is a {type(record).__name__}; allowed: a JSON object")
            records.append(record)
    return records


def image_ids_by_file(dataset_dir: Path | str) -> dict[str, int]:
    """file name -> image id of every image of the prepared dataset (from its captions file)."""
    captions = load_coco(dataset_paths(Path(dataset_dir))["captions"])
    return {image["file_name"]: image["id"] for image in captions.dataset["images"]}


def _image_id(record: Mapping[str, Any], id_key: str, file_name: Any, by_file: Mapping[str, int] | None,
              path: Path) -> int:
    if id_key in record:
        return _integer(record, id_key, path)
    if by_file is None or not isinstance(file_name, str) or file_name not in by_file:
        raise DataError(f"{path}: a record names image {file_name!r}, which the dataset does not have")
    return by_file[file_name]


def _field(record: Any, key: str, path: Path) -> Any:
    if not isinstance(record, Mapping):
        raise DataError(f"{path}: a record is a {type(record).__name__}, not an object with {key!r}: "
                        f"{str(record)[:200]}")
    if key not in record:
        raise DataError(f"{path}: a record lacks {key!r}: {str(record)[:200]}")
    return record[key]


def _integer(record: Any, key: str, path: Path) -> int:
    """An id field: an integer, or a string of one (as some releases write them)."""
    value = _field(record, key, path)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise DataError(f"{path}: a record's {key!r} is {str(value)[:100]!r}; allowed: an integer id")


def _text(record: Any, key: str, path: Path) -> str:
    value = _field(record, key, path)
    if not isinstance(value, str):
        raise DataError(f"{path}: a record's {key!r} is {str(value)[:100]!r}; allowed: a string")
    return value


def _list(record: Any, key: str, path: Path) -> list[Any]:
    value = _field(record, key, path)
    if not isinstance(value, list):
        raise DataError(f"{path}: {key!r} is a {type(value).__name__}; allowed: a list")
    return value


def read_vqa(dataset_dir: Path, split: str) -> list[VQAExample]:
    questions_path = dataset_dir / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json"
    annotations_path = dataset_dir / "vqa" / f"v2_mscoco_{split}_annotations.json"
    questions = {_integer(q, "question_id", questions_path): _text(q, "question", questions_path)
                 for q in _list(read_json(questions_path), "questions", questions_path)}
    examples = []
    for ann in _list(read_json(annotations_path), "annotations", annotations_path):
        question_id = _integer(ann, "question_id", annotations_path)
        if question_id not in questions:
            raise DataError(f"{annotations_path}: question {question_id} is not in {questions_path}")
        answer_type = ann.get("answer_type")
        if answer_type is not None and not isinstance(answer_type, str):
            raise DataError(f"{annotations_path}: question {question_id} has answer_type {answer_type!r}; allowed: "
                            f"a string or null")
        examples.append(VQAExample(
            question_id=question_id, image_id=_integer(ann, "image_id", annotations_path),
            question=questions[question_id], question_type=_text(ann, "question_type", annotations_path),
            answer_type=answer_type,
            answers=tuple(_text(a, "answer", annotations_path) for a in _list(ann, "answers", annotations_path))))
    return examples


def read_snli_ve(dataset_dir: Path, split: str, by_file: Mapping[str, int] | None = None) -> list[VEExample]:
    path = dataset_dir / "snli_ve" / f"snli_ve_{split}.jsonl"
    examples = []
    for record in read_json_lines(path):
        label = _field(record, "gold_label", path)
        if label not in VE_LABELS:
            raise DataError(f"{path}: pair {record.get('pairID')} has gold_label {label!r}, not one of {VE_LABELS}")
        image_id = _image_id(record, "image_id", record.get("Flikr30kID"), by_file, path)
        examples.append(VEExample(str(_field(record, "pairID", path)), image_id, _text(record, "sentence2", path),
                                  VE_LABELS.index(label)))
    return examples


def read_refcoco(dataset_dir: Path, split: str) -> list[RefExample]:
    refs_path = dataset_dir / "refcoco" / "refs.json"
    instances_path = dataset_paths(dataset_dir)["instances"]
    if instances_path is None:
        raise DataError(f"{dataset_dir} has no instances file: RefCOCO's gold boxes come from it")
    instances = read_json(instances_path)
    boxes = {_integer(a, "id", instances_path): a for a in _list(instances, "annotations", instances_path)}
    sizes = {_integer(i, "id", instances_path): i for i in _list(instances, "images", instances_path)}
    refs = read_json(refs_path)
    if not isinstance(refs, list):
        raise DataError(f"{refs_path} holds a {type(refs).__name__}; allowed: a list of refs")
    examples = []
    for ref in refs:
        if _field(ref, "split", refs_path) != split:
            continue
        ref_id, ann_id = _integer(ref, "ref_id", refs_path), _integer(ref, "ann_id", refs_path)
        image_id = _integer(ref, "image_id", refs_path)
        if ann_id not in boxes:
            raise DataError(f"{refs_path}: ref {ref_id} names annotation {ann_id}, not in {instances_path}")
        box = _field(boxes[ann_id], "bbox", instances_path)
        if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
            raise DataError(f"{instances_path}: annotation {ann_id} has bbox {str(box)[:100]}; allowed: "
                            f"[x, y, width, height] of finite numbers")
        width, height = (sizes.get(image_id, {}).get(key) for key in ("width", "height"))
        if not (finite_number(width) and finite_number(height) and width > 0 and height > 0):
            raise DataError(f"{instances_path}: image {image_id} (of ref {ref_id}) has width {width!r} and height "
                            f"{height!r}; allowed: positive numbers")
        x, y, w, h = box
        gold = (x / width, y / height, (x + w) / width, (y + h) / height)
        examples += [RefExample(ref_id, _integer(s, "sent_id", refs_path), image_id, _text(s, "sent", refs_path), gold)
                     for s in _list(ref, "sentences", refs_path)]
    return examples


def read_nlvr2(dataset_dir: Path, split: str, by_file: Mapping[str, int] | None = None) -> list[NLVR2Example]:
    path = dataset_dir / "nlvr2" / f"{split}.json"
    examples = []
    for record in read_json_lines(path):
        identifier = _text(record, "identifier", path)
        # Public NLVR2 names its images after the identifier: "<split>-<set>-<pair>-img0.png" and "-img1.png".
        stem = "-".join(identifier.split("-")[:3])
        left = _image_id(record, "left_image_id", record.get("left_file", f"{stem}-img0.png"), by_file, path)
        right = _image_id(record, "right_image_id", record.get("right_file", f"{stem}-img1.png"), by_file, path)
        label = str(_field(record, "label", path)).lower()
        if label not in NLVR2_LABELS:
            raise DataError(f"{path}: {identifier} has label {record['label']!r}, not True or False")
        examples.append(NLVR2Example(identifier, left, right, _text(record, "sentence", path),
                                     NLVR2_LABELS.index(label)))
    return examples


# The text an example of each example task carries (what is parsed into concepts and encoded like a caption).
TEXT_FIELD = {"vqa": "question", "ve": "hypothesis", "rec": "expression", "nlvr2": "sentence"}


def task_texts(dataset_dir: Path | str, tasks: Sequence[str]) -> list[str]:
    """Every distinct text of the training and evaluation splits of `tasks` (example tasks), sorted."""
    by_file = image_ids_by_file(dataset_dir)
    return sorted({getattr(example, TEXT_FIELD[task]) for task in tasks
                   for split in (TRAIN_SPLIT[task], *EVAL_SPLITS[task])
                   for example in read_task(dataset_dir, task, split, by_file)})


def read_task(dataset_dir: Path | str, task: str, split: str,
              by_file: Mapping[str, int] | None = None) -> list[Any]:
    """The examples of `task` (vqa | ve | rec | nlvr2) in `split` (the task's own split name)."""
    dataset_dir = Path(dataset_dir)
    if task == "vqa":
        return read_vqa(dataset_dir, split)
    if task == "ve":
        return read_snli_ve(dataset_dir, split, by_file)
    if task == "rec":
        return read_refcoco(dataset_dir, split)
    if task == "nlvr2":
        return read_nlvr2(dataset_dir, split, by_file)
    raise ValueError(f"no task file reader for {task!r}; readers: vqa, ve, rec, nlvr2")
