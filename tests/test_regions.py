"""Tests of mvptr.regions: the region store, the extract_region_features step and the VinVL import.

The step runs on the tiny embedded world with 2 backbone epochs (accuracy is not checked here: the
tiny world has too few crops to learn from; see the report for the default world). Expected boxes
are recomputed here from instances.json, and the VinVL files are written by hand in this file, so
that a bug in the library cannot hide in its own helpers. Runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_mvptr

from mvptr.config import load_config
from mvptr.data.synthetic import SIZES, generate_world
from mvptr.errors import ConfigError, DataError
from mvptr.regions.backbone import load_backbone
from mvptr.regions.extract import extract_region_features
from mvptr.regions.store import Regions, RegionStore, RegionStoreWriter
from mvptr.regions.vinvl import FeaturesTsv, write_features_tsv

SPLITS = ("train", "val", "test")
FAST = ["regions.backbone.epochs=2"]


def quiet(_: str) -> None:
    """A `log` that prints nothing."""


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world") / "tiny"
    generate_world(root, num_images=SIZES["tiny"], seed=0)
    return root


@pytest.fixture(scope="module")
def extracted(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("regions")
    extract_region_features(load_config(FAST), tiny_world, out, log=quiet)
    return out


def gold_objects(world: Path) -> dict[int, list[dict]]:
    """image id -> annotations, largest box first (ties: id), read straight from instances.json."""
    data = json.loads((world / "annotations" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        out[ann["image_id"]].append({**ann, "name": names[ann["category_id"]]})
    return {i: sorted(anns, key=lambda a: (-a["bbox"][2] * a["bbox"][3], a["id"])) for i, anns in out.items()}


def splits_of(world: Path) -> dict[int, str]:
    return {img["cocoid"]: img["split"] for img in json.loads((world / "karpathy_split.json").read_text())["images"]}


def expected_box_values(bbox: list[float], size: int) -> list[float]:
    x, y, w, h = bbox
    return [x / size, y / size, (x + w) / size, (y + h) / size, w / size, h / size]


def random_regions(rng: np.random.Generator, n: int, dim: int, vocab: int) -> Regions:
    return Regions(rng.standard_normal((n, dim)).astype(np.float32), rng.random((n, 6)).astype(np.float32),
                   rng.integers(0, vocab, n).astype(np.int32))


# ------------------------------------------------------------------ the store


def _read_in_child(args: tuple[RegionStore, int]) -> np.ndarray:
    store, image_id = args
    return store.get(image_id).features


def test_store_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    written = {7: random_regions(rng, 3, 16, 4), 2: random_regions(rng, 0, 16, 4), 11: random_regions(rng, 5, 16, 4)}
    path = tmp_path / "store.h5"
    with RegionStoreWriter(path, 16, ["a", "b", "c", "d"], {"split": "train"}) as writer:
        for image_id, regions in written.items():
            writer.add(image_id, regions)
    with RegionStore(path) as store:
        assert len(store) == 3 and 7 in store and 3 not in store
        assert store.tag_vocab == ["a", "b", "c", "d"] and store.attrs["split"] == "train"
        for image_id, regions in written.items():
            got = store.get(image_id)
            assert got.features.dtype == np.float16 and got.features.shape == (len(regions), 16)
            np.testing.assert_array_equal(got.features, regions.features.astype(np.float16))
            np.testing.assert_array_equal(got.boxes, regions.boxes)
            np.testing.assert_array_equal(got.tags, regions.tags)
        assert store.tag_names(store.get(7)) == [["a", "b", "c", "d"][t] for t in written[7].tags]
        with pytest.raises(KeyError, match=f"image 3 is not in region store {path}"):
            store.get(3)
        # Several processes read the same file; each child reopens it (fork) instead of sharing the handle.
        with multiprocessing.get_context("fork").Pool(2) as pool:
            children = pool.map(_read_in_child, [(store, 11), (store, 7)])
        np.testing.assert_array_equal(children[0], written[11].features.astype(np.float16))


def test_store_rejects_a_second_copy_of_an_image_and_bad_shapes(tmp_path: Path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image 5 added twice"), \
            RegionStoreWriter(tmp_path / "s.h5", 8, ["a"]) as writer:
        writer.add(5, random_regions(rng, 2, 8, 1))
        writer.add(5, random_regions(rng, 2, 8, 1))
    with pytest.raises(ValueError, match="image 6: regions have features"), \
            RegionStoreWriter(tmp_path / "s.h5", 8, ["a"]) as writer:
        writer.add(6, random_regions(rng, 2, 9, 1))
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_write_leaves_no_store(tmp_path: Path):
    path = tmp_path / "store.h5"
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="disk on fire"), RegionStoreWriter(path, 8, ["a"]) as writer:
        for image_id in range(100):
            writer.add(image_id, random_regions(rng, 50, 8, 1))  # past the first flush to disk
        assert not path.exists() and len(list(tmp_path.glob("store.h5.tmp-*"))) == 1
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the extract step


def test_extract_writes_every_images_gold_regions(extracted: Path, tiny_world: Path):
    gold, splits = gold_objects(tiny_world), splits_of(tiny_world)
    for split in SPLITS:
        with RegionStore(extracted / f"{split}.h5") as store:
            ids = sorted(i for i, s in splits.items() if s == split)
            assert sorted(store.image_ids.tolist()) == ids
            assert store.tag_vocab == ["circle", "square", "triangle", "diamond", "star", "hexagon"]
            for image_id in ids:
                regions = store.get(image_id)
                assert len(regions) == len(gold[image_id]) > 0
                assert regions.features.dtype == np.float16 and regions.features.shape[1] == 128
                assert np.all((regions.boxes >= 0) & (regions.boxes <= 1))
                expected = [expected_box_values(a["bbox"], 128) for a in gold[image_id]]
                np.testing.assert_allclose(regions.boxes, expected, rtol=0, atol=1e-6)
    metrics = json.loads((extracted / "backbone_metrics.json").read_text())
    assert len(metrics["train_loss"]) == 2 and set(metrics["val_accuracy"]) == {"category", "colour", "size"}
    assert load_backbone(extracted / "backbone.safetensors").vocabularies["size"] == ["large", "small"]
    assert json.loads((extracted / "skipped.json").read_text()) == []
    assert not list(extracted.glob("*.tmp-*"))


def test_gold_tags_are_the_annotated_categories(tiny_world: Path, tmp_path: Path):
    extract_region_features(load_config([*FAST, "regions.tags=gold", "regions.max_regions=2"]), tiny_world, tmp_path,
                            log=quiet)
    gold = gold_objects(tiny_world)
    with RegionStore(tmp_path / "train.h5") as store:
        for image_id in store.image_ids.tolist():
            assert store.tag_names(store.get(image_id)) == [a["name"] for a in gold[image_id][:2]]


def corrupt_copy(world: Path, tmp_path: Path) -> tuple[Path, int, Path]:
    """A copy of the world with garbage bytes in one training image."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    image_id = min(i for i, s in splits_of(world).items() if s == "train")
    path = copy / "images" / f"synth_{image_id:06d}.png"
    path.write_bytes(b"this is not a PNG" * 10)
    return copy, image_id, path


def test_a_corrupt_image_stops_the_step_naming_its_path(tiny_world: Path, tmp_path: Path):
    world, _, bad = corrupt_copy(tiny_world, tmp_path)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        extract_region_features(load_config(FAST), world, tmp_path / "out", log=quiet)
    assert not list((tmp_path / "out").glob("*.h5"))


def test_skip_mode_lists_the_corrupt_image_and_goes_on(tiny_world: Path, tmp_path: Path):
    world, image_id, bad = corrupt_copy(tiny_world, tmp_path)
    out = tmp_path / "out"
    summary = extract_region_features(load_config([*FAST, "regions.on_bad_image=skip"]), world, out, log=quiet)
    skipped = json.loads((out / "skipped.json").read_text())
    assert summary["skipped"] == 1 and len(skipped) == 1
    assert skipped[0]["image_id"] == image_id and skipped[0]["path"] == str(bad) and skipped[0]["split"] == "train"
    assert "cannot read image" in skipped[0]["reason"]
    with RegionStore(out / "train.h5") as store:
        assert image_id not in store and len(store) == sum(s == "train" for s in splits_of(world).values()) - 1


def test_detector_boxes_without_torchvision_say_how_to_install(tiny_world: Path, tmp_path: Path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install \.\[detector\]"):
        extract_region_features(load_config([*FAST, "regions.boxes=detector"]), tiny_world, tmp_path, log=quiet)


def test_killed_midway_then_rerun_gives_complete_stores(tiny_world: Path, extracted: Path, tmp_path: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mvptr.cli", "regions", "extract", "--dataset", str(tiny_world), "--out", str(out),
           "--root", str(ROOT), *FAST]
    # Same torch thread count as the in-process run (float sums depend on it), so that the stores can be
    # compared byte for byte.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill as soon as training is done (its metrics appear) or a store is being written.
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "backbone_metrics.json").exists() or list(out.glob("*.h5.tmp-*")):
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not all((out / f"{split}.h5").exists() for split in SPLITS), "killed after it had finished"
    for split in SPLITS:  # whatever exists under a final name is whole
        if (out / f"{split}.h5").exists():
            RegionStore(out / f"{split}.h5").close()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.glob("*.tmp-*"))
    for split in SPLITS:
        assert (out / f"{split}.h5").read_bytes() == (extracted / f"{split}.h5").read_bytes()


# ------------------------------------------------------------------ VinVL import


def b64(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode()


def write_vinvl_by_hand(folder: Path, dim: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """features.tsv + features.lineidx + predictions.tsv for 3 images, as scene_graph_benchmark writes them."""
    rng = np.random.default_rng(1)
    images = {"coco_5": ["dog", "frisbee"], "7": ["man", "surfboard", "man"], "coco_9": []}
    rows, offsets, predictions, position = [], [], [], 0
    data = {}
    for key, classes in images.items():
        values = np.concatenate([rng.standard_normal((len(classes), dim)), rng.random((len(classes), 6))], axis=1)
        data[key] = (values.astype(np.float32), classes)
        line = f"{key}\t{len(classes)}\t{b64(values)}\n"
        offsets.append(position)
        position += len(line.encode())
        rows.append(line)
        objects = [{"class": c, "rect": [1.0, 2.0, 3.0, 4.0], "conf": 0.9 - 0.1 * k} for k, c in enumerate(classes)]
        predictions.append(f"{key}\t{json.dumps({'objects': objects, 'image_h': 480, 'image_w': 640})}\n")
    (folder / "features.tsv").write_text("".join(rows))
    (folder / "features.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    (folder / "predictions.tsv").write_text("".join(predictions))
    return data


def test_vinvl_import_matches_the_tsv(tmp_path: Path):
    data = write_vinvl_by_hand(tmp_path, dim=10)
    proc = run_mvptr("regions", "import-vinvl", "--features", str(tmp_path / "features.tsv"), "--predictions",
                     str(tmp_path / "predictions.tsv"), "--out", str(tmp_path / "store.h5"), check=True)
    assert json.loads(proc.stdout) == {"images": 3, "regions": 5, "feature_dim": 10, "tags": 4}
    with RegionStore(tmp_path / "store.h5") as store:
        assert store.tag_vocab == ["dog", "frisbee", "man", "surfboard"]
        for key, image_id in (("coco_5", 5), ("7", 7), ("coco_9", 9)):
            values, classes = data[key]
            regions = store.get(image_id)
            np.testing.assert_array_equal(regions.features, values[:, :10].astype(np.float16))
            np.testing.assert_array_equal(regions.boxes, values[:, 10:])
            assert store.tag_names(regions) == classes

    with FeaturesTsv(tmp_path / "features.tsv") as tsv:  # random access through the lineidx
        key, values = tsv.row(1)
        assert key == "7" and np.array_equal(values, data["7"][0])
    write_features_tsv(tmp_path / "again.tsv", [(key, values) for key, (values, _) in data.items()])
    assert (tmp_path / "again.tsv").read_bytes() == (tmp_path / "features.tsv").read_bytes()
    assert (tmp_path / "again.lineidx").read_bytes() == (tmp_path / "features.lineidx").read_bytes()


def test_vinvl_import_names_the_image_whose_objects_do_not_match(tmp_path: Path):
    write_vinvl_by_hand(tmp_path, dim=10)
    lines = (tmp_path / "predictions.tsv").read_text().splitlines(keepends=True)
    lines[1] = '7\t{"objects": [{"class": "man", "conf": 0.5}]}\n'
    (tmp_path / "predictions.tsv").write_text("".join(lines))
    proc = run_mvptr("regions", "import-vinvl", "--features", str(tmp_path / "features.tsv"), "--predictions",
                     str(tmp_path / "predictions.tsv"), "--out", str(tmp_path / "store.h5"))
    assert proc.returncode == 2
    assert "line 2 (image 7): 3 feature rows but 1 objects" in proc.stderr
    assert not (tmp_path / "store.h5").exists()


def test_a_whole_corpus_gets_its_stores_from_vinvl_files(tiny_world: Path, tmp_path: Path):
    """regions.boxes=vinvl: each split's store holds the released features of its images; a row of an image
    outside the corpus is passed over and an image no file covers is listed as skipped."""
    splits = splits_of(tiny_world)
    ids = sorted(splits)
    rng = np.random.default_rng(0)
    rows = {i: np.concatenate([rng.standard_normal((3, 10)), rng.random((3, 6))], axis=1) for i in ids[1:]}
    write_features_tsv(tmp_path / "features.tsv", [(f"coco_{i}", v) for i, v in rows.items()]
                       + [("coco_99999", rows[ids[1]])])
    classes = ["dog", "cat", "kite"]
    (tmp_path / "predictions.tsv").write_text("".join(
        f"coco_{i}\t{json.dumps({'objects': [{'class': c, 'conf': 0.5} for c in classes]})}\n"
        for i in [*rows, 99999]))
    files = f"[{{features: {tmp_path / 'features.tsv'}, predictions: {tmp_path / 'predictions.tsv'}, id_offset: 0}}]"
    out = tmp_path / "regions"
    summary = extract_region_features(load_config([*FAST, "regions.boxes=vinvl", f"regions.vinvl.files={files}"]),
                                      tiny_world, out, log=quiet)
    assert summary["rows_outside_corpus"] == 1 and summary["skipped"] == 1
    assert [s["image_id"] for s in json.loads((out / "skipped.json").read_text())] == [ids[0]]
    for split in set(splits.values()):
        with RegionStore(out / f"{split}.h5") as store:
            members = [i for i in rows if splits[i] == split]
            assert len(store) == len(members) and store.tag_vocab == sorted(classes)
            for i in members:
                np.testing.assert_array_equal(store.get(i).features, rows[i][:, :10].astype(np.float16))
                np.testing.assert_array_equal(store.get(i).boxes, rows[i][:, 10:].astype(np.float32))
    with pytest.raises(ConfigError, match="regions.vinvl.files"):
        extract_region_features(load_config([*FAST, "regions.boxes=vinvl"]), tiny_world, tmp_path / "x", log=quiet)
