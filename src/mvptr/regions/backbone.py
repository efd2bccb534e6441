"""The region backbone: a small CNN trained on object crops, our stand-in for VinVL's Visual Genome detector.

Why: VinVL's region features come from a detector trained to name objects *and their attributes*, so a
feature carries "red", "large" and "dog". This network is trained the same way, at toy scale, in the
extract_region_features step itself: one head per label of the training instances - the COCO category
(in the embedded world: the shape) plus every attribute all training instances carry (in the embedded
world: colour and size) - and its penultimate layer (width `regions.feature_dim`) is the region feature.

A crop resized to `crop_size` has lost its scale, which a real detector keeps through the context of its
ROI-pooled feature map; so the crop's 6 box values enter the network beside the convolutional features.

Training is deterministic on CPU from the seed (seeded initialisation and shuffling, no data-loader
workers, global RNG untouched), bit for bit at a given number of torch threads. Weights are saved as
safetensors with the head vocabularies as metadata.

Use:
    model, metrics = train_backbone(train_crops, val_crops, vocabularies, feature_dim=128, crop_size=32,
                                    epochs=4, batch_size=128, lr=2e-3, seed=0)
    save_backbone(model, "backbone.safetensors"); model = load_backbone("backbone.safetensors")
    features = model.features(pixels, geometry)       # (n, feature_dim) float32
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from mvptr.atomic import atomic_write_bytes
from mvptr.errors import DataError
from mvptr.regions.boxes import NUM_BOX_VALUES

CATEGORY_HEAD = "category"
IGNORE = -100  # label of a crop whose attribute value the training split never showed
_CHANNELS = (16, 32, 64)  # as accurate as (32, 64, 128) on the embedded world, and 3x faster on CPU
_POOLED = 4  # the last feature map is pooled to 4x4, whatever the crop size, so that layout survives
# The 6 box values get their own small layer: fed raw beside the 1,024 conv activations, a 0.1 difference
# in w/W ("small" vs "large") was too faint to learn in a few epochs.
_GEOMETRY_WIDTH = 32
_INFERENCE_BATCH = 512
_METADATA_KEY = "mvptr.region_backbone"


def crop(image: Image.Image, xyxy: Sequence[float], size: int) -> np.ndarray:
    """The box resized to size x size, as uint8 (3, size, size); a box under a pixel is widened to one."""
    x1, y1, x2, y2 = xyxy
    box = (x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box)).transpose(2, 0, 1)


@dataclass
class CropSet:
    """Crops with their box values and labels (one tensor of class ids per head)."""

    pixels: torch.Tensor  # uint8 (n, 3, s, s)
    geometry: torch.Tensor  # float32 (n, 6)
    labels: dict[str, torch.Tensor]  # head -> int64 (n,)

    def __len__(self) -> int:
        return len(self.pixels)


class RegionBackbone(nn.Module):
    """Three conv blocks -> 4x4 pooled map + embedded box values -> feature layer (ReLU) -> a linear head per label."""

    def __init__(self, feature_dim: int, vocabularies: Mapping[str, Sequence[str]], crop_size: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.crop_size = crop_size
        self.vocabularies = {head: list(names) for head, names in vocabularies.items()}
        blocks: list[nn.Module] = []
        channels_in = 3
        # momentum=None: batch-norm statistics are the plain average over all training batches. With the
        # default running average, a run of a few dozen steps kept the initial statistics in eval mode, and
        # val accuracy fell far below train accuracy.
        for channels in _CHANNELS:
            blocks += [nn.Conv2d(channels_in, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels, momentum=None), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels_in = channels
        blocks.append(nn.AdaptiveAvgPool2d(_POOLED))
        self.trunk = nn.Sequential(*blocks)
        # Standardised first: w/W of "small" and "large" objects differ by ~0.1, two standard deviations.
        self.geometry = nn.Sequential(nn.BatchNorm1d(NUM_BOX_VALUES, momentum=None),
                                      nn.Linear(NUM_BOX_VALUES, _GEOMETRY_WIDTH), nn.ReLU(inplace=True))
        self.feature = nn.Sequential(nn.Linear(channels_in * _POOLED**2 + _GEOMETRY_WIDTH, feature_dim),
                                     nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({head: nn.Linear(feature_dim, len(names))
                                    for head, names in self.vocabularies.items()})

    def features(self, pixels: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        x = pixels.float().div(255.0).sub(0.5).div(0.25)  # about zero mean, unit spread
        return self.feature(torch.cat([self.trunk(x).flatten(1), self.geometry(geometry)], dim=1))

    def forward(self, pixels: torch.Tensor, geometry: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels, geometry)
        return {head: layer(features) for head, layer in self.heads.items()}


def _loss(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unweighted sum of the heads' cross-entropies."""
    return sum(nn.functional.cross_entropy(out, labels[head], ignore_index=IGNORE) for head, out in logits.items())


@torch.no_grad()
def predict(model: RegionBackbone, pixels: torch.Tensor,
            geometry: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Features and the arg-max class per head, in eval mode, in batches."""
    model.eval()
    features, classes = [], {head: [] for head in model.heads}
    for start in range(0, len(pixels), _INFERENCE_BATCH):
        stop = start + _INFERENCE_BATCH
        batch = model.features(pixels[start:stop], geometry[start:stop])
        features.append(batch)
        for head, layer in model.heads.items():
            classes[head].append(layer(batch).argmax(dim=1))
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(features) if features else torch.zeros(0, model.feature_dim),
            {head: torch.cat(ids) if ids else empty for head, ids in classes.items()})


def accuracy(model: RegionBackbone, crops: CropSet) -> dict[str, float | None]:
    """Share of crops whose arg-max class is the label, per head (crops labelled IGNORE left out; None if all are)."""
    _, classes = predict(model, crops.pixels, crops.geometry)
    out: dict[str, float | None] = {}
    for head, predicted in classes.items():
        known = crops.labels[head] != IGNORE
        out[head] = float((predicted[known] == crops.labels[head][known]).float().mean()) if known.any() else None
    return out


def train_backbone(train: CropSet, val: CropSet | None, vocabularies: Mapping[str, Sequence[str]], *,
                   feature_dim: int, crop_size: int, epochs: int, batch_size: int, lr: float, seed: int,
                   on_epoch: Callable[[int, float], None] | None = None) -> tuple[RegionBackbone, dict]:
    """Train with Adam on the summed head losses; metrics: train loss per epoch, accuracy per head on val."""
    if len(train) < 2:
        raise DataError("no training crops for the region backbone: the training split has no annotated instances")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = RegionBackbone(feature_dim, vocabularies, crop_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(train), generator=order).split(batch_size):
            if len(idx) == 1:  # batch norm cannot train on one crop; it is seen in the other epochs
                continue
            loss = _loss(model(train.pixels[idx], train.geometry[idx]), {h: y[idx] for h, y in train.labels.items()})
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        losses.append(total / seen)
        if on_epoch:
            on_epoch(epoch + 1, losses[-1])
    metrics = {"train_loss": losses, "train_crops": len(train), "val_crops": len(val) if val else 0,
               "val_accuracy": accuracy(model, val) if val and len(val) else {},
               "heads": {head: len(names) for head, names in model.vocabularies.items()}}
    return model, metrics


def save_backbone(model: RegionBackbone, path: Path | str) -> None:
    """safetensors weights; the vocabularies and sizes needed to rebuild the model go in its metadata."""
    # One metadata key: safetensors writes several in hash order, so the same weights gave different bytes.
    config = {"feature_dim": model.feature_dim, "crop_size": model.crop_size, "vocabularies": model.vocabularies}
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={_METADATA_KEY: json.dumps(config, sort_keys=True)}))


def load_backbone(path: Path | str) -> RegionBackbone:
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()[_METADATA_KEY])
    model = RegionBackbone(config["feature_dim"], config["vocabularies"], config["crop_size"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
