"""The extract_region_features step: one region store per split, from gold boxes or from a detector.

Why: every method reads the same regions - features, 6 box values and object tags - from one store per
split, so that differences between methods come from their objectives, not their inputs.

Three ways, by `regions.boxes`:
- `gold` (the embedded world, any dataset with an instances JSON): train the region backbone
  (mvptr.regions.backbone) on the training split's gold object crops, score each head on the val split's
  crops, then store each image's gold boxes (largest first), the backbone's penultimate features of their
  crops and object tags: the backbone's predicted category (`regions.tags: predicted`, as VinVL's tags are
  its detector's) or the annotated one (`gold`).
- `detector` (photographs without boxes: CC3M, SBU, your own folder): a torchvision Faster R-CNN gives each
  image's boxes, features and class-name tags in one pass (mvptr.regions.detector); nothing is trained.
- `vinvl` (the paper's regions): VinVL's released features.tsv + predictions.tsv of each source
  (`regions.vinvl.files`, image ids shifted by the source's `id_offset`) split into the corpus's stores
  (mvptr.regions.vinvl); images no file covers are listed in skipped.json.
Every image is read once (mvptr.regions.images: upright, 8-bit RGB). An unreadable image stops the step with
a DataError naming its path (`regions.on_bad_image: fail`) or is left out and listed in `skipped.json` with
the reason (`skip`). Deterministic from `seed` and the `regions.*` config (bit for bit at a given number of
torch threads; another thread count sums floats in another order and changes the last bits).

Outputs in `out_dir` (each written atomically; leftovers of an interrupted run are removed at start):
    {split}.h5                 region store (mvptr.regions.store); tag vocabulary: the dataset's categories
                               (gold) or the detector's class names (detector)
    backbone.safetensors       backbone weights (gold)
    backbone_metrics.json      train loss per epoch, val accuracy per head (gold)
    detector.json              the detector's architecture, weights and classes (detector)
    skipped.json               images left out, with path and reason ([] when none)

Use:
    mvptr regions extract --dataset resources/datasets/synthetic-1a2b3c4d --out results/regions/... [key=value ...]
    extract_region_features(cfg, dataset_dir, out_dir)      # -> summary dict
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mvptr.atomic import atomic_write_json
from mvptr.config import config_hash, dataset_keys
from mvptr.data.coco import CocoFormatDataset, open_prepared
from mvptr.errors import ConfigError, DataError
from mvptr.progress import Progress
from mvptr.regions.backbone import (
    CATEGORY_HEAD,
    IGNORE,
    CropSet,
    RegionBackbone,
    crop,
    predict,
    save_backbone,
    train_backbone,
)
from mvptr.regions.boxes import NUM_BOX_VALUES, RegionBox, box_values, category_names, gold_boxes
from mvptr.regions.detector import RegionDetector
from mvptr.regions.images import ImageReader
from mvptr.regions.store import Regions, RegionStoreWriter
from mvptr.regions.torchvision_compat import compiled_ops
from mvptr.regions.vinvl import VinvlFiles, import_vinvl_corpus

BACKBONE_FILE = "backbone.safetensors"
METRICS_FILE = "backbone_metrics.json"
SKIPPED_FILE = "skipped.json"
DETECTOR_FILE = "detector.json"
# Images whose crops go through the backbone together in the extraction pass.
_IMAGES_PER_BATCH = 64

Log = Callable[[str], None]


def _stack(crops: Sequence[np.ndarray], values: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and box values as the backbone's (pixels, geometry) input; empty tensors for no regions."""
    if not crops:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, NUM_BOX_VALUES)
    return torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(values))


@dataclass
class _Examples:
    """Gold crops of one split before their labels are turned into class ids."""

    pixels: list[np.ndarray] = field(default_factory=list)
    geometry: list[np.ndarray] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)

    def add(self, image: Image.Image, box: RegionBox, crop_size: int) -> None:
        self.pixels.append(crop(image, box.xyxy, crop_size))
        self.geometry.append(box_values(box.xyxy, *image.size))
        self.labels.append({CATEGORY_HEAD: box.category, **{k: v for k, v in box.attributes.items()
                                                            if isinstance(v, str)}})

    def encode(self, vocabularies: Mapping[str, Sequence[str]], crop_size: int) -> CropSet:
        ids = {head: {name: k for k, name in enumerate(names)} for head, names in vocabularies.items()}
        labels = {head: torch.tensor([ids[head].get(lab.get(head), IGNORE) for lab in self.labels], dtype=torch.long)
                  for head in vocabularies}
        return CropSet(*_stack(self.pixels, self.geometry, crop_size), labels)


def _vocabularies(categories: Sequence[str], train: _Examples) -> dict[str, list[str]]:
    """One head per label: the category, plus each attribute that every training instance has."""
    attributes = set.intersection(*(set(lab) for lab in train.labels)) - {CATEGORY_HEAD} if train.labels else set()
    return {CATEGORY_HEAD: list(categories),
            **{name: sorted({lab[name] for lab in train.labels}) for name in sorted(attributes)}}


def _scan(ds: CocoFormatDataset, reader: ImageReader, max_regions: int, crop_size: int,
          log: Log) -> dict[str, _Examples]:
    """Read every image once (so a bad one is found before training) and keep the train/val gold crops."""
    examples = {"train": _Examples(), "val": _Examples()}
    ids = ds.image_ids()
    progress = Progress("read images", len(ids), "images", log)
    for image_id in ids:
        image = reader.read(image_id)
        split = ds.splits[image_id]
        if image is not None and split in examples:
            for box in gold_boxes(ds.instances_coco, image_id, max_regions):
                examples[split].add(image, box, crop_size)
        progress.advance()
    return examples


def _batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class _BackboneSource:
    """Each image's gold boxes and, from the backbone, their features and tags."""

    ds: CocoFormatDataset
    model: RegionBackbone
    categories: list[str]
    max_regions: int
    gold_tags: bool
    images_per_batch: int = _IMAGES_PER_BATCH

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def regions(self, images: Mapping[int, Image.Image]) -> dict[int, Regions]:
        """Regions of several images, their crops through the backbone in one batch."""
        boxes = {image_id: gold_boxes(self.ds.instances_coco, image_id, self.max_regions) for image_id in images}
        size = self.model.crop_size
        crops = [crop(images[i], b.xyxy, size) for i, bs in boxes.items() for b in bs]
        values = [box_values(b.xyxy, *images[i].size) for i, bs in boxes.items() for b in bs]
        pixels, geometry = _stack(crops, values, size)
        features, classes = predict(self.model, pixels, geometry)
        tags = (np.array([self.categories.index(b.category) for bs in boxes.values() for b in bs], dtype=np.int32)
                if self.gold_tags else classes[CATEGORY_HEAD].numpy().astype(np.int32))
        out, start = {}, 0
        for image_id, image_boxes in boxes.items():
            stop = start + len(image_boxes)
            out[image_id] = Regions(features[start:stop].numpy().astype(np.float16), geometry[start:stop].numpy(),
                                    tags[start:stop])
            start = stop
        return out


@dataclass
class _DetectorSource:
    """Each image's boxes, features and tags from the detector, a batch of images per forward pass."""

    detector: RegionDetector

    @property
    def feature_dim(self) -> int:
        return self.detector.feature_dim

    @property
    def categories(self) -> list[str]:
        return self.detector.categories

    @property
    def images_per_batch(self) -> int:
        return self.detector.settings.batch_size

    def regions(self, images: Mapping[int, Image.Image]) -> dict[int, Regions]:
        return dict(zip(images, self.detector(list(images.values()))))


def _write_store(path: Path, split: str, ids: Sequence[int], reader: ImageReader,
                 source: _BackboneSource | _DetectorSource, attrs: Mapping[str, Any], log: Log) -> dict[str, int]:
    progress = Progress(f"extract {split}", len(ids), "images", log)
    written = regions_total = empty = 0
    with RegionStoreWriter(path, source.feature_dim, source.categories, {**attrs, "split": split}) as writer:
        for batch in _batches(ids, source.images_per_batch):
            images = {i: image for i in batch if (image := reader.read(i)) is not None}
            for image_id, regions in source.regions(images).items():
                writer.add(image_id, regions)
                regions_total += len(regions)
                empty += not len(regions)
            written += len(images)
            progress.advance(len(batch))
    if empty:
        log(f"{split}: {empty} image(s) without regions (no gold object, or none detected): kept for retrieval, "
            "skipped by WPG")
    return {"images": written, "regions": regions_total, "without_regions": empty}


def _remove_leftovers(out_dir: Path, names: Sequence[str]) -> None:
    """Temporary files of an interrupted earlier run (atomic writes that never reached their rename)."""
    for name in names:
        for leftover in out_dir.glob(f"{name}.tmp-*"):
            leftover.unlink(missing_ok=True)


def _check_config(regions_cfg: Mapping[str, Any], ds: CocoFormatDataset) -> None:
    if regions_cfg["boxes"] != "gold":
        if regions_cfg["tags"] == "gold":
            raise ConfigError(f"config key 'regions.tags': 'gold' needs regions.boxes=gold ({regions_cfg['boxes']} "
                              "boxes carry no annotated category); use regions.tags=predicted")
        if regions_cfg["boxes"] == "vinvl" and not regions_cfg["vinvl"]["files"]:
            raise ConfigError("config key 'regions.vinvl.files': regions.boxes=vinvl needs at least one "
                              "{features, predictions, id_offset} entry (VinVL's released TSV files)")
        return
    if ds.instances_coco is None:
        raise DataError("regions.boxes=gold needs an instances JSON (boxes and categories) to train the backbone; "
                        "set dataset.coco_format.instances, or use regions.boxes=detector for photographs")


def _backbone_source(cfg: Mapping[str, Any], ds: CocoFormatDataset, reader: ImageReader, out_dir: Path,
                     log: Log) -> tuple[_BackboneSource, dict[str, Any]]:
    """Train the backbone on the gold crops (saving its weights and metrics); the source that uses it."""
    rcfg, bcfg = cfg["regions"], cfg["regions"]["backbone"]
    examples = _scan(ds, reader, rcfg["max_regions"], bcfg["crop_size"], log)
    categories = category_names(ds.instances_coco)
    vocabularies = _vocabularies(categories, examples["train"])
    epochs = Progress("train backbone", bcfg["epochs"], "epochs", log)
    train, val = (examples[split].encode(vocabularies, bcfg["crop_size"]) for split in ("train", "val"))
    model, metrics = train_backbone(
        train, val, vocabularies, feature_dim=rcfg["feature_dim"], crop_size=bcfg["crop_size"], epochs=bcfg["epochs"],
        batch_size=bcfg["batch_size"], lr=bcfg["lr"], seed=cfg["seed"],
        on_epoch=lambda epoch, loss: epochs.advance(note=f", loss {loss:.4f}"))
    log(f"backbone val accuracy: {metrics['val_accuracy']}")
    save_backbone(model, out_dir / BACKBONE_FILE)
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    source = _BackboneSource(ds, model, categories, rcfg["max_regions"], rcfg["tags"] == "gold")
    return source, {"val_accuracy": metrics["val_accuracy"]}


def _detector_source(cfg: Mapping[str, Any], out_dir: Path, log: Log) -> tuple[_DetectorSource, dict[str, Any]]:
    detector = RegionDetector.from_config(cfg["regions"], cfg["seed"])
    info = {**detector.origin, "device": str(detector.device), "feature_dim": detector.feature_dim,
            "torchvision_compiled_ops": compiled_ops()}
    log(f"detector: {json.dumps(info, sort_keys=True)}")
    info["categories"] = detector.categories
    if detector.settings.weights == "random":
        log("detector: randomly initialised weights (regions.detector.weights=random): the boxes, tags and "
            "features exercise the mechanics only")
    atomic_write_json(out_dir / DETECTOR_FILE, info)
    return _DetectorSource(detector), {"detector": info}


def _import_vinvl(rcfg: Mapping[str, Any], ds: CocoFormatDataset, out_dir: Path, started: float,
                  log: Log) -> dict[str, Any]:
    """regions.boxes=vinvl: the stores from VinVL's released features of the corpus's sources; an image that
    no file covers is listed in skipped.json, as an unreadable one would be."""
    files = [VinvlFiles(Path(f["features"]), Path(f["predictions"]), f["id_offset"]) for f in rcfg["vinvl"]["files"]]
    summary = import_vinvl_corpus(files, ds.splits, out_dir, rcfg["max_regions"])
    skipped = [{"image_id": i, "split": ds.splits[i], "path": str(ds.image_path(i)),
                "reason": "no row in the VinVL features of regions.vinvl.files"} for i in summary.pop("uncovered")]
    if skipped:
        log(f"{len(skipped)} image(s) have no VinVL features, listed in {out_dir / SKIPPED_FILE}")
    if summary["rows_outside_corpus"]:
        log(f"{summary['rows_outside_corpus']} VinVL row(s) of images outside the corpus passed over")
    atomic_write_json(out_dir / SKIPPED_FILE, skipped)
    return {**summary, "skipped": len(skipped), "seconds": round(time.monotonic() - started, 1)}


def extract_region_features(cfg: Mapping[str, Any], dataset_dir: Path | str, out_dir: Path | str,
                            log: Log = print) -> dict[str, Any]:
    """Run the whole step; returns a summary (regions per split, images skipped, val accuracy, seconds)."""
    started = time.monotonic()
    rcfg = cfg["regions"]
    ds = open_prepared(dataset_dir)
    _check_config(rcfg, ds)
    out_dir = Path(out_dir)
    splits = sorted(set(ds.splits.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir, [f"{s}.h5" for s in splits] + [BACKBONE_FILE, METRICS_FILE, SKIPPED_FILE,
                                                              DETECTOR_FILE])
    if rcfg["boxes"] == "vinvl":
        return _import_vinvl(rcfg, ds, out_dir, started, log)
    if rcfg["boxes"] == "detector":
        reader = ImageReader(ds, rcfg["on_bad_image"], max_side=rcfg["detector"]["max_size"])
        source, summary = _detector_source(cfg, out_dir, log)
    else:
        reader = ImageReader(ds, rcfg["on_bad_image"])
        source, summary = _backbone_source(cfg, ds, reader, out_dir, log)
    attrs = {"config_hash": config_hash(cfg, ["seed", "regions", *dataset_keys(cfg)]),
             "boxes": rcfg["boxes"], "tags": rcfg["tags"]}
    counts = {split: _write_store(out_dir / f"{split}.h5", split, ds.image_ids(split), reader, source, attrs, log)
              for split in splits}
    skipped = [reader.skipped[i] for i in sorted(reader.skipped)]
    if skipped:
        log(f"{len(skipped)} image(s) left out (regions.on_bad_image=skip), listed in {out_dir / SKIPPED_FILE}")
    atomic_write_json(out_dir / SKIPPED_FILE, skipped)
    return {"splits": counts, "skipped": len(skipped), **summary, "seconds": round(time.monotonic() - started, 1)}
