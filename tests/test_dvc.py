"""DVC's front door: dvc.yaml is derived from the Snakemake DAG, declares exactly its targets' outputs, and a
real `dvc repro` / `dvc push` to a local remote / fresh copy + `dvc pull` round trip leaves `dvc status` clean and
`snakemake -n` with nothing to do (after `make pull`'s `snakemake --touch`).

The round trip runs the tiny config of test_workflow.py (one method) in a copy of the working tree (a few minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_dvc_declares_exactly_the_outputs_of_the_snakemake_targets_it_calls():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    targets = {stage["cmd"].split()[-1] for stage in dvc["stages"].values()}  # the last target: the one it runs
    assert targets == {"pretrain_only", "evaluate_only"}
    called = set().union(*(target_outputs(t, [], ROOT) for t in targets))
    assert declared_outputs(dvc) == called
    # ... and together they are the whole workflow.
    assert called == set(target_outputs("all", [], ROOT))


def copy_tree(dest: Path) -> Path:
    """The project's files as git sees them (tracked and untracked-not-ignored), in a new git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


def test_repro_push_then_pull_in_a_fresh_copy_leaves_nothing_to_do(tmp_path: Path):
    first = copy_tree(tmp_path / "first")
    remote = tmp_path / "remote"
    run([str(BIN / "mvptr"), "dvc", "write", "--root", str(first), *_overrides()], first)
    run([str(BIN / "dvc"), "repro"], first, timeout=1200)
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


def _overrides() -> list[str]:
    """ONE_METHOD (Snakemake --config values) as `key=value` overrides of the `mvptr` CLI."""
    from mvptr.config import flatten, format_override

    nested = {}
    for item in ONE_METHOD:
        key, _, text = item.partition("=")
        nested[key] = yaml.safe_load(text)
    return [format_override(k, v) for k, v in flatten(nested).items()]
