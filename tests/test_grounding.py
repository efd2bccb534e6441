"""Zero-shot phrase grounding (`mvptr.evaluate.grounding`): which objects a concept names, and the result of a
never-trained model on the tiny world.

Why: "concepts and WPG help phrase grounding" becomes a number only if the gold side is right (an attribute names
the objects of that shape and colour, a relation its subject) and the scoring covers every concept kind.

Run: .venv/bin/python -m pytest tests/test_grounding.py      (builds the tiny world once, ~20 s)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_model

from mvptr.config import load_config
from mvptr.evaluate.grounding import GroundingPaths, gold_objects, ground
from mvptr.models import build_model
from mvptr.regions.store import RegionStore

SCENE = [{"id": 1, "shape": "circle", "colour": "red", "size": "small", "bbox": [10, 50, 20, 20]},
         {"id": 2, "shape": "square", "colour": "blue", "size": "large", "bbox": [80, 40, 40, 40]},
         {"id": 3, "shape": "circle", "colour": "blue", "size": "large", "bbox": [60, 90, 30, 30]}]


@pytest.mark.parametrize(("kind", "key", "ids"), [
    ("objects", "circle", [1, 3]), ("objects", "star", []),
    ("attributes", "red circle", [1]), ("attributes", "large circle", [3]), ("attributes", "two circle", [1, 3]),
    ("attributes", "green square", []), ("attributes", "shiny circle", []),
    ("relations", "circle left of square", [1]), ("relations", "circle below square", [3]),
    ("relations", "square right of circle", [2]),
    ("relations", "square left of circle", []), ("relations", "circle above square", []),
])
def test_gold_objects_of_each_kind(kind: str, key: str, ids: list[int]) -> None:
    assert [o["id"] for o in gold_objects(kind, key, SCENE)] == ids


def test_a_never_trained_model_is_scored_on_every_kind(artifacts: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(["model.hidden_size=32", "model.num_text_layers=1", "model.num_visual_layers=1",
                       "model.num_cross_layers=1", "model.num_attention_heads=2", "model.intermediate_size=64"])
    vocab = json.loads(artifacts["vocab"].read_text())
    weights = tmp_path / "model.safetensors"
    feature_dim = RegionStore(artifacts["regions"] / "train.h5").feature_dim
    save_model(build_model(cfg, vocab["embedding_rows"], feature_dim), str(weights))
    result = ground(cfg, GroundingPaths(**artifacts, weights=weights))
    test, chance = result["splits"]["test"], result["chance"]["test"]
    assert result["task"] == "grounding" and test["captions"] > 0
    scored = [kind for kind, count in test["phrases"].items() if count]
    assert {"object", "attribute"} <= set(scored)
    for kind in scored:
        items = test["item_scores"][kind]
        assert len(items) == test["phrases"][kind] and set(items) <= {0.0, 100.0}
        assert test[kind] == pytest.approx(sum(items) / len(items), abs=1e-9)
        assert 0 < chance[kind] <= 100
