"""Visual Genome 1.2: region descriptions as captions, objects as gold boxes, COCO and Flickr ids as aliases.

`image_data.json` gives each image's size, URL (whose folder, VG_100K or VG_100K_2, is where images.zip and
images2.zip put it), coco_id and flickr_id; `region_descriptions.json` the phrases (every region's phrase is a
caption of its image, as in ALBEF and MVPTR); `objects.json` the boxes with their first name as the tag. Every
VG image is a training image. attributes.json and relationships.json are downloaded for completeness; the
pipeline parses its concepts from the captions (spaCy) and does not read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvptr.data.coco import read_json
from mvptr.data.formats.records import SourceImage


def read_images(source: Any, source_dir: Path, local: str | None) -> list[SourceImage]:
    captions: dict[int, list[str]] = {}
    for entry in read_json(source_dir / "region_descriptions.json"):
        image_id = int(entry.get("id", entry.get("image_id")))
        captions[image_id] = [r["phrase"].strip() for r in entry["regions"] if r["phrase"].strip()]
    objects: dict[int, list] = {}
    for entry in read_json(source_dir / "objects.json"):
        objects[int(entry["image_id"])] = [([float(o["x"]), float(o["y"]), float(o["w"]), float(o["h"])],
                                            o["names"][0], source.id_offset + int(o["object_id"]))
                                           for o in entry["objects"] if o.get("names")]
    images = []
    for record in read_json(source_dir / "image_data.json"):
        image_id = int(record.get("image_id", record.get("id")))
        folder = record["url"].rstrip("/").split("/")[-2]
        aliases = tuple((kind, str(record[key])) for kind, key in (("coco", "coco_id"), ("flickr", "flickr_id"))
                        if record.get(key))
        images.append(SourceImage(
            id=source.id_offset + image_id, file=f"{source.name}/{folder}/{image_id}.jpg", split="train",
            width=record.get("width"), height=record.get("height"), captions=captions.get(image_id, []),
            objects=objects.get(image_id, []), aliases=aliases))
    return images
