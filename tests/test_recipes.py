"""The paper-scale recipes (configs/experiments/): each resolves the whole DAG, and every GPU rule's command
submits its job with the GPUs, memory and time the recipe names.

The check reads what a user's dry run prints (`snakemake -n -p --configfile <recipe>`): each GPU job's shell
command, whose `key=value` overrides are all its command composes its config from, and resolves the launch
settings the command would submit with (`LaunchSettings.from_config(cfg["launch"], rule)`).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from test_workflow import job_counts, snakemake

from mvptr.config import compose, project_root, read_yaml
from mvptr.launch.launcher import LaunchSettings

ROOT = project_root()
RECIPES = sorted((ROOT / "configs/experiments").glob("*_4m.yaml"))
TASKS = ("retrieval", "vqa", "ve", "rec", "nlvr2")
GPU_RULES = ("pretrain_stage1", "pretrain_stage2", *(f"evaluate_{task}" for task in TASKS))


def commands(stdout: str) -> dict[str, list[list[str]]]:
    """rule -> the override lists of its jobs' printed shell commands."""
    out: dict[str, list[list[str]]] = {}
    for line in stdout.splitlines():
        if not line.startswith("Shell command: MVPTR_RULE="):
            continue
        words = shlex.split(line.removeprefix("Shell command: "))
        rule = words[0].split("=", 1)[1]
        if rule not in GPU_RULES:
            continue
        end = words.index(">")
        overrides = [w for w in words[words.index("--root") + 2:end] if "=" in w and not w.startswith("-")]
        out.setdefault(rule, []).append(overrides)
    return out


def test_there_is_one_recipe_per_method():
    assert [p.name for p in RECIPES] == ["mvptr_4m.yaml", "semvlp_4m.yaml", "simla_4m.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_resolves_the_whole_dag_and_each_gpu_rule_asks_for_what_it_names(recipe: Path, tmp_path: Path):
    spec = yaml.safe_load(recipe.read_text())
    proc = snakemake("-n", "-p", "--configfile", str(recipe), workdir=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    runs = len(spec["methods"]) * len(spec["ablations"])
    assert counts["download_source"] == 9 and counts["fetch_web_images"] == 2 and counts["prepare_data"] == 1
    assert counts["extract_region_features"] == counts["extract_concepts"] == counts["summarize"] == 1
    assert counts["pretrain_stage2"] == runs and 1 <= counts["pretrain_stage1"] <= runs
    assert all(counts[f"evaluate_{task}"] == runs for task in TASKS), counts

    base = read_yaml(ROOT / "configs/default.yaml")
    jobs = commands(proc.stdout)
    assert sorted(jobs) == sorted(GPU_RULES)
    for rule, override_lists in jobs.items():
        wanted = spec["launch"]["rules"][rule]
        assert {"gpus_per_node", "mem_gb", "timeout_min"} <= set(wanted), rule
        for overrides in override_lists:
            cfg = compose(base, overrides, ROOT)
            settings = LaunchSettings.from_config(cfg["launch"], rule)
            assert {key: getattr(settings, key) for key in wanted} == wanted, rule
            # The trainer's config is the recipe's: its batch and steps reach the command.
            section = cfg["pretrain"][rule[-6:]] if rule.startswith("pretrain") else cfg["evaluate"][rule[9:]]
            expected = spec["pretrain"][rule[-6:]] if rule.startswith("pretrain") else spec["evaluate"][rule[9:]]
            assert {k: section[k] for k in ("steps", "batch_size", "lr")} == \
                {k: expected[k] for k in ("steps", "batch_size", "lr")}, rule
