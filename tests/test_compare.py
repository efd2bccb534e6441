"""`mvptr compare` against a real `mlflow server` on 127.0.0.1 and against the embedded SQLite store.

Why: the summary is the study's result; it must read back exactly the numbers the runs logged (final step of
the latest finished evaluate run per (method, ablation) and task), keep methods that share an ablation name
apart, ignore other stages and unfinished runs, and behave the same on a tracking server (the cluster) as on
results/mlflow.db. Runs are logged through mvptr.tracking.

Run: .venv/bin/python -m pytest tests/test_compare.py      (starts an `mlflow server`, ~30 s)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow_server import mlflow_server  # noqa: F401 (a fixture)
from PIL import Image

from mvptr import tracking
from mvptr.cli import main
from mvptr.compare import summary_table
from mvptr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
METHOD = "mvptr"  # the method of the default config, which log_study logs
# Names chosen so that plain alphabetical order would not put `full` first.
ABLATIONS = ["a_no_concepts", "full", "z_no_wpg"]
# Final values per (ablation, task); each run also logs an earlier step with other values.
EXPECTED = {
    ("full", "retrieval"): {"r1": 0.8125, "r5": 0.95},
    ("full", "vqa"): {"acc": 0.7},
    ("a_no_concepts", "retrieval"): {"r1": 0.6, "r5": 0.9},
    ("a_no_concepts", "vqa"): {"acc": 0.55},
    ("z_no_wpg", "retrieval"): {"r1": 0.701, "r5": 0.925},
    ("z_no_wpg", "vqa"): {"acc": 0.125},
}


@pytest.fixture(params=["server", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def study(request: pytest.FixtureRequest, base_cfg: dict) -> dict:
    """The config of the study; one server serves several tests, so each gets its own dataset name (experiment)."""
    cfg = copy.deepcopy(base_cfg)
    cfg["dataset"]["name"] = "synthetic_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    return cfg


def cfg_for(base: dict, ablation: str, method: str = METHOD) -> dict:
    cfg = copy.deepcopy(base)
    cfg["ablation"] = ablation
    cfg["method"]["name"] = method  # tracking reads only the name (another method's layer need not exist)
    return cfg


def log_results(base: dict, results: dict[tuple[str, str, str], dict[str, float]]) -> None:
    """One finished evaluate run per (method, ablation, task) with these metrics."""
    for (method, ablation, task), metrics in results.items():
        tracking.log_run(cfg_for(base, ablation, method), stage="evaluate", task=task, metrics=metrics)


def printed_json(capsys: pytest.CaptureFixture) -> dict:
    """The JSON line `mvptr compare` printed last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "ablations.csv", index_col=["method", "ablation"])


def log_study(base: dict) -> None:
    """The runs of a small study: what compare must read, and what it must leave out."""
    for (ablation, task), final in EXPECTED.items():
        cfg = cfg_for(base, ablation)
        # an older finished evaluation of the same (ablation, task): superseded by the one below
        tracking.log_run(cfg, stage="evaluate", task=task, metrics={k: v + 10 for k, v in final.items()})
        run_id = tracking.open_run(cfg, stage="evaluate", task=task)
        tracking.log_metrics(run_id, final, step=5)
        tracking.log_metrics(run_id, {k: v - 1 for k, v in final.items()}, step=2)  # logged later, earlier step
        tracking.close_run(run_id)
        # pretraining of the same ablation: another stage, must not appear
        tracking.log_run(cfg, stage="pretrain", task="itm", metrics={"loss": 1.25})
    # an unfinished (still running) and a failed newer evaluation: must not replace the finished values
    running = tracking.open_run(cfg_for(base, "full"), stage="evaluate", task="vqa")
    tracking.log_metrics(running, {"acc": 99.0}, step=9)
    failed = tracking.open_run(cfg_for(base, "z_no_wpg"), stage="evaluate", task="retrieval")
    tracking.log_metrics(failed, {"r1": -5.0, "r5": -5.0}, step=9)
    tracking.close_run(failed, "FAILED")
    # a finished evaluate run outside the parent/child layout (as runs were logged before): not a result either
    mc = tracking.client()
    experiment_id = mc.get_experiment_by_name(tracking.experiment_name(base)).experiment_id
    loose = mc.create_run(experiment_id, tags={**tracking.run_tags(cfg_for(base, "full"), "evaluate", "vqa")})
    tracking.log_metrics(loose.info.run_id, {"acc": 42.0}, step=99)
    tracking.close_run(loose.info.run_id)


def run_compare(*argv: str) -> None:
    """`mvptr compare ...` in this process, as the command runs it: a bad input exits (SystemExit) with code 2."""
    code = main(["compare", *argv])
    if code:
        raise SystemExit(code)


@pytest.fixture(scope="module")
def base_cfg() -> dict:
    return load_config(root=ROOT)


def test_compare_writes_csv_md_and_charts(store: str, study: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    log_study(study)
    experiment = tracking.experiment_name(study)
    out = tmp_path / "summary"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out), "--metrics", "*")

    rows = [(METHOD, ablation) for ablation in ["full", "a_no_concepts", "z_no_wpg"]]
    assert (out / "ablations.csv").read_text().splitlines()[0] == "method,ablation,retrieval/r1,retrieval/r5,vqa/acc"
    table = read_summary(out)
    assert list(table.index) == rows
    assert list(table.columns) == ["retrieval/r1", "retrieval/r5", "vqa/acc"]  # no pretrain metric
    for (ablation, task), final in EXPECTED.items():
        for metric, value in final.items():
            assert table.loc[(METHOD, ablation), f"{task}/{metric}"] == value, (ablation, task, metric)
    metrics = json.loads((out / "ablations.json").read_text())
    assert sorted(metrics) == ["mvptr/a_no_concepts", "mvptr/full", "mvptr/z_no_wpg"]  # sorted keys (DVC metrics)
    assert metrics["mvptr/full"] == {"retrieval/r1": 0.8125, "retrieval/r5": 0.95, "vqa/acc": 0.7}

    md = (out / "ablations.md").read_text().splitlines()
    assert md[0] == "| method | ablation | retrieval/r1 | retrieval/r5 | vqa/acc |"
    assert set(md[1]) <= set("|-: ") and md[1].count("|") == 6
    assert md[1].split("|")[1:3] == [" --- ", " --- "]  # the two key columns left-aligned, metrics right
    assert [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in md[2:]] == rows
    assert md[2] == "| mvptr | full | 0.8125 | 0.95 | 0.7 |"

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["retrieval.png", "vqa.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            image.verify()
    assert not list(out.glob("*.tmp-*"))  # atomic writes leave no temporary files behind
    printed = printed_json(capsys)
    assert printed["rows"] == ["mvptr/full", "mvptr/a_no_concepts", "mvptr/z_no_wpg"] and printed["columns"] == 3
    assert any(path.endswith("retrieval.png") for path in printed["written"])

    # only some ablations, asked for out of order: still `full` first
    only = tmp_path / "only"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(only),
                "--ablations", "z_no_wpg", "full", "--metrics", "*")
    assert list(read_summary(only).index) == [(METHOD, "full"), (METHOD, "z_no_wpg")]

    # only the columns matching the patterns (the default keeps each downstream task's headline metrics)
    picked = tmp_path / "picked"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(picked),
                "--metrics", "retrieval/r1", "vqa/*")
    assert list(read_summary(picked).columns) == ["retrieval/r1", "vqa/acc"]

    # the Python entry point gives the same table; --stage pretrain reads the other stage instead
    frame = summary_table(tracking.client(store), experiment, ["evaluate"])
    assert list(frame.index.names) == ["method", "ablation"]
    pd.testing.assert_frame_equal(frame, table, check_exact=True)
    pretrain = summary_table(tracking.client(store), experiment, ["pretrain"])
    assert list(pretrain.columns) == ["itm/loss"] and (pretrain["itm/loss"] == 1.25).all()


def test_compare_without_matching_runs_fails_clearly(store: str, study: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    tracking.log_run(cfg_for(study, "full"), stage="pretrain", task="itm", metrics={"loss": 1.0})
    experiment = tracking.experiment_name(study)
    out = tmp_path / "summary"
    with pytest.raises(SystemExit) as exit_info:
        run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out),
                    "--stage", "evaluate", "finetune")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert experiment in err and "'evaluate' or 'finetune'" in err
    assert not out.exists()
    # a run logged only under another method (or another ablation) is no result of the run asked for
    log_results(study, {("simla", "full", "vqa"): {"acc": 0.5}, (METHOD, "joint", "vqa"): {"acc": 0.5}})
    with pytest.raises(SystemExit) as exit_info:
        run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out),
                    "--runs", "mvptr/full")
    assert exit_info.value.code == 2 and "for runs mvptr/full" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out),
                    "--methods", "albef")
    assert exit_info.value.code == 2 and "for methods albef" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # not of the form method/ablation: argparse's usage error
        run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out), "--runs", "full")
    assert exit_info.value.code == 2 and "method/ablation" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        run_compare("--tracking-uri", store, "--experiment", "no-such-study", "--out-dir", str(out))
    assert "no-such-study" in capsys.readouterr().err
    missing_db = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(SystemExit):
        run_compare("--tracking-uri", f"sqlite:///{missing_db}", "--experiment", experiment, "--out-dir", str(out))
    assert "no MLflow store at" in capsys.readouterr().err and not missing_db.parent.exists()  # nothing created


def test_two_methods_with_one_ablation_name_are_two_rows(store: str, study: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    results = {(METHOD, "full", "retrieval"): {"r1": 0.75}, (METHOD, "full", "vqa"): {"acc": 0.5},
               ("simla", "full", "retrieval"): {"r1": 0.625}, ("simla", "full", "vqa"): {"acc": 0.25},
               (METHOD, "no_wpg", "vqa"): {"acc": 0.375}}
    log_results(study, results)
    mc = tracking.client(store)
    experiment = tracking.experiment_name(study)
    runs = tracking.search_all_runs(mc, [mc.get_experiment_by_name(experiment).experiment_id])
    parents = {(r.data.tags["method"], r.data.tags["ablation"]): r.info.run_id for r in runs
               if r.data.tags.get(tracking.PARENT_TAG) == "1"}
    assert sorted(parents) == [(METHOD, "full"), (METHOD, "no_wpg"), ("simla", "full")]  # one parent each
    for run in runs:
        if tracking.PARENT_RUN_ID_TAG in run.data.tags:
            assert run.data.tags[tracking.PARENT_RUN_ID_TAG] == \
                parents[(run.data.tags["method"], run.data.tags["ablation"])]

    out = tmp_path / "summary"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out), "--metrics", "*")
    assert printed_json(capsys)["rows"] == ["mvptr/full", "mvptr/no_wpg", "simla/full"]
    assert (out / "ablations.csv").read_text().splitlines() == [
        "method,ablation,retrieval/r1,vqa/acc",
        "mvptr,full,0.75,0.5",
        "mvptr,no_wpg,,0.375",
        "simla,full,0.625,0.25",
    ]
    md = (out / "ablations.md").read_text().splitlines()
    assert md[0] == "| method | ablation | retrieval/r1 | vqa/acc |"
    assert md[2:] == ["| mvptr | full | 0.75 | 0.5 |", "| mvptr | no_wpg | n/a | 0.375 |",
                      "| simla | full | 0.625 | 0.25 |"]
    assert json.loads((out / "ablations.json").read_text()) == {
        "mvptr/full": {"retrieval/r1": 0.75, "vqa/acc": 0.5}, "mvptr/no_wpg": {"vqa/acc": 0.375},
        "simla/full": {"retrieval/r1": 0.625, "vqa/acc": 0.25}}
    table = summary_table(mc, experiment, ["evaluate"])
    assert table.loc[("simla", "full"), "vqa/acc"] == 0.25 and table.loc[(METHOD, "full"), "vqa/acc"] == 0.5


def test_methods_filter_and_order_the_rows(store: str, study: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    log_results(study, {("simla", "a_other", "vqa"): {"acc": 0.125}, ("simla", "full", "vqa"): {"acc": 0.25},
                        (METHOD, "full", "vqa"): {"acc": 0.5}, (METHOD, "joint", "vqa"): {"acc": 0.625},
                        ("albef", "full", "vqa"): {"acc": 0.75}})
    experiment = tracking.experiment_name(study)
    everything = tmp_path / "all"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(everything), "--metrics", "*")
    # no --methods: methods alphabetical, `full` first within each
    assert printed_json(capsys)["rows"] == ["albef/full", "mvptr/full", "mvptr/joint", "simla/full", "simla/a_other"]

    picked = tmp_path / "picked"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(picked), "--metrics", "*",
                "--methods", "simla", "mvptr")
    assert printed_json(capsys)["rows"] == ["simla/full", "simla/a_other", "mvptr/full", "mvptr/joint"]
    table = read_summary(picked)
    assert list(table.index) == [("simla", "full"), ("simla", "a_other"), (METHOD, "full"), (METHOD, "joint")]
    assert list(table["vqa/acc"]) == [0.25, 0.125, 0.5, 0.625]
    md = (picked / "ablations.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in md[2:]] == ["simla", "simla", "mvptr", "mvptr"]

    # with --ablations too: both filters apply, the order stays that of --methods
    frame = summary_table(tracking.client(store), experiment, ["evaluate"], ablations=["full"],
                          methods=["simla", "albef"])
    assert list(frame.index) == [("simla", "full"), ("albef", "full")]


def test_runs_asked_for_without_results_get_an_na_row(store: str, study: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # simla has no_wpg results, mvptr has none: the gap is (mvptr, no_wpg), not the ablation no_wpg
    log_results(study, {(METHOD, "full", "vqa"): {"acc": 0.5}, ("simla", "full", "vqa"): {"acc": 0.25},
                        ("simla", "no_wpg", "vqa"): {"acc": 0.125}, (METHOD, "joint", "vqa"): {"acc": 0.625}})
    experiment = tracking.experiment_name(study)
    out = tmp_path / "summary"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(out), "--metrics", "*",
                "--runs", "simla/full", "mvptr/no_wpg", "mvptr/full")
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["rows"] == ["mvptr/full", "mvptr/no_wpg", "simla/full"]
    assert "warning: no finished runs for mvptr/no_wpg" in captured.err and "simla/no_wpg" not in captured.err
    assert (out / "ablations.csv").read_text().splitlines() == [
        "method,ablation,vqa/acc", "mvptr,full,0.5", "mvptr,no_wpg,", "simla,full,0.25"]
    md = (out / "ablations.md").read_text().splitlines()
    assert md[2:] == ["| mvptr | full | 0.5 |", "| mvptr | no_wpg | n/a |", "| simla | full | 0.25 |"]
    assert json.loads((out / "ablations.json").read_text()) == {
        "mvptr/full": {"vqa/acc": 0.5}, "mvptr/no_wpg": {}, "simla/full": {"vqa/acc": 0.25}}

    # --methods orders them; a requested run that --methods leaves out gets no row at all (not a false n/a)
    ordered = tmp_path / "ordered"
    run_compare("--tracking-uri", store, "--experiment", experiment, "--out-dir", str(ordered), "--metrics", "*",
                "--runs", "simla/full", "mvptr/no_wpg", "mvptr/full", "--methods", "simla", "mvptr")
    assert printed_json(capsys)["rows"] == ["simla/full", "mvptr/full", "mvptr/no_wpg"]
    table = summary_table(tracking.client(store), experiment, ["evaluate"], methods=[METHOD],
                          runs=[("simla", "full"), (METHOD, "full")])
    assert list(table.index) == [(METHOD, "full")]
    table = summary_table(tracking.client(store), experiment, ["evaluate"], ablations=["full"],
                          runs=[("simla", "no_wpg"), (METHOD, "full")])
    assert list(table.index) == [(METHOD, "full")]
    table = summary_table(tracking.client(store), experiment, ["evaluate"],
                          runs=[("simla", "no_wpg"), (METHOD, "no_wpg"), (METHOD, "full")])
    assert list(table.index) == [(METHOD, "full"), (METHOD, "no_wpg"), ("simla", "no_wpg")]
    assert math.isnan(table.loc[(METHOD, "no_wpg"), "vqa/acc"]) and table.loc[("simla", "no_wpg"), "vqa/acc"] == 0.125
