"""NLVR2: its images from a local folder (form), its statements -> nlvr2/{train,dev,test1}.json (JSON lines).

An image is named `<split>-<set>-<pair>-img0.png` / `-img1.png` after the statement's identifier
(`<split>-<set>-<pair>-<sentence>`); the folder is searched recursively (the released train images sit in 100
sub-folders). NLVR2 images join the corpus in the `task` split: they are never pre-trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_write_bytes
from mvptr.data.formats.records import ImageIndex, SourceImage
from mvptr.data.task_files import read_json_lines
from mvptr.errors import DataError

SPLITS = ("train", "dev", "test1")


def read_images(source: Any, source_dir: Path, local: str | None) -> list[SourceImage]:
    if not local or not Path(local).is_dir():
        raise DataError(f"config key 'dataset.local.{source.name}': {local!r} is not a folder ({source.manual})")
    files = sorted(p for p in Path(local).resolve().rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [SourceImage(id=source.id_offset + number, file=str(path), split="task", aliases=(("nlvr2", path.name),))
            for number, path in enumerate(files)]


def write_task(source: Any, source_dir: Path, out_dir: Path, index: ImageIndex) -> dict[str, Any]:
    counts, skipped = {}, 0
    for split in SPLITS:
        lines = []
        for record in read_json_lines(source_dir / f"{split}.json"):
            stem = "-".join(str(record["identifier"]).split("-")[:3])
            left, right = index.find("nlvr2", f"{stem}-img0.png"), index.find("nlvr2", f"{stem}-img1.png")
            if left is None or right is None:
                skipped += 1
                continue
            lines.append(json.dumps({**record, "left_image_id": left.id, "right_image_id": right.id}, sort_keys=True))
        atomic_write_bytes(out_dir / "nlvr2" / f"{split}.json", "".join(f"{x}\n" for x in lines).encode())
        counts[split] = len(lines)
    return {"statements": counts, "skipped": skipped}
