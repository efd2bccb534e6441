"""Bad input, counted: every reader of user input ends in a result or in one named error, never a crash.

Two halves, each try counted per kind of input (`bad_input_cases.Tally`):
- property-based fuzzers (hypothesis, a fixed number of examples and a per-example deadline) over the config
  loader and its overrides, the COCO-format readers, the task-file readers, the caption parser (the spaCy
  pipeline the project loads), the image reader, the VinVL TSV import and the region store: a result, or a
  ConfigError/DataError whose message is one line naming the file, key or position - anything else is a crash;
- a corpus of hand-made bad files (truncated, corrupt and zero-byte images; wrong JSON types; repeated ids;
  missing, NaN, negative or outside boxes; NaN and overflowing features; non-UTF-8, empty and 1 MB
  captions) through the command a user runs (`mvptr.cli.main`, a few of them in a fresh process too):
  exit status 2 and one line naming the file and the field, or a clean result where the input is fine.
What a researcher gets, by decision: an empty, non-UTF-8 or over-long caption stops `data prepare` naming its
annotation id (a caption dataset with holes is a broken export, better found before hours of training); a
box partly outside its image is clipped (COCO's rounding makes such boxes), one wholly outside is an error.

The counts go to results/reliability/bad_inputs.json (written atomically when the module ends):
    {"kinds": {kind: {"tried": n, "crashed": 0}}, "tried": N, "crashed": 0}
Run: .venv/bin/python -m pytest -q tests/test_bad_input.py   (about a minute on one core)
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_input_cases import ACTIONS, JSON_VALUES, Tally, dumps, mutate, node_paths
from conftest import ROOT, run_mvptr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_readers import write_dataset

from mvptr.atomic import atomic_write_json
from mvptr.cli import main
from mvptr.config import flatten, load_config
from mvptr.data.coco import MAX_CAPTION_CHARS, CocoFormatDataset
from mvptr.data.synthetic import generate_world
from mvptr.data.task_files import image_ids_by_file, read_task
from mvptr.errors import DataError
from mvptr.regions.images import read_image
from mvptr.regions.store import RegionStore
from mvptr.regions.vinvl import import_vinvl, write_features_tsv

COUNTS_FILE = ROOT / "results" / "reliability" / "bad_inputs.json"
TALLY = Tally()
# Every fuzzer: a bounded number of examples, each under a deadline (a hang fails), no example database
# written into the checkout.
FUZZ = {"deadline": 10_000, "database": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


@pytest.fixture(scope="module", autouse=True)
def write_counts() -> Iterator[None]:
    yield
    atomic_write_json(COUNTS_FILE, TALLY.table())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic world: good captions, instances, split and task files in their public formats."""
    root = tmp_path_factory.mktemp("bad-input") / "world"
    generate_world(root, num_images=10, seed=0, image_size=64)
    return root


# --- fuzzers --------------------------------------------------------------------------------------------------

CONFIG_KEYS = sorted(flatten(load_config()))
SELECTORS = ["dataset", "model", "method", "pretrain", "pretrain.objectives", "pretrain.objectives.itc",
             "dataset.name", "model.name", "method.name", "ablation", "ablations", "methods"]
YAML_FRAGMENTS = ["", "null", "[", "]", "{", "{a: 1}", "[1, 2]", "- a", "!!binary aGk=", "!!binary %%", "!!set {a}",
                  "2020-01-01", "!!timestamp x", "1e400", ".inf", "-.nan", "0x10", "&x 1", "*x", "? a : b", "'",
                  '"', "|", "@", "%YAML", "---", "!!int x", "!!float x", "true", "{1: 2, b: 3}", "{null: 1}",
                  "[[[]]]", "[" * 3000, "!!python/name:os.system", "a" * 300]
CONFIG_MARKERS = ["config key", "config file", "override", "malformed YAML"]


@settings(max_examples=400, **FUZZ)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(CONFIG_KEYS + SELECTORS) | st.text(max_size=20),
              st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=30) | st.integers().map(str))
    .map("=".join), st.text(max_size=30)), max_size=4))
def test_fuzz_config_overrides(overrides: list[str]):
    TALLY.attempt("config", lambda: load_config(overrides), CONFIG_MARKERS)


@settings(max_examples=150, **FUZZ)
@given(st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=20),
                                                    max_size=5).map(lambda lines: "\n".join(lines).encode())))
def test_fuzz_config_base_file(tmp_path_factory: pytest.TempPathFactory, text: bytes):
    base = tmp_path_factory.getbasetemp() / "base.yaml"
    base.write_bytes(text)
    TALLY.attempt("config", lambda: load_config(base=base), [*CONFIG_MARKERS, base])


def spoil_json(data: st.DataObject, doc: Any) -> bytes:
    """A JSON document with one node replaced, deleted or doubled, or its text cut short."""
    if data.draw(st.integers(0, 5)) == 0:
        text = dumps(doc)
        return text[:data.draw(st.integers(0, len(text) - 1))]
    path = data.draw(st.sampled_from(node_paths(doc)))
    return dumps(mutate(doc, path, data.draw(st.sampled_from(ACTIONS)), data.draw(JSON_VALUES)))


@settings(max_examples=600, **FUZZ)
@given(data=st.data())
def test_fuzz_coco_json(world: Path, data: st.DataObject):
    files = {"captions": world / "annotations/captions.json", "instances": world / "annotations/instances.json",
             "split_file": world / "karpathy_split.json"}
    which = data.draw(st.sampled_from(sorted(files)))
    spoiled = {**files, which: world.parent / f"spoiled-{which}.json"}
    spoiled[which].write_bytes(spoil_json(data, json.loads(files[which].read_bytes())))

    def open_it() -> list[tuple[Path, list[tuple[int, str]]]]:
        ds = CocoFormatDataset.open(world / "images", spoiled["captions"], spoiled["instances"], spoiled["split_file"])
        return [(ds.image_path(i), ds.captions(i)) for i in ds.image_ids()]  # what later steps read

    TALLY.attempt("coco json", open_it, [spoiled[which]])


# (task, split, file): every task file the readers take, and the instances file RefCOCO reads its boxes from.
TASK_FILES = [("vqa", s, f"vqa/v2_{kind}_{s}_{what}.json") for s in ("train", "val")
              for kind, what in (("OpenEnded_mscoco", "questions"), ("mscoco", "annotations"))]
TASK_FILES += [("ve", "train", "snli_ve/snli_ve_train.jsonl"), ("nlvr2", "train", "nlvr2/train.json"),
               ("rec", "train", "refcoco/refs.json"), ("rec", "val", "annotations/instances.json")]
JSON_LINES = (".jsonl", "train.json")


@settings(max_examples=600, **FUZZ)
@given(data=st.data())
def test_fuzz_task_files(world: Path, data: st.DataObject):
    task, split, name = data.draw(st.sampled_from(TASK_FILES))
    path = world / name
    good = path.read_bytes()
    if name.endswith(JSON_LINES):  # one record (line) spoiled
        records = good.splitlines()
        line = data.draw(st.integers(0, len(records) - 1))
        records[line] = spoil_json(data, json.loads(records[line]))
        spoiled = b"\n".join(records)
    else:
        spoiled = spoil_json(data, json.loads(good))
    by_file = image_ids_by_file(world)
    try:
        path.write_bytes(spoiled)
        TALLY.attempt("task files", lambda: read_task(world, task, split, by_file), [path])
    finally:
        path.write_bytes(good)


@pytest.fixture(scope="module")
def parser():
    from mvptr.concepts.parser import SceneGraphParser

    cfg = load_config()["concepts"]  # the pipeline `mvptr concepts extract` loads
    return SceneGraphParser(cfg["spacy_model"], batch_size=cfg["batch_size"], n_process=1)


@settings(max_examples=60, **FUZZ)
@given(st.text(max_size=300) | st.sampled_from(["", " ", "\x00", "\u202e\u200b", "İİ BIG DOG", "🐈" * 500]))
@example("\udcff a dog")  # a byte that was not UTF-8, as the JSON reader keeps it
@example("a" * 1_000_001)  # over spaCy's max_length
@example(("a red cat on a mat. " * 600)[:MAX_CAPTION_CHARS])  # the longest caption the COCO reader lets through
def test_fuzz_caption_parser(parser, text: str):
    graphs = TALLY.attempt("captions", lambda: parser.parse([text]), ["caption 0"])
    if not isinstance(graphs, DataError):
        assert graphs[0].text == text and all(text[a:b] for spans in graphs[0].objects.values() for a, b in spans)


def image_bytes(fmt: str) -> bytes:
    """A small noisy picture in `fmt` (noise, so that every cut of the file loses pixels)."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


GOOD_IMAGES = {fmt: image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF")}


@st.composite
def spoiled_images(draw: Callable[..., Any]) -> bytes:
    good = GOOD_IMAGES[draw(st.sampled_from(sorted(GOOD_IMAGES)))]
    how = draw(st.sampled_from(["random", "cut", "flip", "whole"]))
    if how == "random":
        return draw(st.binary(max_size=3000))
    if how == "cut":
        return good[:draw(st.integers(0, len(good) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([good[at] ^ draw(st.integers(1, 255))]) + good[at + 1:]
    return good


@settings(max_examples=600, **FUZZ)
@given(spoiled_images(), st.none() | st.integers(1, 64))
def test_fuzz_image_reader(tmp_path_factory: pytest.TempPathFactory, raw: bytes, max_side: int | None):
    path = tmp_path_factory.getbasetemp() / "spoiled-image.jpg"
    path.write_bytes(raw)
    image = TALLY.attempt("images", lambda: read_image(path, max_side), [path])
    if not isinstance(image, DataError):
        assert image.mode == "RGB" and min(image.size) >= 1 and max(image.size) <= (max_side or 10**6)


VINVL_DIM = 4


def write_vinvl(folder: Path, rows: dict[str, np.ndarray], classes: dict[str, list[Any]]) -> tuple[Path, Path]:
    """features.tsv (+ .lineidx) and predictions.tsv with the given rows and object classes."""
    write_features_tsv(folder / "features.tsv", list(rows.items()))
    lines = [f"{key}\t{json.dumps({'objects': [{'class': c, 'conf': 0.5} for c in names]})}\n"
             for key, names in classes.items()]
    (folder / "predictions.tsv").write_text("".join(lines))
    return folder / "features.tsv", folder / "predictions.tsv"


def good_vinvl() -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    rng = np.random.default_rng(0)
    classes = {"coco_1": ["dog", "cat"], "2": ["man"], "coco_3": []}
    rows = {key: np.concatenate([rng.standard_normal((len(c), VINVL_DIM)), rng.random((len(c), 6))], axis=1)
            .astype(np.float32) for key, c in classes.items()}
    return rows, classes


@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_fuzz_vinvl_import(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject):
    folder = tmp_path_factory.getbasetemp() / "vinvl"
    folder.mkdir(exist_ok=True)
    rows, classes = good_vinvl()
    how = data.draw(st.sampled_from(["value", "predictions", "cut", "line"]))
    if how == "value":  # one feature or box value replaced: NaN, infinity, beyond float16, any float
        key = data.draw(st.sampled_from(["coco_1", "2"]))
        index = tuple(data.draw(st.integers(0, n - 1)) for n in rows[key].shape)
        rows[key][index] = data.draw(st.floats(width=32) | st.sampled_from([math.nan, math.inf, 7e4, -1e38]))
    features, predictions = write_vinvl(folder, rows, classes)
    if how == "predictions":  # one image's objects spoiled
        lines = predictions.read_bytes().splitlines()
        line = data.draw(st.integers(0, len(lines) - 1))
        key, _, text = lines[line].partition(b"\t")
        lines[line] = key + b"\t" + spoil_json(data, json.loads(text))
        predictions.write_bytes(b"\n".join(lines))
    elif how == "cut":
        raw = features.read_bytes()
        features.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    elif how == "line":
        lines = features.read_bytes().splitlines(keepends=True)
        lines[data.draw(st.integers(0, len(lines) - 1))] = data.draw(st.binary(max_size=80))
        features.write_bytes(b"".join(lines))
    out = folder / "store.h5"
    out.unlink(missing_ok=True)
    result = TALLY.attempt("features", lambda: import_vinvl(features, predictions, out), [features, predictions])
    if not isinstance(result, DataError):
        with RegionStore(out) as store:
            for image_id in store.image_ids.tolist():  # a row cut away leaves its image out
                regions = store.get(image_id)
                assert np.isfinite(regions.features).all() and np.isfinite(regions.boxes).all()


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_fuzz_region_store_file(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject):
    folder = tmp_path_factory.getbasetemp() / "store"
    folder.mkdir(exist_ok=True)
    if not (folder / "good.h5").exists():
        import_vinvl(*write_vinvl(folder, *good_vinvl()), folder / "good.h5")
    good = (folder / "good.h5").read_bytes()
    raw = data.draw(st.binary(max_size=2000) | st.integers(0, len(good) - 1).map(lambda cut: good[:cut]))
    path = folder / "spoiled.h5"
    path.write_bytes(raw)

    def read_it() -> None:
        with RegionStore(path) as store:
            store.get(1)

    TALLY.attempt("region store", read_it, [path])


# --- the corpus: hand-made bad files through the command a user runs --------------------------------------------


def cli(kind: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `mvptr ARGV` in this process, counted; (exit status, stderr)."""
    capsys.readouterr()
    status = TALLY.attempt(kind, lambda: main(argv), [])
    return status, capsys.readouterr().err


def assert_named_error(status: int, stderr: str, *named: str) -> None:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvptr: error: "), stderr
    for text in named:
        assert text in lines[0], (text, lines[0])


def user_dataset(root: Path) -> dict[str, Path]:
    paths = write_dataset(root)
    paths["instances_data"] = json.loads(paths["instances"].read_text())
    return paths


def prepare_args(paths: dict[str, Path], out: Path) -> list[str]:
    return ["data", "prepare", "--out", str(out), "dataset.name=coco_format",
            *(f"dataset.coco_format.{k}={paths[k]}" for k in ("images_dir", "captions", "instances", "split_file"))]


def set_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file after `change` edited its data in place."""
    data = json.loads(path.read_text())
    change(data)
    path.write_bytes(dumps(data))


def _set(container: Any, key: Any, value: Any) -> None:
    container[key] = value


# (case, file key, spoil, text the one line must hold besides the file), each through `mvptr data prepare`.
COCO_CASES = [
    ("zero-byte captions", "captions", lambda p: p.write_bytes(b""), "malformed JSON"),
    ("captions a list", "captions", lambda p: p.write_text("[]"), "not COCO format"),
    ("images a dict", "captions", lambda p: set_json(p, lambda d: _set(d, "images", {})), "'images' is a dict"),
    ("string image id", "captions", lambda p: set_json(p, lambda d: _set(d["images"][0], "id", "1")),
     "images[0].id is '1'"),
    ("image id beyond 64 bits", "captions", lambda p: set_json(p, lambda d: _set(d["images"][0], "id", 2**64)),
     "images[0].id is 18446744073709551616"),
    ("null image id", "captions", lambda p: set_json(p, lambda d: _set(d["images"][1], "id", None)),
     "images[1].id is None"),
    ("null file name", "captions", lambda p: set_json(p, lambda d: _set(d["images"][0], "file_name", None)),
     "images[0].file_name"),
    ("image record a string", "captions", lambda p: set_json(p, lambda d: _set(d["images"], 2, "img3.jpg")),
     "images[2] is a str"),
    ("duplicate image ids", "captions", lambda p: set_json(p, lambda d: _set(d["images"][1], "id", 1)),
     "images[1].id 1 is repeated"),
    ("duplicate annotation ids", "captions",
     lambda p: set_json(p, lambda d: _set(d["annotations"][1], "id", d["annotations"][0]["id"])),
     "annotations[1].id 10 is repeated"),
    ("null annotation image id", "captions",
     lambda p: set_json(p, lambda d: _set(d["annotations"][0], "image_id", None)), "annotations[0].image_id"),
    ("null caption", "captions", lambda p: set_json(p, lambda d: _set(d["annotations"][2], "caption", None)),
     "annotation ids: 20"),
    ("empty caption", "captions", lambda p: set_json(p, lambda d: _set(d["annotations"][0], "caption", "")),
     "empty or not valid UTF-8; annotation ids: 10"),
    ("non-UTF-8 caption", "captions",
     lambda p: p.write_bytes(p.read_bytes().replace(b"picture 1 caption 1", b"\xc3\x28 \xff")),
     "not valid UTF-8; annotation ids: 11"),
    ("1 MB caption", "captions",
     lambda p: set_json(p, lambda d: _set(d["annotations"][5], "caption", "a cat " * 174_763)),
     f"over {MAX_CAPTION_CHARS} characters; annotation ids: 31"),
    ("nesting too deep", "captions", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "RecursionError"),
    ("integer of 5000 digits", "captions", lambda p: p.write_text('{"images": ' + "9" * 5000 + "}"),
     "cannot read JSON"),
    ("missing box", "instances", lambda p: set_json(p, lambda d: d["annotations"][0].pop("bbox")),
     "annotations[0] (id 101).bbox is None"),
    ("box of strings", "instances", lambda p: set_json(p, lambda d: _set(d["annotations"][1], "bbox", ["1"] * 4)),
     "annotations[1] (id 102).bbox"),
    ("box beyond float range", "instances",
     lambda p: set_json(p, lambda d: _set(d["annotations"][0]["bbox"], 0, 10**400)), "finite numbers"),
    ("NaN box", "instances", lambda p: set_json(p, lambda d: _set(d["annotations"][0]["bbox"], 2, math.nan)),
     "finite numbers"),
    ("negative width", "instances", lambda p: set_json(p, lambda d: _set(d["annotations"][2]["bbox"], 2, -3)),
     "annotations[2] (id 103).bbox [1, 1, -3, 10] has a negative width"),
    ("box wholly outside", "instances",
     lambda p: set_json(p, lambda d: _set(d["annotations"][0], "bbox", [40, 1, 5, 5])),
     "wholly outside its 32x24 image"),
    ("unknown category", "instances", lambda p: set_json(p, lambda d: _set(d["annotations"][0], "category_id", 9)),
     "category_id is 9"),
    ("split file a list", "split_file", lambda p: p.write_text("[]"), "Karpathy-style split file"),
    ("split cocoid not a number", "split_file",
     lambda p: set_json(p, lambda d: _set(d["images"][0], "cocoid", "x")), "Karpathy-style split file"),
]


@pytest.mark.parametrize(("case", "which", "spoil", "field"), COCO_CASES, ids=[c[0] for c in COCO_CASES])
def test_bad_coco_files_stop_prepare_naming_file_and_field(tmp_path: Path, capsys, case, which, spoil, field):
    paths = user_dataset(tmp_path / "user")
    spoil(paths[which])
    kind = "captions" if case.endswith("caption") else "coco json"
    status, stderr = cli(kind, prepare_args(paths, tmp_path / "prepared"), capsys)
    assert_named_error(status, stderr, str(paths[which]), field)
    assert not (tmp_path / "prepared").exists()


def test_what_a_researcher_expects_to_pass_does(tmp_path: Path, capsys):
    """A box partly outside its image (clipped when read), captions in any script with invisible characters."""
    paths = user_dataset(tmp_path / "user")
    set_json(paths["instances"], lambda d: _set(d["annotations"][0], "bbox", [25, 20, 30, 30]))
    set_json(paths["captions"], lambda d: _set(d["annotations"][0], "caption", "\u202ea cat\u200b on a mat 🐈 \x00"))
    set_json(paths["captions"], lambda d: _set(d["annotations"][1], "caption", "x" * MAX_CAPTION_CHARS))
    status, stderr = cli("coco json", prepare_args(paths, tmp_path / "prepared"), capsys)
    assert status == 0, stderr
    status, stderr = cli("captions", ["concepts", "extract", "--dataset", str(tmp_path / "prepared"),
                                      "--out", str(tmp_path / "concepts.json"), "--n-process", "1"], capsys)
    assert status == 0, stderr
    concepts = json.loads((tmp_path / "concepts.json").read_text())
    assert concepts["10"]["text"] == "\u202ea cat\u200b on a mat 🐈 \x00" and "cat" in concepts["10"]["objects"]


IMAGE_CASES = [
    ("zero-byte", lambda good: b""),
    ("truncated JPEG", lambda good: good[: len(good) // 2]),
    ("corrupt JPEG", lambda good: good[:200] + bytes(range(256)) * 4 + good[1224:]),
    ("text named .jpg", lambda good: b"not an image\n"),
]


@pytest.mark.parametrize(("case", "spoil"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_images_are_named_by_the_reader(tmp_path: Path, case, spoil):
    path = tmp_path / "photo.jpg"
    path.write_bytes(spoil(GOOD_IMAGES["JPEG"]))
    err = TALLY.attempt("images", lambda: read_image(path), [path])
    assert isinstance(err, DataError) and str(path) in str(err)


def test_a_truncated_photo_stops_region_extraction_naming_it(tmp_path: Path, capsys):
    paths = user_dataset(tmp_path / "user")
    photo = paths["images_dir"] / "img2.jpg"
    photo.write_bytes(photo.read_bytes()[:300])
    assert cli("coco json", prepare_args(paths, tmp_path / "prepared"), capsys)[0] == 0
    status, stderr = cli("images", ["regions", "extract", "--dataset", str(tmp_path / "prepared"), "--out",
                                    str(tmp_path / "regions"), "regions.on_bad_image=fail"], capsys)
    assert_named_error(status, stderr, str(photo), "cannot read image")


def b64(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode()


def spoil_row(features: Path, key: str, line: str) -> None:
    rows = [row if not row.startswith(f"{key}\t") else line for row in features.read_text().splitlines()]
    features.write_text("\n".join(rows) + "\n")


FEATURE_CASES = [
    ("NaN feature", lambda f, p: spoil_row(f, "2", f"2\t1\t{b64([[math.nan, 0, 0, 0, .1, .1, .5, .5, .4, .4]])}"),
     "line 2: image 2: regions hold NaN or infinity"),
    ("infinite box", lambda f, p: spoil_row(f, "2", f"2\t1\t{b64([[1, 0, 0, 0, .1, .1, math.inf, .5, .4, .4]])}"),
     "regions hold NaN or infinity"),
    ("feature beyond float16", lambda f, p: spoil_row(f, "2", f"2\t1\t{b64([[7e4, 0, 0, 0, .1, .1, .5, .5, .4, .4]])}"),
     "beyond float16's range"),
    ("bad base64", lambda f, p: spoil_row(f, "2", "2\t1\t%%%%"), "bad num_boxes or base64"),
    ("boxes do not split", lambda f, p: spoil_row(f, "2", f"2\t3\t{b64([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])}"),
     "do not split into 3 boxes"),
    ("non-UTF-8 image key", lambda f, p: f.write_bytes(f.read_bytes().replace(b"coco_1\t", b"\xffco_1\t")),
     "has no row in"),
    ("zero-byte features", lambda f, p: f.write_bytes(b""), "no row has any box"),
    ("predictions not JSON", lambda f, p: p.write_text("2\t{objects: [\n"), "line 1 (image 2)"),
    ("objects of strings", lambda f, p: p.write_text('2\t{"objects": ["man"]}\n'), "line 1 (image 2)"),
    ("conf not a number", lambda f, p: p.write_text('2\t{"objects": [{"class": "man", "conf": "high"}]}\n'),
     "line 1 (image 2)"),
]


@pytest.mark.parametrize(("case", "spoil", "field"), FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_bad_vinvl_files_stop_the_import_naming_file_and_field(tmp_path: Path, capsys, case, spoil, field):
    features, predictions = write_vinvl(tmp_path, *good_vinvl())
    spoil(features, predictions)
    status, stderr = cli("features", ["regions", "import-vinvl", "--features", str(features), "--predictions",
                                      str(predictions), "--out", str(tmp_path / "store.h5")], capsys)
    assert_named_error(status, stderr, field)
    assert str(features) in stderr or str(predictions) in stderr
    assert not (tmp_path / "store.h5").exists()


CONFIG_CASES = [
    (["model=1"], "config key 'model': 1 is not allowed"),
    (["ablation=[1]"], "config key 'ablation': [1] is not defined"),
    (["dataset.name=" + "a" * 300], "config key 'dataset.name': no layer named 'aaaa"),
    (["dataset.name=../default"], "config key 'dataset.name': no layer named '../default'"),
    (["pretrain=1"], "config key 'pretrain': 1 is not allowed"),
    (["seed=!!int x"], "override 'seed': value '!!int x' is not valid YAML"),
    (["seed=!!timestamp x"], "override 'seed'"),
    (["seed=" + "[" * 3000], "override 'seed'"),
    (["model={1: 2, b: 3}"], "unknown config key model.1, model.b"),
    (["{1: 2}=3"], "unknown config key {1: 2}"),
]


@pytest.mark.parametrize(("overrides", "named"), CONFIG_CASES, ids=[c[1][:40] for c in CONFIG_CASES])
def test_bad_overrides_stop_config_show_naming_the_key(capsys, overrides, named):
    assert_named_error(*cli("config", ["config", "show", *overrides], capsys), named)


BASE_FILES = [("not UTF-8", b"seed: \xff\n", "is not UTF-8 text"), ("a list", b"- 1\n", "holds a list"),
              ("a bad tag", b"seed: !!float x\n", "malformed YAML in"), ("zero bytes", b"", "config key 'ablation'")]


@pytest.mark.parametrize(("case", "text", "named"), BASE_FILES, ids=[c[0] for c in BASE_FILES])
def test_a_bad_base_file_stops_config_show_naming_it(tmp_path: Path, capsys, case, text, named):
    base = tmp_path / "base.yaml"
    base.write_bytes(text)
    status, stderr = cli("config", ["config", "show", "--base", str(base)], capsys)
    assert_named_error(status, stderr, named)
    assert case == "zero bytes" or str(base) in stderr


TASK_CASES = [
    ("vqa", "val", "vqa/v2_mscoco_val_annotations.json", lambda d: _set(d["annotations"][0], "image_id", None),
     "'image_id' is 'None'; allowed: an integer id"),
    ("vqa", "val", "vqa/v2_OpenEnded_mscoco_val_questions.json", lambda d: _set(d, "questions", {}),
     "'questions' is a dict; allowed: a list"),
    ("vqa", "val", "vqa/v2_mscoco_val_annotations.json", lambda d: _set(d["annotations"][1], "answers", ["yes"]),
     "a record is a str, not an object with 'answer'"),
    ("rec", "train", "annotations/instances.json", lambda d: [_set(i, "width", 0) for i in d["images"]],
     "has width 0"),
    ("rec", "train", "annotations/instances.json", lambda d: [_set(a, "bbox", None) for a in d["annotations"]],
     "has bbox None"),
    ("rec", "train", "refcoco/refs.json", lambda d: [_set(r, "ann_id", "one") for r in d], "'ann_id' is 'one'"),
]


@pytest.mark.parametrize(("task", "split", "name", "change", "named"), TASK_CASES,
                         ids=[f"{c[0]}-{c[4][:30]}" for c in TASK_CASES])
def test_bad_task_files_name_file_and_field(world: Path, tmp_path: Path, task, split, name, change, named):
    copy = tmp_path / "world"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("images"))
    set_json(copy / name, change)
    err = TALLY.attempt("task files", lambda: read_task(copy, task, split), [copy / name])
    assert isinstance(err, DataError) and named in str(err), err


def test_non_utf8_and_non_object_json_lines_name_their_line(world: Path, tmp_path: Path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("images"))
    path = copy / "snli_ve" / "snli_ve_train.jsonl"
    for raw, named in ((b'{"a": "\xff"}\n', "is not UTF-8 text"), (b"[1, 2]\n", "line 1 is a list")):
        path.write_bytes(raw)
        err = TALLY.attempt("task files", lambda: read_task(copy, "ve", "train"), [path])
        assert isinstance(err, DataError) and named in str(err), err


@pytest.mark.parametrize("argv", [
    ["config", "show", "ablation={a: 1}"],
    ["data", "check", "/dev/null"],
], ids=["config", "data check"])
def test_in_a_fresh_process_bad_input_is_one_line_and_exit_2(argv):
    def run() -> None:
        proc = run_mvptr(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    TALLY.attempt("fresh process", run, [])
