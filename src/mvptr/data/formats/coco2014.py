"""COCO 2014 with Karpathy's split: images of train2014/val2014, Karpathy's captions and split, COCO's instances.

Karpathy's `dataset_coco.json` names every image (filepath train2014|val2014, filename, cocoid, split
train|restval|val|test, sentences[].raw); restval joins train, as in every paper that uses the split. Sizes and
gold objects come from `annotations/instances_{train,val}2014.json` (category names as the tags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvptr.data.coco import read_json
from mvptr.data.formats.records import SourceImage

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_instances(paths: list[Path], offset: int) -> tuple[dict[int, tuple[int, int]], dict[int, list]]:
    """image id -> (width, height) and image id -> [(bbox, category name, annotation id)] of COCO instance files."""
    sizes: dict[int, tuple[int, int]] = {}
    objects: dict[int, list] = {}
    for path in paths:
        data = read_json(path)
        names = {c["id"]: c["name"] for c in data["categories"]}
        sizes.update({int(i["id"]): (int(i["width"]), int(i["height"])) for i in data["images"]})
        for ann in data["annotations"]:
            objects.setdefault(int(ann["image_id"]), []).append(
                (list(map(float, ann["bbox"])), names[ann["category_id"]], offset + int(ann["id"])))
    return sizes, objects


def read_images(source: Any, source_dir: Path, local: str | None) -> list[SourceImage]:
    sizes, objects = read_instances([source_dir / "annotations" / f"instances_{s}2014.json" for s in ("train", "val")],
                                    source.id_offset)
    images = []
    for record in read_json(source_dir / source.options["karpathy"])["images"]:
        coco_id = int(record["cocoid"])
        width, height = sizes.get(coco_id, (None, None))
        images.append(SourceImage(
            id=source.id_offset + coco_id, file=f"{source.name}/{record['filepath']}/{record['filename']}",
            split=SPLITS[record["split"]], width=width, height=height,
            captions=[s["raw"] for s in record["sentences"]],
            objects=objects.get(coco_id, []),
            aliases=(("coco", str(coco_id)),)))
    return images
