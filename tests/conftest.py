"""Shared test helpers: the repository root and a runner for the `mvptr` command."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
