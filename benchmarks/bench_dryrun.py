"""Wall time of `snakemake -n` (the DAG of the whole study, nothing run) at 1, 10 and 100 ablations x 3 seeds.

Why: a researcher asks for a dry run before every study and every single-rule rerun; composing and validating
each run's config, hashing its stage-one keys and building the DAG must stay interactive when a study grows.
Target: under 10 s at 100 ablations x 3 seeds (300 runs, ~2,000 jobs).

Snakemake's own start is timed apart (`snakemake --version`, in the same run): with the SLURM executor plugin
installed, importing Snakemake runs `scontrol show config`, which waits ~9 s for a slurmctld that is not up
(this machine has the SLURM client for the tests); `workflow_s` = the dry run less that start is the workflow's
own cost (config composition and validation per run, stage-one hashes, the DAG), what the target is about.

The ablations are generated: copies of MVPTR's `no_wpg` entry, each with another WPG margin (so that each is a
distinct stage-two config sharing stage one), written into a copy of the workflow (Snakefile, workflow/,
configs/) in a temporary folder; `snakemake -n --cores 2 all --config ablations=[...] methods=[mvptr]
'seeds=[0, 1, 2]'` runs there with nothing built yet, so the whole DAG is planned. The DAG's job count is read
from Snakemake's summary line.

Run: `.venv/bin/python benchmarks/bench_dryrun.py [--ablations 1 10 100] [--seeds 3]`. Writes
`results/benchmarks/dryrun.json` (atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mvptr.atomic import atomic_write_json
from mvptr.config import project_root

TARGET_S = 10.0


def workflow_copy(folder: Path, ablations: int) -> list[str]:
    """The workflow in `folder` with `ablations` generated MVPTR ablations in its configs/ablations.yaml."""
    root = project_root()
    shutil.copy(root / "Snakefile", folder / "Snakefile")
    for name in ("workflow", "configs"):
        shutil.copytree(root / name, folder / name)
    entries = yaml.safe_load((folder / "configs" / "ablations.yaml").read_text())
    names = [f"bench_{k:03d}" for k in range(ablations)]
    for k, name in enumerate(names):
        entries[name] = {"method": {"name": "mvptr"},
                         "pretrain": {"objectives": {"wpg": {"margin": round(0.1 + k / 1000, 4)}}}}
    (folder / "configs" / "ablations.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    return names


def dry_run(folder: Path, names: list[str], seeds: int) -> tuple[float, int]:
    """(seconds, jobs) of `snakemake -n` in `folder`."""
    config = [f"ablations=[{', '.join(names)}]", "methods=[mvptr]", f"seeds=[{', '.join(map(str, range(seeds)))}]"]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run(["snakemake", "-n", "--cores", "2", "all", "--config", *config], cwd=folder, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({proc.returncode}): {proc.stderr[-2000:]}")
    jobs = re.search(r"^total\s+(\d+)$", proc.stdout, re.MULTILINE)
    return seconds, int(jobs.group(1)) if jobs else 0


def startup_seconds() -> float:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    subprocess.run(["snakemake", "--version"], env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=project_root() / "results" / "benchmarks" / "dryrun.json")
    args = parser.parse_args()
    startup = startup_seconds()
    rows = []
    for count in args.ablations:
        with tempfile.TemporaryDirectory() as tmp:
            names = workflow_copy(Path(tmp), count)
            seconds, jobs = dry_run(Path(tmp), names, args.seeds)
        rows.append({"ablations": count, "seeds": args.seeds, "runs": count * args.seeds, "jobs": jobs,
                     "seconds": round(seconds, 2), "workflow_s": round(seconds - startup, 2)})
        print(json.dumps(rows[-1]), flush=True)
    largest = max(rows, key=lambda r: r["ablations"])
    report = {"target_s": TARGET_S, "rows": rows, "snakemake_start_s": round(startup, 2),
              "ratio": round(largest["workflow_s"] / TARGET_S, 3),  # <= 1: within the target
              "cpu_count": os.cpu_count()}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
