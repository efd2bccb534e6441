"""Read COCO-format image-caption datasets, with errors that say exactly what is wrong and where.

Why: every later stage (concepts, regions, pre-training, evaluation) reads its images and captions through
this one module, whether the data is the embedded synthetic world or a user's own COCO-format folder
(`dataset: coco_format`). pycocotools does the indexing; this module adds the checks it lacks:
- malformed JSON names the file, line and column;
- a record of the wrong shape (a list where an object belongs, a string or null id, a repeated id, a missing
  or non-finite box, a box of negative size or wholly outside its image) names the file, record and field;
- a caption that is empty, not valid UTF-8 or over MAX_CAPTION_CHARS names its annotation id;
- missing image files name the first few paths and the count.
A box partly outside its image is kept: it is clipped where it is read (mvptr.regions.boxes), as COCO's
rounded boxes need.

Use:
    ds = CocoFormatDataset.open(images_dir, captions_json, instances_json=None, split_file=None)
    ds = open_prepared(Path("resources/synthetic-1a2b3c4d"))     # a folder written by `mvptr data prepare`
    for image_id in ds.image_ids("train"): ds.image_path(image_id), ds.captions(image_id)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from mvptr.errors import DataError

# Where `mvptr data prepare` puts each file of a generated dataset, relative to its folder. A prepared
# user dataset records absolute paths to the user's files in its manifest instead.
STANDARD_LAYOUT = {
    "images_dir": "images",
    "captions": "annotations/captions.json",
    "instances": "annotations/instances.json",
    "split_file": "karpathy_split.json",
}
SHOW_MISSING = 5
# A caption is a sentence or a few; a longer one is a broken export (a whole file in one field), and spaCy
# (mvptr.concepts.parser) refuses texts of a million characters.
MAX_CAPTION_CHARS = 10_000


def read_json(path: Path | str) -> Any:
    """Parse a JSON file. Bytes that are not UTF-8 survive as lone surrogates so that the caller can name
    the record that holds them (see `check_captions`) instead of failing on the whole file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"file not found: {path}") from err
    try:
        return json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON in {path} at line {err.lineno} column {err.colno} "
                        f"(char {err.pos}): {err.msg}") from err
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep
        raise DataError(f"cannot read JSON in {path}: {type(err).__name__}: {err}") from err


def _is_id(value: Any) -> bool:
    """An integer that fits the int64 ids of the region stores."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def finite_number(value: Any) -> bool:
    """A JSON number that is no bool, NaN, infinity (Python's json reads `NaN` and `Infinity`) or integer
    beyond float's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _records(data: dict[str, Any], key: str, path: Path | str, fields: dict[str, str]) -> list[dict[str, Any]]:
    """`data[key]`, a list of objects each with `fields` (name -> "id" | "name"), or DataError naming the
    file, the record and the field; ids are integers and unique."""
    records = data[key]
    if not isinstance(records, list):
        raise DataError(f"{path}: {key!r} is a {type(records).__name__}; allowed: a list of objects")
    seen: set[int] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: {key}[{index}] is a {type(record).__name__}; allowed: an object")
        for name, kind in fields.items():
            value = record.get(name)
            if kind == "id" and not _is_id(value):
                raise DataError(f"{path}: {key}[{index}].{name} is {value!r}; allowed: an integer id (64-bit)")
            if kind == "name" and not (isinstance(value, str) and value and "\0" not in value):
                raise DataError(f"{path}: {key}[{index}].{name} is {value!r}; allowed: a non-empty string")
        if record["id"] in seen:
            raise DataError(f"{path}: {key}[{index}].id {record['id']} is repeated; allowed: ids unique in {key!r}")
        seen.add(record["id"])
    return records


def check_boxes(data: dict[str, Any], path: Path | str) -> None:
    """In an instances file (one with 'categories') every annotation has one of its categories and a box; every
    box is [x, y, w, h] of finite numbers, w and h >= 0, that overlaps its image where the image's width and
    height are given."""
    categories = ({c["id"] for c in _records(data, "categories", path, {"id": "id", "name": "name"})}
                  if "categories" in data else None)
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in data["images"]}
    for index, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}] (id {ann['id']})"
        category = ann.get("category_id")
        if categories is not None and not (_is_id(category) and category in categories):
            raise DataError(f"{where}.category_id is {category!r}; allowed: an id of 'categories'")
        box = ann.get("bbox")
        if box is None and categories is None:  # a captions file
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
            raise DataError(f"{where}.bbox is {box!r}; allowed: [x, y, width, height] of finite numbers")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise DataError(f"{where}.bbox {box} has a negative width or height")
        width, height = sizes.get(ann["image_id"], (None, None))
        if finite_number(width) and finite_number(height) and (x >= width or y >= height or x + w <= 0 or y + h <= 0):
            raise DataError(f"{where}.bbox {box} lies wholly outside its {width}x{height} image")


def load_coco(path: Path | str) -> COCO:
    """A pycocotools COCO index over a JSON file read by `read_json` (quiet: no progress prints), its records
    checked first (`_records`, `check_boxes`)."""
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path} is not COCO format: it needs top-level 'images' and 'annotations'")
    _records(data, "images", path, {"id": "id", "file_name": "name"})
    _records(data, "annotations", path, {"id": "id", "image_id": "id"})
    check_boxes(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_valid_text(text: Any) -> bool:
    if not isinstance(text, str) or not text.strip():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 in the file
        return False
    return True


def check_captions(coco: COCO, path: Path | str) -> None:
    """Every caption is a non-empty, valid UTF-8 string of at most MAX_CAPTION_CHARS attached to a known image."""
    bad = [ann.get("id") for ann in coco.dataset["annotations"] if not _is_valid_text(ann.get("caption"))]
    if bad:
        shown = ", ".join(str(b) for b in bad[:SHOW_MISSING])
        raise DataError(f"{path}: {len(bad)} caption(s) empty or not valid UTF-8; annotation ids: {shown}")
    long = [ann["id"] for ann in coco.dataset["annotations"] if len(ann["caption"]) > MAX_CAPTION_CHARS]
    if long:
        raise DataError(f"{path}: {len(long)} caption(s) over {MAX_CAPTION_CHARS} characters; annotation ids: "
                        f"{', '.join(str(i) for i in long[:SHOW_MISSING])}")
    orphans = [ann["id"] for ann in coco.dataset["annotations"] if ann["image_id"] not in coco.imgs]
    if orphans:
        raise DataError(f"{path}: {len(orphans)} caption(s) point to unknown images; annotation ids: "
                        f"{', '.join(str(o) for o in orphans[:SHOW_MISSING])}")


def check_images(images_dir: Path, coco: COCO) -> None:
    """Every image the captions name exists under `images_dir`."""
    missing = [images_dir / img["file_name"] for img in coco.dataset["images"]
               if not os.path.isfile(images_dir / img["file_name"])]  # False, not OSError, for a name too long
    if missing:
        shown = ", ".join(str(p) for p in missing[:SHOW_MISSING])
        raise DataError(f"{len(missing)} image file(s) missing under {images_dir}; first: {shown}")


def read_splits(path: Path | str) -> dict[int, str]:
    """image id -> split from a Karpathy-style split file (`images[*].cocoid` and `.split`)."""
    data = read_json(path)
    try:
        return {int(img["cocoid"]): str(img["split"]) for img in data["images"]}
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise DataError(f"{path} is not a Karpathy-style split file (images[*].cocoid/.split): {err}") from err


@dataclass
class CocoFormatDataset:
    """Images + captions (+ instances) of one COCO-format dataset, checked on open."""

    images_dir: Path
    captions_coco: COCO
    instances_coco: COCO | None = None
    splits: dict[int, str] = field(default_factory=dict)

    @classmethod
    def open(cls, images_dir: Path | str, captions: Path | str, instances: Path | str | None = None,
             split_file: Path | str | None = None) -> CocoFormatDataset:
        images_dir = Path(images_dir)
        captions_coco = load_coco(captions)
        check_captions(captions_coco, captions)
        check_images(images_dir, captions_coco)
        instances_coco = load_coco(instances) if instances else None
        splits = read_splits(split_file) if split_file else {i: "train" for i in captions_coco.imgs}
        unknown = sorted(set(captions_coco.imgs) - set(splits))
        if unknown:
            raise DataError(f"{split_file}: {len(unknown)} image(s) of {captions} have no split; "
                            f"first ids: {unknown[:SHOW_MISSING]}")
        return cls(images_dir, captions_coco, instances_coco, splits)

    def image_ids(self, split: str | None = None) -> list[int]:
        return sorted(i for i in self.captions_coco.imgs if split is None or self.splits[i] == split)

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.captions_coco.imgs[image_id]["file_name"]

    def captions(self, image_id: int) -> list[tuple[int, str]]:
        """(annotation id, caption) pairs of one image, in id order."""
        anns = self.captions_coco.imgToAnns.get(image_id, [])
        return sorted((a["id"], a["caption"]) for a in anns)


def dataset_paths(dataset_dir: Path) -> dict[str, Path | None]:
    """Where the files of a prepared dataset are: its manifest's `paths`, or the standard layout."""
    manifest = read_json(dataset_dir / "manifest.json")
    paths = manifest.get("paths", STANDARD_LAYOUT) if isinstance(manifest, dict) else manifest
    if not (isinstance(paths, dict) and set(STANDARD_LAYOUT) <= set(paths)
            and all(value is None or isinstance(value, str) for value in paths.values())):
        raise DataError(f"{dataset_dir / 'manifest.json'}: 'paths' is {str(paths)[:200]}; allowed: an object of "
                        f"file paths or null for {', '.join(STANDARD_LAYOUT)} (as `mvptr data prepare` writes it)")
    return {key: (dataset_dir / value if value is not None else None) for key, value in paths.items()}


def open_prepared(dataset_dir: Path | str) -> CocoFormatDataset:
    """Open a folder written by `mvptr data prepare` (synthetic or coco_format)."""
    paths = dataset_paths(Path(dataset_dir))
    return CocoFormatDataset.open(paths["images_dir"], paths["captions"], paths["instances"], paths["split_file"])
