"""Pairs per second of the pre-training data loader against what the training step consumes, at two shapes.

Why: a step that waits for its batch wastes the device. The loader (mvptr.pairs: PairDataset items, `collate`,
torch's DataLoader as the trainer builds it) must deliver pairs at least 3x as fast as the step uses them, at the
demo's shape and at BERT-base's, so that it stays off the critical path with room for a noisy machine.

    demo       the demo world's captions and region stores as the workflow builds them (a generated `small`
               world, the backbone's 128-d features, the tiny model), `pretrain.num_workers` workers (0: the
               training process); consumption = batch / the measured seconds of the MVPTR tiny step here
               (mvptr.estimate.measure.step_on_random_batch at the same batch, what bench_step times)
    bert_base  the same captions with VinVL-sized regions (2048-d features, 50 boxes per image, a region store
               of random values), 2 workers; consumption = batch / the step time a GPU would take: the FLOPs of
               the BERT-base MVPTR step at that batch (mvptr.estimate.flops, the same count the cost estimates
               use) at 40% of an A100's 312 bf16 TFLOP/s, a high consumption (a GPU at MFU 0.4)
`ratio` = loader pairs/s / consumed pairs/s; target >= 3.

Run: `.venv/bin/python benchmarks/bench_loader.py [--batch 64] [--batches 20]`. Writes
`results/benchmarks/loader.json` (atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mvptr.atomic import atomic_write_json
from mvptr.config import load_config, project_root
from mvptr.data.order import batch_indices
from mvptr.estimate.flops import Shape, step_passes, total
from mvptr.estimate.measure import step_on_random_batch
from mvptr.pairs import PairDataset, PairInputs, collate
from mvptr.regions.store import Regions, RegionStore, RegionStoreWriter
from mvptr.train.stages import stage_objectives

A100_BF16_TFLOPS = 312.0
ASSUMED_MFU = 0.4


def mvptr_cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "mvptr.cli", *argv], check=True, capture_output=True)


def build_world(folder: Path) -> dict[str, Path]:
    """A `small` world with its concepts, vocabulary and region stores, made with the CLI as the workflow does."""
    paths = {"dataset": folder / "world", "concepts": folder / "concepts.json", "vocab": folder / "vocab.json",
             "regions": folder / "regions"}
    mvptr_cli("data", "synth", "--size", "small", "--out", str(paths["dataset"]))
    mvptr_cli("concepts", "extract", "--dataset", str(paths["dataset"]), "--out", str(paths["concepts"]))
    mvptr_cli("concepts", "vocab", "--dataset", str(paths["dataset"]), "--concepts", str(paths["concepts"]),
              "--out", str(paths["vocab"]))
    mvptr_cli("regions", "extract", "--dataset", str(paths["dataset"]), "--out", str(paths["regions"]),
              "regions.backbone.epochs=1")
    return paths


def vinvl_sized_store(source: Path, out: Path, dim: int = 2048, boxes: int = 50) -> Path:
    """A region store with the images of `source`, each with `boxes` random regions of `dim` features."""
    rng = np.random.default_rng(0)
    with RegionStore(source) as store:
        ids, tags = store.image_ids.tolist(), store.tag_vocab
    with RegionStoreWriter(out, dim, tags) as writer:
        for image_id in ids:
            writer.add(image_id, Regions(rng.standard_normal((boxes, dim)).astype(np.float32),
                                         rng.random((boxes, 6)).astype(np.float32),
                                         rng.integers(0, len(tags), boxes).astype(np.int32)))
    return out


def loader_rate(pairs: PairDataset, batch: int, batches: int, workers: int) -> float:
    """Pairs per second of the trainer's DataLoader over `batches` batches (after one warm-up batch)."""
    sampler = [batch_indices(len(pairs), batch, step, 0) for step in range(batches + 1)]
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def measured_step_seconds(cfg: dict, batch: int, rounds: int = 3) -> float:
    pcfg = cfg["pretrain"]
    shape = Shape(batch, pcfg["max_words"], pcfg["max_concepts"], pcfg["max_tags"], 10)
    model, step, data = step_on_random_batch(cfg, stage_objectives(cfg, 2), shape, torch.device("cpu"))
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        loss, _ = step(data)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path, default=project_root() / "results" / "benchmarks" / "loader.json")
    args = parser.parse_args()
    demo_cfg = load_config()
    base_cfg = load_config(["model.name=bert_base", "regions.feature_dim=2048", "regions.max_regions=50"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_world(Path(tmp))
        inputs = PairInputs.from_artifacts(demo_cfg, paths["dataset"], paths["concepts"], paths["vocab"])
        demo_pairs = PairDataset(inputs, paths["regions"] / "train.h5", "train")
        workers = demo_cfg["pretrain"]["num_workers"]
        demo_rate = loader_rate(demo_pairs, args.batch, args.batches, workers)
        big = vinvl_sized_store(paths["regions"] / "train.h5", Path(tmp) / "vinvl.h5")
        base_inputs = PairInputs.from_artifacts(base_cfg, paths["dataset"], paths["concepts"], paths["vocab"])
        base_rate = loader_rate(PairDataset(base_inputs, big, "train"), args.batch, args.batches, 2)
    demo_step = measured_step_seconds(demo_cfg, args.batch)
    pcfg = base_cfg["pretrain"]
    shape = Shape(args.batch, pcfg["max_words"], pcfg["max_concepts"], pcfg["max_tags"], 50)
    flops = total(step_passes(base_cfg, stage_objectives(base_cfg, 2), shape)).total
    gpu_step = flops / (A100_BF16_TFLOPS * 1e12 * ASSUMED_MFU)
    report = {"batch": args.batch, "batches": args.batches, "target": 3.0, "shapes": {
        "demo": {"loader_pairs_per_s": round(demo_rate, 1), "workers": workers, "step_s": round(demo_step, 4),
                 "consumed_pairs_per_s": round(args.batch / demo_step, 1),
                 "ratio": round(demo_rate * demo_step / args.batch, 2), "consumer": "the tiny MVPTR step on this CPU"},
        "bert_base": {"loader_pairs_per_s": round(base_rate, 1), "workers": 2, "step_tflop": round(flops / 1e12, 3),
                      "step_s": round(gpu_step, 5), "consumed_pairs_per_s": round(args.batch / gpu_step, 1),
                      "ratio": round(base_rate * gpu_step / args.batch, 2),
                      "consumer": f"the BERT-base MVPTR step's FLOPs at MFU {ASSUMED_MFU} of an A100 "
                                  f"({A100_BF16_TFLOPS} bf16 TFLOP/s)",
                      "regions": {"feature_dim": 2048, "boxes": 50}}}}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
