"""The Snakemake workflow: lint, formatting, dry run, and a real run of prepare_data on the tiny world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from conftest import ROOT
from mvptr.config import dataset_dir, load_config

BIN = Path(sys.executable).parent
TINY = "dataset={synthetic: {size: tiny}}"


def snakemake(*args: str, workdir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), *args]
    if workdir is not None:
        cmd += ["--directory", str(workdir)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_lint_finds_nothing():
    proc = snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_are_snakefmt_formatted():
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_from_the_repository_root_plans_prepare_data(tmp_path: Path):
    proc = snakemake("-n", "--config", TINY, workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prepare_data" in proc.stdout + proc.stderr


def test_a_bad_config_stops_snakemake_naming_the_key(tmp_path: Path):
    proc = snakemake("-n", "--config", "model={hidden_size: banana}", workdir=tmp_path)
    assert proc.returncode != 0
    assert "model.hidden_size" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    proc = snakemake("--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"),
                     "--config", TINY, workdir=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir


def test_prepare_data_writes_the_world_the_config_asks_for(tiny_run: Path):
    cfg = load_config(["dataset.synthetic.size=tiny"], root=ROOT)
    out = tiny_run / dataset_dir(cfg)
    captions = COCO(str(out / "annotations/captions.json"))
    instances = COCO(str(out / "annotations/instances.json"))
    assert len(captions.imgs) == 40
    assert len(captions.anns) == 40 * cfg["dataset"]["synthetic"]["captions_per_image"]
    assert len(instances.imgs) == 40 and len(instances.anns) >= 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 40
    assert (tiny_run / f"results/logs/prepare_data/{out.name}.log").exists()
    assert (tiny_run / f"results/benchmarks/rules/prepare_data/{out.name}.tsv").exists()


def test_a_second_run_has_nothing_to_do(tiny_run: Path):
    proc = snakemake("-n", "--config", TINY, workdir=tiny_run)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr
