"""Efficiency of one stage-two pre-training step against a bare transformers `BertModel` forward+backward.

Why: a method does more work than plain BERT (three stacks, the hard-negative ITM pass, the masked text pass of
MLM, a momentum model), so the ratio of step times says nothing about efficiency. Here both sides' FLOPs are
counted from the shapes of every matmul they really run (torch.utils.flop_counter.FlopCounterMode: matmuls,
linear layers, attention, forward and backward) and the achieved FLOP/s compared: `efficiency` = our FLOP/s /
bare BERT's FLOP/s, at the same width, total depth (text + visual + cross layers), batch and tokens (text + tags
+ regions), in the same process, timed interleaved (medians) so that the machine's noise cancels. Below 1, our
step spends time outside dense matmuls (masking, negative mining, small ops, Python): `top_ops` (torch.profiler,
self time, one step) says where. Target: efficiency >= 0.85.

    ours   PretrainStep(the method's stage-two objectives: MVPTR vsc, itm, mlm, wpg) forward + backward, with
           the config's options (and the momentum model of a method that distils)
    bare   BertModel(num_hidden_layers = text + visual + cross) forward + backward of sum(last_hidden_state)

On CUDA (bf16 autocast, as the trainer) it also reports MFU: our FLOP/s over the bf16 matmul peak measured in
the same run (`peak_tflops`: the best of a few 8192^3 matmuls), and `--compile` times the torch.compile'd step.

Run: `.venv/bin/python benchmarks/bench_step.py [--method mvptr] [--model tiny|bert_base] [--batch 64]
[--regions 10] [--steps 10 (interleaved rounds; medians)] [--device cpu|cuda] [--compile] [--out FILE]`.
Writes `results/benchmarks/step_<model>_<device>.json` (another method: `step_<method>_<model>_<device>.json`;
atomically) and prints it. A smoke run: `--batch 4 --steps 1 --out /tmp/step.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from mvptr.atomic import atomic_write_json
from mvptr.config import load_config, project_root
from mvptr.estimate.flops import Shape
from mvptr.estimate.measure import step_on_random_batch
from mvptr.train.stages import stage_objectives

VOCAB = 30522 + 200  # the tokenizer's word pieces + concept rows


def median_seconds(steps: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step, the steps interleaved round by round so that both see the same
    machine load (this machine is shared and noisy); two warm-up rounds first (allocations, kernels)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 2):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of `step` (forward and backward), counted from the shapes of its matmuls."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def top_ops(step: Callable[[], None], device: torch.device, count: int = 12) -> list[dict[str, object]]:
    """The `count` operators of one call of `step` with the most self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:count]
    return [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1000, 3)} for e in events]


def matmul_peak_tflops(device: torch.device, size: int = 8192, repeats: int = 5) -> float:
    """The best bf16 matmul throughput of a few size^3 products on `device` (the MFU's denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mvptr", help="a method of configs/methods/ (mvptr, simla)")
    parser.add_argument("--model", default="tiny", help="a layer of configs/models/ (tiny, bert_base)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--regions", type=int, default=10, help="regions per image (MVPTR: up to 50)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON to write (default results/benchmarks/step_[<method>_]<model>_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config([f"method.name={args.method}", f"model.name={args.model}"])
    mcfg, pcfg = cfg["model"], cfg["pretrain"]
    text = 2 + pcfg["max_words"] + pcfg["max_concepts"]
    tags = pcfg["max_tags"]
    objectives = stage_objectives(cfg, 2)
    # The step and random batch `mvptr estimate --measure` times too (every slot filled; SemVLP's questions).
    shape = Shape(args.batch, pcfg["max_words"], pcfg["max_concepts"], tags, args.regions)
    model, ours, batch = step_on_random_batch(cfg, objectives, shape, device, VOCAB)
    layers = mcfg["num_text_layers"] + mcfg["num_visual_layers"] + mcfg["num_cross_layers"]
    bare = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=mcfg["hidden_size"], num_hidden_layers=layers,
                                num_attention_heads=mcfg["num_attention_heads"],
                                intermediate_size=mcfg["intermediate_size"], attn_implementation="sdpa")).to(device)
    tokens = text + tags + args.regions
    bare_ids = torch.randint(1000, 30000, (args.batch, tokens), device=device)
    bf16 = device.type == "cuda"

    def our_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = ours(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        ours.after_step()  # the momentum model's EMA update, as the trainer does after each optimiser step

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = bare(input_ids=bare_ids).last_hidden_state.float().sum()
        loss.backward()
        bare.zero_grad(set_to_none=True)

    steps = {"ours": our_step, "bare": bare_step}
    if args.compile:
        compiled = torch.compile(ours)

        def compiled_step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = compiled(batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            ours.after_step()

        steps["compiled"] = compiled_step
    flops = {"ours": count_flops(our_step), "bare": count_flops(bare_step)}
    medians = median_seconds(steps, args.steps, device)
    ours_s, bare_s = medians["ours"], medians["bare"]
    ours_rate, bare_rate = flops["ours"] / ours_s, flops["bare"] / bare_s
    result = {"method": args.method, "model": args.model, "device": str(device), "dtype": "bf16" if bf16 else "fp32",
              "threads": torch.get_num_threads(), "batch": args.batch, "layers": layers,
              "hidden": mcfg["hidden_size"], "tokens": {"text": text, "tags": tags, "regions": args.regions},
              "objectives": objectives, "rounds": args.steps,
              "stage2_step_s": round(ours_s, 5), "bare_bert_step_s": round(bare_s, 5),
              "time_ratio": round(ours_s / bare_s, 2),
              "step_gflop": round(flops["ours"] / 1e9, 3), "bare_gflop": round(flops["bare"] / 1e9, 3),
              "step_gflops_per_s": round(ours_rate / 1e9, 2), "bare_gflops_per_s": round(bare_rate / 1e9, 2),
              "efficiency": round(ours_rate / bare_rate, 3), "target": 0.85,
              "top_ops": top_ops(our_step, device)}
    if args.compile:
        result["compiled_step_s"] = round(medians["compiled"], 5)
        result["compiled_efficiency"] = round(flops["ours"] / medians["compiled"] / bare_rate, 3)
    if device.type == "cuda":
        peak = matmul_peak_tflops(device)
        result["peak_tflops"] = round(peak, 1)
        result["mfu"] = round(ours_rate / 1e12 / peak, 4)
        result["bare_mfu"] = round(bare_rate / 1e12 / peak, 4)
    method = "" if args.method == "mvptr" else f"{args.method}_"  # MVPTR keeps the file name it always had
    out = args.out or project_root() / "results" / "benchmarks" / f"step_{method}{args.model}_{device.type}.json"
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
