"""The `prepare_data` step for a corpus of downloaded sources (`dataset.corpus`, e.g. configs/datasets/4m.yaml).

Why: concepts, regions, pre-training and evaluation read one prepared folder in one format (COCO-format captions
and instances, a Karpathy-style split file, the task files of mvptr.data.task_files), whatever the sources. This
step reads every source the corpus names through its reader (mvptr.data.formats), keeps the test images of
`exclude_test_of` out of pre-training (matched by COCO and Flickr id; the manifest says how many it removed from
each source), adds the images a task needs that no pre-training source brought (split `task`, never pre-trained
on), writes the task files with prepared image ids, and records in the manifest what came from where (counts,
removed images, dead URLs of web image lists, skipped task examples). Images stay where the download step put
them: the captions file names them relative to resources/downloads.

Splits: the retrieval source's images keep its Karpathy split (train, val, test); every other pre-training
image is train; task-only images are task.

Run: `mvptr data prepare --out resources/datasets/<name>-<hash> dataset.name=4m` (the prepare_data rule).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mvptr.atomic import atomic_dir, atomic_write_json
from mvptr.data.catalog import DOWNLOADS, corpus_roles, load_source, needed_sources, web_sources
from mvptr.data.coco import STANDARD_LAYOUT, CocoFormatDataset
from mvptr.data.download import Log
from mvptr.data.fetch import MANIFEST
from mvptr.data.formats import IMAGE_READERS, TASK_WRITERS, ImageIndex, SourceImage
from mvptr.data.web_images import SUMMARY, read_summary
from mvptr.errors import DataError


class _Reader:
    """Each source's images, read once."""

    def __init__(self, cfg: Mapping[str, Any], downloads: Path, root: Path | None) -> None:
        self.cfg, self.downloads, self.root = cfg, downloads, root
        self.cache: dict[tuple[str, bool], list[SourceImage]] = {}

    def images(self, name: str, need_files: bool = True) -> list[SourceImage]:
        """The source's images; without `need_files`, a local folder that is not set is not needed (the split
        alone says which images are test images)."""
        local = self.cfg["dataset"]["local"].get(name)
        source = load_source(name, self.cfg, self.root)
        if source.local and local is None and need_files:
            raise DataError(f"config key 'dataset.local.{name}' is not set: {source.manual}")
        key = (name, local is not None)
        if key not in self.cache:
            if source.format not in IMAGE_READERS:
                raise DataError(f"source {name!r} (format {source.format}) has no images of its own")
            self.cache[key] = IMAGE_READERS[source.format](source, self.downloads / name, local)
        return self.cache[key]


def _check_downloaded(cfg: Mapping[str, Any], downloads: Path, root: Path | None) -> None:
    """Every source the corpus needs has finished its download step (and its web-image step)."""
    for name in needed_sources(cfg, root):
        if not (downloads / name / MANIFEST).is_file():
            raise DataError(f"source {name!r} is not downloaded ({downloads / name / MANIFEST} missing): run "
                            f"`mvptr data download --source {name} --out {downloads / name}` or the workflow")
    for name in web_sources(cfg, root):
        if not (downloads / name / SUMMARY).is_file():
            raise DataError(f"source {name!r} has no images yet ({downloads / name / SUMMARY} missing): run "
                            f"`mvptr data web-images --source {name} --dir {downloads / name}` or the workflow")


def _fill_sizes(images: list[SourceImage], downloads: Path) -> None:
    """Width and height of the images whose source does not give them, from the file's header."""
    for img in images:
        if img.width is None or img.height is None:
            try:
                with Image.open(downloads / img.file) as opened:
                    img.width, img.height = opened.size
            except (OSError, Image.DecompressionBombError) as err:
                raise DataError(f"{downloads / img.file}: not a readable image ({err})") from err


def _coco_files(images: list[SourceImage]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """captions.json, instances.json and the split file of the corpus's images."""
    records = [{"id": img.id, "file_name": img.file, "width": img.width, "height": img.height} for img in images]
    captions = [{"id": number, "image_id": img.id, "caption": text}
                for number, (img, text) in enumerate(((img, t) for img in images for t in img.captions), start=1)]
    names = sorted({name for img in images for _, name, _ in img.objects})
    category = {name: number for number, name in enumerate(names, start=1)}
    objects = [{"id": ann_id, "image_id": img.id, "bbox": box, "category_id": category[name],
                "area": box[2] * box[3], "iscrowd": 0} for img in images for box, name, ann_id in img.objects]
    return ({"images": records, "annotations": captions},
            {"images": records, "annotations": objects,
             "categories": [{"id": i, "name": n} for n, i in category.items()]},
            {"images": [{"cocoid": img.id, "split": img.split} for img in images]})


def prepare_corpus(cfg: Mapping[str, Any], out_dir: Path, downloads: Path = DOWNLOADS, log: Log = print,
                   root: Path | None = None) -> dict[str, Any]:
    """Write the prepared folder of the configured corpus; returns its manifest."""
    roles, corpus = corpus_roles(cfg), cfg["dataset"]["corpus"]
    _check_downloaded(cfg, downloads, root)
    reader = _Reader(cfg, downloads.resolve(), root)
    excluded = {alias for name in roles["exclude"] for img in reader.images(name, need_files=False)
                if img.split == "test" for alias in img.aliases}
    index, removed, per_source = ImageIndex(), Counter(), {}
    for name in roles["pretrain"]:
        kept = 0
        for img in reader.images(name):
            if name != corpus["retrieval"]:
                if excluded.intersection(img.aliases):
                    removed[name] += 1
                    continue
                img.split = "train"
            index.add(img)
            kept += 1
        per_source[name] = kept
        log(f"prepare: {name}: {kept} images ({removed[name]} removed as test images of "
            f"{', '.join(roles['exclude']) or 'no source'})")
    tasks: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for task, name in sorted(corpus["tasks"].items()):
            source = load_source(name, cfg, root)
            if source.image_source() not in roles["pretrain"]:
                for img in reader.images(source.image_source()):
                    img.split = "task"
                    index.add_missing(img)
            tasks[task] = {"source": name, **TASK_WRITERS[source.format](source, downloads / name, tmp, index)}
            log(f"prepare: {task} from {name}: {tasks[task]}")
        images = sorted(index.images.values(), key=lambda img: img.id)
        _fill_sizes(images, downloads.resolve())
        captions, instances, splits = _coco_files(images)
        for key, data in (("captions", captions), ("instances", instances), ("split_file", splits)):
            atomic_write_json(tmp / STANDARD_LAYOUT[key], data)
        web = {name: read_summary(downloads / name) for name in roles["pretrain"]
               if (downloads / name / SUMMARY).is_file()}
        # Relative to the prepared folder, so that the checkout can move (and DVC restore it elsewhere).
        paths = {**STANDARD_LAYOUT, "images_dir": os.path.relpath(downloads.resolve(), out_dir.resolve())}
        counts = {"images": len(images), "captions": len(captions["annotations"]),
                  "objects": len(instances["annotations"]),
                  **{f"images_{split}": n for split, n in sorted(Counter(img.split for img in images).items())}}
        manifest = {"paths": paths, "counts": counts, "sources": per_source, "removed_test_images": dict(removed),
                    "web_images": web, "tasks": tasks}
        atomic_write_json(tmp / "manifest.json", manifest)
        # The folder must open the way every later step opens it (images present, captions valid, splits known).
        CocoFormatDataset.open(downloads.resolve(), tmp / STANDARD_LAYOUT["captions"],
                               tmp / STANDARD_LAYOUT["instances"], tmp / STANDARD_LAYOUT["split_file"])
    log(f"prepare: {counts}")
    return manifest
