"""MLflow conventions: where runs go, and the tags and params every run carries.

Why: `mlflow ui` can compare ablations only if every stage logs the same params (the full flattened
config) and the same tags (ablation, method, stage, task, dataset, snakemake_rule, slurm_job_id, git
commit, config hash). MLflow records; it never schedules.

Store: $MLFLOW_TRACKING_URI when set (a tracking server on a cluster), else a SQLite file
`results/mlflow.db` in the working directory, beside the other results (MLflow refuses a plain file store).

Use:
    run_id = log_run(cfg, stage="concepts", task="concept_quality", metrics={"objects_f1": 0.98})
    .venv/bin/mlflow ui --backend-store-uri sqlite:///results/mlflow.db
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvptr.config import config_hash, flatten, project_root

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    results = Path("results").resolve()
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results / 'mlflow.db'}"


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


def experiment_name(cfg: Mapping[str, Any]) -> str:
    return f"mvptr-{cfg['dataset']['name']}"


def log_run(cfg: Mapping[str, Any], *, stage: str, task: str, metrics: Mapping[str, float],
            step: int = 0) -> str:
    """One finished run: tags, the flattened config as params, and `metrics`; returns the run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    name = experiment_name(cfg)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, tags=run_tags(cfg, stage, task), run_name=f"{cfg['ablation']}/{stage}/{task}")
    run_id = run.info.run_id
    params = [Param(k, str(v)) for k, v in sorted(flatten(cfg).items())]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(metrics.items())])
    client.set_terminated(run_id)
    return run_id
