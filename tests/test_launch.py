"""The submitit launcher, with real jobs: local ones always, SLURM ones when this machine can run a cluster.

The workload is `Toy`, a Checkpointable that counts steps into a state file and resumes from it the way a
trainer resumes from its checkpoint; each start appends "pid first-step" to starts.txt, so a test can tell
whether a job re-attached (one start), resumed (a second start past step 0) or restarted (a second start at 0).

The SLURM tests bring up the single-node test cluster with ../shared/slurm/slurm_up.sh (as root; it is
idempotent; $MVPTR_SLURM_UP names another copy) and leave it running for other tests: stop it with slurm_down.sh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
import yaml

from mvptr.atomic import atomic_write_json
from mvptr.errors import ConfigError
from mvptr.launch import LaunchError, LaunchSettings, launch, read_job_record

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LOCAL = LaunchSettings(cluster="local", timeout_min=5, poll_seconds=0.1)


class Toy(submitit.helpers.Checkpointable):
    """Count `steps` steps (rank 0 only), resuming from workdir/state.json.

    With `fail_at` >= 0, rank `fail_rank` raises: rank 0 at step `fail_at`, another rank at once.
    """

    def __init__(self, workdir: str, steps: int, sleep: float = 0.05, fail_at: int = -1, fail_rank: int = 0) -> None:
        self.workdir = workdir
        self.steps = steps
        self.sleep = sleep
        self.fail_at = fail_at
        self.fail_rank = fail_rank

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        work = Path(self.workdir)
        if env.global_rank == self.fail_rank != 0 and self.fail_at >= 0:
            raise ValueError(f"toy failure in rank {env.global_rank}")
        if env.global_rank == 0:
            state = work / "state.json"
            start = json.loads(state.read_text())["step"] if state.exists() else 0
            with (work / "starts.txt").open("a") as handle:
                handle.write(f"{os.getpid()} {start}\n")
            for step in range(start, self.steps):
                if step == self.fail_at and self.fail_rank == 0:
                    raise ValueError(f"toy failure at step {step}")
                time.sleep(self.sleep)
                atomic_write_json(state, {"step": step + 1})
        return {"rank": env.global_rank, "job_id": env.job_id, "steps": self.steps}


# What a rule does, in a process of its own that a test can kill: argv = workdir steps sleep folder settings.
_LAUNCHER = """
import sys
import test_launch
from mvptr.launch import launch
toy = test_launch.Toy(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
launch(toy, name="toy", folder=sys.argv[4], settings=getattr(test_launch, sys.argv[5]))
"""


@pytest.fixture(autouse=True)
def _toy_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # job processes unpickle Toy by reference (module test_launch), so they need this folder on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def _starts(work: Path) -> list[tuple[int, int]]:
    path = work / "starts.txt"
    if not path.exists():
        return []
    return [(int(pid), int(step)) for pid, step in (line.split() for line in path.read_text().splitlines())]


def _step(work: Path) -> int:
    path = work / "state.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _start_launcher(work: Path, steps: int, sleep: float, folder: Path, out: Path,
                    settings: str = "LOCAL") -> subprocess.Popen:
    # output to a file, not a pipe: the job outlives the launcher and would hold a pipe open
    with out.open("w") as handle:
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(work), str(steps), str(sleep), str(folder),
                                 settings], stdout=handle, stderr=subprocess.STDOUT)


def _kill_launcher_once_running(proc: subprocess.Popen, work: Path, folder: Path, out: Path) -> dict:
    """SIGKILL the launcher process once its job has made progress; the job record it left."""
    _wait_for(lambda: _step(work) >= 2 and read_job_record(folder) is not None or proc.poll() is not None,
              "the launcher's job to make progress")
    assert proc.poll() is None, f"launcher ended early:\n{out.read_text()}"
    proc.kill()
    proc.wait()
    record = read_job_record(folder)
    assert record is not None
    return record


# ------------------------------------------------------------------------------------------------ local


def test_local_job_returns_result_and_records_job_id(tmp_path: Path, work: Path) -> None:
    lines: list[str] = []
    folder = tmp_path / "log"
    result = launch(Toy(str(work), 3), name="toy", folder=folder, settings=LOCAL, log=lines.append)
    record = read_job_record(folder)
    assert result == {"rank": 0, "job_id": record["job_id"], "steps": 3}
    assert record["cluster"] == "local" and record["submissions"] == 1
    assert record["state"] == "COMPLETED" and record["returned"] is True
    assert Path(record["stdout"]).exists() and record["job_id"] in Path(record["stdout"]).name
    assert any(f"submitted job {record['job_id']}" in line for line in lines), lines
    assert any(record["stderr"] in line for line in lines), lines

    # a result handed over is not handed over again: running the rule again runs a new job
    again = launch(Toy(str(work), 3), name="toy", folder=folder, settings=LOCAL, log=lines.append)
    assert again["job_id"] != result["job_id"] and read_job_record(folder)["job_id"] == again["job_id"]
    assert [step for _, step in _starts(work)] == [0, 3]


class Chatty(submitit.helpers.Checkpointable):
    """Prints a progress line to stdout and one to stderr, slowly enough for the launcher to poll between."""

    def __call__(self) -> str:
        print("step 1 loss 0.5", flush=True)
        time.sleep(0.5)
        print("step 2 warning", file=sys.stderr, flush=True)
        return "done"


def test_job_output_is_forwarded_to_the_launchers_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert launch(Chatty(), name="chatty", folder=tmp_path / "log", settings=LOCAL, log=lambda _: None) == "done"
    out = capfd.readouterr().out
    # each line once (offsets are followed), both of rank 0's logs
    assert out.count("step 1 loss 0.5") == 1 and out.count("step 2 warning") == 1, out


def test_multi_task_local_job_returns_rank_zero_result(tmp_path: Path, work: Path) -> None:
    settings = LaunchSettings(cluster="local", timeout_min=5, tasks_per_node=2, poll_seconds=0.1)
    result = launch(Toy(str(work), 2), name="toy", folder=tmp_path / "log", settings=settings, log=lambda _: None)
    record = read_job_record(tmp_path / "log")
    assert result["rank"] == 0 and record["tasks"] == 2
    assert Path(record["folder"], f"{record['job_id']}_1_result.pkl").exists()


def test_exception_in_another_rank_fails_the_call_and_stops_the_job(tmp_path: Path, work: Path) -> None:
    settings = LaunchSettings(cluster="local", timeout_min=5, tasks_per_node=2, poll_seconds=0.1)
    with pytest.raises(LaunchError, match="raised in task 1: ValueError: toy failure in rank 1"):
        launch(Toy(str(work), 600, 0.1, fail_at=0, fail_rank=1), name="toy", folder=tmp_path / "log",
               settings=settings, log=lambda _: None)
    job_id = read_job_record(tmp_path / "log")["job_id"]
    # Rank 0 alone would train for 60 s; on a loaded 2-core machine the cancellation can take several seconds.
    _wait_for(lambda: not _pid_running(int(job_id)), "the job to be cancelled", timeout=45)
    assert _step(work) < 600, "rank 0 should have been stopped, not left to train to the end"


def test_restarted_launcher_reattaches_to_the_running_local_job(tmp_path: Path, work: Path) -> None:
    folder, out = tmp_path / "log", tmp_path / "launcher.out"
    proc = _start_launcher(work, 30, 0.1, folder, out)
    record = _kill_launcher_once_running(proc, work, folder, out)
    job_id = record["job_id"]
    assert _pid_running(int(job_id)), "the local job should outlive the launcher that submitted it"

    lines: list[str] = []
    result = launch(Toy(str(work), 30, 0.1), name="toy", folder=folder, settings=LOCAL, log=lines.append)
    assert result["job_id"] == job_id
    assert any(f"re-attaching to job {job_id}" in line for line in lines), lines
    assert len(_starts(work)) == 1, "re-attaching must not start the toy a second time"
    record = read_job_record(folder)
    assert record["job_id"] == job_id and record["submissions"] == 1 and record["returned"] is True


def test_job_that_finished_while_no_launcher_waited_gives_its_result(tmp_path: Path, work: Path) -> None:
    folder, out = tmp_path / "log", tmp_path / "launcher.out"
    proc = _start_launcher(work, 8, 0.1, folder, out)
    job_id = _kill_launcher_once_running(proc, work, folder, out)["job_id"]
    _wait_for(lambda: not _pid_running(int(job_id)), "the orphaned local job to finish")

    lines: list[str] = []
    result = launch(Toy(str(work), 8, 0.1), name="toy", folder=folder, settings=LOCAL, log=lines.append)
    assert result["job_id"] == job_id
    assert any("finished while no launcher waited" in line for line in lines), lines
    assert not any("submitted job" in line for line in lines), lines
    assert len(_starts(work)) == 1 and read_job_record(folder)["submissions"] == 1


def _kill_first_task_at(work: Path, step: int) -> threading.Thread:
    """Preempt the job the hard way: SIGKILL its task process once the toy reached `step`."""

    def kill() -> None:
        _wait_for(lambda: _step(work) >= step, f"the toy to reach step {step}")
        os.kill(_starts(work)[0][0], signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_killed_job_is_resubmitted_and_resumes_from_its_checkpoint(tmp_path: Path, work: Path) -> None:
    folder = tmp_path / "log"
    killer = _kill_first_task_at(work, 4)
    lines: list[str] = []
    result = launch(Toy(str(work), 20, 0.1), name="toy", folder=folder, settings=LOCAL, log=lines.append)
    killer.join(timeout=5)
    (first_pid, first_step), (second_pid, second_step) = _starts(work)
    assert first_step == 0 and second_step >= 4, "the second job must resume from the checkpoint, not restart"
    record = read_job_record(folder)
    assert record["submissions"] == 2 and result["job_id"] == record["job_id"]
    assert [entry["job_id"] for entry in record["history"]] != [record["job_id"]] and len(record["history"]) == 1
    assert any("resubmitting (1/3)" in line for line in lines), lines
    assert _step(work) == 20


def test_launcher_gives_up_after_max_resubmissions(tmp_path: Path, work: Path) -> None:
    settings = LaunchSettings(cluster="local", timeout_min=5, max_resubmissions=0, poll_seconds=0.1)
    killer = _kill_first_task_at(work, 2)
    with pytest.raises(LaunchError, match="did not finish after 1 attempts") as info:
        launch(Toy(str(work), 20, 0.1), name="toy", folder=tmp_path / "log", settings=settings, log=lambda _: None)
    killer.join(timeout=5)
    assert len(_starts(work)) == 1
    assert info.value.log_path == Path(read_job_record(tmp_path / "log")["stderr"])


def test_exception_in_fn_raises_with_the_log_path(tmp_path: Path, work: Path) -> None:
    folder = tmp_path / "log"
    with pytest.raises(LaunchError) as info:
        launch(Toy(str(work), 5, 0.01, fail_at=2), name="toy", folder=folder, settings=LOCAL, log=lambda _: None)
    message = str(info.value)
    record = read_job_record(folder)
    assert "ValueError: toy failure at step 2" in message
    assert f"log: {record['stderr']}" in message and info.value.log_path == Path(record["stderr"])
    assert "Traceback" in message  # the stderr tail
    assert record["state"] == "FAILED" and record["submissions"] == 1 and len(_starts(work)) == 1


def test_debug_cluster_runs_in_process(tmp_path: Path, work: Path) -> None:
    settings = LaunchSettings(cluster="debug")
    result = launch(Toy(str(work), 2, 0.0), name="toy", folder=tmp_path / "log", settings=settings, log=lambda _: None)
    assert result["rank"] == 0 and _starts(work) == [(os.getpid(), 0)]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(LaunchError, match="toy failure at step 0") as info:
        launch(Toy(str(other), 2, 0.0, fail_at=0), name="toy", folder=tmp_path / "log2", settings=settings,
               log=lambda _: None)
    assert isinstance(info.value.__cause__, ValueError)
    assert read_job_record(tmp_path / "log2")["state"] == "FAILED"


def test_settings_from_config_names_a_bad_key() -> None:
    section = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["launch"]
    settings = LaunchSettings.from_config(section)
    assert settings.cluster == section["cluster"] and settings.max_resubmissions == section["max_resubmissions"]
    with pytest.raises(ConfigError, match=r"launch\.gpus_per_nod\b"):
        LaunchSettings.from_config({**section, "gpus_per_nod": 1})
    with pytest.raises(ConfigError, match=r"launch\.cluster"):
        LaunchSettings.from_config({"cluster": "kubernetes"})
    with pytest.raises(ConfigError, match=r"launch\.nodes"):
        LaunchSettings.from_config({"nodes": True})
    with pytest.raises(ConfigError, match=r"launch\.nodes"):
        LaunchSettings.from_config({"cluster": "local", "nodes": 2})


# ------------------------------------------------------------------------------------------------ SLURM


SLURM = LaunchSettings(cluster="slurm", timeout_min=5, gpus_per_node=1, slurm_account="testacct", poll_seconds=0.2)


def test_slurm_job_runs_and_is_accounted(tmp_path: Path, work: Path, slurm: None) -> None:
    lines: list[str] = []
    folder = tmp_path / "log"
    result = launch(Toy(str(work), 3), name="toy-slurm", folder=folder, settings=SLURM, log=lines.append)
    record = read_job_record(folder)
    job_id = record["job_id"]
    assert result == {"rank": 0, "job_id": job_id, "steps": 3}
    assert record["cluster"] == "slurm" and record["submissions"] == 1 and record["returned"] is True

    def accounted() -> bool:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,Account", "-j", job_id],
                             capture_output=True, text=True).stdout
        return f"{job_id}|COMPLETED|testacct" in out

    _wait_for(accounted, f"sacct to show job {job_id} COMPLETED under account testacct", timeout=20)
    assert "--gpus-per-node=1" in Path(record["folder"], f"{job_id}_submission.sh").read_text()


def _slurm_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def test_restarted_launcher_reattaches_to_the_running_slurm_job(tmp_path: Path, work: Path, slurm: None) -> None:
    folder, out = tmp_path / "log", tmp_path / "launcher.out"
    proc = _start_launcher(work, 30, 0.1, folder, out, settings="SLURM")
    job_id = _kill_launcher_once_running(proc, work, folder, out)["job_id"]
    assert _slurm_state(job_id) == "RUNNING"
    lines: list[str] = []
    result = launch(Toy(str(work), 30, 0.1), name="toy", folder=folder, settings=SLURM, log=lines.append)
    assert result["job_id"] == job_id and len(_starts(work)) == 1
    assert any(f"re-attaching to job {job_id} (slurm, RUNNING)" in line for line in lines), lines
    assert read_job_record(folder)["submissions"] == 1


def test_slurm_requeue_on_preemption_is_waited_for(tmp_path: Path, work: Path, slurm: None) -> None:
    """submitit's own requeue (USR2 -> checkpoint -> scontrol requeue) keeps the job id: no second job."""
    folder = tmp_path / "log"

    def preempt() -> None:
        _wait_for(lambda: _step(work) >= 3, "the toy to reach step 3")
        job_id = read_job_record(folder)["job_id"]
        subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)
        # a requeued job waits 2 minutes before it may start again; let it start at once
        _wait_for(lambda: _slurm_state(job_id) == "PENDING", "the job to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    lines: list[str] = []
    result = launch(Toy(str(work), 20, 0.1), name="toy", folder=folder, settings=SLURM, log=lines.append)
    thread.join(timeout=5)
    (_, first), (_, second) = _starts(work)
    assert first == 0 and second >= 3, "the requeued job must resume from its checkpoint"
    record = read_job_record(folder)
    # One submission and the same job id: the launcher waited for SLURM's requeue instead of resubmitting.
    # (Whether it logged RUNNING -> PENDING depends on when its squeue polls fell; not checked.)
    assert record["submissions"] == 1 and result["job_id"] == record["job_id"], lines


def test_cancelled_slurm_job_is_not_resubmitted(tmp_path: Path, work: Path, slurm: None) -> None:
    folder = tmp_path / "log"

    def cancel() -> None:
        _wait_for(lambda: _step(work) >= 2, "the toy to reach step 2")
        subprocess.run(["scancel", read_job_record(folder)["job_id"]], check=True)

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    with pytest.raises(LaunchError, match="was cancelled"):
        launch(Toy(str(work), 50, 0.1), name="toy", folder=folder, settings=SLURM, log=lambda _: None)
    thread.join(timeout=5)
    assert len(_starts(work)) == 1 and read_job_record(folder)["submissions"] == 1
