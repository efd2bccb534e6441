"""`mvptr estimate`: GPU-hours and wall time of a recipe per stage and per task, before anything is submitted.

    mvptr estimate [--configfile RECIPE.yaml ...] [key=value ...]
                   (--benchmark results/benchmarks/step_*.json | --step-seconds S [--at key=value ...]
                    | --measure [--at key=value ...])
                   [--gpus N] [--efficiency E] [--eval-images N [--eval-texts M]] [--vocab-size V] [--json FILE]

The recipe is the config the workflow would run: `--configfile` YAML files of overrides (as Snakemake's
--configfile, e.g. configs/experiments/mvptr_4m.yaml, or configs/models/bert_base.yaml), then `key=value`
overrides. The step time is either the benchmark's JSON (benchmarks/bench_step.py: its method, model, batch,
token slots and median stage-two step), a number with the shape it was measured at (`--at`: config keys over
the recipe, or the shortcuts batch, regions, words, concepts, tags, model, method; `--measured-stage`, default
2), or measured here (`--measure`, at the recipe with `--at`, batch 8 unless `--at` gives one). The model
behind the numbers is `mvptr.estimate`'s docstring, and the output states it. Put the `key=value` overrides
before `--at`, which takes every `key=value` after it. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mvptr.config import add_config_arguments


def cmd_estimate(args: argparse.Namespace) -> None:
    from mvptr import estimate as est
    from mvptr.atomic import atomic_write_json
    from mvptr.errors import ConfigError

    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size: must be >= 1, got {args.vocab_size}")

    recipe = est.recipe_overrides(args.configfile or [], args.overrides)
    cfg = est.load_recipe(recipe, args.base, args.root)
    at = [item for group in args.at or [] for item in group]
    if args.benchmark is not None:
        if at:
            raise ConfigError("--at: a benchmark JSON says its own shape; --at goes with --step-seconds or "
                                  "--measure")
        measured = est.from_benchmark(args.benchmark, args.root)
    elif args.step_seconds is not None:
        measured = est.from_step_seconds(args.step_seconds, recipe, at, args.measured_stage, args.base, args.root)
    else:
        batch_keys = ("batch=", f"pretrain.stage{args.measured_stage}.batch_size=")
        if not any(item.startswith(batch_keys) for item in at):
            at.append(f"batch={min(8, cfg['pretrain'][f'stage{args.measured_stage}']['batch_size'])}")
        measured_cfg = est.load_recipe(est.measured_overrides(recipe, at, cfg, args.measured_stage), args.base,
                                       args.root)
        measured = est.measure_step(measured_cfg, args.measured_stage, rounds=args.measure_rounds,
                                    vocab=args.vocab_size, device=args.device)
    rows = est.estimate_rows(cfg, measured, vocab=args.vocab_size, gpus=args.gpus, efficiency=args.efficiency,
                             eval_images=args.eval_images, eval_texts=args.eval_texts)
    rep = est.report(cfg, measured, rows, vocab=args.vocab_size, efficiency=args.efficiency)
    print(est.format_table(rep))
    if args.json is not None:
        atomic_write_json(args.json, rep)
        print(f"written: {args.json}")


def register(groups: argparse._SubParsersAction) -> None:
    estimate = groups.add_parser("estimate", help="GPU-hours and wall time of a recipe, per stage and task",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    estimate.add_argument("--configfile", type=Path, action="append", default=None, metavar="FILE",
                          help="a YAML file of config overrides, the recipe (repeatable; later files win)")
    source = estimate.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", type=Path, default=None, metavar="JSON",
                        help="the step time of benchmarks/bench_step.py (results/benchmarks/step_*.json)")
    source.add_argument("--step-seconds", type=float, default=None, metavar="S",
                        help="a measured step time in seconds (its shape: --at)")
    source.add_argument("--measure", action="store_true", help="time the step here, at the recipe with --at")
    estimate.add_argument("--at", nargs="+", action="append", default=None, metavar="KEY=VALUE",
                          help="the shape the step time was (or is to be) measured at: config keys over the recipe, "
                               "or batch, regions, words, concepts, tags, model, method")
    estimate.add_argument("--measured-stage", type=int, choices=(1, 2), default=2,
                          help="the pre-training stage whose step was measured (default 2)")
    estimate.add_argument("--measure-rounds", type=int, default=3, help="--measure: timed steps (median; default 3)")
    estimate.add_argument("--device", default=None, help="--measure: cpu or cuda (default cuda when available)")
    estimate.add_argument("--gpus", type=int, default=None,
                          help="GPUs of every job (default: launch.rules.<rule> over launch, nodes x gpus_per_node)")
    estimate.add_argument("--efficiency", type=float, default=1.0,
                          help="scaling efficiency on more than one GPU, in (0, 1] (default 1.0: linear)")
    estimate.add_argument("--eval-images", type=int, default=None, metavar="N",
                          help="count retrieval's evaluation passes on N test images (COCO-5k: 5000)")
    estimate.add_argument("--eval-texts", type=int, default=None, metavar="M",
                          help="test captions for --eval-images (default 5 per image)")
    estimate.add_argument("--vocab-size", type=int, default=30522,
                          help="rows of the word-embedding table: word pieces + concept rows (default 30522)")
    estimate.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the estimate as JSON")
    add_config_arguments(estimate)
    estimate.set_defaults(func=cmd_estimate)
