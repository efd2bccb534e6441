"""How well the scene-graph parser recovers gold tuples: precision, recall and F1 per tuple type.

Why: MVPTR's concepts are only as good as the parser that produces them. Where the data has gold scene
graphs (the synthetic world writes them to `annotations/scene_graphs.json`), this scores the parsed
objects, (object, attribute) pairs and (subject, relation, object) triples the way SPICE compares tuples:
per caption as sets, then micro-averaged over captions (true/false positives and misses are summed before
dividing). It also lists the captions that still go wrong, so that the parser can be improved.

Run: `mvptr concepts quality --dataset DIR --concepts FILE --out FILE`, or
    report = score(predicted, gold)   # both {caption id: {"objects": [...], "attributes": [...], ...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mvptr.concepts.parser import KINDS, concept_from_json

MAX_ERRORS = 30


def tuple_set(kind: str, items: list[Any]) -> set[Any]:
    return {concept_from_json(kind, item) for item in items}


def prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall and F1 from counts; an empty denominator scores 1.0 (nothing to find, nothing wrong)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _sorted(items: set[Any]) -> list[Any]:
    return sorted(items, key=str)


def score(predicted: Mapping[str, Mapping[str, Any]], gold: Mapping[str, Mapping[str, Any]],
          max_errors: int = MAX_ERRORS) -> dict[str, Any]:
    """Scores per kind over the captions of `gold`; every gold caption must have a prediction."""
    missing = sorted(set(gold) - set(predicted), key=str)
    if missing:
        raise KeyError(f"{len(missing)} gold caption(s) have no parsed concepts; first ids: {missing[:5]}")
    counts = {kind: [0, 0, 0] for kind in KINDS}  # tp, fp, fn
    errors: list[dict[str, Any]] = []
    for caption_id in sorted(gold, key=str):
        error: dict[str, Any] = {}
        for kind in KINDS:
            want = tuple_set(kind, gold[caption_id][kind])
            got = tuple_set(kind, predicted[caption_id][kind])
            tally = counts[kind]
            tally[0] += len(want & got)
            tally[1] += len(got - want)
            tally[2] += len(want - got)
            if want != got:
                error[kind] = {"missing": _sorted(want - got), "spurious": _sorted(got - want)}
        if error:
            errors.append({"caption_id": caption_id, "text": predicted[caption_id].get("text"), **error})
    return {**{kind: prf(*counts[kind]) for kind in KINDS}, "captions": len(gold),
            "captions_with_errors": len(errors), "errors": errors[:max_errors]}
