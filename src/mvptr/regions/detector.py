"""Region features of photographs: a torchvision Faster R-CNN gives the boxes, their tags and their features.

Why: the embedded world's regions come from gold boxes and a small CNN trained on them; photographs
(CC3M, SBU, a user's folder) have no gold boxes. MVPTR's regions are a detector's: VinVL's boxes, its class
names as object tags, and its RoI features. This is the same design on torchvision (`regions.boxes:
detector`), in ONE pass per batch of images, as bottom-up attention (Anderson et al.) selects its regions:
1. the detector's transform, backbone (ResNet-50 or MobileNet-v3 + FPN) and region proposal network give
   `regions.detector.proposals` proposal boxes per image;
2. RoIAlign over the FPN levels (the detector's own `box_roi_pool`) and its box head give each proposal a
   1,024-d representation - the region feature, the vector the detector's classifier reads;
3. the classifier's softmax gives each proposal its best non-background class (the tag) and score; class-wise
   NMS at `nms_threshold`; the boxes scoring at least `score_threshold` are kept, at least `min_regions` and
   at most `regions.max_regions` of them, highest score first.
Boxes are the proposals themselves (as bottom-up attention's), so a feature is always pooled from its own box.
Why not two steps (boxes from the detector, features from a second network over crops): a second backbone
pass per image, and features that the tags were not predicted from.

Weights (`regions.detector.weights`): `torchvision` (the architecture's COCO weights, read from torchvision's
cache, `$TORCH_HOME/hub/checkpoints/`, never downloaded here: the error says how to fill the cache), a local
file (a state dict, .pth/.pt/.safetensors, e.g. a detector trained on Visual Genome's 1,600 classes with
`regions.detector.categories` naming them) or `random` (seeded initialisation: only the mechanics are real;
the tests use it). Class names: the COCO names of torchvision's weights, or `categories`, a JSON list or a
text file with one name per line, index 0 the background.

Runs batched on the GPU when there is one (`device: auto`), features stored as fp16.

Use:
    detector = RegionDetector.from_config(cfg["regions"], seed=0)
    regions = detector([image, ...])          # -> [Regions(features, boxes, tags), ...]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mvptr.checkpoint_files import read_checkpoint
from mvptr.errors import ConfigError
from mvptr.regions.boxes import box_values
from mvptr.regions.store import Regions
from mvptr.regions.torchvision_compat import import_torchvision

# Architecture name -> (torchvision builder, its COCO weights enum).
ARCHITECTURES = {
    "fasterrcnn_resnet50_fpn_v2": ("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
    "fasterrcnn_resnet50_fpn": ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("fasterrcnn_mobilenet_v3_large_fpn",
                                          "FasterRCNN_MobileNet_V3_Large_FPN_Weights"),
}


@dataclass(frozen=True)
class DetectorSettings:
    """The `regions.detector` keys, plus `regions.max_regions`."""

    arch: str
    weights: str
    categories: str | None
    score_threshold: float
    nms_threshold: float
    min_regions: int
    max_regions: int
    proposals: int
    min_size: int
    max_size: int
    batch_size: int
    device: str

    @classmethod
    def from_config(cls, regions_cfg: Mapping[str, Any]) -> DetectorSettings:
        d = regions_cfg["detector"]
        return cls(arch=d["arch"], weights=str(d["weights"]), categories=d["categories"],
                   score_threshold=d["score_threshold"], nms_threshold=d["nms_threshold"],
                   min_regions=d["min_regions"], max_regions=regions_cfg["max_regions"], proposals=d["proposals"],
                   min_size=d["min_size"], max_size=d["max_size"], batch_size=d["batch_size"], device=d["device"])


def _weights_enum(arch: str) -> Any:
    import_torchvision()
    from torchvision.models import detection

    return getattr(detection, ARCHITECTURES[arch][1]).COCO_V1


def read_categories(path: Path | str) -> list[str]:
    """Class names from a JSON list or a text file (one per line); index 0 is the background."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config key 'regions.detector.categories': cannot read {path}: {err}") from err
    names = json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines()
                                                               if line.strip()]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key 'regions.detector.categories': {path} must list at least 2 class names "
                          "(index 0 the background)")
    return names


def cached_weights_path(arch: str) -> Path:
    """Where torchvision's cache keeps the architecture's COCO weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_weights_enum(arch).url).name


def _weights_file(settings: DetectorSettings) -> Path:
    if settings.weights != "torchvision":
        return Path(settings.weights).expanduser()
    path = cached_weights_path(settings.arch)
    if not path.is_file():
        url = _weights_enum(settings.arch).url
        raise ConfigError(f"config key 'regions.detector.weights': torchvision's weights for {settings.arch} are not "
                          f"in its cache ({path}); download {url} there once (on a machine with internet), or set "
                          "regions.detector.weights to a local file")
    return path


def build_detector(settings: DetectorSettings, seed: int) -> tuple[torch.nn.Module, list[str], dict[str, Any]]:
    """The detector in eval mode, its class names, and where its weights came from."""
    if settings.arch not in ARCHITECTURES:
        raise ConfigError(f"config key 'regions.detector.arch': {settings.arch!r} is not one of "
                          f"{', '.join(ARCHITECTURES)}")
    import_torchvision()
    from torchvision.models import detection

    categories = (read_categories(settings.categories) if settings.categories
                  else list(_weights_enum(settings.arch).meta["categories"]))
    options = {"num_classes": len(categories), "min_size": settings.min_size, "max_size": settings.max_size,
               "rpn_post_nms_top_n_test": settings.proposals}
    builder = getattr(detection, ARCHITECTURES[settings.arch][0])
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = builder(weights=None, weights_backbone=None, **options)
    origin: dict[str, Any] = {"arch": settings.arch, "weights": settings.weights, "classes": len(categories)}
    if settings.weights != "random":
        path = _weights_file(settings)
        if not path.is_file():
            raise ConfigError(f"config key 'regions.detector.weights': no file {path}")
        missing, unexpected = model.load_state_dict(read_checkpoint(path), strict=False)
        if missing or unexpected:
            raise ConfigError(f"config key 'regions.detector.weights': {path} does not fit {settings.arch} with "
                              f"{len(categories)} classes ({len(missing)} missing, e.g. {missing[:2]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); check regions.detector.arch "
                              "and regions.detector.categories")
        origin["file"] = str(path)
    return model.eval(), categories, origin


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RegionDetector:
    """Regions of a batch of RGB images: proposal boxes, their box-head features and their best class."""

    def __init__(self, settings: DetectorSettings, seed: int) -> None:
        self.settings = settings
        self.device = _device(settings.device)
        model, self.categories, self.origin = build_detector(settings, seed)
        self.model = model.to(self.device)
        self.feature_dim = self.model.roi_heads.box_predictor.cls_score.in_features

    @classmethod
    def from_config(cls, regions_cfg: Mapping[str, Any], seed: int) -> RegionDetector:
        return cls(DetectorSettings.from_config(regions_cfg), seed)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[Regions]:
        from torchvision.models.detection.transform import resize_boxes
        from torchvision.transforms.functional import pil_to_tensor

        if not images:
            return []
        tensors = [pil_to_tensor(image).to(self.device).float().div_(255.0) for image in images]
        batch, _ = self.model.transform(tensors)
        feature_maps = self.model.backbone(batch.tensors)
        proposals, _ = self.model.rpn(batch, feature_maps)
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(feature_maps, proposals, batch.image_sizes)
        features = heads.box_head(pooled)
        logits, _ = heads.box_predictor(features)
        out = []
        for image, boxes, image_size, feats, scores in zip(
                images, proposals, batch.image_sizes, features.split([len(p) for p in proposals]),
                logits.softmax(dim=-1).split([len(p) for p in proposals])):
            keep = self._select(boxes, scores)
            xyxy = resize_boxes(boxes[keep], image_size, (image.height, image.width)).cpu().numpy()
            width, height = image.size
            values = np.stack([box_values(tuple(b), width, height) for b in xyxy]) if len(xyxy) else \
                np.zeros((0, 6), dtype=np.float32)
            tags = scores[keep, 1:].argmax(dim=1).add(1).cpu().numpy().astype(np.int32)
            out.append(Regions(feats[keep].cpu().numpy().astype(np.float16), values, tags))
        return out

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the kept proposals, best first: class-wise NMS, then the score threshold within bounds."""
        from torchvision.ops import batched_nms

        best, label = scores[:, 1:].max(dim=1)  # column 0 is the background
        keep = batched_nms(boxes, best, label, self.settings.nms_threshold)  # sorted by decreasing score
        above = int((best[keep] >= self.settings.score_threshold).sum())
        count = min(max(above, self.settings.min_regions), self.settings.max_regions, len(keep))
        return keep[:count]
