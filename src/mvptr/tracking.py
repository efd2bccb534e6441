"""MLflow conventions: where runs go, how they nest, and the tags and params every run carries.

Why: `mlflow ui` and `mvptr compare` can compare ablations only if every stage logs the same params (the full
flattened config) and the same tags (ablation, method, stage, task, dataset, snakemake_rule, slurm_job_id, git
commit, config hash), and if runs are found the same way everywhere. MLflow records; it never schedules.

Layout: one experiment per study (`mvptr-<dataset>`); in it one parent run per (method, ablation) (tag
`mvptr_parent=1`, name `method/ablation`) and, under it, one child run per (stage, task) (tag
`mlflow.parentRunId`, name `method/ablation/stage/task`). A requeued job passes the run id it kept in its
checkpoint directory back to `open_run` and goes on logging into the same run.

Store: $MLFLOW_TRACKING_URI when set (a tracking server on a cluster), else a SQLite file
`results/mlflow.db` in the working directory, beside the other results (MLflow refuses a plain file store).
Artifacts of an embedded store go to `mlartifacts/` beside the database, not to ./mlruns.

Use:
    run_id = open_run(cfg, stage="pretrain", task="itm", run_id=saved_id)   # resumes saved_id if it exists
    log_metrics(run_id, {"loss": 0.7, "lr": 1e-4}, step=100)
    log_artifact(run_id, "loss.png")
    close_run(run_id)                       # or close_run(run_id, "FAILED")
    run_id = log_run(cfg, stage="concepts", task="concept_quality", metrics={"objects_f1": 0.98})  # all in one
    .venv/bin/mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mvptr.config import config_hash, flatten, project_root
from mvptr.errors import ConfigError

if TYPE_CHECKING:  # mlflow is imported inside the functions so that `import mvptr` stays light
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
PARENT_TAG = "mvptr_parent"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests runs by it
PARENT_STAGE = "parent"
_IDENTITY_TAGS = ("method", "ablation", "stage", "task")  # what a resumed run must agree on with the caller


class ResumeConflict(ConfigError):
    """A run to resume was logged by another method/ablation/stage/task, or with other config values (params)."""


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    results = Path("results").resolve()
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results / 'mlflow.db'}"


@functools.lru_cache(maxsize=8)
def _cached_client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def client(uri: str | None = None) -> MlflowClient:
    """One MlflowClient per store, reused: a trainer logs every few steps and a new client reopens the store."""
    return _cached_client(uri or tracking_uri())


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags(cfg: Mapping[str, Any], stage: str, task: str) -> dict[str, str]:
    tags = {
        "ablation": str(cfg["ablation"]),
        "method": str(cfg["method"]["name"]),
        "stage": stage,
        "task": task,
        "dataset": str(cfg["dataset"]["name"]),
        "snakemake_rule": os.environ.get("MVPTR_RULE", "none"),
        "git_commit": git_commit(),
        "config_hash": config_hash(cfg),
    }
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def run_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The full flattened config as MLflow params (strings): the same keys on every run."""
    return {k: str(v) for k, v in sorted(flatten(cfg).items())}


def experiment_name(cfg: Mapping[str, Any]) -> str:
    """One experiment per study: per prepared dataset (`mvptr-synthetic-<hash>`), so that runs on another world
    size or seed are never compared with these."""
    from mvptr.config import dataset_dir

    return f"mvptr-{dataset_dir(cfg).name}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded `sqlite:///` store; None for a server or an in-memory database."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path == "/:memory:":
        return None
    return Path(unquote(parsed.path[1:]))  # sqlite:///rel.db is relative, sqlite:////abs.db absolute


def _artifact_location(uri: str, name: str) -> str | None:
    """For an embedded SQLite store, `mlartifacts/<experiment>` beside the database; a server chooses its own."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "mlartifacts" / name).resolve().as_uri()


def get_or_create_experiment(mc: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = mc.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mc.create_experiment(name, artifact_location=_artifact_location(mc.tracking_uri, name))
        except MlflowException as err:  # another job created it between our look-up and our create
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mc.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise ConfigError(f"MLflow experiment {name!r} in {mc.tracking_uri} is deleted: restore it "
                          f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or remove it "
                          "for good (`mlflow gc`) before logging to it")
    return experiment.experiment_id


def search_all_runs(mc: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every active run matching the filter, across pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = mc.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log_params(mc: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mc.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def _set_tags(mc: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in tags.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mc.log_batch(run_id, tags=items[start:start + MAX_PARAMS_PER_BATCH])


def parent_run(cfg: Mapping[str, Any], mc: MlflowClient | None = None) -> str:
    """The parent run of the (method, ablation) in the study's experiment, created on first use; returns its id.

    Two jobs of one ablation may start at once and both create a parent: each then keeps the oldest parent
    (start time, then id) and deletes its own if that is not it, so all children end under one parent.
    """
    mc = mc or client()
    experiment_id = get_or_create_experiment(mc, experiment_name(cfg))
    method, ablation = str(cfg["method"]["name"]), str(cfg["ablation"])

    def parents() -> list[Run]:
        found = search_all_runs(mc, [experiment_id], f"tags.{PARENT_TAG} = '1'")
        found = [r for r in found if r.data.tags.get("ablation") == ablation
                 and r.data.tags.get("method") == method]
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    existing = parents()
    if existing:
        return existing[0].info.run_id
    tags = {**run_tags(cfg, PARENT_STAGE, "all"), PARENT_TAG: "1"}
    run = mc.create_run(experiment_id, tags=tags, run_name=f"{method}/{ablation}")
    own = run.info.run_id
    _log_params(mc, own, run_params(cfg))
    # A parent holds no work of its own; marking it finished keeps the UI from showing it as running forever.
    mc.set_terminated(own, "FINISHED")
    chosen = parents()[0].info.run_id
    if chosen != own:
        mc.delete_run(own)
    return chosen


def _existing_run(mc: MlflowClient, run_id: str) -> Run | None:
    from mlflow.exceptions import MlflowException

    try:
        run = mc.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _resume(mc: MlflowClient, run: Run, cfg: Mapping[str, Any], stage: str, task: str,
            on_param_conflict: str) -> str:
    run_id = run.info.run_id
    tags = run_tags(cfg, stage, task)
    wrong = [f"{k}: run has {run.data.tags.get(k)!r}, caller has {tags[k]!r}" for k in _IDENTITY_TAGS
             if run.data.tags.get(k) != tags[k]]
    experiment = mc.get_experiment(run.info.experiment_id).name
    if experiment != experiment_name(cfg):
        wrong.append(f"experiment: run is in {experiment!r}, caller logs to {experiment_name(cfg)!r}")
    if wrong:
        raise ResumeConflict(f"cannot resume MLflow run {run_id}: it belongs to another run; " + "; ".join(wrong))
    params = run_params(cfg)
    logged = run.data.params
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    if changed:
        # MLflow params are write-once: the run keeps the values it started with.
        listing = ", ".join(f"{k}: logged {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
        message = f"MLflow run {run_id} was started with other config values ({listing})"
        if on_param_conflict == "raise":
            raise ResumeConflict(message + "; start a new run (no run id) or restore the config")
        warnings.warn(message + "; the run keeps the logged values", stacklevel=3)
    _log_params(mc, run_id, {k: v for k, v in params.items() if k not in logged})  # keys new since the start
    # Tags that may differ on a requeue (SLURM job id, rule, commit) are updated; params are not.
    _set_tags(mc, run_id, {k: v for k, v in tags.items() if run.data.tags.get(k) != v})
    if run.info.status != "RUNNING":
        mc.update_run(run_id, status="RUNNING")
    return run_id


def open_run(cfg: Mapping[str, Any], *, stage: str, task: str, run_id: str | None = None,
             on_param_conflict: str = "raise") -> str:
    """Resume `run_id` if the store has it (status RUNNING again), else start a child of the (method,
    ablation)'s parent.

    A resumed run must carry the same method, ablation, stage and task tags (else ResumeConflict). Params already
    logged with the same value are skipped; a changed value raises ResumeConflict naming the keys, or with
    on_param_conflict="warn" warns and keeps the logged value. Returns the run id to keep for a requeue.
    """
    if on_param_conflict not in ("raise", "warn"):
        raise ValueError(f"on_param_conflict must be 'raise' or 'warn', not {on_param_conflict!r}")
    mc = client()
    if run_id:
        run = _existing_run(mc, run_id)
        if run is not None:
            return _resume(mc, run, cfg, stage, task, on_param_conflict)
    parent = parent_run(cfg, mc)
    experiment_id = get_or_create_experiment(mc, experiment_name(cfg))
    tags = {**run_tags(cfg, stage, task), PARENT_RUN_ID_TAG: parent}
    run = mc.create_run(experiment_id, tags=tags,
                        run_name=f"{cfg['method']['name']}/{cfg['ablation']}/{stage}/{task}")
    _log_params(mc, run.info.run_id, run_params(cfg))
    return run.info.run_id


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log every metric at `step`, in as few requests as MLflow allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())]
    mc = client()
    for start in range(0, len(items), MAX_METRICS_PER_BATCH):
        mc.log_batch(run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])


def close_run(run_id: str, status: str = "FINISHED") -> None:
    """End the run: FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"close_run status must be FINISHED, FAILED or KILLED, not {status!r}")
    client().set_terminated(run_id, status)


def log_artifact(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    """Upload a file (e.g. the loss-curve PNG) or a folder to the run's artifacts."""
    client().log_artifact(run_id, str(path), artifact_path)


def log_run(cfg: Mapping[str, Any], *, stage: str, task: str, metrics: Mapping[str, float],
            step: int = 0) -> str:
    """One finished child run: tags, the flattened config as params, and `metrics`; returns the run id."""
    run_id = open_run(cfg, stage=stage, task=task)
    try:
        log_metrics(run_id, metrics, step)
    except BaseException:
        close_run(run_id, "FAILED")
        raise
    close_run(run_id)
    return run_id
