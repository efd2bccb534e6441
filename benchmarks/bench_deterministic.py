"""Cost of `launch.deterministic`: a pre-training step with torch's CPU kernels pinned over the same step without.

Why: the switch (mvptr.launch.determinism) trades speed for the same bits on any x86-64 CPU: ATen's scalar
kernels instead of AVX2/AVX512 ones, oneDNN's SSE4.1 kernels, MKL's compatible code path. Those are read when
torch first computes, so each side runs in its own process; the processes alternate (pinned, free, pinned, ...)
so that both see the same machine load, and the ratio of the medians is reported.

Run: `.venv/bin/python benchmarks/bench_deterministic.py [--model tiny] [--batch 32] [--steps 5] [--rounds 3]
[--out FILE]`. Writes `results/benchmarks/deterministic_<model>_cpu.json` (atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from mvptr.atomic import atomic_write_json
from mvptr.config import project_root
from mvptr.launch.determinism import PINNED_ENVIRONMENT


def child(model: str, batch: int, steps: int, pinned: bool) -> None:
    """One side: the demo's stage-two step (the one `benchmarks/bench_step.py` times), median seconds on stdout."""
    import torch
    from bench_step import median_seconds  # this folder is on sys.path when the script runs

    from mvptr.config import load_config
    from mvptr.estimate.flops import Shape
    from mvptr.estimate.measure import step_on_random_batch
    from mvptr.launch.determinism import enter_deterministic_job
    from mvptr.train.stages import stage_objectives

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if pinned:
        enter_deterministic_job()
    cfg = load_config([f"model.name={model}"])
    pcfg = cfg["pretrain"]
    shape = Shape(batch, pcfg["max_words"], pcfg["max_concepts"], pcfg["max_tags"], 10)
    net, step, data = step_on_random_batch(cfg, stage_objectives(cfg, 2), shape, torch.device("cpu"))

    def one_step() -> None:
        loss, _ = step(data)
        loss.backward()
        net.zero_grad(set_to_none=True)

    seconds = median_seconds({"step": one_step}, steps, torch.device("cpu"))["step"]
    print(json.dumps({"step_s": seconds, "capability": torch.backends.cpu.get_cpu_capability()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=["pinned", "free"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.batch, args.steps, args.child == "pinned")
        return
    sides: dict[str, list[dict]] = {"pinned": [], "free": []}
    free_env = {k: v for k, v in os.environ.items() if k not in PINNED_ENVIRONMENT}
    for _ in range(args.rounds):
        for side in sides:
            env = {**free_env, **(PINNED_ENVIRONMENT if side == "pinned" else {})}
            out = subprocess.run([sys.executable, __file__, "--child", side, "--model", args.model, "--batch",
                                  str(args.batch), "--steps", str(args.steps)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            sides[side].append(json.loads(out.strip().splitlines()[-1]))
    pinned = statistics.median(r["step_s"] for r in sides["pinned"])
    free = statistics.median(r["step_s"] for r in sides["free"])
    result = {"model": args.model, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "threads": int(os.environ.get("BENCH_THREADS", "2")),
              "kernels": {side: runs[0]["capability"] for side, runs in sides.items()},
              "pinned_step_s": round(pinned, 5), "free_step_s": round(free, 5), "ratio": round(pinned / free, 2)}
    out = args.out or project_root() / "results" / "benchmarks" / f"deterministic_{args.model}_cpu.json"
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
