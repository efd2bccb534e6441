"""Captions per second of the concept extraction against its limit, spaCy's own `nlp.pipe`, and the naive loop.

Why: `mvptr concepts extract` parses every caption of the corpus (COCO + the rest: millions in MVPTR), so it
runs spaCy with `nlp.pipe` in batches over several processes, with only the components the extraction reads.
The parse is the limit: `vs_spacy_pipe` is our captions/s over those of spaCy's own `nlp.pipe` of the same
pipeline (the same components, batch size and processes, the docs only collected), target >= 0.8; `speedup` is
what the batching buys over the naive loop (one `nlp(text)` call per caption, every component on). All on the
same captions of a generated `small` synthetic world (1,500 captions), in the same run; the batched and naive
extractions must give the same scene graphs. The batched time includes starting the worker processes (each loads the
model), since every real run pays it too; model loading in the main process is left out of both.

Run: `.venv/bin/python benchmarks/bench_concepts.py [--n-process 2] [--size small] [--seed 0]`
Writes `results/benchmarks/concepts.json` (atomically) and prints the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import spacy

from mvptr.atomic import atomic_write_json
from mvptr.concepts.parser import GraphExtractor, SceneGraph, SceneGraphParser, lower_in_place
from mvptr.config import load_config, project_root
from mvptr.data.coco import open_prepared
from mvptr.data.synthetic import SIZES, generate_world


def world_captions(size: str, seed: int) -> list[str]:
    """Every caption of a freshly generated synthetic world."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(Path(tmp) / "world", num_images=SIZES[size], seed=seed)
        ds = open_prepared(Path(tmp) / "world")
        return [text for image_id in ds.image_ids() for _, text in ds.captions(image_id)]


def timed(run: Callable[[], list[SceneGraph]]) -> tuple[list[SceneGraph], float]:
    start = time.perf_counter()
    graphs = run()
    return graphs, time.perf_counter() - start


def rate(n: int, seconds: float, **details: Any) -> dict[str, Any]:
    return {"seconds": round(seconds, 3), "captions_per_s": round(n / seconds, 1), **details}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-process", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=project_root() / "results" / "benchmarks" / "concepts.json")
    args = parser.parse_args()

    cfg = load_config()["concepts"]
    captions = world_captions(args.size, args.seed)
    batched = SceneGraphParser(cfg["spacy_model"], batch_size=cfg["batch_size"], n_process=args.n_process)
    fast, fast_s = timed(lambda: batched.parse(captions))
    lowered = [lower_in_place(text) for text in captions]
    _, pipe_s = timed(lambda: list(batched.nlp.pipe(lowered, batch_size=cfg["batch_size"], n_process=args.n_process)))

    # The naive loop: the whole pipeline (NER included), one call per caption, same extraction.
    nlp, extractor = spacy.load(cfg["spacy_model"]), GraphExtractor()
    slow, slow_s = timed(lambda: [extractor.extract(nlp(lower_in_place(text))) for text in captions])
    if [g.tuples() for g in fast] != [g.tuples() for g in slow]:
        raise AssertionError("the batched and per-caption parsers disagree on some caption")

    report = {
        "captions": len(captions), "world": {"size": args.size, "seed": args.seed},
        "spacy_model": cfg["spacy_model"], "cpu_count": os.cpu_count(),
        "batched": rate(len(captions), fast_s, n_process=args.n_process, batch_size=cfg["batch_size"],
                        components=batched.nlp.pipe_names),
        "per_caption": rate(len(captions), slow_s, components=nlp.pipe_names),
        "spacy_pipe": rate(len(captions), pipe_s, n_process=args.n_process, batch_size=cfg["batch_size"]),
    }
    report["vs_spacy_pipe"] = round(pipe_s / fast_s, 3)
    report["target"] = 0.8
    report["speedup"] = round(report["batched"]["captions_per_s"] / report["per_caption"]["captions_per_s"], 2)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
