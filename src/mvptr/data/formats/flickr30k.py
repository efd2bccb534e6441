"""Flickr30k with Karpathy's split (`dataset_flickr30k.json`); the images are a local folder (licence form).

The split file is enough to know which photos are Flickr30k test images (kept out of pre-training by their
Flickr id, the file name's stem); the images themselves are read only when a task uses them (SNLI-VE), from
`dataset.local.flickr30k`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvptr.data.coco import read_json
from mvptr.data.formats.coco2014 import SPLITS
from mvptr.data.formats.records import SourceImage
from mvptr.errors import DataError


def read_images(source: Any, source_dir: Path, local: str | None) -> list[SourceImage]:
    """Every image of the split file; with `local`, each file must be there."""
    images = []
    folder = Path(local).resolve() if local else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"config key 'dataset.local.{source.name}': {folder} is not a folder ({source.manual})")
    for record in read_json(source_dir / source.options["karpathy"])["images"]:
        file = record["filename"]
        if folder is not None:
            path = folder / file
            if not path.is_file():
                raise DataError(f"dataset.local.{source.name}: {path} is missing (named by "
                                f"{source.options['karpathy']})")
            file = str(path)
        images.append(SourceImage(id=source.id_offset + int(record["imgid"]), file=file,
                                  split=SPLITS[record["split"]],
                                  captions=[s["raw"] for s in record["sentences"]],
                                  aliases=(("flickr", Path(record["filename"]).stem),)))
    return images
