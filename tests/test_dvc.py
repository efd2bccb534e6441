"""DVC's front door: dvc.yaml is derived from the Snakemake DAG and declares exactly its outputs; in a copy of the
tree with the tiny config of test_workflow.py (one method), one real `dvc repro` serves three checks (a few
minutes): a stage-two edit reruns only the jobs downstream of stage two (persistent outputs), a `dvc push` /
fresh clone + `make pull` round trip leaves `dvc status` clean and `snakemake -n` with nothing to do, and
`dvc exp run -S configs/default.yaml:seed=3` is an experiment that `dvc exp show` lists with its task metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_workflow import FAST

from mvptr.dvc_stages import build, declared_outputs, target_outputs

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
# The tiny config with one method: DVC's round trip does not depend on how many methods run (test_workflow.py
# runs them all), and each one costs a minute here.
ONE_METHOD = [item if not item.startswith("methods=") else "methods=[mvptr]" for item in FAST]


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_committed_dvc_yaml_is_the_one_derived_from_the_dag():
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == build([], ROOT), "run `mvptr dvc write`"


def test_dvc_declares_exactly_the_outputs_of_the_snakemake_workflow():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert [stage["cmd"].split()[-1] for stage in dvc["stages"].values()] == ["all"]
    outputs = set(target_outputs("all", [], ROOT))
    declared = declared_outputs(dvc)

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d + "/") for d in declared)

    assert all(covered(path) for path in outputs), sorted(p for p in outputs if not covered(p))
    assert all(any(p == d or p.startswith(d + "/") for p in outputs) for d in declared)
    # persistent: DVC never deletes them before Snakemake decides what to redo
    assert all(next(iter(item.values()))["persist"] for item in dvc["stages"]["workflow"]["outs"])


def copy_tree(dest: Path) -> Path:
    """The project's files as git sees them (tracked and untracked-not-ignored), in a new git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    # a repository-local identity: `dvc exp run` commits the experiment, and CI's machine may have no global one
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


def jobs_run(output: str) -> set[str]:
    """The rules of the jobs a Snakemake run did, from its `Job stats` table."""
    table = output.split("Job stats:")[-1].split("\n\n")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)} - {"total"}


# Three workflow runs (repro, the stage-two edit, the experiment) and a clone: ~9 min alone, more beside the rest
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_repro_reruns_only_what_changed_round_trips_and_runs_experiments(tmp_path: Path):
    first = copy_tree(tmp_path / "first")
    remote = tmp_path / "remote"
    run([str(BIN / "mvptr"), "dvc", "write", "--root", str(first), *_overrides()], first)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "dvc.yaml"], first)
    run([str(BIN / "dvc"), "repro"], first, timeout=1200)

    # A stage-two key (one the --config overrides leave to configs/default.yaml) changes: only stage two and what
    # reads it are redone, not the data, concepts, regions or stage one.
    config = first / "configs/default.yaml"
    text = config.read_text()
    stage2 = text.index("  stage2:")
    config.write_text(text[:stage2] + text[stage2:].replace("lr: 0.0005", "lr: 0.0004", 1))
    again = run([str(BIN / "dvc"), "repro"], first, timeout=1200)
    done = jobs_run(again.stdout + again.stderr)
    assert done == {"all", "pretrain_stage2", "summarize", "dvc_export"} | {r for r in done if r.startswith(
        "evaluate_")} and any(r.startswith("evaluate_") for r in done), done

    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], first)
    run([str(BIN / "dvc"), "push"], first)
    run(["git", "add", "-A"], first)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], first)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / "results").exists() or not any((second / "results").glob("synthetic-*"))
    run(["make", "-s", "pull", f"VENV={BIN.parent}", "SNAKEMAKE_CONFIG=" + " ".join(f"'{c}'" for c in ONE_METHOD)],
        second)
    status = run([str(BIN / "dvc"), "status"], second)
    assert "up to date" in status.stdout, status.stdout
    dry = run([str(BIN / "snakemake"), "-n", "--config", *ONE_METHOD], second)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    # A seed is an experiment: its params and every task metric are in `dvc exp show`.
    run([str(BIN / "dvc"), "exp", "run", "-n", "seed3", "-S", "configs/default.yaml:seed=3"], first, timeout=1200)
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], first).stdout)
    exps = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    seed3 = next(run["revs"][0]["data"] for run in exps if run.get("name") == "seed3")
    assert seed3["params"]["configs/default.yaml"]["data"]["seed"] == 3
    metrics = seed3["metrics"]["results/dvc/metrics.json"]["data"]
    assert {"retrieval", "vqa", "ve", "rec", "nlvr2"} <= {key.split("/")[3] for key in metrics}, metrics


def _overrides() -> list[str]:
    """ONE_METHOD (Snakemake --config values) as `key=value` overrides of the `mvptr` CLI."""
    from mvptr.config import flatten, format_override

    nested = {}
    for item in ONE_METHOD:
        key, _, text = item.partition("=")
        nested[key] = yaml.safe_load(text)
    return [format_override(k, v) for k, v in flatten(nested).items()]
