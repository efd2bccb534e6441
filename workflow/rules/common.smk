"""Shared by every rule: the merged, validated config and the input/param functions.

The config is composed by mvptr.config exactly as the `mvptr` CLI composes it: Snakemake's `config`
(configs/default.yaml + --configfile + --config) is turned back into `key=value` overrides of the base
file, and those overrides are passed to every CLI call, so a rule and its command see the same config.
"""

import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from mvptr.config import (
    compose,
    config_hash,
    dataset_dir as config_dataset_dir,
    overrides_from,
    read_yaml,
)
from mvptr.train.stages import stage1_keys

ROOT = Path(workflow.basedir)
BASE = read_yaml(ROOT / "configs" / "default.yaml")
OVERRIDES = overrides_from(config, BASE)
CONFIG = compose(BASE, OVERRIDES, ROOT)
validate(CONFIG, "../schemas/config.schema.yaml")
DATASET = config_dataset_dir(CONFIG).name
# Every ablation that runs, composed like `mvptr ... ablation=<name>`, and the hash of its stage-one keys:
# ablations with the same hash share one stage-one job.
ABLATIONS = {
    name: compose(BASE, [*OVERRIDES, f"ablation={name}"], ROOT)
    for name in CONFIG["ablations"]
}
STAGE1 = {name: config_hash(cfg, stage1_keys(cfg)) for name, cfg in ABLATIONS.items()}
EVAL_TASKS = CONFIG["evaluate"]["tasks"]


# Only the configured dataset can be built: its folder name carries the hash of the keys that shape it.
wildcard_constraints:
    dataset=re.escape(DATASET),
    ablation="|".join(re.escape(name) for name in ABLATIONS),
    stage1="|".join(sorted(set(STAGE1.values()))),


def dataset_dir():
    """The prepared dataset folder of the configured dataset."""
    return f"resources/datasets/{DATASET}"


def concept_outputs():
    """The concept vocabulary, plus the parser's quality where the dataset has gold tuples (synthetic)."""
    outputs = [f"results/{DATASET}/concepts/concept_vocab.json"]
    if CONFIG["dataset"]["name"] == "synthetic":
        outputs.append(f"results/{DATASET}/concepts/concept_quality.json")
    return outputs


def regions_dir():
    """The region stores (one HDF5 file per split), backbone and skipped-image manifest of the dataset."""
    return f"results/{DATASET}/regions"


def concepts_file():
    return f"results/{DATASET}/concepts/concepts.json"


def vocab_file():
    return f"results/{DATASET}/concepts/concept_vocab.json"


def stage1_dir(ablation):
    """Stage-one outputs of an ablation: keyed by the hash of the config keys that affect stage one."""
    return f"results/{DATASET}/pretrain/stage1-{STAGE1[ablation]}"


def stage2_dir(ablation):
    return f"results/{DATASET}/{ablation}/pretrain_stage2"


def stage1_ablation(wildcards):
    """The first ablation whose stage one has this hash (they all compute the same thing)."""
    return next(name for name, digest in STAGE1.items() if digest == wildcards.stage1)


def stage_outputs(ablations=None):
    """Both stages' outputs of the given (default: every running) ablations."""
    names = ablations or list(ABLATIONS)
    return [
        f"{folder}/{name}"
        for ablation in names
        for folder in (stage1_dir(ablation), stage2_dir(ablation))
        for name in ("model.safetensors", "metrics.json", "loss_curves.png")
    ]


# The config sections each step reads. A rule hands its command only the overrides under these keys, so
# that changing, say, a stage-two setting does not change the params of (and so rerun) the data rules.
DATA_KEYS = ("seed", "dataset")
CONCEPT_KEYS = (*DATA_KEYS, "concepts", "model.name", "model.tokenizer")
REGION_KEYS = (*DATA_KEYS, "regions")
# Keys that change nothing a GPU-class step computes but that its command reads: how and where it runs. They
# reach the command outside `params:` (LAUNCH_ARGS in the shell line), so that running the same workflow with
# another profile (local -> SLURM) or cadence is not a params change that reruns every trained stage.
RUN_KEYS = (
    "launch",
    "pretrain.checkpoint_every",
    "pretrain.log_every",
    "pretrain.num_workers",
)
# Every section except `ablations`, which only says which ablations the workflow runs.
TRAIN_KEYS = tuple(key for key in BASE if key != "ablations")


def overrides_under(keys, exclude=()):
    """The overrides whose key is one of `keys` or under one, and not under `exclude`."""

    def under(item, prefixes):
        key = item.split("=", 1)[0]
        return any(key == k or key.startswith(f"{k}.") for k in prefixes)

    return [
        item for item in OVERRIDES if under(item, keys) and not under(item, exclude)
    ]


LAUNCH_ARGS = " ".join(shlex.quote(item) for item in overrides_under(RUN_KEYS))


def stage1_args(wildcards):
    """Stage one's command gets only the overrides of the keys its hash covers, so that a stage-two override
    neither changes its path nor its params (a rerun trigger)."""
    ablation = stage1_ablation(wildcards)
    return config_args((*stage1_keys(ABLATIONS[ablation]), "method"), ablation)


def evaluation_outputs(ablations=None):
    """The metrics JSON of every downstream task of the given (default: every running) ablations."""
    names = ablations or list(ABLATIONS)
    return [
        f"results/{DATASET}/{ablation}/evaluate/{task}.json"
        for ablation in names
        for task in EVAL_TASKS
    ]


def summary_outputs():
    """The ablation table (CSV, markdown) and the bar chart of every task."""
    folder = f"results/summary/{DATASET}"
    return [f"{folder}/ablations.{ext}" for ext in ("csv", "md", "json")] + [
        f"{folder}/{task}.png" for task in EVAL_TASKS
    ]


def config_args(keys, ablation=None):
    """`--root` and the overrides under `keys` but not under RUN_KEYS (plus `ablation=<name>`) to hand to
    `mvptr`, shell-quoted: a rule's command may run in another working directory (--directory, a cluster node)
    and composes the same config from them."""
    extra = [f"ablation={ablation}"] if ablation else []
    picked = overrides_under(keys, exclude=RUN_KEYS)
    return " ".join(
        shlex.quote(item) for item in ["--root", str(ROOT), *picked, *extra]
    )
