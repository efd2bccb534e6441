"""A real `mlflow server` for tests: SQLite backend and an artifact store in a temporary folder.

Why: the runs a user reads in the MLflow UI go through a tracking server (artifacts proxied by it), not the
embedded store; tests of what the UI shows (artifacts, inputs, system metrics, tags) go through one too.
Use: `from mlflow_server import mlflow_server` in a test module; the fixture starts the server on a free port,
waits for /health, points MLFLOW_TRACKING_URI (this process and the CLI processes it starts) at it, and stops it.
`start_server(root, port)` / `stop_server(proc)` start and stop one by hand (an outage, a restart on the same
port and store).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:`port` with its store in `root` (db, art; the same store on a restart),
    in its own session; return once /health answers."""
    uri = f"http://127.0.0.1:{port}"
    with (root / "server.log").open("a") as log:
        proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root / 'db'}",
                                 "--artifacts-destination", str(root / "art")], cwd=root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                # no background job runner (a pool of huey consumers): tracking needs none of it
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End the server's process group (its workers run in the session it leads) with `sig`, then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_server(root, port)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        stop_server(proc)
