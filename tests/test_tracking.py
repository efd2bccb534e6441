"""MLflow conventions of mvptr.tracking: a parent run per (method, ablation), a child per (stage, task), resuming.

Why: a requeued job must go on logging into its run (same id, params not logged twice), a changed config must
not silently be recorded under old params, and `mvptr compare` relies on the parent/child layout.
Each test has its own embedded SQLite store (MLFLOW_TRACKING_URI set per test).

Run: .venv/bin/python -m pytest tests/test_tracking.py
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from mvptr import tracking
from mvptr.config import flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_TAGS = {"ablation", "method", "seed", "stage", "task", "dataset", "snakemake_rule", "git_commit", "config_hash"}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (./mlruns)
    return uri


@pytest.fixture(scope="module")
def base_cfg() -> dict:
    return load_config(root=ROOT)


def with_ablation(cfg: dict, ablation: str, method: str | None = None, **top: object) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["ablation"] = ablation
    if method is not None:  # tracking reads only method.name (another method's layer need not exist)
        cfg["method"]["name"] = method
    cfg.update(top)
    return cfg


def run_name(run) -> str:  # noqa: ANN001
    return run.info.run_name or run.data.tags.get("mlflow.runName")


def all_runs(store: str, cfg: dict) -> list:
    mc = tracking.client(store)
    experiment = mc.get_experiment_by_name(tracking.experiment_name(cfg))
    return tracking.search_all_runs(mc, [experiment.experiment_id])


def test_parent_per_ablation_and_child_per_stage_task(store: str, base_cfg: dict) -> None:
    assert base_cfg["method"]["name"] == "mvptr"
    full, other = base_cfg, with_ablation(base_cfg, "no_concepts")
    ids = {
        ("full", "pretrain", "itm"): tracking.open_run(full, stage="pretrain", task="itm"),
        ("full", "evaluate", "retrieval"): tracking.open_run(full, stage="evaluate", task="retrieval"),
        ("no_concepts", "evaluate", "retrieval"): tracking.open_run(other, stage="evaluate", task="retrieval"),
    }
    ids[("full", "concepts", "concept_quality")] = tracking.log_run(full, stage="concepts", task="concept_quality",
                                                                    metrics={"objects_f1": 0.5})
    runs = all_runs(store, full)
    parents = {r.data.tags["ablation"]: r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == "1"}
    assert sorted(parents) == ["full", "no_concepts"]
    assert len(runs) == len(parents) + len(ids)  # exactly one parent per ablation, however many children
    by_id = {r.info.run_id: r for r in runs}
    for ablation, parent in parents.items():
        assert parent.data.tags["method"] == "mvptr" and run_name(parent) == f"mvptr/{ablation}/seed0"
    for (ablation, stage, task), run_id in ids.items():
        tags = by_id[run_id].data.tags
        assert tags[tracking.PARENT_RUN_ID_TAG] == parents[ablation].info.run_id
        assert (tags["method"], tags["ablation"], tags["stage"], tags["task"]) == ("mvptr", ablation, stage, task)
        assert run_name(by_id[run_id]) == f"mvptr/{ablation}/seed0/{stage}/{task}"
    expected_keys = set(flatten(full))
    for run in runs:
        assert REQUIRED_TAGS <= set(run.data.tags)
        assert set(run.data.params) == expected_keys  # the same keys on every run, parents included
    assert by_id[ids[("no_concepts", "evaluate", "retrieval")]].data.params["ablation"] == "no_concepts"
    concept_run = by_id[ids[("full", "concepts", "concept_quality")]]
    assert concept_run.info.status == "FINISHED" and concept_run.data.metrics == {"objects_f1": 0.5}
    assert by_id[ids[("full", "pretrain", "itm")]].info.status == "RUNNING"


def test_metrics_close_and_artifact(store: str, base_cfg: dict, tmp_path: Path) -> None:
    run_id = tracking.open_run(base_cfg, stage="pretrain", task="mlm")
    tracking.log_metrics(run_id, {"loss": 2.0, "lr": 1e-4}, step=1)
    tracking.log_metrics(run_id, {f"m{i}": float(i) for i in range(1500)}, step=2)  # more than one batch
    tracking.log_metrics(run_id, {"loss": 1.5}, step=3)
    png = tmp_path / "loss.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    tracking.log_artifact(run_id, png)
    tracking.close_run(run_id, "FAILED")
    mc = tracking.client(store)
    run = mc.get_run(run_id)
    assert run.info.status == "FAILED"
    assert [(m.step, m.value) for m in mc.get_metric_history(run_id, "loss")] == [(1, 2.0), (3, 1.5)]
    assert len(run.data.metrics) == 1502
    assert [a.path for a in mc.list_artifacts(run_id)] == ["loss.png"]
    # an embedded store keeps artifacts beside its database, not in the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "db" / "mlartifacts").as_uri())
    assert not (tmp_path / "cwd" / "mlruns").exists()
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.close_run(run_id, "DONE")


def test_resume_reuses_run_id_and_skips_logged_params(store: str, base_cfg: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = tracking.open_run(base_cfg, stage="pretrain", task="itm")
    tracking.log_metrics(run_id, {"loss": 3.0}, step=10)
    tracking.close_run(run_id, "KILLED")  # the job was preempted
    before = {r.info.run_id for r in all_runs(store, base_cfg)}

    mc = tracking.client(store)
    sent_params: list = []
    original = mc.log_batch

    def spy(run_id: str, metrics=(), params=(), tags=(), **kwargs):  # noqa: ANN001, ANN202
        sent_params.extend(params)
        return original(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(mc, "log_batch", spy)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the requeued job has another SLURM id
    assert tracking.open_run(base_cfg, stage="pretrain", task="itm", run_id=run_id) == run_id
    assert sent_params == []  # every param was already logged with the same value
    tracking.log_metrics(run_id, {"loss": 2.0}, step=20)
    assert {r.info.run_id for r in all_runs(store, base_cfg)} == before  # no new run, no new parent
    run = mc.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["slurm_job_id"] == "4242"
    assert set(run.data.params) == set(flatten(base_cfg))
    assert [(m.step, m.value) for m in mc.get_metric_history(run_id, "loss")] == [(10, 3.0), (20, 2.0)]


def test_changed_param_on_resume_is_reported(store: str, base_cfg: dict) -> None:
    run_id = tracking.open_run(base_cfg, stage="pretrain", task="itm")
    # (The seed would name another experiment: it shapes the dataset. `ablations` changes only a param.)
    changed = with_ablation(base_cfg, "full", ablations=["full"])
    logged, now = str(base_cfg["ablations"]), str(changed["ablations"])
    assert logged != now
    with pytest.raises(tracking.ResumeConflict, match=re.escape(f"ablations: logged {logged!r}, now {now!r}")):
        tracking.open_run(changed, stage="pretrain", task="itm", run_id=run_id)
    with pytest.warns(UserWarning, match="ablations"):
        assert tracking.open_run(changed, stage="pretrain", task="itm", run_id=run_id,
                                 on_param_conflict="warn") == run_id
    assert tracking.client(store).get_run(run_id).data.params["ablations"] == logged  # write-once


def test_resume_checks_identity_and_unknown_id_starts_a_new_run(store: str, base_cfg: dict) -> None:
    run_id = tracking.open_run(base_cfg, stage="pretrain", task="itm")
    with pytest.raises(tracking.ResumeConflict, match="task: run has 'itm', caller has 'mlm'"):
        tracking.open_run(base_cfg, stage="pretrain", task="mlm", run_id=run_id)
    with pytest.raises(tracking.ResumeConflict, match="ablation: run has 'full', caller has 'no_wpg'"):
        tracking.open_run(with_ablation(base_cfg, "no_wpg"), stage="pretrain", task="itm", run_id=run_id)
    fresh = tracking.open_run(base_cfg, stage="pretrain", task="itm", run_id="0" * 32)  # lost from the store
    assert fresh != run_id
    assert tracking.client(store).get_run(fresh).data.tags[tracking.PARENT_RUN_ID_TAG] == \
        tracking.parent_run(base_cfg)


def test_parent_is_found_by_tag_and_the_oldest_wins(store: str, base_cfg: dict) -> None:
    mc = tracking.client(store)
    experiment_id = tracking.get_or_create_experiment(mc, tracking.experiment_name(base_cfg))
    tags = {tracking.PARENT_TAG: "1", "method": "mvptr", "ablation": "full", "seed": "0"}
    older = mc.create_run(experiment_id, start_time=1_000, tags=tags).info.run_id  # e.g. two racing jobs
    mc.create_run(experiment_id, start_time=2_000, tags=tags)
    mc.create_run(experiment_id, start_time=500, tags={tracking.PARENT_TAG: "1", "method": "mvptr",
                                                       "ablation": "other", "seed": "0"})
    # the same (method, ablation) with another training seed, and older: another run's parent
    mc.create_run(experiment_id, start_time=200, tags={**tags, "seed": "1"})
    # the same ablation of another method, and older: not this run's parent
    mc.create_run(experiment_id, start_time=100, tags={tracking.PARENT_TAG: "1", "method": "simla",
                                                       "ablation": "full", "seed": "0"})
    child = tracking.open_run(base_cfg, stage="evaluate", task="vqa")
    assert mc.get_run(child).data.tags[tracking.PARENT_RUN_ID_TAG] == older


def test_same_ablation_of_two_methods_gets_two_parents(store: str, base_cfg: dict) -> None:
    mvptr, simla = base_cfg, with_ablation(base_cfg, "full", method="simla")
    ids = {
        ("mvptr", "evaluate", "retrieval"): tracking.open_run(mvptr, stage="evaluate", task="retrieval"),
        ("simla", "evaluate", "retrieval"): tracking.open_run(simla, stage="evaluate", task="retrieval"),
        ("simla", "pretrain", "itm"): tracking.open_run(simla, stage="pretrain", task="itm"),
    }
    runs = all_runs(store, mvptr)  # one experiment per study, whatever the method
    parents = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == "1"]
    by_method = {r.data.tags["method"]: r for r in parents}
    assert len(parents) == 2 and sorted(by_method) == ["mvptr", "simla"]
    assert {r.data.tags["ablation"] for r in parents} == {"full"}
    assert sorted(run_name(r) for r in parents) == ["mvptr/full/seed0", "simla/full/seed0"]
    assert tracking.parent_run(mvptr) == by_method["mvptr"].info.run_id
    assert tracking.parent_run(simla) == by_method["simla"].info.run_id
    assert len(runs) == len(parents) + len(ids)
    by_id = {r.info.run_id: r for r in runs}
    for (method, stage, task), run_id in ids.items():
        run = by_id[run_id]
        assert run.data.tags[tracking.PARENT_RUN_ID_TAG] == by_method[method].info.run_id
        assert (run.data.tags["method"], run.data.tags["ablation"]) == (method, "full")
        assert run.data.params["method.name"] == method
        assert run_name(run) == f"{method}/full/seed0/{stage}/{task}"


def test_resume_with_another_method_is_a_conflict(store: str, base_cfg: dict) -> None:
    run_id = tracking.open_run(base_cfg, stage="pretrain", task="itm")
    tracking.close_run(run_id, "KILLED")
    simla = with_ablation(base_cfg, "full", method="simla")
    # The identity check, not only the changed param method.name: warning on param conflicts must not let it pass.
    for on_param_conflict in ("raise", "warn"):
        with pytest.raises(tracking.ResumeConflict, match="method: run has 'mvptr', caller has 'simla'"):
            tracking.open_run(simla, stage="pretrain", task="itm", run_id=run_id,
                              on_param_conflict=on_param_conflict)
    run = tracking.client(store).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["method"] == "mvptr"  # left as it was
    # and nothing started in its place: still the one run and mvptr's parent
    assert {r.info.run_id for r in all_runs(store, base_cfg)} == {run_id, tracking.parent_run(base_cfg)}
