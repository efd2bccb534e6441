"""SNLI-VE -> snli_ve/snli_ve_{train,dev,test}.jsonl with the premise image's prepared id.

Both generator versions of necla-ml/SNLI-VE are read: `Flikr30kID` ("<id>.jpg") and `Flickr30K_ID` ("<id>").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_write_bytes
from mvptr.data.formats.records import ImageIndex
from mvptr.data.task_files import read_json_lines

SPLITS = ("train", "dev", "test")


def write_task(source: Any, source_dir: Path, out_dir: Path, index: ImageIndex) -> dict[str, Any]:
    counts, skipped = {}, 0
    for split in SPLITS:
        lines = []
        for record in read_json_lines(source_dir / f"snli_ve_{split}.jsonl"):
            flickr = str(record.get("Flickr30K_ID", record.get("Flikr30kID", ""))).removesuffix(".jpg")
            image = index.find("flickr", flickr)
            if image is None:
                skipped += 1
                continue
            lines.append(json.dumps({**record, "image_id": image.id}, sort_keys=True))
        atomic_write_bytes(out_dir / "snli_ve" / f"snli_ve_{split}.jsonl", "".join(f"{x}\n" for x in lines).encode())
        counts[split] = len(lines)
    return {"pairs": counts, "skipped": skipped}
