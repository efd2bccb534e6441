"""Tests of the embedded synthetic world (mvptr.data.synthetic).

The generator is checked from the outside: files are read back in their public formats and every
answer, label and referring expression is re-derived here from scene_graphs.json with this file's
own small parser and geometry, so that a bug in the generator's logic cannot hide in the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO

from mvptr.data.synthetic import SIZES, generate_world
from mvptr.data.synthetic import world as world_module
from mvptr.data.synthetic.captions import NUMBER_WORDS
from mvptr.data.synthetic.scene import COLOURS, OBJECT_SIZES, SHAPES

NUM_IMAGES = SIZES["tiny"]
CAPTIONS_PER_IMAGE = 5
NUMBERS = {w: n for n, w in enumerate(NUMBER_WORDS) if n > 0}
REL_PHRASES = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
# A description: optional size, optional colour, a shape (or "object"), optionally plural.
DESC = (rf"(?:({'|'.join(OBJECT_SIZES)}) )?(?:({'|'.join(COLOURS)}) )?"
        rf"({'|'.join(SHAPES)}|object)s?")
REL = "|".join(REL_PHRASES)


# ------------------------------------------------------------------ helpers


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def relation(a: dict, b: dict) -> str:
    """Relation of a to b along the axis where the box centres differ most (ties: horizontal)."""
    ax, ay = a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2
    bx, by = b["bbox"][0] + b["bbox"][2] / 2, b["bbox"][1] + b["bbox"][3] / 2
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def matching(objects: list[dict], size: str | None, colour: str | None, shape: str | None) -> list[dict]:
    return [o for o in objects if (size is None or o["size"] == size) and (colour is None or o["colour"] == colour)
            and (shape in (None, "object") or o["shape"] == shape)]


def resolve(objects: list[dict], expression: str) -> list[dict]:
    """Objects that a referring expression "[the] desc [REL the desc]" denotes."""
    m = re.fullmatch(rf"(?:the )?{DESC}(?: ({REL}) the {DESC})?", expression)
    assert m, f"unparsable expression: {expression!r}"
    targets = matching(objects, *m.group(1, 2, 3))
    if m.group(4) is None:
        return targets
    anchors = matching(objects, *m.group(5, 6, 7))
    assert len(anchors) == 1, f"anchor of {expression!r} is not unique"
    return [o for o in targets if o is not anchors[0] and relation(o, anchors[0]) == REL_PHRASES[m.group(4)]]


def exists_relation(objects: list[dict], subject: tuple, rel: str, obj: tuple) -> bool:
    return any(a is not b and relation(a, b) == rel
               for a in matching(objects, *subject) for b in matching(objects, *obj))


def boxes_overlap(a: list[int], b: list[int]) -> bool:
    return not (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "world"
    generate_world(root, num_images=NUM_IMAGES, seed=0, captions_per_image=CAPTIONS_PER_IMAGE)
    return root


@pytest.fixture(scope="module")
def scenes(world: Path) -> dict[int, dict]:
    return {int(k): v for k, v in read_json(world / "annotations/scene_graphs.json")["images"].items()}


@pytest.fixture(scope="module")
def splits(world: Path) -> dict[int, str]:
    return {img["cocoid"]: img["split"] for img in read_json(world / "karpathy_split.json")["images"]}


# ------------------------------------------------------------------ determinism, atomicity, manifest


def test_same_seed_same_bytes_other_seed_other_bytes(world: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    generate_world(again, num_images=NUM_IMAGES, seed=0, captions_per_image=CAPTIONS_PER_IMAGE)
    generate_world(other, num_images=NUM_IMAGES, seed=1, captions_per_image=CAPTIONS_PER_IMAGE)
    reference = tree_hashes(world)
    assert tree_hashes(again) == reference
    different = tree_hashes(other)
    assert {p for p in reference if different.get(p) != reference[p]} >= {
        "images/synth_000001.png", "annotations/captions.json", "annotations/instances.json", "refcoco/refs.json"}


def test_regenerating_replaces_the_folder_atomically(tmp_path: Path) -> None:
    target = tmp_path / "world"
    target.mkdir()
    (target / "stale.txt").write_text("from an older run")
    generate_world(target, num_images=12, seed=3)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temporary folder left behind


def test_failed_generation_keeps_the_old_folder_and_no_temporary_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "world"
    target.mkdir()
    (target / "previous.txt").write_text("a finished older world")

    def fail(*_: Any) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(world_module, "png_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        generate_world(target, num_images=12, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
    assert (target / "previous.txt").read_text() == "a finished older world"


def test_too_few_images_for_three_splits_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too few"):
        generate_world(tmp_path / "world", num_images=2, seed=0)


def test_manifest_lists_every_file_and_counts(world: Path) -> None:
    manifest = read_json(world / "manifest.json")
    hashes = tree_hashes(world)
    del hashes["manifest.json"]
    assert manifest["files"] == hashes
    assert manifest["counts"]["images"] == NUM_IMAGES
    assert manifest["counts"]["captions"] == NUM_IMAGES * CAPTIONS_PER_IMAGE
    assert manifest["generator"]["seed"] == 0
    text = (world / "manifest.json").read_text()
    assert str(world) not in text and "/tmp" not in text
    assert manifest["counts"]["refcoco/refs.json"] == len(read_json(world / "refcoco/refs.json"))


# ------------------------------------------------------------------ COCO files, splits, twins


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_coco_captions_and_instances(world: Path, scenes: dict[int, dict]) -> None:
    captions = load_coco(world / "annotations/captions.json")
    instances = load_coco(world / "annotations/instances.json")
    assert len(captions.getImgIds()) == NUM_IMAGES
    assert len(captions.getAnnIds()) == NUM_IMAGES * CAPTIONS_PER_IMAGE
    assert sorted(c["name"] for c in instances.loadCats(instances.getCatIds())) == sorted(SHAPES)
    for image_id in captions.getImgIds():
        img = captions.imgs[image_id]
        assert (world / "images" / img["file_name"]).is_file()
        anns = instances.loadAnns(instances.getAnnIds(imgIds=[image_id]))
        assert 1 <= len(anns) <= 4
        assert sorted(a["id"] for a in anns) == sorted(o["id"] for o in scenes[image_id]["objects"])
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, int) for v in ann["bbox"])
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
            assert x <= min(xs) and max(xs) <= x + w and y <= min(ys) and max(ys) <= y + h
            assert 0 < ann["area"] <= w * h
            assert set(ann["attributes"]) == {"colour", "size"}
        for i, a in enumerate(anns):
            assert not any(boxes_overlap(a["bbox"], b["bbox"]) for b in anns[i + 1:])


def test_karpathy_split_file(world: Path, splits: dict[int, str]) -> None:
    data = read_json(world / "karpathy_split.json")
    assert data["dataset"] == "synthetic"
    assert Counter(splits.values()).keys() == {"train", "val", "test"}
    for img in data["images"]:
        assert img["filepath"] == "images" and (world / "images" / img["filename"]).is_file()
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        assert all(s["imgid"] == img["imgid"] and s["tokens"] == re.findall(r"[a-z0-9']+", s["raw"])
                   for s in img["sentences"])


def test_twins_differ_in_binding_only(scenes: dict[int, dict], splits: dict[int, str]) -> None:
    twins = {i: s for i, s in scenes.items() if s["twin_of"] is not None}
    assert twins
    for image_id, twin in twins.items():
        source = scenes[twin["twin_of"]]
        assert splits[image_id] == splits[twin["twin_of"]]
        assert source["twin_of"] is None
        for key in ("shape", "colour", "size"):
            assert Counter(o[key] for o in twin["objects"]) == Counter(o[key] for o in source["objects"])
        bound = [[(o["shape"], o["colour"], o["bbox"]) for o in s["objects"]] for s in (twin, source)]
        assert bound[0] != bound[1]


# ------------------------------------------------------------------ captions


def test_captions_carry_their_gold_tuples(world: Path, scenes: dict[int, dict]) -> None:
    coco = read_json(world / "annotations/captions.json")
    gold = read_json(world / "annotations/scene_graphs.json")["captions"]
    per_image: dict[int, list[str]] = {}
    templates: Counter[str] = Counter()
    partial = 0
    for ann in coco["annotations"]:
        text, tuples, objects = ann["caption"], gold[str(ann["id"])], scenes[ann["image_id"]]["objects"]
        per_image.setdefault(ann["image_id"], []).append(text)
        templates[tuples["template"]] += 1
        assert text == text.lower() and text.endswith(".")
        words = re.findall(r"[a-z']+", text)
        for lemma in tuples["objects"]:
            assert lemma in words or lemma + "s" in words, (text, lemma)
            assert any(o["shape"] == lemma for o in objects)
        for lemma, attribute in tuples["attributes"]:
            assert attribute in words, (text, attribute)
            assert lemma in tuples["objects"]
        for subject, rel, obj in tuples["relations"]:
            assert rel in text and subject in words and obj in words
            assert exists_relation(objects, (None, None, subject), rel, (None, None, obj)), text
        for number, size, colour, shape in re.findall(rf"\b({'|'.join(NUMBERS)}) {DESC}", text):
            assert len(matching(objects, size or None, colour or None, shape)) == NUMBERS[number], text
        partial += len(tuples["objects"]) < len(objects)
    assert all(len(set(texts)) == CAPTIONS_PER_IMAGE for texts in per_image.values())
    assert templates["relation"] and templates["count"] and templates["conjunction"]
    assert partial > 0


# ------------------------------------------------------------------ VQA v2


def vqa_answer(objects: list[dict], question: str) -> str:
    """The answer to a question of the generator's grammar, derived from the scene alone."""
    if m := re.fullmatch(rf"what color is the {DESC}\?", question):
        (target,) = matching(objects, *m.groups())
        return target["colour"]
    if m := re.fullmatch(rf"what shape is the {DESC}\?", question):
        (target,) = matching(objects, *m.groups())
        return target["shape"]
    if m := re.fullmatch(rf"how many {DESC} are there\?", question):
        return str(len(matching(objects, *m.groups())))
    if m := re.fullmatch(rf"is there an? {DESC}\?", question):
        return "yes" if matching(objects, *m.groups()) else "no"
    if m := re.fullmatch(rf"what shape is ({REL}) the {DESC}\?", question):
        (anchor,) = matching(objects, *m.group(2, 3, 4))
        (target,) = [o for o in objects if o is not anchor and relation(o, anchor) == REL_PHRASES[m.group(1)]]
        return target["shape"]
    if m := re.fullmatch(rf"is the {DESC} ({REL}) the {DESC}\?", question):
        (a,), (b,) = matching(objects, *m.group(1, 2, 3)), matching(objects, *m.group(5, 6, 7))
        return "yes" if relation(a, b) == REL_PHRASES[m.group(4)] else "no"
    raise AssertionError(f"question outside the grammar: {question!r}")


def test_vqa_files_agree_with_the_scenes(world: Path, scenes: dict[int, dict]) -> None:
    correct_humans: Counter[int] = Counter()
    yes_no: Counter[str] = Counter()
    for split in ("train", "val", "test"):
        questions = read_json(world / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json")
        annotations = read_json(world / f"vqa/v2_mscoco_{split}_annotations.json")
        assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == split
        assert annotations["data_subtype"] == split and questions["questions"]
        assert ([q["question_id"] for q in questions["questions"]]
                == [a["question_id"] for a in annotations["annotations"]])
        for q, ann in zip(questions["questions"], annotations["annotations"]):
            truth = vqa_answer(scenes[q["image_id"]]["objects"], q["question"])
            assert ann["multiple_choice_answer"] == truth, q["question"]
            assert ann["answer_type"] in {"yes/no", "number", "other"}
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert all(a["answer_confidence"] == "yes" for a in ann["answers"])
            votes = Counter(a["answer"] for a in ann["answers"])
            assert votes.most_common(1)[0][0] == truth and votes[truth] >= 7
            correct_humans[votes[truth]] += 1
            if ann["answer_type"] == "yes/no":
                yes_no[truth] += 1
    assert set(correct_humans) == {7, 8, 9, 10}
    assert min(yes_no.values()) > 0.3 * sum(yes_no.values())


# ------------------------------------------------------------------ SNLI-VE


def statement_truth(objects: list[dict], sentence: str) -> bool | None:
    """Truth of an entailment/contradiction hypothesis, or None if it is not of a checked form."""
    if m := re.fullmatch(rf"there is an? {DESC}\.", sentence):
        return bool(matching(objects, *m.groups()))
    if m := re.fullmatch(rf"there (?:is|are) ({'|'.join(NUMBERS)}) {DESC}\.", sentence):
        return len(matching(objects, *m.group(2, 3, 4))) == NUMBERS[m.group(1)]
    if m := re.fullmatch(rf"an? {DESC} is ({REL}) an? {DESC}\.", sentence):
        return exists_relation(objects, m.group(1, 2, 3), REL_PHRASES[m.group(4)], m.group(5, 6, 7))
    return None


def test_snli_ve_files_agree_with_the_scenes(world: Path, scenes: dict[int, dict], splits: dict[int, str]) -> None:
    captions = read_json(world / "annotations/captions.json")["annotations"]
    texts = {(c["image_id"], c["caption"]) for c in captions}
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        records = read_jsonl(world / f"snli_ve/snli_ve_{name}.jsonl")
        labels = Counter(r["gold_label"] for r in records)
        assert set(labels) == {"entailment", "neutral", "contradiction"}
        assert min(labels.values()) > 0.25 * len(records)
        assert len({r["pairID"] for r in records}) == len(records)
        for r in records:
            objects = scenes[r["image_id"]]["objects"]
            assert splits[r["image_id"]] == split and (world / "images" / r["Flikr30kID"]).is_file()
            assert (r["image_id"], r["sentence1"]) in texts
            truth = statement_truth(objects, r["sentence2"])
            if r["gold_label"] == "neutral":
                m = re.match(rf"(?:the|an?) {DESC} ", r["sentence2"])
                assert m and matching(objects, *m.groups()), r["sentence2"]
            else:
                assert truth is not None, r["sentence2"]
                assert truth == (r["gold_label"] == "entailment"), r["sentence2"]


# ------------------------------------------------------------------ RefCOCO


def test_referring_expressions_single_out_their_object(world: Path, scenes: dict[int, dict],
                                                      splits: dict[int, str]) -> None:
    refs = read_json(world / "refcoco/refs.json")
    categories = {c["id"]: c["name"] for c in read_json(world / "annotations/instances.json")["categories"]}
    assert refs
    for ref in refs:
        objects = scenes[ref["image_id"]]["objects"]
        (target,) = [o for o in objects if o["id"] == ref["ann_id"]]
        assert categories[ref["category_id"]] == target["shape"]
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        needs_relation = False
        for sentence in ref["sentences"]:
            assert sentence["tokens"] == sentence["raw"].split() and sentence["sent"] == sentence["raw"]
            assert resolve(objects, sentence["raw"]) == [target], sentence["raw"]
            needs_relation |= any(phrase in sentence["raw"] for phrase in REL_PHRASES)
        image_split = splits[ref["image_id"]]
        expected = ("testB" if needs_relation else "testA") if image_split == "test" else image_split
        assert ref["split"] == expected
    assert {"train", "val", "testA"} <= {r["split"] for r in refs}
    assert any(phrase in r["sentences"][0]["raw"] for r in refs for phrase in REL_PHRASES)  # some need a relation


# ------------------------------------------------------------------ NLVR2


def nlvr2_truth(left: list[dict], right: list[dict], sentence: str) -> bool:
    if m := re.fullmatch(rf"both images contain an? {DESC}\.", sentence):
        return bool(matching(left, *m.groups())) and bool(matching(right, *m.groups()))
    if m := re.fullmatch(rf"exactly one image contains an? {DESC}\.", sentence):
        return bool(matching(left, *m.groups())) != bool(matching(right, *m.groups()))
    if m := re.fullmatch(rf"the (left|right) image has more {DESC} than the (left|right) image\.", sentence):
        first, second = (left, right) if m.group(1) == "left" else (right, left)
        return len(matching(first, *m.group(2, 3, 4))) > len(matching(second, *m.group(2, 3, 4)))
    if m := re.fullmatch(rf"there (?:is|are) ({'|'.join(NUMBERS)}) {DESC} in total\.", sentence):
        desc = m.group(2, 3, 4)
        return len(matching(left, *desc)) + len(matching(right, *desc)) == NUMBERS[m.group(1)]
    raise AssertionError(f"statement outside the templates: {sentence!r}")


def test_nlvr2_labels_agree_with_the_scenes(world: Path, scenes: dict[int, dict], splits: dict[int, str]) -> None:
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test1")):
        records = read_jsonl(world / f"nlvr2/{name}.json")
        labels = Counter(r["label"] for r in records)
        assert labels["True"] > 0 and labels["False"] > 0
        assert abs(labels["True"] - labels["False"]) <= 0.2 * len(records)
        for n, r in enumerate(records):
            assert r["identifier"] == f"{name}-{n}-0-0"
            assert splits[r["left_image_id"]] == splits[r["right_image_id"]] == split
            assert r["left_file"] == f"synth_{r['left_image_id']:06d}.png"
            truth = nlvr2_truth(scenes[r["left_image_id"]]["objects"], scenes[r["right_image_id"]]["objects"],
                                r["sentence"])
            assert r["label"] == str(truth), r["sentence"]
