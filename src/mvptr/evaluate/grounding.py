"""Zero-shot phrase-to-region grounding of a pre-trained model on the synthetic world's gold boxes, per concept kind.

Why: MVPTR claims that its concepts and its weakly-supervised phrase grounding (WPG) teach phrases to find their
regions; the downstream tasks measure that only through fine-tuning. Here it is measured directly, with no
training at all: for every textual concept of every test caption (the `[CLS] words concepts [SEP]` positions that
pre-training sees), the model's cross-modal output at that position is compared (cosine) with the cross-modal
output of each region of the caption's image (`model.fuse`, every cross-modal layer, as WPG reads them), and the
concept is grounded when the most similar region is one the world says it names:
    object     "circle"                  a circle of the image
    attribute  "red circle", "small       a circle of that colour or size ("two circle", a count: any circle)
               circle", "two circle"
    relation   "circle left of square"   a circle that is left of some square (the subject of the relation)
A region names an object when its box has IoU >= 0.5 with the object's (`regions.boxes: gold` gives exactly
the objects' boxes). Concepts the parser got wrong (no object of the image fits) are counted as `unfit`, not
scored. Accuracy is in %; `chance` is the expected accuracy of a region picked at random, per kind.

The result has the layout of a downstream task's (`mvptr.evaluate.finetune`), so the summary reads it as the
task `grounding`: splits.test.{object, attribute, relation, phrases, unfit, item_scores}, chance.test.

Run: `mvptr evaluate grounding --dataset DIR --concepts FILE --vocab FILE --regions DIR --weights FILE --out FILE
[key=value ...]` (in-process: a few seconds for the demo world), or `ground(cfg, paths)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model

from mvptr.artifacts import Artifacts
from mvptr.concepts.parser import KINDS
from mvptr.errors import DataError
from mvptr.evaluate.metrics import box_iou

SPLIT = "test"
KIND_NAMES = {"objects": "object", "attributes": "attribute", "relations": "relation"}
SCENE_FILE = Path("annotations") / "scene_graphs.json"


@dataclass(frozen=True)
class GroundingPaths(Artifacts):
    weights: Path  # model.safetensors of a pre-training stage (or never trained)


def gold_objects(kind: str, key: str, objects: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The objects of a scene (scene_graphs.json's objects) that the concept `key` of `kind` names."""
    from mvptr.data.synthetic.captions import NUMBER_WORDS, RELATION_PHRASES
    from mvptr.data.synthetic.scene import COLOURS, OBJECT_SIZES

    if kind == "objects":
        return [o for o in objects if o["shape"] == key]
    if kind == "attributes":
        value, _, shape = key.rpartition(" ")
        field = "colour" if value in COLOURS else "size" if value in OBJECT_SIZES else None
        if field is None and value not in NUMBER_WORDS:
            return []
        return [o for o in objects if o["shape"] == shape and (field is None or o[field] == value)]
    for rel in RELATION_PHRASES:  # "circle left of square": subject, relation, object
        subject, sep, other = key.partition(f" {rel} ")
        if sep:
            return [a for a in objects if a["shape"] == subject and any(
                b["id"] != a["id"] and b["shape"] == other and _relation(a, b) == rel for b in objects)]
    return []


def _relation(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    from mvptr.data.synthetic.scene import Object, relation

    return relation(Object(**{**a, "bbox": tuple(a["bbox"])}), Object(**{**b, "bbox": tuple(b["bbox"])}))


def _normalised(obj: Mapping[str, Any], size: int) -> list[float]:
    x, y, w, h = obj["bbox"]
    return [x / size, y / size, (x + w) / size, (y + h) / size]


def ground(cfg: Mapping[str, Any], paths: GroundingPaths, *, batch_size: int = 64) -> dict[str, Any]:
    """Ground every concept of every test caption (see the module docstring); the result JSON."""
    from mvptr.data.coco import read_json
    from mvptr.models import build_model
    from mvptr.pairs import PairDataset, PairInputs, collate_image, collate_text

    started = time.monotonic()
    scene_file = Path(paths.dataset) / SCENE_FILE
    if not scene_file.is_file():
        raise DataError(f"--dataset {paths.dataset}: no {SCENE_FILE} (grounding needs the synthetic world's scenes)")
    scenes = read_json(scene_file)["images"]
    captions = read_json(Path(paths.dataset) / "annotations" / "captions.json")
    sizes = {int(img["id"]): img["width"] for img in captions["images"]}
    inputs = PairInputs.from_artifacts(cfg, paths.dataset, paths.concepts, paths.vocab)
    test = PairDataset(inputs, Path(paths.regions) / f"{SPLIT}.h5", SPLIT)
    vocab = read_json(paths.vocab)["concepts"]
    by_id = {entry["id"]: (entry["kind"], key) for key, entry in vocab.items()}
    model = build_model(cfg, inputs.vocab_size, test.store.feature_dim)
    load_model(model, str(paths.weights))
    model.eval()

    hits: dict[str, list[float]] = {KIND_NAMES[k]: [] for k in KINDS}
    chance: dict[str, list[float]] = {KIND_NAMES[k]: [] for k in KINDS}
    unfit = dict.fromkeys(hits, 0)
    with torch.no_grad():
        for start in range(0, len(test.pairs), batch_size):
            pairs = test.pairs[start:start + batch_size]
            texts = collate_text([test.text_item(cid) for cid, _ in pairs])
            items = [test.image_item(image_id) for _, image_id in pairs]
            images = collate_image(items)
            text = model.encode_text(texts["input_ids"], texts["attention_mask"])
            fusion = model.fuse(text.tokens, texts["attention_mask"], model.encode_image(images))
            cosine = torch.einsum("blh,brh->blr", F.normalize(fusion.text.float(), dim=-1),
                                  F.normalize(fusion.regions.float(), dim=-1))
            cosine = cosine.masked_fill(~images["region_mask"].bool()[:, None, :], float("-inf"))
            for row, ((_, image_id), item) in enumerate(zip(pairs, items, strict=True)):
                boxes = torch.from_numpy(item["region_boxes"][:, :4]).float()
                objects = scenes[str(image_id)]["objects"]
                for position in texts["concept_mask"][row].nonzero().flatten().tolist():
                    kind, key = by_id[int(texts["input_ids"][row, position])]
                    name = KIND_NAMES[kind]
                    gold = gold_objects(kind, key, objects)
                    if not gold or not len(boxes):
                        unfit[name] += 1
                        continue
                    gold_boxes = torch.tensor([_normalised(o, sizes[image_id]) for o in gold])
                    names = (box_iou(boxes, gold_boxes) >= 0.5).any(dim=1)  # (R,) does region r name it
                    best = int(cosine[row, position, : len(boxes)].argmax())
                    hits[name].append(100.0 * bool(names[best]))
                    chance[name].append(100.0 * names.double().mean().item())

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    metrics: dict[str, Any] = {name: mean(values) for name, values in hits.items() if values}
    metrics.update(phrases={name: len(values) for name, values in hits.items()}, unfit=unfit,
                   captions=len(test.pairs), item_scores={name: values for name, values in hits.items() if values})
    return {"task": "grounding", "weights": str(paths.weights), "splits": {SPLIT: metrics},
            "chance": {SPLIT: {name: mean(values) for name, values in chance.items() if values}},
            "seconds": round(time.monotonic() - started, 1)}


def cmd_grounding(args: Any) -> None:
    from mvptr.artifacts import artifact_paths
    from mvptr.atomic import atomic_write_json
    from mvptr.config import config_from_args

    cfg = config_from_args(args)
    artifacts = artifact_paths(args)
    result = ground(cfg, GroundingPaths(**artifacts, weights=args.weights.resolve()))
    atomic_write_json(args.out, result)
    test = result["splits"][SPLIT]
    print(json.dumps({name: round(test[name], 2) for name in KIND_NAMES.values() if name in test}))
