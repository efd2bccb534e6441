"""Generate the whole synthetic world (images, COCO annotations, Karpathy split, task files, manifest).

Why: MVPTR's pipeline needs an image-caption corpus with region annotations and four downstream
tasks; this writes a small, fully deterministic one in the public formats, so that the workflow
runs end to end on a laptop without downloads. Same arguments -> byte-identical files.

Layout of `out_dir` (written atomically: built beside it, then swapped in):
    images/synth_{image_id:06d}.png          image ids 1..num_images
    annotations/captions.json                COCO captions
    annotations/instances.json               COCO instances (categories = shapes; segmentation =
                                             shape outline; "attributes": {"colour", "size"})
    annotations/scene_graphs.json            {"images": {id: scene}, "captions": {id: gold tuples}}
    karpathy_split.json                      Karpathy's dataset_coco.json format
    vqa/ snli_ve/ refcoco/ nlvr2/            see mvptr.data.synthetic.tasks
    manifest.json                            generator parameters, counts, sha256 of every file

Use:
    manifest = generate_world("resources/world", num_images=SIZES["tiny"], seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvptr.atomic import atomic_dir
from mvptr.data.synthetic.captions import Caption, caption_scene, tokenize
from mvptr.data.synthetic.render import outline, png_bytes, render_scene
from mvptr.data.synthetic.scene import CATEGORY_IDS, Scene, sample_scenes
from mvptr.data.synthetic.tasks import INFO, LICENSE, SPLITS, TaskFile, build_tasks

SIZES: dict[str, int] = {"tiny": 40, "small": 300, "default": 600}
FORMAT_VERSION = 1
# Independent random streams, so that changing e.g. the caption templates leaves the scenes and
# pixels of a seed unchanged.
_SCENE_STREAM, _RENDER_STREAM, _CAPTION_STREAM, _TASK_STREAM = 0, 1, 2, 3
_MIN_IMAGE_SIZE = 32


def assign_splits(scenes: Sequence[Scene], fractions: Sequence[float]) -> dict[int, str]:
    """image id -> train/val/test: contiguous blocks (scenes are i.i.d.), test last; a twin stays with its source.

    val and test get at least one image each, rounded up to whole groups (an original and its twin).
    """
    groups: list[list[int]] = []
    for scene in scenes:
        if scene.twin_of is None:
            groups.append([scene.image_id])
        else:
            groups[-1].append(scene.image_id)
    targets = {split: max(1, round(len(scenes) * fraction)) for split, fraction in zip(SPLITS, fractions)}
    splits: dict[int, str] = {}
    filling = ["test", "val"]  # from the end; whatever is left is train
    taken = 0
    for group in reversed(groups):
        split = filling[0] if filling else "train"
        splits.update((image_id, split) for image_id in group)
        taken += len(group)
        if filling and taken >= targets[split]:
            filling.pop(0)
            taken = 0
    if set(splits.values()) != set(SPLITS):
        raise ValueError(f"{len(scenes)} images are too few to fill train, val and test with fractions {fractions}")
    return splits


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def _write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    """Shoelace formula: COCO's `area` is the area of the segmentation."""
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def _coco_files(scenes: Sequence[Scene], captions: Mapping[int, Sequence[tuple[int, Caption]]],
                splits: Mapping[int, str]) -> dict[str, Any]:
    """The COCO captions/instances files, the scene graphs and the Karpathy split file."""
    licenses = [{"id": 1, **LICENSE}]
    images = [{"id": s.image_id, "file_name": s.file_name, "width": s.image_size, "height": s.image_size, "license": 1}
              for s in scenes]
    instances = []
    for scene in scenes:
        for obj in scene.objects:
            points = outline(obj.shape, obj.bbox)
            instances.append({"id": obj.id, "image_id": scene.image_id, "category_id": CATEGORY_IDS[obj.shape],
                              "bbox": list(obj.bbox), "area": round(_polygon_area(points), 2), "iscrowd": 0,
                              "segmentation": [[round(v, 2) for point in points for v in point]],
                              "attributes": {"colour": obj.colour, "size": obj.size}})
    caption_anns = [{"id": cid, "image_id": image_id, "caption": c.text}
                    for image_id, pairs in captions.items() for cid, c in pairs]
    karpathy = [{"filepath": "images", "filename": s.file_name, "imgid": k, "cocoid": s.image_id,
                 "split": splits[s.image_id], "sentids": [cid for cid, _ in captions[s.image_id]],
                 "sentences": [{"tokens": tokenize(c.text), "raw": c.text, "imgid": k, "sentid": cid}
                               for cid, c in captions[s.image_id]]}
                for k, s in enumerate(scenes)]
    return {
        "annotations/captions.json": {"info": INFO, "licenses": licenses, "images": images,
                                      "annotations": caption_anns},
        "annotations/instances.json": {"info": INFO, "licenses": licenses, "images": images,
                                       "annotations": instances,
                                       "categories": [{"id": i, "name": n, "supercategory": "shape"}
                                                      for n, i in CATEGORY_IDS.items()]},
        "annotations/scene_graphs.json": {
            "images": {str(s.image_id): s.to_json() for s in scenes},
            "captions": {str(cid): {"image_id": image_id, **c.graph()}
                         for image_id, pairs in captions.items() for cid, c in pairs}},
        "karpathy_split.json": {"dataset": "synthetic", "images": karpathy},
    }


def _task_bytes(task_file: TaskFile) -> bytes:
    if task_file.json_lines:
        return b"".join(_dumps(record) for record in task_file.payload)
    return _dumps(task_file.payload)


def _check_arguments(num_images: int, image_size: int, captions_per_image: int, twin_fraction: float,
                     split_fractions: Sequence[float]) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be positive, got {captions_per_image}")
    if not 0 <= twin_fraction <= 1:
        raise ValueError(f"twin_fraction must be in [0, 1], got {twin_fraction}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")


def generate_world(out_dir: Path | str, *, num_images: int, seed: int = 0, image_size: int = 128,
                   captions_per_image: int = 5, twin_fraction: float = 0.3,
                   split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, Any]:
    """Write the world into `out_dir` (replacing it atomically) and return its manifest."""
    _check_arguments(num_images, image_size, captions_per_image, twin_fraction, split_fractions)
    scenes = sample_scenes(np.random.default_rng([seed, _SCENE_STREAM]), num_images, image_size, twin_fraction)
    splits = assign_splits(scenes, split_fractions)
    caption_rng = np.random.default_rng([seed, _CAPTION_STREAM])
    per_image = {s.image_id: caption_scene(caption_rng, s, captions_per_image) for s in scenes}
    numbered = {image_id: [(1 + (image_id - 1) * captions_per_image + k, c) for k, c in enumerate(caps)]
                for image_id, caps in per_image.items()}
    tasks = build_tasks(scenes, splits, per_image, np.random.SeedSequence([seed, _TASK_STREAM]))

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for scene in scenes:
            image = render_scene(scene, np.random.default_rng([seed, _RENDER_STREAM, scene.image_id]))
            _write(tmp, f"images/{scene.file_name}", png_bytes(image))
        for relative, obj in _coco_files(scenes, numbered, splits).items():
            _write(tmp, relative, _dumps(obj))
        for relative, task_file in tasks.items():
            _write(tmp, relative, _task_bytes(task_file))
        hashes = {path.relative_to(tmp).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                  for path in sorted(tmp.rglob("*")) if path.is_file()}
        manifest = {
            "generator": {"name": "mvptr.data.synthetic", "format_version": FORMAT_VERSION, "num_images": num_images,
                          "seed": seed, "image_size": image_size, "captions_per_image": captions_per_image,
                          "twin_fraction": twin_fraction, "split_fractions": list(split_fractions)},
            "counts": {"images": len(scenes), "captions": num_images * captions_per_image,
                       "objects": sum(len(s.objects) for s in scenes),
                       "twins": sum(s.twin_of is not None for s in scenes),
                       **{f"images_{split}": sum(v == split for v in splits.values()) for split in SPLITS},
                       **{relative: task_file.count for relative, task_file in tasks.items()}},
            "files": hashes,
        }
        _write(tmp, "manifest.json", (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the world is meant to be shared like any output
    return manifest
