"""Fault tests of the trainer's I/O: an MLflow server down at the start or killed mid-run, a disk that fills up.

A real `mlflow server` (tests/mlflow_server.py) is started late, killed (SIGKILL to its process group) and started
again on the same port and store while a stage trains; the training's `log` callback does it at a given step, so
the outage falls at the same steps every time. Disk full is a real tmpfs (root only, else skipped), filled by a
filler file after the first checkpoint or at the last step, or sized to hold half of the first region store.
Run: `.venv/bin/python -m pytest -q tests/test_faults_io.py`.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import quiet, run_mvptr
from mlflow_server import free_port, start_server, stop_server
from safetensors.torch import load
from test_train import SMALL, paths

from mvptr import tracking
from mvptr.config import load_config
from mvptr.train import tracker
from mvptr.train.checkpoint import load_state, state_path
from mvptr.train.loop import FINAL_WEIGHTS, train_stage
from mvptr.train.tracker import PENDING_FILE, RUN_FILE

STEPS = 12
CFG = [*SMALL, f"pretrain.stage1.steps={STEPS}"]


def _stage_runs(cfg: dict) -> list:
    mc = tracking.client()
    experiment = mc.get_experiment_by_name(tracking.experiment_name(cfg))
    return tracking.search_all_runs(mc, [experiment.experiment_id], "tags.stage = 'pretrain_stage1'")


def _warnings(err: str) -> list[str]:
    """Lines of stderr that warn or report an error (ours and MLflow's own logger's), not its INFO lines."""
    return [line for line in err.splitlines() if "warning" in line.lower() or "ERROR" in line]


@pytest.fixture
def server_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """A store folder and a port with nothing listening yet, MLFLOW_TRACKING_URI pointing at it; a try to reach
    the store at every log call while it is down."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(tracker, "RETRY_S", 0.0)
    for name in tracker.BOUNDED_HTTP:  # unset, as for a user who set none; set-then-deleted, so that the values
        monkeypatch.setenv(name, "0")  # the trainer sets are removed after the test
        monkeypatch.delenv(name)
    return root, port


def _outage(root: Path, port: int, events: dict[int, str], servers: list) -> Callable[[str], None]:
    """A training `log` that, after the line of step N, does events[N] to the server: "start" one (appended to
    `servers`) or "kill" the last one (SIGKILL to its process group)."""

    def log(line: str) -> None:
        for step, event in events.items():
            if line.startswith(f"stage 1 step {step}/"):
                if event == "start":
                    servers.append(start_server(root, port))
                else:
                    stop_server(servers.pop(), signal.SIGKILL)

    return log


def test_a_server_down_at_the_start_gets_every_step_once_it_is_up(artifacts, server_root, tmp_path, capfd):
    root, port = server_root
    servers: list = []
    try:
        result = train_stage(load_config(CFG), 1, paths(artifacts, tmp_path / "ckpt"),
                             log=_outage(root, port, {4: "start"}, servers))
        err = capfd.readouterr().err
        assert result["completed"] and len(result["history"]) == STEPS
        lines = _warnings(err)
        assert len(lines) == 1 and "unreachable" in lines[0] and PENDING_FILE in lines[0], err
        runs = _stage_runs(load_config(CFG))
        assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
        history = tracking.client().get_metric_history(result["mlflow_run_id"], "loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert runs[0].info.status == "FINISHED"
        assert not (tmp_path / "ckpt" / PENDING_FILE).exists()
    finally:
        for proc in servers:
            stop_server(proc)


def test_a_server_killed_mid_run_and_restarted_gets_every_step_in_one_run(artifacts, server_root, tmp_path,
                                                                           capfd):
    root, port = server_root
    servers = [start_server(root, port)]
    try:
        result = train_stage(load_config(CFG), 1, paths(artifacts, tmp_path / "ckpt"),
                             log=_outage(root, port, {4: "kill", 7: "start"}, servers))
        err = capfd.readouterr().err
        assert result["completed"]
        lines = _warnings(err)
        assert len(lines) == 1 and "unreachable" in lines[0], err
        runs = _stage_runs(load_config(CFG))
        assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
        for name in ("loss", "lr", "samples_per_s"):
            history = tracking.client().get_metric_history(result["mlflow_run_id"], name)
            assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), name
        assert runs[0].info.status == "FINISHED"
    finally:
        for proc in servers:
            stop_server(proc)


def test_a_server_down_to_the_end_keeps_every_step_and_a_rerun_sends_them(artifacts, server_root, tmp_path, capfd,
                                                                         monkeypatch):
    root, port = server_root
    monkeypatch.setattr(tracker, "RETRY_S", 3600.0)  # tried at the start and the end only
    ckpt = tmp_path / "ckpt"
    started = time.monotonic()
    result = train_stage(load_config(CFG), 1, paths(artifacts, ckpt), log=lambda _: None)
    # Two tries (start, end) of a few requests: seconds with the bounded client, minutes with MLflow's defaults.
    assert time.monotonic() - started < 90
    lines = _warnings(capfd.readouterr().err)
    assert result["completed"] and result["mlflow_run_id"] is None
    assert len(lines) == 2 and "still unreachable at the end" in lines[1] and str(ckpt / PENDING_FILE) in lines[1]
    assert len((ckpt / PENDING_FILE).read_text().splitlines()) == STEPS
    proc = start_server(root, port)
    try:
        again = train_stage(load_config(CFG), 1, paths(artifacts, ckpt), log=lambda _: None)
        assert not _warnings(capfd.readouterr().err)
        history = tracking.client().get_metric_history(again["mlflow_run_id"], "loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert [r.info.run_id for r in _stage_runs(load_config(CFG))] == [again["mlflow_run_id"]]
        assert not (ckpt / PENDING_FILE).exists()
    finally:
        stop_server(proc)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`small_disk(size)` mounts a tmpfs of `size` bytes and returns its folder (unmounted after the test);
    skipped without root or when the mount fails."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes free on `folder`'s file system."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_a_stage_run_by_the_cli_with_the_store_down_to_the_end_keeps_its_steps_beside_the_outputs(artifacts,
                                                                                                  tmp_path):
    """`mvptr pretrain stage` removes the finished stage's checkpoint folder: the steps never sent move to the
    output folder and a line says where, instead of going with the checkpoint."""
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "mvptr.cli", "pretrain", "stage", "--stage", "1",
                           *(f"--{k}={artifacts[k]}" for k in ("dataset", "concepts", "vocab", "regions")),
                           f"--ckpt-dir={tmp_path / 'ckpt'}", f"--job-dir={tmp_path / 'job'}", f"--out={out}",
                           *CFG, "launch.cluster=local"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists()
    kept = out / PENDING_FILE
    assert len(kept.read_text().splitlines()) == STEPS
    assert f"{STEPS} logged step(s) are kept in {kept}" in proc.stdout


def test_a_checkpoint_that_does_not_fit_fails_in_one_line_and_the_previous_one_resumes(artifacts, small_disk):
    ckpt = small_disk(64 << 20) / "ckpt"
    cfg = load_config(CFG)
    train_stage(cfg, 1, paths(artifacts, ckpt), log=quiet, stop_after=5)  # a checkpoint at step 5
    filler = _fill(ckpt.parent, leave=1 << 20)
    with pytest.raises(OSError) as caught:
        train_stage(cfg, 1, paths(artifacts, ckpt), log=quiet)  # its checkpoint at step 10 does not fit
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message, message
    assert "No space left on device" in message and str(state_path(ckpt, 0)) in message, message
    assert sorted(p.name for p in ckpt.iterdir()) == [RUN_FILE, state_path(ckpt, 0).name]  # no temporary file
    assert load_state(ckpt, 0)["step"] == 5
    filler.unlink()
    result = train_stage(cfg, 1, paths(artifacts, ckpt), log=quiet)
    assert result["completed"] and [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))


def test_a_region_store_that_does_not_fit_fails_in_one_line_and_leaves_no_store(artifacts, small_disk):
    reference = artifacts["regions"]
    first = reference / "test.h5"  # the splits' stores are written in sorted order
    page = os.sysconf("SC_PAGE_SIZE")
    pages = sum(-(-f.stat().st_size // page) for f in reference.iterdir() if f.suffix != ".h5")
    # Room for the backbone, its metrics and half of the first store.
    out = small_disk((pages + 1 + first.stat().st_size // 2 // page) * page) / "regions"
    proc = run_mvptr("regions", "extract", "--dataset", str(artifacts["dataset"]), "--out", str(out),
                     "regions.backbone.epochs=2")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert errors == [f"mvptr: error: {out / first.name}: No space left on device"], proc.stderr
    assert not [p.name for p in out.iterdir() if p.suffix == ".h5" or ".tmp" in p.name]


def test_final_weights_that_do_not_fit_fail_in_one_line_and_the_last_checkpoint_resumes(artifacts, small_disk,
                                                                                         tmp_path):
    cfg = load_config([*CFG, f"pretrain.checkpoint_every={STEPS + 1}"])  # one checkpoint, at the last step
    train_stage(cfg, 1, paths(artifacts, tmp_path / "reference"), log=quiet)
    room = state_path(tmp_path / "reference", 0).stat().st_size + (256 << 10)  # that checkpoint, not the weights
    assert (tmp_path / "reference" / FINAL_WEIGHTS).stat().st_size > 256 << 10
    disk = small_disk(64 << 20)
    ckpt, filled = disk / "ckpt", []

    def log(line: str) -> None:
        if line.startswith(f"stage 1 step {STEPS}/"):
            filled.append(_fill(disk, leave=room))

    with pytest.raises(OSError) as caught:
        train_stage(cfg, 1, paths(artifacts, ckpt), log=log)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message, message
    assert "No space left on device" in message and str(ckpt / FINAL_WEIGHTS) in message, message
    assert sorted(p.name for p in ckpt.iterdir()) == [RUN_FILE, state_path(ckpt, 0).name]  # no temporary file
    assert load_state(ckpt, 0)["step"] == STEPS
    filled[0].unlink()
    assert train_stage(cfg, 1, paths(artifacts, ckpt), log=quiet)["completed"]
    resumed, straight = (load((folder / FINAL_WEIGHTS).read_bytes()) for folder in (ckpt, tmp_path / "reference"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
