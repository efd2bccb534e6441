"""Run one call `fn(*args)` as a submitit job that a restarted rule finds again, and resubmit it until it finishes.

Why: GPU-class Snakemake rules train for hours. If the rule's own process dies (Snakemake restarted, the login
node rebooted), a job that still runs must not be submitted a second time; if the job dies (preemption, time
limit, a killed node), it must go on from its last checkpoint, not from scratch; and the rule must write its
outputs only after a real success. A rule therefore blocks in `launch`, which keeps a record of the job next
to the rule's log and returns the result only when the job finished successfully.

Use:
    settings = LaunchSettings.from_config(cfg["launch"])        # cluster local | slurm | debug, resources
    result = launch(trainer, name="pretrain", folder=log_dir, settings=settings, log=logger.info)
    # ... then write the rule's outputs atomically from `result`

What `launch` does, in `folder` (one per rule, its log folder):
- `job.json` (written atomically) records the job: `job_id`, `cluster`, `submitted_at` (UTC), `submissions`
  (jobs submitted for this call so far), `state` (last seen), `tasks`, `folder` (the job's submitit folder),
  `stdout`/`stderr` (rank 0's logs), `fingerprint` (sha256 of the pickled call), `returned` (whether a
  result was handed to the caller) and `history` (earlier jobs of the call and how they ended).
- Each submission gets its own submitit folder, `submitit/<time>-<random>/`, holding the pickled call, the
  result pickles and the logs `<job id>_<rank>_log.out|err`: a job id used again (a local pid, a SLURM
  cluster whose state was reset) can never pick up another job's result.
- On entry, a record for the same call (same fingerprint) whose result was not yet returned is looked at:
  a job still pending or running is re-attached to; a job that finished successfully gives its result
  without running anything; a job that failed or vanished is replaced by a new submission. A record of a
  different call (other arguments) is set aside, and its job cancelled if still running, since it would
  write the same checkpoints. A record whose result was returned is not used again: running the rule
  again (forced, or with a changed input) runs the job again.
- While waiting, the result pickles are checked every `poll_seconds`; the scheduler is asked for the state
  too (at once for local jobs, with back-off up to 30 s for SLURM so a long job does not hammer slurmctld).
- While waiting, new lines of rank 0's stdout and stderr are copied to this process's stdout (each file read
  on from where the last poll stopped), so that a rule's log (`> {log}`) shows the trainer's progress.
- A job that ends without a result (preempted, timed out, killed, node failure, vanished) or whose
  submitit signal handler gave up (`UncompletedJobError`) is resubmitted, up to `max_resubmissions` times
  in one call. A SLURM job cancelled with scancel (state CANCELLED) is a decision to stop: LaunchError.
  A Python exception in `fn` is not retried: it raises `LaunchError` with the tail of the job's stderr and
  the log's path. With several tasks (one per GPU) the result is rank 0's; an exception in any rank fails
  the call (and cancels the others).

The contract for `fn`: a picklable callable, normally a `submitit.helpers.Checkpointable`, whose
`checkpoint()` saves the training state to disk and returns a `DelayedSubmission` (submitit then requeues
it itself on a SLURM preemption or time-out signal), and which, when called again with the same arguments,
resumes from that on-disk checkpoint. The launcher resubmits the same call, `fn(*args)`, so the state
that matters must be on disk, not only in `fn`'s attributes. The call is pickled to compare it with the
record: keep it deterministic (no timestamps, uuids or sets of strings in `fn` or `args`), or a restarted
rule cannot re-attach and starts a new job instead (still correct, since the job resumes from disk).

Local jobs and restarts (found by reading submitit 1.5.4's `local/local.py`): `LocalExecutor.submit`
starts a controller process, `python -m submitit.local._local <folder>`, with a plain `Popen` (no new
session); the controller starts one process per task and its pid is the job id. A `LocalJob` object cannot
be re-attached: rebuilt from folder and id it has no `Popen`, so submitit reports it done at once ("NO
PROCESS AND NO RESULT") and `result()` fails after 15 s. The controller itself, though, does survive the
death of the process that submitted it when only that process dies (SIGKILL, a crash): it is reparented
and finishes the job. So a local job is re-attached by its pid, checked against `/proc/<pid>/cmdline`
(the controller's command line names the job's unique submitit folder, so a reused pid is not mistaken
for it) and `/proc/<pid>/stat` (a zombie is over), and the launcher waits for that pid to end and reads
the result pickles itself. When the whole process group is killed (Ctrl-C in a terminal, a killed
Snakemake), the controller and its tasks die too; the record then names a dead job, which is resubmitted
and resumes from its checkpoint. Linux only (reads /proc).

SLURM: always `cluster=` explicitly (once SLURM is installed, AutoExecutor would pick it on its own);
`slurm_account`, `slurm_partition`, `qos`, `constraint`, `gres` and `slurm_extra` (further sbatch options, as
submitit's slurm_additional_parameters) are passed only when set, `gpus_per_node` only when > 0 (a gres
request on a cluster without gres fails at submission). The state comes from `squeue`, and from `sacct`
once squeue forgot the job; without accounting, a job squeue no longer lists is simply over. While SLURM
cannot be reached the launcher keeps waiting and never resubmits. Multi-node and multi-GPU jobs are started
by submitit (`tasks_per_node` processes per node; use `submitit.helpers.TorchDistributedEnvironment`
inside), never torchrun. `timeout_min` should be >= 3 on SLURM: submitit asks for its signal 90 s before
the limit. The job keeps running when the launcher is killed (that is what re-attaching is for): cancel it
with `scancel <job_id from job.json>`.

`cluster="debug"` runs `fn` in this process (through submitit's DebugExecutor, but without its pdb
post-mortem); nothing is re-attached or resubmitted, and an exception raises `LaunchError` from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle
import submitit
from submitit.core.utils import JobPaths

from mvptr.atomic import atomic_write_json
from mvptr.errors import ConfigError
from mvptr.launch.determinism import PINNED_ENVIRONMENT

T = TypeVar("T")

CLUSTERS = ("local", "slurm", "debug")
JOB_RECORD = "job.json"
# SLURM states (squeue/sacct spelling) in which a job may still run and write its result.
_SLURM_ACTIVE = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "POWER_UP_NODE", "SPECIAL_EXIT",
})
# Once a job is seen to end, how long its result pickles may take to show up (a shared file system lags; 15 s
# is what submitit allows). Only a job that exited by itself (COMPLETED, or FAILED: an exception) wrote one.
_RESULT_GRACE_S = {"local": 1.0, "slurm": 15.0}
_RESULT_GRACE_OTHER_S = 2.0
_EXITED_STATES = ("COMPLETED", "FAILED")
# The longest pause between two squeue calls while a SLURM job runs (result files are checked every poll).
_MAX_SLURM_PROBE_S = 30.0
_STDERR_TAIL_LINES = 40
_SCHEDULER_TIMEOUT_S = 60
# Seconds a cancelled local job gets to stop on SIGINT before its processes are killed.
_LOCAL_CANCEL_GRACE_S = 5.0


class LaunchError(RuntimeError):
    """A job raised, or did not finish after all resubmissions; the message names its log."""

    def __init__(self, message: str, job_id: str | None = None, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.log_path = log_path


@dataclass(frozen=True)
class LaunchSettings:
    """Where a job runs and with what; the `launch:` config section (`from_config`)."""

    cluster: str = "local"  # local | slurm | debug
    timeout_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1  # one process per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    slurm_partition: str | None = None
    slurm_account: str | None = None
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint (node features)
    gres: str | None = None  # sbatch --gres, e.g. "gpu:a100:4" (gpus_per_node asks for GPUs of any type)
    slurm_extra: str | None = None  # further sbatch options, e.g. "--exclusive --comment=mvptr"
    max_resubmissions: int = 3  # a preempted/timed-out/vanished job is resubmitted (it resumes from its checkpoint)
    deterministic: bool = False  # pinned CPU kernels: the same bits on any x86-64 CPU (mvptr.launch.determinism)
    # Result files are checked this often: a cheap stat; a short job would otherwise wait up to a second for it.
    poll_seconds: float = 0.25

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"launch.cluster: must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        minimum = {"timeout_min": 1, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1,
                   "max_resubmissions": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            # bool is an int in Python; `nodes: true` in YAML is a mistake, not 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"launch.{key}: must be an integer >= {low}, got {value!r}")
        for key in ("mem_gb", "poll_seconds"):
            value = getattr(self, key)
            if value is None and key == "mem_gb":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"launch.{key}: must be a number > 0, got {value!r}")
        for key in ("slurm_partition", "slurm_account", "qos", "constraint", "gres", "slurm_extra"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"launch.{key}: must be a non-empty string or null, got {value!r}")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"launch.deterministic: must be true or false, got {self.deterministic!r}")
        sbatch_options(self.slurm_extra)  # a malformed option fails here, not at submission
        if self.cluster == "local" and self.nodes != 1:
            raise ConfigError(f"launch.nodes: the local executor runs on one node, got {self.nodes}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], rule: str | None = None) -> LaunchSettings:
        """Settings from the `launch:` section, with the rule's own `launch.rules.<rule>` over it (a recipe asks
        pre-training for 2 nodes x 8 GPUs and a fine-tuning for 1); an unknown key or a bad value raises
        ConfigError naming it."""
        known = [f.name for f in dataclasses.fields(cls)]
        own = dict((section.get("rules") or {}).get(rule, {})) if rule else {}
        # a GPU rule's Snakemake resources (workflow/rules/common.smk trainer_args); 0 leaves the keys as they are
        gpus, mem_mb = own.pop("gpus", 0), own.pop("mem_mb", 0)
        if gpus:
            own.update(gpus_per_node=gpus, tasks_per_node=gpus)
        if mem_mb:
            own["mem_gb"] = mem_mb / 1000
        merged = {**{k: v for k, v in section.items() if k != "rules"}, **own}
        for key in merged:
            if key not in known:
                where = f"launch.rules.{rule}.{key}" if key in own else f"launch.{key}"
                raise ConfigError(f"{where}: unknown launch setting (known: {', '.join(known)})")
        return cls(**merged)

    def describe(self) -> str:
        """One line for the log: where the job runs and what it asks for."""
        mem = f"{self.mem_gb:g} GB" if self.mem_gb else "default memory"
        return (f"{self.cluster}: {self.nodes} node(s) x {self.tasks_per_node} task(s), {self.gpus_per_node} GPU(s) "
                f"per node, {self.cpus_per_task} CPU(s) per task, {mem}, {self.timeout_min} min per job")


def sbatch_options(text: str | None) -> dict[str, str | bool]:
    """`"--exclusive --comment=x"` -> {"exclusive": True, "comment": "x"}: submitit's slurm_additional_parameters
    (it writes each as `#SBATCH --key[=value]`). Raises ConfigError naming launch.slurm_extra otherwise."""
    options: dict[str, str | bool] = {}
    try:
        words = shlex.split(text or "")
    except ValueError as err:
        raise ConfigError(f"launch.slurm_extra: {err} in {text!r}") from err
    for word in words:
        key, sep, value = word.partition("=")
        if not key.startswith("--") or len(key) < 3:
            raise ConfigError(f"launch.slurm_extra: {word!r} is not an sbatch option of the form --name[=value]")
        options[key[2:]] = value if sep else True
    return options


def read_job_record(folder: Path | str) -> dict[str, Any] | None:
    """The launcher's record in `folder` (its `job.json`), or None when there is none."""
    path = Path(folder) / JOB_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a job record")
    return record


def launch(fn: Callable[..., T], *args: Any, name: str, folder: Path | str, settings: LaunchSettings,
           log: Callable[[str], None] = print) -> T:
    """Run `fn(*args)` as a submitit job and return its (rank 0's) result once the job finished successfully.

    Re-attaches to this call's job if a previous launcher left it running, resubmits a job that ended
    without a result, and raises LaunchError for an exception in `fn`. See the module docstring.
    """
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(fn, args)
    if settings.cluster == "debug":
        return _run_debug(fn, args, name, folder, settings, fingerprint, log)

    submissions, history, job = 0, [], None
    previous = _previous_record(folder, fingerprint, name, log)
    if previous is not None:
        submissions, history = int(previous.get("submissions", 0)), list(previous.get("history", []))
        old = _Job.from_record(previous)
        state, alive = old.probe()
        if alive:
            log(f"{name}: re-attaching to job {old.job_id} ({old.cluster}, {state}), submitted {old.submitted_at}")
            log(f"{name}: logs {old.paths().stdout} and {old.paths().stderr}")
            job = old
        else:
            kind, value = _verdict(old, old.load_results(), state)
            if kind == "success":
                log(f"{name}: job {old.job_id} finished while no launcher waited; taking its result")
                _write_record(folder, name, old, submissions, fingerprint, "COMPLETED", history, returned=True)
                return value
            why = f"raised in task {value[0]}" if kind == "error" else f"ended without a result ({value})"
            log(f"{name}: previous job {old.job_id} {why}; submitting a new job")
            history.append(_history_entry(old, str(value) if kind != "error" else "FAILED"))

    attempts = 0  # jobs waited for in this call, re-attached included
    while True:
        fresh = job is None
        if fresh:
            if attempts > settings.max_resubmissions:
                last = history[-1] if history else {}
                raise LaunchError(f"{name}: job did not finish after {attempts} attempts (max_resubmissions="
                                  f"{settings.max_resubmissions}); last job {last.get('job_id')} ended "
                                  f"{last.get('state')}; see its log {last.get('stderr')}",
                                  job_id=last.get("job_id"), log_path=Path(last["stderr"]) if last else None)
            job = _submit(fn, args, name, folder, settings)
            submissions += 1
            log(f"{name}: submitted job {job.job_id} ({job.cluster}, {job.tasks} task(s), submission {submissions})")
            log(f"{name}: logs {job.paths().stdout} and {job.paths().stderr}")
        attempts += 1
        current = job

        def on_state(state: str, current: _Job = current) -> None:
            _write_record(folder, name, current, submissions, fingerprint, state, history)

        on_state("SUBMITTED" if fresh else "ATTACHED")
        kind, value = _wait(current, settings, name, log, on_state)
        if kind == "success":
            _write_record(folder, name, current, submissions, fingerprint, "COMPLETED", history, returned=True)
            log(f"{name}: job {current.job_id} completed")
            return value
        if kind == "error":
            task, trace = value
            _write_record(folder, name, current, submissions, fingerprint, "FAILED", history)
            raise _failure(name, current, task, trace)
        if kind == "cancelled":
            _write_record(folder, name, current, submissions, fingerprint, value, history)
            raise LaunchError(f"{name}: job {current.job_id} was cancelled ({value}), so it is not resubmitted; "
                              f"log: {current.paths().stderr}", job_id=current.job_id, log_path=current.paths().stderr)
        history.append(_history_entry(current, value))
        _write_record(folder, name, current, submissions, fingerprint, value, history)
        if attempts <= settings.max_resubmissions:
            log(f"{name}: job {current.job_id} did not finish ({value}); resubmitting "
                f"({attempts}/{settings.max_resubmissions}), it resumes from its checkpoint")
        job = None


# ---------------------------------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    """A submitted job as the launcher sees it: enough to find its state, results and logs again."""

    cluster: str
    job_id: str
    folder: Path  # the job's own submitit folder
    tasks: int
    submitted_at: str
    # The local controller's Popen when this process started it: polling it also reaps it.
    process: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> _Job:
        return cls(str(record["cluster"]), str(record["job_id"]), Path(record["folder"]), int(record["tasks"]),
                   str(record["submitted_at"]))

    def paths(self, task: int = 0) -> JobPaths:
        return JobPaths(self.folder, job_id=self.job_id, task_id=task)

    def finished_tasks(self) -> list[int]:
        return [task for task in range(self.tasks) if self.paths(task).result_pickle.exists()]

    def load_results(self, known: dict[int, tuple[str, Any]] | None = None) -> dict[int, tuple[str, Any]]:
        """("success", value) or ("error", traceback text) of each task that wrote its result pickle."""
        results = dict(known or {})
        for task in self.finished_tasks():
            if task not in results:
                # submitit renames a finished pickle into place: a file under this name is whole
                with self.paths(task).result_pickle.open("rb") as handle:
                    results[task] = pickle.load(handle)
        return results

    def probe(self) -> tuple[str, bool]:
        """(state, alive): alive while the job may still run and write its results."""
        if self.cluster == "local":
            alive = _local_controller_alive(int(self.job_id), self.folder, self.process)
            return ("RUNNING", True) if alive else ("ENDED", False)
        if self.cluster == "slurm":
            return _slurm_state(self.job_id)
        return "ENDED", False  # a debug job lives and dies with the launcher that ran it

    def cancel(self) -> None:
        if self.cluster == "slurm":
            with contextlib.suppress(FileNotFoundError, subprocess.TimeoutExpired):
                subprocess.run(["scancel", self.job_id], capture_output=True, timeout=_SCHEDULER_TIMEOUT_S)
        elif self.cluster == "local" and self.probe()[1]:
            # SIGINT is what LocalJob.cancel sends: the controller then stops its tasks and exits. A process
            # started with SIGINT ignored (inherited from its parent) does not: after a grace period its tasks
            # and then the controller are killed.
            pid = int(self.job_id)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + _LOCAL_CANCEL_GRACE_S
            while self.probe()[1] and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.probe()[1]:
                for victim in [*_children(pid), pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _local_controller_alive(pid: int, folder: Path, process: subprocess.Popen | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # the controller is `python -m submitit.local._local <folder>`; the folder is unique to this submission
    if b"submitit.local._local" not in argv or str(folder).encode() not in argv:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]  # the command name in parentheses may contain spaces
    return state not in ("Z", "X")


def _slurm_state(job_id: str) -> tuple[str, bool]:
    try:
        # --states=all: squeue also shows a job that ended in the last MinJobAge seconds, with its final state
        queue = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format", "%T"],
                               capture_output=True, text=True, timeout=_SCHEDULER_TIMEOUT_S)
    except FileNotFoundError:
        return "NO SLURM", False
    except subprocess.TimeoutExpired:
        return "SLURM UNREACHABLE", True
    if queue.returncode == 0 and queue.stdout.strip():
        state = queue.stdout.split()[0]
        return state, state in _SLURM_ACTIVE
    if queue.returncode != 0 and "invalid job id" not in queue.stderr.lower():
        # slurmctld down or busy: keep waiting, never resubmit because of that
        return "SLURM UNREACHABLE", True
    # squeue forgot the job (it keeps finished ones a few minutes): accounting has its final state, if enabled
    with contextlib.suppress(FileNotFoundError, subprocess.TimeoutExpired):
        acct = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", "--format", "State", "--jobs",
                               job_id], capture_output=True, text=True, timeout=_SCHEDULER_TIMEOUT_S)
        lines = acct.stdout.strip().splitlines()
        if acct.returncode == 0 and lines and lines[-1].strip():
            state = lines[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED; a requeued job's last record wins
            return state, state in _SLURM_ACTIVE
    return "GONE", False


def _executor(folder: Path, name: str, settings: LaunchSettings) -> submitit.AutoExecutor:
    # cluster= always: once SLURM is installed, AutoExecutor would pick it even for a local run
    executor = submitit.AutoExecutor(folder=folder, cluster=settings.cluster)
    params: dict[str, Any] = {
        "name": name, "timeout_min": settings.timeout_min, "nodes": settings.nodes,
        "tasks_per_node": settings.tasks_per_node, "cpus_per_task": settings.cpus_per_task,
    }
    if settings.mem_gb is not None:
        params["mem_gb"] = settings.mem_gb
    if settings.gpus_per_node > 0:
        params["gpus_per_node"] = settings.gpus_per_node
    if settings.slurm_partition:
        params["slurm_partition"] = settings.slurm_partition
    if settings.slurm_account:
        params["slurm_account"] = settings.slurm_account
    for key in ("qos", "constraint", "gres"):
        if getattr(settings, key):
            params[f"slurm_{key}"] = getattr(settings, key)
    if settings.slurm_extra:
        params["slurm_additional_parameters"] = sbatch_options(settings.slurm_extra)
    executor.update_parameters(**params)
    return executor


def _new_job_folder(folder: Path) -> Path:
    parent = folder / "submitit"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S-")
    return Path(tempfile.mkdtemp(dir=parent, prefix=stamp))


def _submit(fn: Callable[..., Any], args: tuple[Any, ...], name: str, folder: Path,
            settings: LaunchSettings) -> _Job:
    job_folder = _new_job_folder(folder)
    with _environ(**_job_environment(settings)):  # a local process and sbatch (--export=ALL) inherit it
        job = _executor(job_folder, name, settings).submit(fn, *args)
    return _Job(settings.cluster, str(job.job_id), job_folder, settings.nodes * settings.tasks_per_node, _now(),
                process=getattr(job, "_process", None))


def _wait(job: _Job, settings: LaunchSettings, name: str, log: Callable[[str], None],
          on_state: Callable[[str], None]) -> tuple[str, Any]:
    """Block until the job is over: ("success", rank 0's result), ("error", (task, trace)) or ("incomplete", why)."""
    follow = _Follower([job.paths().stdout, job.paths().stderr])
    try:
        return _wait_loop(job, settings, name, log, on_state, follow)
    finally:
        follow.poll(final=True)


def _wait_loop(job: _Job, settings: LaunchSettings, name: str, log: Callable[[str], None],
               on_state: Callable[[str], None], follow: _Follower) -> tuple[str, Any]:
    results: dict[int, tuple[str, Any]] = {}
    state = ""
    interval = settings.poll_seconds
    next_probe = 0.0
    while True:
        follow.poll()
        results = job.load_results(results)
        if len(results) == job.tasks:
            return _verdict(job, results, "COMPLETED")
        failed = [task for task, (kind, trace) in results.items() if kind == "error" and not _uncompleted(trace)]
        if failed:
            job.cancel()  # the other ranks would wait for the failed one until their collective timeout
            return "error", (failed[0], results[failed[0]][1])
        now = time.monotonic()
        if now >= next_probe:
            new_state, alive = job.probe()
            if not alive:
                # give the results time to show up, then make sure the job did not come back (a SLURM requeue)
                grace = _RESULT_GRACE_S.get(job.cluster, 1.0)
                if job.cluster == "slurm" and new_state not in _EXITED_STATES:
                    grace = _RESULT_GRACE_OTHER_S
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and len(job.finished_tasks()) < job.tasks:
                    time.sleep(min(settings.poll_seconds, 1.0))
                    _refresh(job.folder)
                new_state, alive = job.probe()
            if new_state != state:
                log(f"{name}: job {job.job_id} {new_state}" if not state else
                    f"{name}: job {job.job_id} {state} -> {new_state}")
                state = new_state
                on_state(state)
            if not alive:
                return _verdict(job, job.load_results(results), state)
            next_probe = now + interval
            if job.cluster == "slurm":
                interval = min(interval * 2, max(_MAX_SLURM_PROBE_S, settings.poll_seconds))
        time.sleep(settings.poll_seconds)


class _Follower:
    """Copies what was appended to some files to stdout, whole lines only, reading on from the last offsets."""

    def __init__(self, paths: list[Path]) -> None:
        self.offsets = {path: 0 for path in paths}

    def poll(self, final: bool = False) -> None:
        for path, offset in self.offsets.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            end = len(chunk) if final else chunk.rfind(b"\n") + 1
            if end > 0:
                sys.stdout.write(chunk[:end].decode("utf-8", errors="replace"))
                if final and not chunk.endswith(b"\n"):
                    sys.stdout.write("\n")
                sys.stdout.flush()
                self.offsets[path] = offset + end


def _refresh(folder: Path) -> None:
    """Make an NFS client drop its cached listing of `folder` (submitit's trick: a no-op chmod)."""
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)


def _verdict(job: _Job, results: Mapping[int, tuple[str, Any]], state: str) -> tuple[str, Any]:
    """How a job that is over ended, from the results its tasks wrote."""
    errors = {task: trace for task, (kind, trace) in results.items() if kind == "error"}
    genuine = sorted(task for task, trace in errors.items() if not _uncompleted(trace))
    if genuine:
        return "error", (genuine[0], errors[genuine[0]])
    if errors:
        trace = errors[min(errors)]
        return "incomplete", f"{state}: {_last_line(trace)}"
    if state.startswith("CANCELLED") and 0 not in results:
        # someone ran scancel: that is a decision to stop, not a preemption (which SLURM calls PREEMPTED)
        return "cancelled", state
    if 0 in results:
        # rank 0 returns only after the collective end of training: a rank without a result pickle was
        # killed after that point and does not change the result
        return "success", results[0][1]
    return "incomplete", f"{state}, no result"


def _uncompleted(trace: str) -> bool:
    """Whether an error result is submitit's own give-up (timed out too often, checkpoint failed), not `fn`'s."""
    return "UncompletedJobError" in _last_line(trace)


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _failure(name: str, job: _Job, task: int, trace: str) -> LaunchError:
    paths = job.paths(task)
    tail = _tail(paths.stderr, _STDERR_TAIL_LINES)
    message = [f"{name}: job {job.job_id} ({job.cluster}) raised in task {task}: {_last_line(trace)}"]
    if tail:
        message += [f"--- last lines of {paths.stderr} ---", tail, "---"]
    else:  # the log may lag behind on a shared file system; the pickled traceback is there already
        message += ["--- traceback ---", str(trace).rstrip(), "---"]
    message.append(f"log: {paths.stderr} (stdout: {paths.stdout})")
    return LaunchError("\n".join(message), job_id=job.job_id, log_path=paths.stderr)


# ---------------------------------------------------------------------------------------------------- record


def _fingerprint(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    return hashlib.sha256(cloudpickle.dumps((fn, args))).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _history_entry(job: _Job, state: str) -> dict[str, Any]:
    return {"job_id": job.job_id, "cluster": job.cluster, "submitted_at": job.submitted_at, "state": state,
            "stderr": str(job.paths().stderr)}


def _write_record(folder: Path, name: str, job: _Job, submissions: int, fingerprint: str, state: str,
                  history: list[dict[str, Any]], returned: bool = False) -> None:
    atomic_write_json(folder / JOB_RECORD, {
        "name": name, "cluster": job.cluster, "job_id": job.job_id, "tasks": job.tasks, "folder": str(job.folder),
        "submitted_at": job.submitted_at, "submissions": submissions, "state": state, "returned": returned,
        "fingerprint": fingerprint, "stdout": str(job.paths().stdout), "stderr": str(job.paths().stderr),
        "history": history,
    })


def _previous_record(folder: Path, fingerprint: str, name: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The record of this same call whose result was not returned yet, if any; sets other records aside."""
    try:
        record = read_job_record(folder)
    except (ValueError, UnicodeDecodeError) as err:
        log(f"{name}: ignoring unreadable {folder / JOB_RECORD}: {err}")
        return None
    if record is None:
        return None
    try:
        old = _Job.from_record(record)
    except (KeyError, TypeError, ValueError) as err:
        log(f"{name}: ignoring incomplete {folder / JOB_RECORD}: missing {err}")
        return None
    if record.get("returned"):
        return None
    if record.get("fingerprint") != fingerprint:
        if old.probe()[1]:
            # it belongs to a different call (other arguments) and would write the same checkpoints
            log(f"{name}: cancelling job {old.job_id}, left running by a launch with other arguments")
            old.cancel()
        return None
    return record


def _job_environment(settings: LaunchSettings) -> dict[str, str]:
    return dict(PINNED_ENVIRONMENT) if settings.deterministic else {}


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_debug(fn: Callable[..., T], args: tuple[Any, ...], name: str, folder: Path, settings: LaunchSettings,
               fingerprint: str, log: Callable[[str], None]) -> T:
    job_folder = _new_job_folder(folder)
    debug_job = _executor(job_folder, name, settings).submit(fn, *args)  # a DebugJob: nothing ran yet
    job = _Job("debug", str(debug_job.job_id), job_folder, 1, _now())
    _write_record(folder, name, job, 1, fingerprint, "RUNNING", [])
    log(f"{name}: running job {job.job_id} in this process (debug)")
    # DebugJob.result() would drop into pdb on an exception; run the submission with the job's environment
    # instead, so that submitit.JobEnvironment() works inside fn
    try:
        with _environ(SUBMITIT_DEBUG_JOB_ID=job.job_id, SUBMITIT_FOLDER=str(job_folder),
                      **_job_environment(settings)):
            result = debug_job.submission().result()
    except Exception as err:
        _write_record(folder, name, job, 1, fingerprint, "FAILED", [])
        raise LaunchError(f"{name}: debug job {job.job_id} raised {type(err).__name__}: {err} (ran in-process; "
                          f"folder {job_folder})", job_id=job.job_id) from err
    _write_record(folder, name, job, 1, fingerprint, "COMPLETED", [], returned=True)
    return result
