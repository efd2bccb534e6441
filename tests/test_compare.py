"""`mvptr compare` against a real `mlflow server` on 127.0.0.1 and against the embedded SQLite store.

Why: the summary is the study's result; it must read back exactly the numbers the runs logged (final step of
the latest finished evaluate run per ablation and task), ignore other stages and unfinished runs, and behave
the same on a tracking server (the cluster) as on results/mlflow.db. Runs are logged through mvptr.tracking.

Run: .venv/bin/python -m pytest tests/test_compare.py      (starts an `mlflow server`, ~10 s)
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mvptr import tracking
from mvptr.compare import summary_table
from mvptr.compare_commands import register
from mvptr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")
# Names chosen so that plain alphabetical order would not put `full` first.
ABLATIONS = ["a_no_concepts", "full", "z_no_wpg"]
# Final values per (ablation, task); each run also logs an earlier step with other values.
EXPECTED = {
    ("full", "retrieval"): {"r1": 0.8125, "r5": 0.95},
    ("full", "vqa"): {"acc": 0.7},
    ("a_no_concepts", "retrieval"): {"r1": 0.6, "r5": 0.9},
    ("a_no_concepts", "vqa"): {"acc": 0.55},
    ("z_no_wpg", "retrieval"): {"r1": 0.701, "r5": 0.925},
    ("z_no_wpg", "vqa"): {"acc": 0.125},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server with a SQLite backend, one worker (the machine is small), killed at the end."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--default-artifact-root", str(tmp / "artifacts")],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # no background job runner (a pool of huey consumers): tracking needs none of it
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text(errors='replace')}")
            time.sleep(0.5)
        yield url
    finally:
        # The server runs workers in its own session: end that process group (ours), then reap it.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(params=["server", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def study(request: pytest.FixtureRequest, base_cfg: dict) -> dict:
    """The config of the study; one server serves several tests, so each gets its own dataset name (experiment)."""
    cfg = copy.deepcopy(base_cfg)
    cfg["dataset"]["name"] = "synthetic_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    return cfg


def cfg_for(base: dict, ablation: str) -> dict:
    cfg = copy.deepcopy(base)
    cfg["ablation"] = ablation
    return cfg


def log_study(base: dict) -> None:
    """The runs of a small study: what compare must read, and what it must leave out."""
    for (ablation, task), final in EXPECTED.items():
        cfg = cfg_for(base, ablation)
        # an older finished evaluation of the same (ablation, task): superseded by the one below
        tracking.log_run(cfg, stage="evaluate", task=task, metrics={k: v + 10 for k, v in final.items()})
        run_id = tracking.open_run(cfg, stage="evaluate", task=task)
        tracking.log_metrics(run_id, final, step=5)
        tracking.log_metrics(run_id, {k: v - 1 for k, v in final.items()}, step=2)  # logged later, earlier step
        tracking.close_run(run_id)
        # pretraining of the same ablation: another stage, must not appear
        tracking.log_run(cfg, stage="pretrain", task="itm", metrics={"loss": 1.25})
    # an unfinished (still running) and a failed newer evaluation: must not replace the finished values
    running = tracking.open_run(cfg_for(base, "full"), stage="evaluate", task="vqa")
    tracking.log_metrics(running, {"acc": 99.0}, step=9)
    failed = tracking.open_run(cfg_for(base, "z_no_wpg"), stage="evaluate", task="retrieval")
    tracking.log_metrics(failed, {"r1": -5.0, "r5": -5.0}, step=9)
    tracking.close_run(failed, "FAILED")
    # a finished evaluate run outside the parent/child layout (as runs were logged before): not a result either
    mc = tracking.client()
    experiment_id = mc.get_experiment_by_name(tracking.experiment_name(base)).experiment_id
    loose = mc.create_run(experiment_id, tags={**tracking.run_tags(cfg_for(base, "full"), "evaluate", "vqa")})
    tracking.log_metrics(loose.info.run_id, {"acc": 42.0}, step=99)
    tracking.close_run(loose.info.run_id)


def run_compare(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="mvptr")
    register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["compare", *argv])
    args.func(args)


@pytest.fixture(scope="module")
def base_cfg() -> dict:
    return load_config(root=ROOT)


def test_compare_writes_csv_md_and_charts(store: str, study: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    log_study(study)
    experiment = tracking.experiment_name(study)
    out = tmp_path / "summary"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out), "--metrics", "*")

    table = pd.read_csv(out / "ablations.csv", index_col="ablation")
    assert list(table.index) == ["full", "a_no_concepts", "z_no_wpg"]
    assert list(table.columns) == ["retrieval/r1", "retrieval/r5", "vqa/acc"]  # no pretrain metric
    for (ablation, task), final in EXPECTED.items():
        for metric, value in final.items():
            assert table.loc[ablation, f"{task}/{metric}"] == value, (ablation, task, metric)

    md = (out / "ablations.md").read_text().splitlines()
    assert md[0] == "| ablation | retrieval/r1 | retrieval/r5 | vqa/acc |"
    assert set(md[1]) <= set("|-: ") and md[1].count("|") == 5
    assert [line.split("|")[1].strip() for line in md[2:]] == ["full", "a_no_concepts", "z_no_wpg"]
    assert md[2] == "| full | 0.8125 | 0.95 | 0.7 |"

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["retrieval.png", "vqa.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            image.verify()
    assert not list(out.glob("*.tmp-*"))  # atomic writes leave no temporary files behind
    assert "retrieval.png" in capsys.readouterr().out

    # only some ablations, asked for out of order: still `full` first
    only = tmp_path / "only"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(only),
                "--ablations", "z_no_wpg", "full", "--metrics", "*")
    assert list(pd.read_csv(only / "ablations.csv", index_col="ablation").index) == ["full", "z_no_wpg"]

    # only the columns matching the patterns (the default keeps each downstream task's headline metrics)
    picked = tmp_path / "picked"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(picked),
                "--metrics", "retrieval/r1", "vqa/*")
    assert list(pd.read_csv(picked / "ablations.csv", index_col="ablation").columns) == ["retrieval/r1", "vqa/acc"]

    # the Python entry point gives the same table; --stage pretrain reads the other stage instead
    frame = summary_table(tracking.client(store), experiment, ["evaluate"])
    pd.testing.assert_frame_equal(frame, table, check_exact=True)
    pretrain = summary_table(tracking.client(store), experiment, ["pretrain"])
    assert list(pretrain.columns) == ["itm/loss"] and (pretrain["itm/loss"] == 1.25).all()


def test_compare_without_matching_runs_fails_clearly(store: str, study: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    tracking.log_run(cfg_for(study, "full"), stage="pretrain", task="itm", metrics={"loss": 1.0})
    experiment = tracking.experiment_name(study)
    out = tmp_path / "summary"
    with pytest.raises(SystemExit) as exit_info:
        run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out),
                    "--stage", "evaluate", "finetune")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert experiment in err and "'evaluate' or 'finetune'" in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        run_compare("--tracking-uri", store, "--experiment", "no-such-study", "--out-dir", str(out))
    assert "no-such-study" in capsys.readouterr().err
    missing_db = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(SystemExit):
        run_compare("--tracking-uri", f"sqlite:///{missing_db}", "--experiment", experiment, "--out-dir", str(out))
    assert "no MLflow store at" in capsys.readouterr().err and not missing_db.parent.exists()  # nothing created
