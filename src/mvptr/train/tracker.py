"""Rank 0's MLflow run of a pre-training stage, kept through a tracking store that is down or goes down.

Why: a tracking server that is down when a job starts, or restarts while it trains, must neither stop nor hang
the training, and must not lose what it logged. The run is created on the first start (its id kept in run.json
in the checkpoint directory) and reused on every resume, with MLflow's system-metrics monitor on it. While the
store cannot be reached, each logged step goes to `mlflow-pending.jsonl` beside run.json (one JSON line per
step, with the time it was logged) and one warning line says so; at a later log call (at most one try every
RETRY_S seconds) and at the end, the run is opened if it was not yet and the pending steps are sent in order,
then the file is removed. A store still down at the end leaves the file (a resumed job sends it) and a second
warning naming it. MLflow's HTTP client is bounded (BOUNDED_HTTP, unless the user set them) so that one
request to a dead server gives up in seconds, not minutes.

Use (rank 0 of `mvptr.train.loop`; other ranks get a tracker that does nothing):
    tracker = StageRun(cfg, stage, ckpt_dir, env, log)
    tracker.log({"loss": 0.7}, step)
    tracker.close()          # sends what is pending, ends the run FINISHED; tracker.run_id
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mvptr.artifacts import PENDING_FILE, RUN_FILE
from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.train.distributed import Env

RETRY_S = 60.0  # while the store is down, one try to reach it per this many seconds (at a log call)
REPLAY_BLOCK = 50  # pending steps sent between two rewrites of the pending file
# MLflow's defaults (120 s timeout, 7 retries, backoff factor 2) make one request to a dead server take minutes.
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# Errors of a store that cannot be reached (MLflow reports a refused connection or a 5xx as INTERNAL_ERROR).
UNREACHABLE_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
MONITOR_LOGGER = "mlflow.system_metrics.system_metrics_monitor"


def _unreachable(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in UNREACHABLE_CODES
    return isinstance(err, (OSError, ConnectionError, TimeoutError))


def _reason(err: BaseException) -> str:
    """The cause in a few words: the OS error inside MLflow's message (`[Errno 111] Connection refused`), else its
    first line."""
    text = str(err).strip()
    found = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    return found.group(0) if found else (text.splitlines() or [type(err).__name__])[0]


class _MonitorFailures(logging.Filter):
    """The system-metrics monitor's own warning when it cannot reach the store (it then stops): counted as the
    outage warning of this process's latest stage run instead of a line of its own; that run starts the monitor
    again once the store is back. One instance, on MLflow's monitor logger."""

    current: StageRun | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and message.startswith(("Failed to get mlflow run",
                                                                      "Failed to log system metrics")):
            if self.current is not None:
                self.current._went_down(message)
            return False
        return True


_MONITOR_FAILURES = _MonitorFailures()
logging.getLogger(MONITOR_LOGGER).addFilter(_MONITOR_FAILURES)


class StageRun:
    """The stage's run; see the module docstring."""

    def __init__(self, cfg: Mapping[str, Any], stage: int, ckpt_dir: Path, env: Env,
                 log: Callable[[str], None]) -> None:
        self.run_id: str | None = None
        self._enabled = env.is_main
        if not self._enabled:
            return
        for name, value in BOUNDED_HTTP.items():
            os.environ.setdefault(name, value)
        self._cfg, self._stage, self._log = cfg, stage, log
        self._run_file, self._pending = ckpt_dir / RUN_FILE, ckpt_dir / PENDING_FILE
        self._monitor: Any = None
        self._lock = threading.Lock()
        self._warned = False
        self._down_since: float | None = None
        _MONITOR_FAILURES.current = self
        self._reach(force=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), "timestamp": int(time.time() * 1000),
                  "metrics": {k: float(v) for k, v in metrics.items()}}
        if self._down_since is None and not self._pending.exists() and self.run_id:
            try:
                self._send([record])
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                self._went_down(_reason(err))
        with self._pending.open("a") as handle:  # a journal: a line torn by a kill is skipped when read
            handle.write(json.dumps(record) + "\n")
        self._reach(force=False)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is pending and end the run; a store still down only warns, naming the pending file."""
        if not self._enabled:
            return
        from mvptr import tracking

        try:
            if self._reach(force=True, monitor=False):
                if self._monitor is not None:
                    self._monitor.finish()
                tracking.close_run(self.run_id, status)
                return
        except Exception as err:
            if not _unreachable(err):
                raise
            self._went_down(_reason(err))
        finally:  # a monitor left running stops at its next failed poll: no more warnings of this run
            if _MONITOR_FAILURES.current is self:
                _MONITOR_FAILURES.current = None
        print(f"warning: MLflow store {self._uri()} still unreachable at the end of stage {self._stage}: run "
              f"{self.run_id or '(not created)'} not ended, {len(self._read_pending())} logged steps not in MLflow "
              f"are kept in {self._pending} (sent when this stage resumes)", file=sys.stderr, flush=True)

    def _reach(self, force: bool, monitor: bool = True) -> bool:
        """Open the run if it is not yet, send the pending steps and (`monitor`) start the system-metrics monitor
        if it is not running; False while the store is down (tried at most once per RETRY_S unless `force`)."""
        if not force and self._down_since is not None and time.monotonic() - self._down_since < RETRY_S:
            return False
        try:
            if not self.run_id:
                self._open()
            pending = self._read_pending()
            for start in range(0, len(pending), REPLAY_BLOCK):  # one request a step; what is sent leaves the file
                self._send(pending[start:start + REPLAY_BLOCK])
                rest = pending[start + REPLAY_BLOCK:]
                if rest:
                    atomic_write_bytes(self._pending, "".join(json.dumps(r) + "\n" for r in rest).encode())
                else:
                    self._pending.unlink(missing_ok=True)
            if monitor and not self._monitor_alive():
                from mvptr import tracking

                self._monitor = tracking.start_system_metrics(self.run_id)
        except Exception as err:
            if not _unreachable(err):
                raise
            self._went_down(_reason(err))
            return False
        if self._down_since is not None:
            self._log(f"MLflow store {self._uri()} reachable again: logging to run {self.run_id}")
        self._down_since = None
        return True

    def _open(self) -> None:
        from mvptr import tracking

        previous = json.loads(self._run_file.read_text())["mlflow_run_id"] if self._run_file.is_file() else None
        stage = f"pretrain_stage{self._stage}"
        # A requeued job may run elsewhere (launch.*) or log at another cadence: warn, do not stop, when a
        # param differs from what the run logged first (MLflow params are write-once).
        try:
            self.run_id = tracking.open_run(self._cfg, stage=stage, task="pretrain", run_id=previous,
                                            on_param_conflict="warn")
        except tracking.ResumeConflict as err:  # the run is another study's (an older checkpoint): a new run
            self._log(f"not resuming MLflow run {previous}: {err}; starting a new run")
            self.run_id = tracking.open_run(self._cfg, stage=stage, task="pretrain")
        atomic_write_json(self._run_file, {"mlflow_run_id": self.run_id})

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mvptr import tracking

        assert self.run_id
        for record in records:
            tracking.log_metrics(self.run_id, record["metrics"], record["step"], timestamp_ms=record["timestamp"])

    def _read_pending(self) -> list[dict[str, Any]]:
        if not self._pending.is_file():
            return []
        records = []
        for line in self._pending.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line, torn by a kill while it was written
                continue
        return records

    def _monitor_alive(self) -> bool:
        thread = getattr(self._monitor, "_process", None)  # MLflow's monitor thread; it stops when the store fails
        return thread is not None and thread.is_alive()

    def _went_down(self, reason: str) -> None:
        with self._lock:
            self._down_since = time.monotonic()
            if self._warned:
                return
            self._warned = True
        print(f"warning: MLflow store {self._uri()} unreachable ({reason}); training goes on, logged steps are "
              f"kept in {self._pending} and sent when it is back", file=sys.stderr, flush=True)

    @staticmethod
    def _uri() -> str:
        from mvptr import tracking

        return tracking.tracking_uri()
