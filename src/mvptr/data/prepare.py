"""The `prepare_data` step: make a dataset folder that every later step reads the same way.

- `dataset.name: synthetic` generates the embedded world (mvptr.data.synthetic) into the folder.
- `dataset.name: coco_format` checks the user's COCO-format files (images exist, JSON parses, captions are
  valid) and writes a manifest pointing at them; nothing is copied.
- any other name is a corpus of downloaded sources (`dataset.corpus`, mvptr.data.corpus): it reads what the
  download step put under resources/downloads (`--downloads`).
Either way the folder ends with `manifest.json`, which `mvptr.data.coco.open_prepared` reads.

Run: `mvptr data prepare --out resources/datasets/<dataset> [--downloads DIR] [key=value ...]` (the rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_dir, atomic_write_json
from mvptr.data.catalog import DOWNLOADS
from mvptr.data.coco import CocoFormatDataset
from mvptr.data.corpus import prepare_corpus
from mvptr.data.download import Log
from mvptr.data.synthetic import SIZES, generate_world


def synthetic_num_images(settings: Mapping[str, Any]) -> int:
    return settings["num_images"] or SIZES[settings["size"]]


def prepare_synthetic(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    s = cfg["dataset"]["synthetic"]
    return generate_world(out_dir, num_images=synthetic_num_images(s), seed=cfg["seed"],
                          image_size=s["image_size"], captions_per_image=s["captions_per_image"],
                          twin_fraction=s["twin_fraction"], split_fractions=tuple(s["split_fractions"]))


def prepare_coco_format(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    c = cfg["dataset"]["coco_format"]
    paths = {key: (str(Path(value).resolve()) if value else None) for key, value in c.items()}
    ds = CocoFormatDataset.open(paths["images_dir"], paths["captions"], paths["instances"], paths["split_file"])
    counts: dict[str, Any] = {"images": len(ds.image_ids()),
                              "captions": len(ds.captions_coco.dataset["annotations"])}
    if ds.instances_coco is not None:
        counts["objects"] = len(ds.instances_coco.dataset["annotations"])
    for split in sorted(set(ds.splits.values())):
        counts[f"images_{split}"] = len(ds.image_ids(split))
    manifest = {"paths": paths, "counts": counts}
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def prepare(cfg: Mapping[str, Any], out_dir: Path | str, downloads: Path = DOWNLOADS, log: Log = print,
            root: Path | None = None) -> dict[str, Any]:
    """Write the dataset folder for `cfg`; returns its manifest."""
    makers = {"synthetic": prepare_synthetic, "coco_format": prepare_coco_format}
    if cfg["dataset"]["name"] not in makers:
        return prepare_corpus(cfg, Path(out_dir), downloads, log, root)
    return makers[cfg["dataset"]["name"]](cfg, Path(out_dir))
