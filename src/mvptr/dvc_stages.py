"""`dvc.yaml`, derived from the Snakemake DAG: DVC's front door to the same pipeline, never a second copy of it.

Why: Snakemake owns the DAG; DVC versions its artifacts and offers `dvc repro`. Each DVC stage calls one
Snakemake target, and declares as outputs exactly the files that target's jobs write (as `snakemake --summary`
lists them; each stage leaves out what an earlier stage declares), so the two can never disagree on what a
run produces. Output paths carry config hashes (the dataset folder, stage one), so dvc.yaml is written by this
module for a config rather than by hand, and a test checks that the committed file is current.

    pretrain   snakemake ... pretrain_only   data, concepts, regions, both stages of every ablation
    evaluate   snakemake ... evaluate_only   every task's metrics, the ablation table (DVC metrics:
                                             ablations.json) and charts; first `snakemake --touch pretrain_only`,
                                             since DVC's commit of the first stage rewrote its files in no
                                             particular order (Snakemake would redo them by their times)
Loss curves and charts are DVC plots; params are the config sections each stage reads (derived from the
schema's classification of the keys, `mvptr.config.step_keys`), in configs/default.yaml and in the layer file
of every method the workflow runs.

Run: `mvptr dvc write [--out dvc.yaml] [key=value ...]` (the overrides must be the ones Snakemake runs with).
After `dvc pull` in a fresh clone, `make pull` (dvc pull + dvc status + snakemake --touch) makes
`snakemake -n` report nothing to do: DVC sets file times in no particular order.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mvptr.atomic import atomic_write_bytes
from mvptr.config import add_config_arguments, classify, config_from_args, load_config, project_root, read_yaml

SNAKEMAKE = "snakemake --cores 2 --workflow-profile workflow/profiles/default"
CODE = ["Snakefile", "workflow/rules", "workflow/schemas", "src/mvptr", "configs"]
# DVC stage -> (Snakemake target, the key classes (config.LEAF_CLASSES) of its params): the pretrain stage's
# params are every key up to stage two plus which runs the workflow makes; the evaluate stage's the rest.
STAGES = {
    "pretrain": ("pretrain_only", ("data", "concepts", "regions", "stage1", "stage2", "workflow")),
    "evaluate": ("evaluate_only", ("evaluate",)),
}


def stage_params(classes: tuple[str, ...], overrides: Sequence[str], root: Path) -> list[dict[str, list[str]]]:
    """DVC params of a stage: the top-level sections of configs/default.yaml, and of each running method's
    layer file, that hold a key of one of `classes`."""
    cfg = load_config(overrides, root=root)
    params = []
    files = ["configs/default.yaml", *(f"configs/methods/{m}.yaml" for m in cfg["methods"])]
    for name in files:
        layer = read_yaml(root / name)
        sections = set()
        for method in cfg["methods"] if name != files[0] else [cfg["method"]["name"]]:
            leaves = classify(load_config([*overrides, f"method.name={method}"], root=root))
            sections |= {key.split(".")[0] for key, cls in leaves.items() if cls in classes}
        kept = [section for section in layer if section in sections]
        if kept:
            params.append({name: kept})
    return params


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


def build(overrides: Sequence[str], root: Path) -> dict:
    config = _snakemake_config(overrides)
    suffix = " --config " + " ".join(f"'{item}'" for item in config) if config else ""
    stages, declared, upstream = {}, set(), []
    for name, (target, classes) in STAGES.items():
        outputs = [path for path in target_outputs(target, config, root) if path not in declared]
        plots = [p for p in outputs if p.endswith(".png")]
        metrics = [p for p in outputs if p.endswith("ablations.json")]
        outs = [p for p in outputs if p not in plots and p not in metrics]
        # DVC has just checked (or produced) the earlier stages' outputs, but committing them to its cache
        # rewrote them in no particular order: mark them up to date so Snakemake does not redo them by mtime.
        touch = "".join(f"{SNAKEMAKE} --touch {up}{suffix} && " for up in upstream)
        stage = {"cmd": f"{touch}{SNAKEMAKE} {target}{suffix}",
                 # a later stage depends on every output of the earlier ones (its Snakemake inputs or theirs)
                 "deps": CODE + sorted(declared),
                 "params": stage_params(classes, overrides, root), "outs": outs}
        if metrics:
            stage["metrics"] = [{path: {"cache": True}} for path in metrics]
        if plots:
            stage["plots"] = [{path: {"cache": True}} for path in plots]
        stages[name] = stage
        declared |= set(outputs)
        upstream.append(target)
    return {"stages": stages}


def declared_outputs(dvc_yaml: dict) -> set[str]:
    """Every path that a dvc.yaml declares as an output (outs, metrics, plots)."""
    paths = set()
    for stage in dvc_yaml["stages"].values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                paths |= set(item) if isinstance(item, dict) else {item}
    return paths


HEADER = b"""# Generated by `mvptr dvc write` from the Snakemake DAG (src/mvptr/dvc_stages.py); do not edit by hand.
# Each stage calls one Snakemake target and declares exactly the files that target writes.
# Run: dvc repro (with .venv/bin on PATH); after `dvc pull`: make pull.
"""


def cmd_write(args: argparse.Namespace) -> None:
    config_from_args(args)  # validate the overrides first: a bad key stops here, named
    root = args.root or project_root()
    text = yaml.safe_dump(build(args.overrides, root), sort_keys=False, width=120)
    atomic_write_bytes(args.out, HEADER + text.encode("utf-8"))
    print(f"wrote {args.out}")


def register(groups: argparse._SubParsersAction) -> None:
    dvc = groups.add_parser("dvc", help="DVC's view of the workflow").add_subparsers(dest="cmd", required=True)
    write = dvc.add_parser("write", help="write dvc.yaml from the Snakemake DAG")
    write.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    add_config_arguments(write)
    write.set_defaults(func=cmd_write)
