"""The `mvptr` command line for a user: a help listing every command, --version, and bad input as one line
`mvptr: error: ...` with exit status 2, checked before any work (no job submitted, nothing written); the
summary built from evaluation JSON files alone, and its narrow headline table.

Run: .venv/bin/python -m pytest -q tests/test_cli.py      (~20 s)
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from mvptr import tracking
from mvptr.cli import build_parser, commands, main
from mvptr.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("mvptr: error: "), err
    return err.strip()


def test_help_lists_every_command_once(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    groups = build_parser()._subparsers._group_actions[0]
    listed = commands(groups)
    assert len(listed) == len({name for name, _ in listed}) >= 19
    for name in ["data synth", "pretrain stage", "evaluate run", "dvc write", "compare", "estimate",
                 "import-checkpoint", "config show"]:
        assert name in dict(listed)
    for name, what in listed:
        assert what, name
        assert sum(1 for line in out if line.strip().startswith(name + " ") and line.endswith(what)) == 1, name
    assert "COMMAND_MODULES" not in "\n".join(out)  # the developers' docstring is not the help


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"mvptr {importlib.metadata.version('mvptr')}"


def test_synth_too_few_images_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = one_line_error(capsys, "data", "synth", "--num-images", "3", "--out", str(tmp_path / "w"))
    assert err == "mvptr: error: --num-images 3: must be at least 10"
    assert not (tmp_path / "w").exists()


def test_compare_key_value_is_an_override(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    # seed=3 is an override, not an ablation; a bad override names its key
    err = one_line_error(capsys, "compare", "--evaluations", str(tmp_path / "m/full/seed0/evaluate/vqa.json"),
                         "--ablations", "full", "nosuchkey=3", "--out-dir", str(tmp_path / "s"))
    assert "nosuchkey" in err and "ablation" not in err.split("nosuchkey")[0]
    err = one_line_error(capsys, "compare", "--evaluations", str(tmp_path / "m/full/seed0/evaluate/vqa.json"),
                         "--ablations", "full", "seed=3", "--out-dir", str(tmp_path / "s"))
    assert err == f"mvptr: error: --evaluations {tmp_path / 'm/full/seed0/evaluate/vqa.json'}: no such file"


@pytest.mark.parametrize("argv", [["pretrain", "stage", "--stage", "1", "--ckpt-dir", "{tmp}/ck", "--out", "{tmp}/o"],
                                  ["evaluate", "run", "--task", "vqa", "--weights", "{tmp}/w.safetensors",
                                   "--out", "{tmp}/o.json"]])
def test_missing_inputs_fail_before_a_job(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str]) -> None:
    job_dir = tmp_path / "job"
    (tmp_path / "w.safetensors").write_bytes(b"")  # present: the missing dataset is what must be reported
    (tmp_path / "c.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = one_line_error(capsys, *argv, "--dataset", str(tmp_path / "nodata"), "--concepts", str(tmp_path / "c.json"),
                         "--vocab", str(tmp_path / "v.json"), "--regions", str(tmp_path / "r"),
                         "--job-dir", str(job_dir), "--root", str(ROOT))
    assert err == f"mvptr: error: --dataset {tmp_path / 'nodata'}: no such folder"
    (tmp_path / "nodata").mkdir()
    err = one_line_error(capsys, *argv, "--dataset", str(tmp_path / "nodata"), "--concepts", str(tmp_path / "c.json"),
                         "--vocab", str(tmp_path / "v.json"), "--regions", str(tmp_path / "r"),
                         "--job-dir", str(job_dir), "--root", str(ROOT))
    assert err == f"mvptr: error: --vocab {tmp_path / 'v.json'}: no such file"
    assert not job_dir.exists()


def evaluation(task: str, value: float) -> dict:
    """An evaluation JSON in the shape `mvptr evaluate run --out` writes (trimmed to a few numbers)."""
    if task == "retrieval":
        split = {"test": {"images": 10, "texts": 50, "zero_shot": {"ir_r_at_1": value / 2, "r_sum": value * 3},
                          "fine_tuned_itm": {"ir_r_at_1": value, "tr_r_at_1": value + 1, "r_sum": value * 6}}}
    else:
        key = "overall" if task == "vqa" else "accuracy"
        split = {s: {key: value + i} for i, s in enumerate({"vqa": ["val", "test"], "ve": ["dev", "test"],
                                                            "rec": ["val", "testA", "testB"],
                                                            "nlvr2": ["dev", "test1"]}[task])}
    return {"task": task, "weights": "w", "train": {"examples": 8, "steps": 2}, "splits": split,
            "chance": {"test": {"chance": 10.0}}, "seconds": 1.5}


DEMO_RUNS = [("mvptr", "full"), ("mvptr", "no_pretraining"), ("mvptr", "joint"), ("simla", "full"),
             ("simla", "no_pretraining"), ("semvlp", "full"), ("semvlp", "no_pretraining")]
TASKS = ["retrieval", "vqa", "ve", "rec", "nlvr2"]


def test_summary_from_files_ignores_mlflow_and_headline_fits(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = load_config(root=ROOT)
    files = []
    for i, (method, ablation) in enumerate(DEMO_RUNS):
        for j, task in enumerate(TASKS):
            path = tmp_path / "results" / "synthetic" / method / ablation / "seed0" / "evaluate" / f"{task}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            result = evaluation(task, 10.0 * i + j + 0.25)
            path.write_text(json.dumps(result))
            files.append(str(path))
    # MLflow holds other numbers for one run: the summary from files must not read them
    run_cfg = {**cfg, "ablation": "full", "method": {**cfg["method"], "name": "mvptr"}}
    tracking.log_run(run_cfg, stage="evaluate", task="vqa", metrics={"splits/test/overall": 99.0})
    argv = ["compare", "--evaluations", *files, "--runs", *(f"{m}/{a}" for m, a in DEMO_RUNS),
            "--methods", "mvptr", "simla", "semvlp"]
    out = tmp_path / "before"
    assert main([*argv, "--out-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    db.unlink()
    again = tmp_path / "after"
    assert main([*argv, "--out-dir", str(again)]) == 0
    assert {p.name: p.read_bytes() for p in sorted(again.iterdir())} == before
    assert not db.exists()
    capsys.readouterr()

    summary = json.loads(before["ablations.json"])
    assert summary["mvptr/full"]["vqa/splits/test/overall"] == 2.25  # the file's, not MLflow's 99
    assert summary["semvlp/no_pretraining"]["retrieval/splits/test/fine_tuned_itm/ir_r_at_1"] == 60.25
    headline = before["headline.md"].decode().splitlines()
    assert all(len(line) <= 100 for line in headline), max(headline, key=len)
    header = [c.strip() for c in headline[0].strip("|").split("|")]
    assert header == ["run", "IR@1", "VQA", "VE", "REC", "NLVR2"]
    rows = [line for line in headline[2:] if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == ["mvptr/full", "mvptr/joint", "mvptr/no_pretraining",
                                                       "simla/full", "simla/no_pretraining", "semvlp/full",
                                                       "semvlp/no_pretraining"]  # row_order: full first
    assert [c.strip() for c in rows[0].strip("|").split("|")] == ["mvptr/full", "0.2", "2.2", "3.2", "5.2", "5.2"]
    assert "- REC: rec/splits/testB/accuracy" in headline
