"""Time of one stage-two pre-training step next to a bare transformers `BertModel` forward+backward.

Why: the ratio is the overhead of everything a method adds around plain BERT layers. For MVPTR: three stacks
instead of one, the hard-negative ITM pass, the second (masked) text pass of MLM, WPG's grounding scores, the
masking and negative mining. Both sides run in the same process on the same device, the same width and total
depth (text + visual + cross layers), the same batch and the same number of tokens (text + tags + regions), so
the machine's noise cancels in the ratio.

    ours   PretrainStep(the method's stage-two objectives: MVPTR vsc, itm, mlm, wpg) forward + backward, with
           the config's options (and the momentum model of a method that distils)
    bare   BertModel(num_hidden_layers = text + visual + cross) forward + backward of sum(last_hidden_state)
           on (batch, text + tags + regions) tokens

Run: `.venv/bin/python benchmarks/bench_step.py [--method mvptr] [--model tiny|bert_base] [--batch 64]
[--regions 10] [--steps 10 (interleaved rounds; medians)] [--device cpu|cuda] [--out FILE]` (CUDA: bf16
autocast, as the trainer). Writes `results/benchmarks/step_<model>_<device>.json` (another method:
`step_<method>_<model>_<device>.json`; atomically) and prints it. A smoke run: `--batch 4 --steps 1 --out
/tmp/step.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mvptr", help="a method of configs/methods/ (mvptr, simla)")
    parser.add_argument("--model", default="tiny", help="a layer of configs/models/ (tiny, bert_base)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--regions", type=int, default=10, help="regions per image (MVPTR: up to 50)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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

    medians = median_seconds({"ours": our_step, "bare": bare_step}, args.steps, device)
    ours_s, bare_s = medians["ours"], medians["bare"]
    result = {"method": args.method, "model": args.model, "device": str(device), "dtype": "bf16" if bf16 else "fp32",
              "threads": torch.get_num_threads(), "batch": args.batch, "layers": layers,
              "hidden": mcfg["hidden_size"], "tokens": {"text": text, "tags": tags, "regions": args.regions},
              "objectives": objectives, "rounds": args.steps,
              "stage2_step_s": round(ours_s, 5), "bare_bert_step_s": round(bare_s, 5),
              "ratio": round(ours_s / bare_s, 2)}
    method = "" if args.method == "mvptr" else f"{args.method}_"  # MVPTR keeps the file name it always had
    out = args.out or project_root() / "results" / "benchmarks" / f"step_{method}{args.model}_{device.type}.json"
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
