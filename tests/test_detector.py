"""The detector path on real photographs of every kind: read upright in 8-bit RGB, featurised, or named.

The detector is torchvision's Faster R-CNN with randomly initialised weights (`regions.detector.weights=random`;
nothing is downloaded): the mechanics - reading, resizing, proposals, RoIAlign, selection, the store - are
real, the boxes are not meaningful. MobileNet-v3 at a 128-192 pixel resize keeps each image under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_mvptr
from photos import write_image_kinds
from PIL import Image

from mvptr.config import load_config
from mvptr.errors import ConfigError, DataError
from mvptr.regions.images import read_image
from mvptr.regions.store import RegionStore

DETECTOR = ["regions.boxes=detector", "regions.detector.weights=random",
            "regions.detector.arch=fasterrcnn_mobilenet_v3_large_fpn", "regions.detector.min_size=128",
            "regions.detector.max_size=192", "regions.detector.proposals=60", "regions.max_regions=12",
            "regions.detector.min_regions=5"]
READABLE = ["rgb", "rgb_jpeg", "grayscale", "gray16", "rgba", "palette", "exif_rotated", "cmyk_jpeg",
            "very_large", "one_pixel"]
UNREADABLE = ["truncated", "not_an_image"]
# Exactly the reference's pixels: the file holds them losslessly in another form.
LOSSLESS = ["rgb", "grayscale", "gray16", "rgba", "palette", "exif_rotated", "one_pixel"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory):
    return write_image_kinds(tmp_path_factory.mktemp("kinds"))


def detector(*overrides: str):
    from mvptr.regions.detector import RegionDetector

    return RegionDetector.from_config(load_config(overrides=[*DETECTOR, *overrides])["regions"], seed=0)


@pytest.mark.parametrize("kind", LOSSLESS)
def test_each_lossless_kind_reads_as_the_picture_a_viewer_shows(kinds, kind):
    image = read_image(kinds[kind].path)
    assert image.mode == "RGB" and image.size == kinds[kind].reference.size
    assert np.array_equal(np.asarray(image), np.asarray(kinds[kind].reference))


def test_a_cmyk_jpeg_reads_in_rgb_within_the_jpeg_loss(kinds):
    image = np.asarray(read_image(kinds["cmyk_jpeg"].path), dtype=np.float64)
    reference = np.asarray(kinds["cmyk_jpeg"].reference, dtype=np.float64)
    # JPEG at quality 95 moves a pixel by a few levels; inverted CMYK (Adobe's form read naively) would move
    # the mean by ~100 levels, a dropped channel by tens.
    assert np.abs(image - reference).mean() < 4.0


def test_a_very_large_photo_is_read_shrunk_with_its_shape(kinds):
    image = read_image(kinds["very_large"].path, max_side=192)
    width, height = kinds["very_large"].reference.size
    assert max(image.size) == 192
    assert abs(image.size[1] - 192 * height / width) <= 1


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_file_is_named(kinds, kind):
    with pytest.raises(DataError, match=f"cannot read image {kinds[kind].path}"):
        read_image(kinds[kind].path)


def test_the_detector_sees_every_kind_as_its_reference(kinds):
    """Orientation, bit depth, transparency and palette handled: the features of the file are those of the
    picture it shows. The same batch order on both sides, so padding is the same and the floats identical."""
    detect = detector()
    files = detect([read_image(kinds[k].path, max_side=192) for k in LOSSLESS])
    references = detect([read_image_of(kinds[k].reference, max_side=192) for k in LOSSLESS])
    for kind, got, want in zip(LOSSLESS, files, references):
        assert len(got) == len(want) >= 5, kind
        assert np.array_equal(got.features, want.features), kind
        assert np.array_equal(got.boxes, want.boxes) and np.array_equal(got.tags, want.tags), kind


def read_image_of(image: Image.Image, max_side: int) -> Image.Image:
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return image


def test_detector_regions_are_bounded_boxes_fp16_features_and_class_tags(kinds):
    detect = detector()
    (regions,) = detect([read_image(kinds["rgb"].path, max_side=192)])
    assert 5 <= len(regions) <= 12
    assert regions.features.dtype == np.float16 and regions.features.shape[1] == detect.feature_dim == 1024
    x1, y1, x2, y2, w, h = regions.boxes.T
    assert (regions.boxes >= 0).all() and (regions.boxes <= 1).all()
    assert np.allclose(x2 - x1, w, atol=1e-6) and np.allclose(y2 - y1, h, atol=1e-6)
    assert (regions.tags >= 1).all() and (regions.tags < len(detect.categories)).all()  # never the background
    assert detect.categories[1] == "person"  # torchvision's COCO names


def test_extract_featurises_every_kind_and_lists_the_unreadable_ones(kinds, tmp_path: Path):
    paths = coco_folder(kinds, tmp_path)
    prepared, regions = tmp_path / "prepared", tmp_path / "regions"
    overrides = ["dataset.name=coco_format", *(f"dataset.coco_format.{k}={v}" for k, v in paths.items()), *DETECTOR]
    run_mvptr("data", "prepare", "--out", str(prepared), *overrides, check=True)
    run_mvptr("regions", "extract", "--dataset", str(prepared), "--out", str(regions), *overrides,
              "regions.on_bad_image=skip", check=True)
    names = list(kinds)
    with RegionStore(regions / "train.h5") as store:
        for kind in READABLE:
            got = store.get(names.index(kind) + 1)
            assert 5 <= len(got) <= 12 and got.features.shape[1] == 1024, kind
        assert set(store.tag_names(got)) <= set(json.loads((regions / "detector.json").read_text())["categories"])
    skipped = {entry["path"]: entry["reason"] for entry in json.loads((regions / "skipped.json").read_text())}
    assert sorted(skipped) == sorted(str(kinds[k].path) for k in UNREADABLE)
    assert json.loads((regions / "detector.json").read_text())["weights"] == "random"

    failed = run_mvptr("regions", "extract", "--dataset", str(prepared), "--out", str(tmp_path / "failed"),
                       *overrides)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "cannot read image" in failed.stderr and ("truncated.jpg" in failed.stderr
                                                     or "not_an_image.jpg" in failed.stderr)
    assert not list((tmp_path / "failed").glob("*.h5"))


def coco_folder(kinds, root: Path) -> dict[str, Path]:
    """The kinds as one training split of a COCO-format dataset: image i + 1 is the i-th kind."""
    images = [{"id": i + 1, "file_name": kind.path.name, "width": 1, "height": 1}
              for i, kind in enumerate(kinds.values())]
    captions = [{"id": i + 1, "image_id": i + 1, "caption": f"a photograph of kind {name}"}
                for i, name in enumerate(kinds)]
    paths = {"images_dir": next(iter(kinds.values())).path.parent, "captions": root / "captions.json"}
    paths["captions"].write_text(json.dumps({"images": images, "annotations": captions}))
    return paths


def test_weights_from_a_local_file_are_used(tmp_path: Path):
    trained = detector()
    with torch.no_grad():  # weights that no seed gives
        for p in trained.model.roi_heads.parameters():
            p.mul_(1.5)
    torch.save(trained.model.state_dict(), tmp_path / "detector.pth")
    loaded = detector(f"regions.detector.weights={tmp_path / 'detector.pth'}")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    assert np.array_equal(loaded([image])[0].features, trained([image])[0].features)
    assert not np.array_equal(detector()([image])[0].features, trained([image])[0].features)


def test_weights_that_do_not_fit_name_the_key_and_the_file(tmp_path: Path):
    torch.save({"backbone.body.nonsense": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"regions.detector.weights.*wrong.pth does not fit"):
        detector(f"regions.detector.weights={tmp_path / 'wrong.pth'}")


def test_torchvision_weights_are_read_from_its_cache_never_downloaded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"not in its cache \(" + str(tmp_path)):
        detector("regions.detector.weights=torchvision")
    assert not list(tmp_path.rglob("*.pth"))


def test_python_nms_keeps_what_the_greedy_definition_keeps():
    from mvptr.regions.torchvision_compat import import_torchvision, nms_reference

    tv = import_torchvision()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 40 + 1], dim=1)
    scores = torch.rand(300, generator=g)
    iou = tv.ops.box_iou(boxes, boxes)
    kept: list[int] = []
    for i in sorted(range(300), key=lambda i: -scores[i]):  # the definition, box by box
        if all(iou[i, j] <= 0.5 for j in kept):
            kept.append(i)
    assert nms_reference(boxes, scores, 0.5).tolist() == kept
    assert tv.ops.nms(boxes, scores, 0.5).tolist() == kept  # compiled or Python, torchvision's entry point
