"""Faults: kill -9 in the middle of every rule kind, then the same command again, against a straight run.

One workflow (MVPTR, one ablation, two tasks, the tiny world) runs twice: straight, and as a chain of runs each
SIGKILLed in the middle of the next rule kind and started again with the same command (after `snakemake
--unlock`, which a killed run needs). What is killed:

    group     the Snakemake process group: Snakemake, its rule's command and the trainer (a closed terminal)
    trainer   only the submitit trainer of a GPU rule (a crashed or OOM-killed job): the launcher resubmits
    workflow  Snakemake and the rule's launcher, not the trainer (a SLURM head job lost while the trainer job
              runs on): the rerun re-attaches to that trainer instead of starting a second one

After every kill, no half-written file is under results/ or resources/: every file there is byte-equal to the
straight run's (or is a JSON equal but for run ids, timings and the run's own folder, or weights with equal
tensors), and nothing is left under a temporary name. At the end the same holds for every file, each stage
trained once per resumption and no MLflow run is duplicated.

Run: `.venv/bin/pytest tests/test_faults_kill.py` (about 7 minutes on 2 cores; marked slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CONFIG = ["dataset={synthetic: {size: tiny}}", "ablations=[full]", "methods=[mvptr]",
          "model={hidden_size: 32, num_text_layers: 1, num_visual_layers: 1, num_cross_layers: 1, "
          "num_attention_heads: 2, intermediate_size: 64}",
          "pretrain={stage1: {steps: 300, batch_size: 8}, stage2: {steps: 300, batch_size: 8}, checkpoint_every: 5}",
          "regions={backbone: {epochs: 1}}", "concepts={min_count: 2}",
          "evaluate={tasks: [retrieval, vqa], retrieval: {steps: 2, batch_size: 8}, vqa: {steps: 2, batch_size: 8}}"]
# (rule, a fragment of its command line, a line its log must show first ("" = as soon as it runs), whom to kill)
KILLS = [
    ("prepare_data", "mvptr data prepare", "", "group"),
    ("extract_concepts", "mvptr concepts extract", "", "group"),
    ("extract_region_features", "mvptr regions extract", "", "group"),
    ("pretrain_stage1", "pretrain stage --stage 1", "step 20/300", "trainer"),
    ("pretrain_stage1", "pretrain stage --stage 1", "resumed at step", "group"),
    ("pretrain_stage2", "pretrain stage --stage 2", "step 20/300", "workflow"),
    ("evaluate_retrieval", "evaluate run --task retrieval", "RUNNING", "trainer"),
    ("evaluate_vqa", "evaluate run --task vqa", "RUNNING", "group"),
    ("summarize", "mvptr compare", "", "group"),
]
# JSON keys that differ between two straight runs: run ids, timings, the run's own folder in a path.
VOLATILE = {"mlflow_run_id", "seconds", "itm_seconds", "samples_per_s", "weights"}
# What a run writes besides its artifacts: logs and rule timings (times), the MLflow store (run ids).
NOT_ARTIFACTS = ("results/logs/", "results/benchmarks/", "results/mlartifacts/")


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"), *args, "--config", *CONFIG]
    log = (workdir / "snakemake-runs.log").open("a")
    # a session of its own: a "group" kill takes Snakemake and all it started, as a closed terminal does
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _processes() -> dict[int, str]:
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def _rule_log(workdir: Path, rule: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (workdir / "results/logs" / rule).rglob("*.log"))


def _wait_for_rule(proc: subprocess.Popen, workdir: Path, rule: str, fragment: str, marker: str,
                   whom: str) -> dict[int, str]:
    """The rule's processes once it runs, its log shows `marker` and (for a kill that needs it) its trainer runs."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"Snakemake ended before {rule} was killed:\n{_tail(workdir)}"
        if marker in _rule_log(workdir, rule):
            running = {pid: cmd for pid, cmd in _processes().items() if str(workdir) in cmd or fragment in cmd}
            if any(fragment in cmd for cmd in running.values()) and (whom == "group" or _trainers(running, rule)):
                return running
        time.sleep(0.05)
    raise AssertionError(f"{rule} did not reach {marker!r} in 600 s:\n{_tail(workdir)}")


def _tail(workdir: Path) -> str:
    return (workdir / "snakemake-runs.log").read_text()[-4000:]


def _trainers(running: dict[int, str], rule: str) -> list[int]:
    return [pid for pid, cmd in running.items() if "submitit.core._submit" in cmd and f"logs/{rule}/" in cmd]


def _trainer(running: dict[int, str], rule: str) -> int:
    pids = _trainers(running, rule)
    assert len(pids) == 1, (rule, running)
    return pids[0]


def _kill(proc: subprocess.Popen, running: dict[int, str], rule: str, fragment: str, whom: str) -> int | None:
    """SIGKILL `whom`; the trainer's pid where it is left running."""
    if whom == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    elif whom == "trainer":
        os.kill(_trainer(running, rule), signal.SIGKILL)
        return None
    else:  # workflow: Snakemake and the rule's launcher (the `mvptr` process), not the trainer
        trainer = _trainer(running, rule)
        os.kill(proc.pid, signal.SIGKILL)
        for pid, cmd in running.items():  # the rule's shell and launcher; submitit's controller and task live on
            if fragment in cmd and not any(f"-m submitit.{m}" in cmd for m in ("core._submit", "local._local")):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        assert Path(f"/proc/{trainer}").exists(), f"{rule}: the trainer ended before the kill (too few steps)"
        return trainer
    proc.wait()
    return None


def _files(workdir: Path) -> dict[str, Path]:
    return {str(p.relative_to(workdir)): p for top in ("results", "resources") for p in (workdir / top).rglob("*")
            if p.is_file() and not str(p.relative_to(workdir)).startswith(NOT_ARTIFACTS)}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _same(name: str, ours: Path, straight: Path) -> bool:
    if ours.read_bytes() == straight.read_bytes():
        return True
    if name.endswith(".json"):
        return _strip(json.loads(ours.read_text())) == _strip(json.loads(straight.read_text()))
    if name.endswith(".safetensors"):  # its tied-weight metadata comes in a per-process hash order
        a, b = load_file(str(ours)), load_file(str(straight))
        return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    return False


def _check_no_half_written_file(workdir: Path, straight: dict[str, Path], when: str) -> None:
    for name, path in _files(workdir).items():
        if ".tmp-" in path.name and when != "at the end":
            continue  # an atomic write the kill interrupted: never read under that name (none may be left at the end)
        if "/checkpoints/" in name:  # a running stage's resumable state (not an output): it must read whole
            if path.name.startswith("state-rank") and path.suffix == ".pt":
                assert torch.load(path, map_location="cpu", weights_only=True)["step"] > 0, f"{when}: {name}"
            elif path.name == "final.safetensors":  # the finished stage's weights, before they are copied out
                assert load_file(str(path)), f"{when}: {name}"
            elif path.name == "run.json":
                assert json.loads(path.read_text())["mlflow_run_id"], f"{when}: {name}"
            else:
                assert path.name == "mlflow-pending.jsonl", f"{when}: {name} in a checkpoint folder"
            continue
        assert name in straight, f"{when}: {name} is not an output of the straight run (a temporary file?)"
        assert _same(name, path, straight[name]), f"{when}: {name} differs from the straight run's"


def _runs(workdir: Path) -> Counter:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    return Counter((run.info.run_name, run.info.status) for exp in client.search_experiments()
                   for run in client.search_runs([exp.experiment_id]))


@pytest.mark.timeout(2400)
def test_a_run_killed_in_every_rule_kind_and_rerun_ends_as_a_straight_run(tmp_path: Path):
    straight_dir, chain = tmp_path / "straight", tmp_path / "chain"
    straight_dir.mkdir(), chain.mkdir()
    assert _start(straight_dir).wait(timeout=1200) == 0, _tail(straight_dir)
    straight = _files(straight_dir)
    assert len(straight) > 30

    proc, reattached = _start(chain), []
    for rule, fragment, marker, whom in KILLS:
        running = _wait_for_rule(proc, chain, rule, fragment, marker, whom)
        kept = _kill(proc, running, rule, fragment, whom)
        _check_no_half_written_file(chain, straight, f"after a {whom} kill in {rule}")
        if whom != "trainer":  # the same command again, as a user does (a killed run leaves the folder locked)
            assert subprocess.run([str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory",
                                   str(chain), "--unlock", "--config", *CONFIG], cwd=ROOT).returncode == 0
            proc = _start(chain)
        if kept is not None:
            reattached.append((rule, kept))
    assert proc.wait(timeout=1200) == 0, _tail(chain)

    # Every artifact as in the straight run, and no file of the straight run missing.
    _check_no_half_written_file(chain, straight, "at the end")
    assert set(_files(chain)) == set(straight)
    # The rerun's launcher re-attached to the trainer left running, which finished the stage: one submission.
    assert [rule for rule, _ in reattached] == ["pretrain_stage2"]
    for rule, _ in reattached:
        log = _rule_log(chain, rule)  # the rerun's (a rerun replaces a rule's log)
        # it waits for the trainer, or takes its result if it finished while Snakemake restarted; never a second
        attached = "re-attaching to job" in log or "finished while no launcher waited; taking its result" in log
        assert attached and "submitted job" not in log, log[-3000:]
        record = json.loads(next((chain / "results/logs" / rule).rglob("job.json")).read_text())
        assert record["submissions"] == 1 and record["state"] == "COMPLETED", record
    # Stage one resumed from its checkpoint after the group kill (after the trainer kill too: the second kill
    # waited for "resumed at step" in the first run's log, which the rerun's replaced).
    stage1 = _rule_log(chain, "pretrain_stage1")
    assert "resumed at step" in stage1, stage1[-3000:]
    # One MLflow run per run of the straight workflow: the same names, none duplicated and none FAILED.
    assert _runs(chain) == _runs(straight_dir)
