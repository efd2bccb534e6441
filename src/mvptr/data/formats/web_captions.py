"""A web-scale image list (CC3M, SBU) after img2dataset: the images that landed, with their captions.

img2dataset wrote one parquet table per shard (`images/<shard>.parquet`, every URL with its status) and the
shard's files (`images/<shard>/<key>.jpg`); the `id` column is the row of the URL list (mvptr.data.web_images),
so an image keeps the same id whichever URLs died. With `options.flickr_ids` (SBU: static.flickr.com URLs), the
photo id in the URL is the image's Flickr alias.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from mvptr.data.formats.records import SourceImage
from mvptr.data.web_images import IMAGES_DIR

FLICKR_PHOTO = re.compile(r"/(\d+)_[0-9a-f]+(?:_[a-z])?\.(?:jpg|jpeg|png|gif)$", re.IGNORECASE)


def read_images(source: Any, source_dir: Path, local: str | None) -> list[SourceImage]:
    images = []
    for table_path in sorted((source_dir / IMAGES_DIR).glob("*.parquet")):
        table = pd.read_parquet(table_path, columns=["id", "key", "url", "caption", "status", "width", "height"])
        for row in table[table["status"] == "success"].itertuples(index=False):
            match = FLICKR_PHOTO.search(row.url) if source.options.get("flickr_ids") else None
            images.append(SourceImage(
                id=source.id_offset + int(row.id), file=f"{source.name}/{IMAGES_DIR}/{table_path.stem}/{row.key}.jpg",
                split="train", width=int(row.width), height=int(row.height), captions=[str(row.caption)],
                aliases=(("flickr", match.group(1)),) if match else ()))
    return images
