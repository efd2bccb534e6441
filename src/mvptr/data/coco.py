"""Read COCO-format image-caption datasets, with errors that say exactly what is wrong and where.

Why: every later stage (concepts, regions, pre-training, evaluation) reads its images and captions through
this one module, whether the data is the embedded synthetic world or a user's own COCO-format folder
(`dataset: coco_format`). pycocotools does the indexing; this module adds the checks it lacks:
- malformed JSON names the file, line and column;
- a caption that is empty or not valid UTF-8 names its annotation id;
- missing image files name the first few paths and the count.

Use:
    ds = CocoFormatDataset.open(images_dir, captions_json, instances_json=None, split_file=None)
    ds = open_prepared(Path("resources/synthetic-1a2b3c4d"))     # a folder written by `mvptr data prepare`
    for image_id in ds.image_ids("train"): ds.image_path(image_id), ds.captions(image_id)
"""

from __future__ import annotations

import contextlib
import io
import json
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


def load_coco(path: Path | str) -> COCO:
    """A pycocotools COCO index over a JSON file read by `read_json` (quiet: no progress prints)."""
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path} is not COCO format: it needs top-level 'images' and 'annotations'")
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
    """Every caption is a non-empty, valid UTF-8 string attached to a known image."""
    bad = [ann.get("id") for ann in coco.dataset["annotations"] if not _is_valid_text(ann.get("caption"))]
    if bad:
        shown = ", ".join(str(b) for b in bad[:SHOW_MISSING])
        raise DataError(f"{path}: {len(bad)} caption(s) empty or not valid UTF-8; annotation ids: {shown}")
    orphans = [ann["id"] for ann in coco.dataset["annotations"] if ann["image_id"] not in coco.imgs]
    if orphans:
        raise DataError(f"{path}: {len(orphans)} caption(s) point to unknown images; annotation ids: "
                        f"{', '.join(str(o) for o in orphans[:SHOW_MISSING])}")


def check_images(images_dir: Path, coco: COCO) -> None:
    """Every image the captions name exists under `images_dir`."""
    missing = [images_dir / img["file_name"] for img in coco.dataset["images"]
               if not (images_dir / img["file_name"]).is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:SHOW_MISSING])
        raise DataError(f"{len(missing)} image file(s) missing under {images_dir}; first: {shown}")


def read_splits(path: Path | str) -> dict[int, str]:
    """image id -> split from a Karpathy-style split file (`images[*].cocoid` and `.split`)."""
    data = read_json(path)
    try:
        return {int(img["cocoid"]): str(img["split"]) for img in data["images"]}
    except (KeyError, TypeError, ValueError) as err:
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
    paths = manifest.get("paths", STANDARD_LAYOUT)
    return {key: (dataset_dir / value if value is not None else None) for key, value in paths.items()}


def open_prepared(dataset_dir: Path | str) -> CocoFormatDataset:
    """Open a folder written by `mvptr data prepare` (synthetic or coco_format)."""
    paths = dataset_paths(Path(dataset_dir))
    return CocoFormatDataset.open(paths["images_dir"], paths["captions"], paths["instances"], paths["split_file"])
