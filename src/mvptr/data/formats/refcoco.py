"""RefCOCO+ -> refcoco/refs.json (the UNC splits train, val, testA, testB) with prepared image and box ids.

`refs(unc).p` is a Python 2 pickle: it is read with the restricted unpickler (mvptr.data.safe_pickle), which
accepts plain containers only. A ref's `ann_id` is a COCO instance id; the referred box is that annotation in
the corpus's instances (coco2014's), so the gold box the evaluation reads is COCO's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_write_json
from mvptr.data.formats.records import ImageIndex
from mvptr.data.safe_pickle import load_plain_pickle
from mvptr.errors import DataError


def write_task(source: Any, source_dir: Path, out_dir: Path, index: ImageIndex) -> dict[str, Any]:
    refs_path = source_dir / source.options["refs"]
    refs = load_plain_pickle(refs_path)
    if not isinstance(refs, list):
        raise DataError(f"{refs_path}: expected a list of refs, found {type(refs).__name__}")
    kept, skipped, counts = [], 0, {}
    for ref in refs:
        image = index.find("coco", str(ref["image_id"]))
        ann_id = index_offset(index, image) + int(ref["ann_id"]) if image is not None else None
        if image is None or all(obj[2] != ann_id for obj in image.objects):
            skipped += 1
            continue
        kept.append({"ref_id": int(ref["ref_id"]), "ann_id": ann_id, "image_id": image.id, "split": ref["split"],
                     "sentences": [{"sent_id": int(s["sent_id"]), "sent": s["sent"]} for s in ref["sentences"]]})
        counts[ref["split"]] = counts.get(ref["split"], 0) + len(ref["sentences"])
    atomic_write_json(out_dir / "refcoco" / "refs.json", kept)
    return {"expressions": dict(sorted(counts.items())), "skipped_refs": skipped}


def index_offset(index: ImageIndex, image: Any) -> int:
    """The id offset of the source that brought `image` (its prepared id minus its COCO id)."""
    coco_id = next(int(value) for kind, value in image.aliases if kind == "coco")
    return image.id - coco_id
