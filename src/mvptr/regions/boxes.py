"""Where the regions of an image are: the gold instance boxes, or boxes from an object detector.

Why: MVPTR's visual input is a set of regions, each a detector feature plus 6 box values
`[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`. The box source is a config choice (`regions.boxes`):
- `gold`: the instances JSON's boxes, largest first, at most `regions.max_regions` (the default; the
  embedded world has exact boxes, and so do COCO and Flickr30k Entities);
- `detector`: torchvision's Faster R-CNN (mvptr.regions.detector), an optional extra
  (`pip install .[detector]`), imported only when chosen.

Use:
    boxes = gold_boxes(instances, image_id, max_regions=50)      # -> [RegionBox, ...]
    values = box_values(boxes[0].xyxy, width, height)             # -> float32 array of 6
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO

NUM_BOX_VALUES = 6


@dataclass(frozen=True)
class RegionBox:
    """One region: its box in pixels, and (gold boxes only) its annotated category and attributes."""

    xyxy: tuple[float, float, float, float]
    category: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


def box_values(xyxy: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """`[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`, clipped to the image (VinVL's last 6 feature columns)."""
    x1, y1, x2, y2 = xyxy
    x1, x2 = np.clip([x1, x2], 0, width) / width
    y1, y2 = np.clip([y1, y2], 0, height) / height
    return np.array([x1, y1, x2, y2, x2 - x1, y2 - y1], dtype=np.float32)


def category_names(instances: COCO) -> list[str]:
    """Category names in category-id order: the tag vocabulary of every region store built from `instances`."""
    return [instances.cats[cat_id]["name"] for cat_id in sorted(instances.cats)]


def gold_boxes(instances: COCO, image_id: int, max_regions: int) -> list[RegionBox]:
    """The image's annotated instances, largest box first (ties: annotation id), at most `max_regions`."""
    anns = sorted(instances.imgToAnns.get(image_id, []), key=lambda a: (-a["bbox"][2] * a["bbox"][3], a["id"]))
    return [RegionBox(xyxy=(x, y, x + w, y + h), category=instances.cats[ann["category_id"]]["name"],
                      attributes=ann.get("attributes", {}))
            for ann in anns[:max_regions] for x, y, w, h in [ann["bbox"]]]
