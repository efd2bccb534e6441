"""`dvc.yaml`, derived from the Snakemake DAG: DVC's front door to the same pipeline, never a second copy of it.

Why: Snakemake owns the DAG; DVC versions its artifacts and offers `dvc repro` and experiments. One DVC stage,
`workflow`, runs `snakemake ... all`; its outputs are exactly the files that target's jobs write (`snakemake
--summary`), declared whole where their folder carries no config hash (resources/datasets, results/summary),
else by path. Every output is `persist: true` (DVC's docs, dvc.yaml "Output subfields": not removed before the
stage runs), so a rerun of the stage leaves the files in place and Snakemake redoes only the jobs whose params,
code or inputs changed (not file times: DVC rewrites files when it caches them). Deps: the workflow code, the
config layers read (params: the sections of configs/default.yaml and each running method's layer that hold a
key affecting a step, `mvptr.config.classify`; files: the dataset's and model's layer, configs/ablations.yaml).

`mvptr dvc export` (rule dvc_export, workflow/rules/dvc.smk) writes what no config change moves:
results/dvc/metrics.json (DVC metrics: `dvc metrics show`, `dvc exp show`) and results/dvc/plots/ (losses/
<method>-<ablation>-stage<n>.json records of the stage's `history`, tasks.json records of every task metric:
`dvc plots diff`, declared in dvc.yaml's top-level `plots`), so an experiment (`dvc exp run -S
configs/default.yaml:seed=3`) lands its numbers where dvc.yaml looks.

Run: `mvptr dvc write [--out dvc.yaml] [key=value ...]` (the overrides must be the ones Snakemake runs with);
`mvptr dvc export --results results/<dataset> --runs <method>/<ablation>/seed<k>=<stage-one folder> ... --out-dir DIR`.
After `dvc pull` in a fresh clone, `make pull` (dvc pull + dvc status + snakemake --touch) makes
`snakemake -n` report nothing to do: DVC sets file times in no particular order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.config import add_config_arguments, classify, config_from_args, load_config, project_root, read_yaml

# DVC rewrites every output when it caches it, so file times say nothing between two `dvc repro`s: Snakemake
# decides what to redo from what it records instead (params, code, software environment, the set of inputs).
# One Snakemake run does the whole DAG, so a redone job still redoes everything downstream of it.
SNAKEMAKE = ("snakemake --rerun-triggers params code software-env input --cores 2 "
             "--workflow-profile workflow/profiles/default")
CODE = ["Snakefile", "workflow/rules", "src/mvptr"]
TARGET = "all"
# Stable folders (no config hash in their names) declared whole; every other output is declared by its path.
STABLE = ("resources/datasets", "results/summary", "results/dvc")
EXPORT = "results/dvc"
PLOTS = [
    {f"{EXPORT}/plots/losses": {"x": "step", "y": "loss", "title": "pre-training loss per (method, ablation, stage)"}},
    {f"{EXPORT}/plots/tasks.json": {"x": "value", "y": "metric", "template": "bar_horizontal",
                                    "title": "task metrics of every (method, ablation)"}},
]


def stage_params(overrides: Sequence[str], root: Path) -> list[dict[str, list[str]]]:
    """DVC params: the top-level sections of configs/default.yaml, and of each running method's layer file, that
    the workflow reads (every key that affects a step, `mvptr.config.classify`)."""
    cfg = load_config(overrides, root=root)
    params = []
    files = ["configs/default.yaml", *(f"configs/methods/{m}.yaml" for m in cfg["methods"])]
    for name in files:
        layer = read_yaml(root / name)
        sections = set()
        for method in cfg["methods"] if name != files[0] else [cfg["method"]["name"]]:
            leaves = classify(load_config([*overrides, f"method.name={method}"], root=root))
            sections |= {key.split(".")[0] for key, cls in leaves.items() if cls != "launch"}
        kept = [section for section in layer if section in sections]
        if kept:
            params.append({name: kept})
    return params


def config_files(overrides: Sequence[str], root: Path) -> list[str]:
    """The config layers read besides the params files: the dataset's and model's layer, the ablations."""
    cfg = load_config(overrides, root=root)
    names = [f"configs/datasets/{cfg['dataset']['name']}.yaml", f"configs/models/{cfg['model']['name']}.yaml",
             "configs/ablations.yaml"]
    return [name for name in names if (root / name).is_file()]


def target_outputs(target: str, overrides: Sequence[str], root: Path) -> list[str]:
    """The output files of every job of `target`, from `snakemake --summary` (sorted)."""
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--summary", target]
    if overrides:
        cmd += ["--config", *overrides]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake --summary {target} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    return sorted({line.split("\t", 1)[0] for line in lines[start + 1:] if line.strip()})


def _snakemake_config(overrides: Sequence[str]) -> list[str]:
    """`key=value` overrides as Snakemake's --config wants them (one nested YAML value per top-level key)."""
    from mvptr.config import parse_overrides

    return [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}"
            for key, value in parse_overrides(overrides).items()]


def declared(outputs: Sequence[str]) -> list[str]:
    """`outputs` with every path under a STABLE folder replaced by that folder."""
    def folder(path: str) -> str:
        return next((top for top in STABLE if path == top or path.startswith(top + "/")), path)
    return sorted({folder(path) for path in outputs} - {EXPORT})


def build(overrides: Sequence[str], root: Path) -> dict:
    config = _snakemake_config(overrides)
    suffix = " --config " + " ".join(f"'{item}'" for item in config) if config else ""
    outputs = target_outputs(TARGET, config, root)
    # persist: DVC leaves the outputs in place when the stage reruns, and Snakemake redoes only what changed.
    stage = {"cmd": f"{SNAKEMAKE} {TARGET}{suffix}",
             "deps": CODE + config_files(overrides, root),
             "params": stage_params(overrides, root),
             "outs": [{path: {"persist": True}} for path in declared(outputs)],
             "metrics": [{f"{EXPORT}/metrics.json": {"persist": True}}],
             "plots": [{f"{EXPORT}/plots": {"persist": True}}]}
    return {"stages": {"workflow": stage}, "plots": PLOTS}


def declared_outputs(dvc_yaml: dict) -> set[str]:
    """Every path that a dvc.yaml declares as an output (outs, metrics, plots)."""
    paths = set()
    for stage in dvc_yaml["stages"].values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                paths |= set(item) if isinstance(item, dict) else {item}
    return paths


HEADER = b"""# Generated by `mvptr dvc write` from the Snakemake DAG (src/mvptr/dvc_stages.py); do not edit by hand.
# One stage calls Snakemake's `all` and declares exactly the files it writes; experiments: dvc exp run -S ...
# Run: dvc repro (with .venv/bin on PATH); after `dvc pull`: make pull.
"""


def cmd_write(args: argparse.Namespace) -> None:
    config_from_args(args)  # validate the overrides first: a bad key stops here, named
    root = args.root or project_root()
    text = yaml.safe_dump(build(args.overrides, root), sort_keys=False, width=120)
    atomic_write_bytes(args.out, HEADER + text.encode("utf-8"))
    print(f"wrote {args.out}")


def export(results: Path, runs: dict[str, Path], out_dir: Path) -> None:
    """results/dvc: every task's headline metrics (flat keys `<method>/<ablation>/seed<k>/<task>/<metric>`), and as plot
    data the loss history of both stages of each run and the task metrics as records."""
    from mvptr.errors import DataError
    from mvptr.evaluate.commands import headline

    metrics, losses = {}, {}
    for run, stage1 in runs.items():
        for stage, folder in (("stage1", stage1), ("stage2", results / run / "pretrain_stage2")):
            losses[f"{run.replace('/', '-')}-{stage}"] = _read(folder / "metrics.json")["history"]
        for path in sorted((results / run / "evaluate").glob("*.json")):
            for key, value in headline(_read(path)).items():
                if key not in ("task", "seconds"):
                    metrics[f"{run}/{path.stem}/{key}"] = value
    if not metrics:
        raise DataError(f"{results}: no evaluate/<task>.json of the runs {', '.join(runs)}")
    atomic_write_json(out_dir / "metrics.json", metrics)
    for name, history in losses.items():
        records = [{k: v for k, v in point.items() if k == "step" or k.startswith("loss")} for point in history]
        atomic_write_json(out_dir / "plots" / "losses" / f"{name}.json", records)
    atomic_write_json(out_dir / "plots" / "tasks.json",
                      [{"metric": key, "value": value} for key, value in metrics.items()])


def _read(path: Path) -> dict:
    from mvptr.errors import DataError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from None


def cmd_export(args: argparse.Namespace) -> None:
    from mvptr.errors import ConfigError

    runs = {}
    for item in args.runs:
        run, sep, stage1 = item.partition("=")
        if not sep or run.count("/") != 2:
            raise ConfigError(f"--runs {item}: expected <method>/<ablation>/seed<k>=<stage-one folder>")
        runs[run] = Path(stage1)
    export(args.results, runs, args.out_dir)
    print(f"wrote {args.out_dir}/metrics.json and {args.out_dir}/plots")


def register(groups: argparse._SubParsersAction) -> None:
    dvc = groups.add_parser("dvc", help="DVC's view of the workflow").add_subparsers(dest="cmd", required=True)
    write = dvc.add_parser("write", help="write dvc.yaml from the Snakemake DAG")
    write.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    add_config_arguments(write)
    write.set_defaults(func=cmd_write)
    out = dvc.add_parser("export", help="results/dvc: metrics and plot data at paths no config hash changes")
    out.add_argument("--results", type=Path, required=True, help="results/<dataset>")
    out.add_argument("--runs", nargs="+", required=True, metavar="METHOD/ABLATION/SEEDk=STAGE1_DIR")
    out.add_argument("--out-dir", type=Path, default=Path("results/dvc"))
    out.set_defaults(func=cmd_export)
