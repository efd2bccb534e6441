"""Shared test helpers: the repository root, a runner for the `mvptr` command, and the real SLURM test cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The shared scripts sit beside the checkout (../shared); CI may point elsewhere with MVPTR_SLURM_UP.
SLURM_UP = Path(os.environ.get("MVPTR_SLURM_UP", ROOT.parent / "shared" / "slurm" / "slurm_up.sh"))
# Runs that tests log (and the CLI processes they start, which inherit the environment) go to a throw-away
# MLflow store, never to the project's results/mlflow.db.
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='mvptr-mlflow-')}/mlflow.db")


def run_mvptr(*args: str, cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, the way a rule or a user does."""
    proc = subprocess.run([sys.executable, "-m", "mvptr.cli", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"mvptr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running single-node SLURM cluster with accounting (sacct works, account `testacct`) and one fake GPU,
    or a skip saying why not. slurm_up.sh is idempotent; the cluster is left running (slurm_down.sh stops it)."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (slurm_up.sh)")
    if not SLURM_UP.exists():
        pytest.skip(f"{SLURM_UP} not found (set MVPTR_SLURM_UP)")
    env = {**os.environ, "SLURM_ACCOUNTING": "slurmdbd", "SLURM_GPUS": "1", "SLURM_CPUS": "8"}
    try:
        proc = subprocess.run(["bash", str(SLURM_UP)], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm_up.sh did not finish in 300 s")
    if proc.returncode != 0:
        pytest.skip(f"slurm_up.sh failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")


def quiet(_: str) -> None:
    """A `log` that prints nothing."""


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny world with its concepts, vocabulary and region stores, built with the CLI as the workflow does."""
    root = tmp_path_factory.mktemp("artifacts")
    world, concepts, vocab, regions = root / "world", root / "concepts.json", root / "vocab.json", root / "regions"
    run_mvptr("data", "synth", "--size", "tiny", "--seed", "0", "--out", str(world), check=True)
    run_mvptr("concepts", "extract", "--dataset", str(world), "--out", str(concepts), "--n-process", "1",
              "concepts.min_count=2", check=True)
    run_mvptr("concepts", "vocab", "--dataset", str(world), "--concepts", str(concepts), "--out", str(vocab),
              "concepts.min_count=2", check=True)
    run_mvptr("regions", "extract", "--dataset", str(world), "--out", str(regions), "regions.backbone.epochs=2",
              check=True)
    return {"dataset": world, "concepts": concepts, "vocab": vocab, "regions": regions}
