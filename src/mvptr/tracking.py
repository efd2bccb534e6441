"""MLflow conventions: where runs go, how they nest, and the tags and params every run carries.

Why: `mlflow ui` and `mvptr compare` can compare ablations only if every stage logs the same params (the full
flattened config) and the same tags (ablation, method, seed, stage, task, dataset, snakemake_rule, slurm_job_id, git
commit, config hash), and if runs are found the same way everywhere. MLflow records; it never schedules.

Layout: one experiment per study (`mvptr-<dataset>`); in it one parent run per (method, ablation, seed) (tag
`mvptr_parent=1`, name `method/ablation/seed<k>`, k the train_seed) and, under it, one child run per (stage, task)
(tag `mlflow.parentRunId`, name `method/ablation/seed<k>/stage/task`). A requeued job passes the run id it kept in its
checkpoint directory back to `open_run` and goes on logging into the same run.

MLflow's own conventions on top: every run carries the source tags (`mlflow.source.git.commit`, `.name`,
`.type` JOB, `mlflow.user`) and the prepared dataset as an input (name, digest = the hash in its folder name,
source = its path: the UI's Dataset column); the experiment is tagged `mlflow.experimentKind` =
`custom_model_development` (the UI opens "Training runs"). A parent carries its children's dataset input, the
headline metric of each finished task (`log_headline`) and an end time moved to its last child's end. A shared
stage one (one job for every ablation of a method) is reachable from each ablation that uses it: the stage-two
run and the ablation's parent carry `mvptr.stage1_run_id`, and the stage-one run `mvptr.used_by.<ablation>`
(`link_stage1`). `start_system_metrics(run_id)` runs MLflow's system-metrics monitor (CPU, memory, disk, network,
GPU) every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 5). Artifacts are logged after the rule's
outputs are written, and a store that is down then only warns (`log_files`); the pre-training loop keeps the
steps it logs while the store is down and sends them when it is back (`mvptr.train.tracker`).

Store: $MLFLOW_TRACKING_URI when set (a tracking server on a cluster), else a SQLite file
`results/mlflow.db` in the working directory, beside the other results (MLflow refuses a plain file store).
Artifacts of an embedded store go to `mlartifacts/` beside the database, not to ./mlruns.

Use:
    run_id = open_run(cfg, stage="pretrain", task="itm", run_id=saved_id)   # resumes saved_id if it exists
    log_metrics(run_id, {"loss": 0.7, "lr": 1e-4}, step=100)
    log_artifact(run_id, "loss.png")
    close_run(run_id)                       # or close_run(run_id, "FAILED")
    finish_child(cfg, run_id, headline={"retrieval_test_ir_r_at_1": 41.0})  # close, update the parent
    run_id = log_run(cfg, stage="concepts", task="concept_quality", metrics={"objects_f1": 0.98})  # all in one
    .venv/bin/mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import getpass
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mvptr.config import config_hash, dataset_keys, flatten, project_root
from mvptr.errors import ConfigError

if TYPE_CHECKING:  # mlflow is imported inside the functions so that `import mvptr` stays light
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
PARENT_TAG = "mvptr_parent"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests runs by it
PARENT_STAGE = "parent"
_IDENTITY_TAGS = ("method", "ablation", "seed", "stage", "task")  # what a resumed run must agree on with the caller
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the UI opens an experiment of this kind on "Training runs"
EXPERIMENT_KIND = "custom_model_development"
STAGE1_RUN_TAG = "mvptr.stage1_run_id"  # on a stage-two run and its ablation's parent: the stage one it used
USED_BY_TAG = "mvptr.used_by."  # + "<method>/<ablation>" on a stage-one run: the parent run id of each user
DEFAULT_SYSTEM_METRICS_INTERVAL = 5.0  # seconds; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides


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

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    # Two jobs opening a new SQLite store at once both run MLflow's schema migrations and one fails ("duplicate
    # column name"): this process's first open of a store, which creates or migrates it, is serialised.
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mc = MlflowClient(uri)
        mc.search_experiments(max_results=1)
    return mc


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


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "unknown"


def source_tags(stage: str) -> dict[str, str]:
    """MLflow's standard source tags: commit, entry point (the rule, else the stage), type JOB, user."""
    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags

    rule = os.environ.get("MVPTR_RULE")
    return {mlflow_tags.MLFLOW_GIT_COMMIT: git_commit(),
            mlflow_tags.MLFLOW_SOURCE_NAME: f"mvptr rule {rule}" if rule else f"mvptr {stage}",
            mlflow_tags.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB),
            mlflow_tags.MLFLOW_USER: _user()}


def run_tags(cfg: Mapping[str, Any], stage: str, task: str) -> dict[str, str]:
    tags = {
        **source_tags(stage),
        "ablation": str(cfg["ablation"]),
        "method": str(cfg["method"]["name"]),
        "seed": str(cfg["train_seed"]),
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
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # new, or made before the tag existed
        mc.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
    """The parent run of the (method, ablation, seed) in the study's experiment, created on first use; returns its id.

    Two jobs of one ablation may start at once and both create a parent: each then keeps the oldest parent
    (start time, then id) and deletes its own if that is not it, so all children end under one parent.
    """
    mc = mc or client()
    experiment_id = get_or_create_experiment(mc, experiment_name(cfg))
    method, ablation, seed = str(cfg["method"]["name"]), str(cfg["ablation"]), str(cfg["train_seed"])

    def parents() -> list[Run]:
        found = search_all_runs(mc, [experiment_id], f"tags.{PARENT_TAG} = '1'")
        found = [r for r in found if r.data.tags.get("ablation") == ablation
                 and r.data.tags.get("method") == method and r.data.tags.get("seed") == seed]
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    existing = parents()
    if existing:
        parent = existing[0].info.run_id
        # Source tags of the newest child's job (a parent made before they existed gets them too).
        _set_tags(mc, parent, {k: v for k, v in source_tags(PARENT_STAGE).items()
                               if existing[0].data.tags.get(k) != v})
        return parent
    tags = {**run_tags(cfg, PARENT_STAGE, "all"), PARENT_TAG: "1"}
    run = mc.create_run(experiment_id, tags=tags, run_name=f"{method}/{ablation}/seed{seed}")
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


def log_dataset(run_id: str, cfg: Mapping[str, Any], dataset: Path | str, context: str,
                mc: MlflowClient | None = None) -> None:
    """The prepared dataset as an input of the run: name, digest (the hash in its folder name), source (its
    path). MLflow keeps one input per (name, digest) and run, so logging it again on a resume adds nothing."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest = config_hash(cfg, dataset_keys(cfg), 8)
    source = json.dumps({"uri": Path(dataset).resolve().as_uri()})  # a LocalArtifactDatasetSource's JSON
    entry = DatasetInput(Dataset(str(cfg["dataset"]["name"]), digest, "local", source),
                         [InputTag(MLFLOW_DATASET_CONTEXT, context)])
    (mc or client()).log_inputs(run_id, datasets=[entry])


def open_run(cfg: Mapping[str, Any], *, stage: str, task: str, run_id: str | None = None,
             on_param_conflict: str = "raise", dataset: Path | str | None = None) -> str:
    """Resume `run_id` if the store has it (status RUNNING again), else start a child of the (method,
    ablation)'s parent; `dataset` (the prepared dataset's folder) is logged as an input of both.

    A resumed run must carry the same method, ablation, stage and task tags (else ResumeConflict). Params already
    logged with the same value are skipped; a changed value raises ResumeConflict naming the keys, or with
    on_param_conflict="warn" warns and keeps the logged value. Returns the run id to keep for a requeue.
    """
    if on_param_conflict not in ("raise", "warn"):
        raise ValueError(f"on_param_conflict must be 'raise' or 'warn', not {on_param_conflict!r}")
    mc = client()
    run = _existing_run(mc, run_id) if run_id else None
    if run is not None:
        opened = _resume(mc, run, cfg, stage, task, on_param_conflict)
        parent = run.data.tags.get(PARENT_RUN_ID_TAG)
    else:
        parent = parent_run(cfg, mc)
        experiment_id = get_or_create_experiment(mc, experiment_name(cfg))
        tags = {**run_tags(cfg, stage, task), PARENT_RUN_ID_TAG: parent}
        created = mc.create_run(experiment_id, tags=tags,
                                run_name=f"{cfg['method']['name']}/{cfg['ablation']}/seed{cfg['train_seed']}/{stage}/{task}")
        opened = created.info.run_id
        _log_params(mc, opened, run_params(cfg))
    if dataset is not None:
        context = "evaluation" if stage == "evaluate" else "training"
        for target in (opened, parent):
            if target:
                log_dataset(target, cfg, dataset, context, mc)
    return opened


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
    """Log every metric at `step` (at `timestamp_ms`, default now), in as few requests as MLflow allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
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


def log_files(run_id: str, files: list[Path], cfg: Mapping[str, Any] | None = None,
              dicts: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Log the rule's outputs `files` (already written), `cfg` as config.yaml and each of `dicts` (artifact
    name -> content, JSON or YAML by extension) as artifacts of the run. A store that is down or refuses only
    warns (on stderr) and returns False: the outputs are the record, the artifacts a copy."""
    mc = client()
    try:
        for path in files:
            mc.log_artifact(run_id, str(path))
        for name, content in {**({"config.yaml": cfg} if cfg is not None else {}), **(dicts or {})}.items():
            mc.log_dict(run_id, dict(content), name)
    except Exception as err:  # any failure of the store: the outputs stay, the rule succeeds
        print(f"warning: could not log artifacts to MLflow run {run_id} ({tracking_uri()}): "
              f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return False
    return True


def start_system_metrics(run_id: str | None) -> Any:
    """Start MLflow's system-metrics monitor (metrics `system/*`: CPU, memory, disk, network, GPU) on the run,
    sampling every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 5); a resumed run goes on from its last
    step. Returns the monitor (`.finish()` stops it; its thread is a daemon, so a crash never hangs on it), or
    None without a run."""
    if not run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=DEFAULT_SYSTEM_METRICS_INTERVAL,
                                   resume_logging=True, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def headline_metrics(task: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics of `task` (flat names, `mvptr.evaluate.finetune.flat_metrics`) that `mvptr compare` shows as
    its headline, named for a parent run: `<task>_<split>_..._<metric>` (e.g. retrieval_test_zero_shot_ir_r_at_1)."""
    from mvptr.headline import HEADLINE_METRICS

    out = {}
    for key, value in metrics.items():
        if any(fnmatch.fnmatchcase(f"{task}/{key}", pattern) for pattern in HEADLINE_METRICS):
            out[f"{task}/{key}".replace("/splits/", "/").replace("/", "_")] = value
    return out


def finish_child(cfg: Mapping[str, Any], run_id: str, status: str = "FINISHED",
                 headline: Mapping[str, float] | None = None) -> None:
    """End a child run; log `headline` metrics on its parent and move the parent's end time to now, so that
    the parent's duration spans its children."""
    close_run(run_id, status)
    mc = client()
    parent = mc.get_run(run_id).data.tags.get(PARENT_RUN_ID_TAG) or parent_run(cfg, mc)
    if headline:
        log_metrics(parent, headline, step=0)
    mc.set_terminated(parent, "FINISHED", end_time=int(time.time() * 1000))


def link_stage1(cfg: Mapping[str, Any], stage1_run_id: str, stage2_run_id: str | None = None) -> None:
    """Make a (possibly shared) stage-one run reachable from this ablation: tag the ablation's parent (and the
    stage-two run) `mvptr.stage1_run_id`, and the stage-one run `mvptr.used_by.<method>/<ablation>` = parent.
    One tag per user, so that two ablations linking at once never overwrite each other."""
    mc = client()
    parent = parent_run(cfg, mc)
    for run_id in (parent, stage2_run_id):
        if run_id:
            mc.set_tag(run_id, STAGE1_RUN_TAG, stage1_run_id)
    mc.set_tag(stage1_run_id, f"{USED_BY_TAG}{cfg['method']['name']}/{cfg['ablation']}", parent)


def log_run(cfg: Mapping[str, Any], *, stage: str, task: str, metrics: Mapping[str, float],
            step: int = 0) -> str:
    """One finished child run: tags, the flattened config as params, and `metrics`; returns the run id."""
    run_id = open_run(cfg, stage=stage, task=task)
    try:
        log_metrics(run_id, metrics, step)
    except BaseException:
        close_run(run_id, "FAILED")
        raise
    finish_child(cfg, run_id)
    return run_id
