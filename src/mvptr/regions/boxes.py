"""Where the regions of an image are: the gold instance boxes, or boxes from an object detector.

Why: MVPTR's visual input is a set of regions, each a detector feature plus 6 box values
`[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`. The box source is a config choice (`regions.boxes`):
- `gold`: the instances JSON's boxes, largest first, at most `regions.max_regions` (the default; the
  embedded world has exact boxes, and so do COCO and Flickr30k Entities);
- `detector`: torchvision's Faster R-CNN, an optional extra (`pip install .[detector]`), imported only
  when chosen, so that the package never needs torchvision otherwise.

Use:
    boxes = gold_boxes(instances, image_id, max_regions=50)      # -> [RegionBox, ...]
    values = box_values(boxes[0].xyxy, width, height)             # -> float32 array of 6
    detect = TorchvisionDetector(max_regions=50); detect(image)   # -> [RegionBox, ...] (category None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from mvptr.errors import ConfigError

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


class TorchvisionDetector:
    """Boxes from torchvision's COCO-trained Faster R-CNN (ResNet-50 FPN v2), highest score first.

    Its own COCO labels are not kept: object tags come from the region backbone, which knows the
    dataset's categories. The pretrained weights are downloaded by torchvision on first use.
    """

    def __init__(self, max_regions: int, score_threshold: float = 0.2, device: str = "cpu") -> None:
        try:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2
            from torchvision.transforms.functional import to_tensor
        except ImportError as err:
            raise ConfigError("config key 'regions.boxes': 'detector' needs torchvision, an optional extra; "
                              "install it with `pip install .[detector]` or use regions.boxes=gold") from err
        self._to_tensor = to_tensor
        self.model = fasterrcnn_resnet50_fpn_v2(weights=FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT).eval().to(device)
        self.max_regions = max_regions
        self.score_threshold = score_threshold
        self.device = device

    def __call__(self, image: Image.Image) -> list[RegionBox]:
        import torch

        with torch.no_grad():
            output = self.model([self._to_tensor(image).to(self.device)])[0]
        keep = output["scores"] >= self.score_threshold  # torchvision returns them sorted by score
        boxes = output["boxes"][keep][: self.max_regions].cpu().tolist()
        return [RegionBox(xyxy=tuple(box)) for box in boxes]
