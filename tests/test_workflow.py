"""The Snakemake workflow: lint, formatting, dry runs (job counts of a method x ablation grid, single-rule reruns),
and a real run of the whole DAG, every method, on the tiny world with a shrunken model and a few training steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pycocotools.coco import COCO

from mvptr.config import dataset_dir, load_config

BIN = Path(sys.executable).parent
TINY = "dataset={synthetic: {size: tiny}}"
# The whole DAG in a few minutes: tiny world, 1+1+1 layers at width 32, a few steps of 8 pairs, every method
# as configured (tests that need several ablations say so).
METHODS = ("mvptr", "simla", "semvlp")
TASKS = ("retrieval", "vqa", "ve", "rec", "nlvr2")
FAST = [TINY, "ablations=[full]", f"methods=[{', '.join(METHODS)}]",
        "model={hidden_size: 32, num_text_layers: 1, num_visual_layers: 1, num_cross_layers: 1, "
        "num_attention_heads: 2, intermediate_size: 64}",
        "pretrain={stage1: {steps: 3, batch_size: 8}, stage2: {steps: 3, batch_size: 8}}",
        "regions={backbone: {epochs: 1}}", "concepts={min_count: 2}",
        "evaluate={" + ", ".join(f"{task}: {{steps: 2, batch_size: 8}}" for task in TASKS) + "}"]


def job_counts(output: str) -> dict[str, int]:
    """The `job  count` table that `snakemake -n` prints."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0].isidentifier() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


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
                     "--config", *FAST, workdir=workdir, timeout=900)
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
    proc = snakemake("-n", "--config", *FAST, workdir=tiny_run)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize("method, objectives", [("mvptr", ["vsc", "itm", "mlm", "wpg"]),
                                                ("simla", ["itc", "itm", "mlm", "xmm", "psl"]),
                                                ("semvlp", ["mlm", "mop", "itm", "qa"])])
def test_the_run_trained_both_stages_of_every_method_through_submitit(tiny_run: Path, method: str,
                                                                      objectives: list[str]):
    stage2 = next(tiny_run.glob(f"results/*/{method}/full/seed0/pretrain_stage2"))
    metrics = json.loads((stage2 / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["method"] == method and metrics["objectives"] == objectives
    # Zero-shot retrieval needs contrastive embeddings, which SemVLP has not.
    assert ("zero_shot" in metrics) == (method != "semvlp")
    if method != "semvlp":
        assert "tr_r_at_1" in metrics["zero_shot"]["recalls"]
    assert list(tiny_run.glob(f"results/logs/pretrain_stage2/*/{method}/full/seed0.submitit/job.json"))
    for task in TASKS:
        assert next(tiny_run.glob(f"results/*/{method}/full/seed0/evaluate/{task}.json")).stat().st_size > 0
    grounding = json.loads(next(tiny_run.glob(f"results/*/{method}/full/seed0/evaluate/grounding.json")).read_text())
    assert grounding["task"] == "grounding" and grounding["splits"]["test"]["phrases"]["object"] > 0


def test_the_summary_has_a_row_per_method(tiny_run: Path):
    lines = next(tiny_run.glob("results/summary/*/ablations.md")).read_text().splitlines()
    assert lines[0].startswith("| method | ablation |")
    assert [line.split("|")[1:3] for line in lines[2:]] == [[f" {method} ", " full "] for method in METHODS]
    stats = json.loads(next(tiny_run.glob("results/summary/*/statistics.json")).read_text())
    assert sorted(stats["rows"]) == sorted(f"{method}/full" for method in METHODS)
    assert {"G-obj", "G-att", "ITM"} <= set(stats["metrics"])


def test_seeds_are_a_wildcard_and_stage_one_is_shared_per_seed(tmp_path: Path):
    proc = snakemake("-n", "-p", "--config", TINY, "methods=[mvptr]", "ablations=[full, no_wpg]", "seeds=[0, 1, 2]",
                     workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # full and no_wpg differ in stage two only: one stage one per seed, one stage two per (ablation, seed).
    assert counts["pretrain_stage1"] == 3 and counts["pretrain_stage2"] == 6, counts
    assert all(counts[f"evaluate_{task}"] == 6 for task in (*TASKS, "grounding")), counts
    assert counts["prepare_data"] == 1 and counts["summarize"] == 1, counts
    for seed in (0, 1, 2):
        assert f"/mvptr/no_wpg/seed{seed}/evaluate/grounding.json" in proc.stdout
        assert f"train_seed={seed}" in proc.stdout


def test_methods_and_ablations_share_exactly_the_stage_one_jobs_that_compute_the_same(tmp_path: Path):
    ablations = ("[full, no_pretraining, no_wpg, joint, simla_no_xmm, simla_no_distill, semvlp_single_only, "
                 "semvlp_two_only, semvlp_no_qa]")
    proc = snakemake("-n", "--config", TINY, "methods=[mvptr, simla, semvlp]", f"ablations={ablations}",
                     workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # Runs: full and no_pretraining for the three methods, no_wpg and joint for MVPTR, the two SIMLA and the three
    # SemVLP ablations: 13. Stage one: MVPTR's full and no_wpg share one, its joint and no_pretraining have their
    # own; SIMLA and SemVLP train in one pass, so each method's full and its ablations (which change stage-two
    # keys only: objectives' weights and options, SemVLP's mode schedule) share one and no_pretraining has its
    # own: 3 + 2 + 2 = 7.
    assert counts["pretrain_stage1"] == 7 and counts["pretrain_stage2"] == 13, counts
    assert all(counts[f"evaluate_{task}"] == 13 for task in TASKS), counts
    assert counts["prepare_data"] == 1 and counts["extract_region_features"] == 1, counts
    assert counts["summarize"] == 1 and counts["extract_concepts"] == 1, counts


def test_mvptr_ablations_that_change_only_stage_two_share_one_stage_one_job(tmp_path: Path):
    proc = snakemake("-n", "--config", TINY, "methods=[mvptr]",
                     "ablations=[full, no_wpg, no_itm_hard, no_vsc, joint, no_mcr]", workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # full, no_wpg, no_itm_hard and no_vsc share one stage one; joint and no_mcr each have their own.
    assert counts["pretrain_stage1"] == 3 and counts["pretrain_stage2"] == 6, counts


def test_forcing_stage_two_reruns_only_stage_two(tiny_run: Path):
    proc = snakemake("-n", "--forcerun", "pretrain_stage2", "--config", *FAST, workdir=tiny_run)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # Stage two of `full` of each method, then their evaluations, the summary and DVC's export; nothing upstream.
    n = len(METHODS)
    assert counts.pop("pretrain_stage2") == n and counts.pop("summarize") == 1 and counts.pop("all") == 1, counts
    assert counts.pop("dvc_export") == 1, counts  # DVC's stable-path metrics and plots (workflow/rules/dvc.smk)
    assert counts == {f"evaluate_{task}": n for task in (*TASKS, "grounding")}


def test_a_stage_two_override_leaves_stage_one_and_the_data_alone(tiny_run: Path):
    fast = [item if not item.startswith("pretrain=") else
            "pretrain={stage1: {steps: 3, batch_size: 8}, stage2: {steps: 4, batch_size: 8}}" for item in FAST]
    assert fast != FAST
    proc = snakemake("-n", "--config", *fast, workdir=tiny_run)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    n = len(METHODS)
    assert counts.pop("pretrain_stage2") == n and counts.pop("summarize") == 1 and counts.pop("all") == 1, counts
    assert counts.pop("dvc_export") == 1, counts  # DVC's stable-path metrics and plots (workflow/rules/dvc.smk)
    assert counts == {f"evaluate_{task}": n for task in (*TASKS, "grounding")}
