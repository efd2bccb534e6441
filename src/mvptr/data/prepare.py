"""The `prepare_data` step: make a dataset folder that every later step reads the same way.

- `dataset.name: synthetic` generates the embedded world (mvptr.data.synthetic) into the folder.
- `dataset.name: coco_format` checks the user's COCO-format files (images exist, JSON parses, captions are
  valid) and writes a manifest pointing at them; only the task files (`dataset.coco_format.task_files`) are
  copied in, under the names the evaluation reads.
- any other name is a corpus of downloaded sources (`dataset.corpus`, mvptr.data.corpus): it reads what the
  download step put under resources/downloads (`--downloads`).
Either way the folder ends with `manifest.json`, which `mvptr.data.coco.open_prepared` reads.

Run: `mvptr data prepare --out resources/datasets/<dataset> [--downloads DIR] [key=value ...]` (the rule).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_dir, atomic_write_json
from mvptr.data.catalog import DOWNLOADS
from mvptr.data.coco import CocoFormatDataset
from mvptr.data.corpus import prepare_corpus
from mvptr.data.download import Log
from mvptr.data.synthetic import SIZES, generate_world
from mvptr.data.task_files import TASK_FILE_NAMES, TASK_FOLDERS
from mvptr.errors import DataError


def synthetic_num_images(settings: Mapping[str, Any]) -> int:
    return settings["num_images"] or SIZES[settings["size"]]


def prepare_synthetic(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    s = cfg["dataset"]["synthetic"]
    return generate_world(out_dir, num_images=synthetic_num_images(s), seed=cfg["seed"],
                          image_size=s["image_size"], captions_per_image=s["captions_per_image"],
                          twin_fraction=s["twin_fraction"], split_fractions=tuple(s["split_fractions"]))


def copy_task_files(task_files: Mapping[str, str | None], out_dir: Path) -> dict[str, list[str]]:
    """Copy the configured task files into the prepared folder's layout (mvptr.data.task_files); task -> names.
    A missing file names its config key."""
    copied = {}
    for task, given in task_files.items():
        if not given:
            continue
        source = Path(given)
        names = TASK_FILE_NAMES[task]
        files = {name: source if source.is_file() and len(names) == 1 else source / name for name in names}
        for name, path in files.items():
            if not path.is_file():
                raise DataError(f"config key 'dataset.coco_format.task_files.{task}': {path} not found (a {task} "
                                f"dataset needs {', '.join(names)})")
            dest = out_dir / TASK_FOLDERS[task] / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        copied[task] = names
    return copied


def prepare_coco_format(cfg: Mapping[str, Any], out_dir: Path, log: Log = print) -> dict[str, Any]:
    c = dict(cfg["dataset"]["coco_format"])
    task_files = c.pop("task_files")
    paths = {key: (str(Path(value).resolve()) if value else None) for key, value in c.items()}
    ds = CocoFormatDataset.open(paths["images_dir"], paths["captions"], paths["instances"], paths["split_file"])
    counts: dict[str, Any] = {"images": len(ds.image_ids()),
                              "captions": len(ds.captions_coco.dataset["annotations"])}
    if ds.instances_coco is not None:
        counts["objects"] = len(ds.instances_coco.dataset["annotations"])
        # An image without annotated objects stays: its captions pre-train and it is retrieved; grounding skips
        # it (gold boxes: no regions, so WPG leaves it out; no referring expression can name one of its boxes).
        counts["images_without_objects"] = sum(not ds.instances_coco.imgToAnns.get(i) for i in ds.image_ids())
        if counts["images_without_objects"]:
            log(f"{counts['images_without_objects']} image(s) have no annotated object: kept for captions and "
                "retrieval, skipped by grounding (WPG, REC)")
    for split in sorted(set(ds.splits.values())):
        counts[f"images_{split}"] = len(ds.image_ids(split))
    with atomic_dir(out_dir) as tmp:
        manifest = {"paths": paths, "counts": counts, "task_files": copy_task_files(task_files, tmp)}
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def prepare(cfg: Mapping[str, Any], out_dir: Path | str, downloads: Path = DOWNLOADS, log: Log = print,
            root: Path | None = None) -> dict[str, Any]:
    """Write the dataset folder for `cfg`; returns its manifest."""
    if cfg["dataset"]["name"] == "synthetic":
        return prepare_synthetic(cfg, Path(out_dir))
    if cfg["dataset"]["name"] == "coco_format":
        return prepare_coco_format(cfg, Path(out_dir), log)
    return prepare_corpus(cfg, Path(out_dir), downloads, log, root)
