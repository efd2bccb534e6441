"""Shared by every rule: the merged, validated config and the input/param functions.

The config is composed by mvptr.config exactly as the `mvptr` CLI composes it: Snakemake's `config`
(configs/default.yaml + --configfile + --config) is turned back into `key=value` overrides of the base
file, and those overrides are passed to every CLI call, so a rule and its command see the same config.
"""

import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from mvptr.data.catalog import evaluable_tasks, load_source, needed_sources, web_sources
from mvptr.config import (
    compose,
    config_hash,
    dataset_dir as config_dataset_dir,
    overrides_from,
    read_yaml,
    schema_path,
    step_keys,
    workflow_runs,
)

ROOT = Path(workflow.basedir)
BASE = read_yaml(ROOT / "configs" / "default.yaml")
OVERRIDES = overrides_from(config, BASE)
CONFIG = compose(BASE, OVERRIDES, ROOT)
validate(CONFIG, str(schema_path()))
DATASET = config_dataset_dir(CONFIG).name
# Every (method, ablation, seed) that runs (`methods` x the method-independent ablations, plus each method's own
# ablations, each with every one of `seeds`), composed like `mvptr ... method.name=<m> ablation=<a>
# train_seed=<s>`, and the hash of its stage-one keys: runs with the same hash share one stage-one job. A config
# is composed once per (method, ablation); train_seed, an override applied last, is then set in a copy.
PAIRS = {
    (method, ablation): compose(
        BASE, [*OVERRIDES, f"method.name={method}", f"ablation={ablation}"], ROOT
    )
    for method, ablation in workflow_runs(CONFIG, ROOT)
}
SEEDS = list(CONFIG["seeds"])
RUNS = {
    (method, ablation, seed): {**cfg, "train_seed": seed}
    for (method, ablation), cfg in PAIRS.items()
    for seed in SEEDS
}
_PAIR_STEP_KEYS = {}


def pair_step_keys(method, ablation, step):
    """The config keys `step` depends on for a (method, ablation) (the same whatever the seed), computed once."""
    key = (method, ablation, step)
    if key not in _PAIR_STEP_KEYS:
        _PAIR_STEP_KEYS[key] = step_keys(PAIRS[(method, ablation)], step)
    return _PAIR_STEP_KEYS[key]


STAGE1 = {
    run: config_hash(cfg, pair_step_keys(run[0], run[1], "stage1"))
    for run, cfg in RUNS.items()
}
# The evaluate.tasks the dataset has files for; each one left out is said once, before any job runs.
EVAL_TASKS, LEFT_OUT = evaluable_tasks(CONFIG)
for _task, _why in LEFT_OUT.items():
    print(f"mvptr: evaluate_{_task} left out: {_why}", file=sys.stderr)
# The evaluated tasks whose examples carry a text (all but retrieval): parsed once by task_concepts.
TEXT_TASKS = [task for task in EVAL_TASKS if task != "retrieval"]
# Zero-shot grounding reads the gold scenes that only the synthetic world has (workflow/rules/evaluate.smk).
GROUNDING = ["grounding"] if CONFIG["dataset"]["name"] == "synthetic" else []
# Every task of the summary (a chart each).
SUMMARY_TASKS = [*EVAL_TASKS, *GROUNDING]
# The download sources of a corpus (none for synthetic and coco_format), and those whose images are URL lists.
SOURCES = needed_sources(CONFIG, ROOT)
WEB_SOURCES = web_sources(CONFIG, ROOT)


# Only the configured dataset can be built: its folder name carries the hash of the keys that shape it.
wildcard_constraints:
    dataset=re.escape(DATASET),
    method="|".join(sorted({re.escape(method) for method, _ in PAIRS})),
    ablation="|".join(sorted({re.escape(ablation) for _, ablation in PAIRS})),
    seed="|".join(str(seed) for seed in SEEDS),
    stage1="|".join(sorted(set(STAGE1.values()))),
    source="|".join(re.escape(source) for source in SOURCES) or "(?!)",


def dataset_dir():
    """The prepared dataset folder of the configured dataset."""
    return f"resources/datasets/{DATASET}"


def source_inputs():
    """What prepare_data reads of a corpus: each source's download manifest, and each URL list's image table."""
    return [f"resources/downloads/{source}/manifest.json" for source in SOURCES] + [
        f"resources/downloads/{source}/images.json" for source in WEB_SOURCES
    ]


def source_entry(wildcards):
    """The hash of a source's catalog entry: a changed URL, size or checksum reruns its download."""
    return config_hash({"entry": repr(load_source(wildcards.source, CONFIG, ROOT))})


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


def stage1_dir(run):
    """Stage-one outputs of a (method, ablation, seed): keyed by the hash of the config keys that affect stage one
    (train_seed among them)."""
    return f"results/{DATASET}/pretrain/stage1-{STAGE1[run]}"


def run_dir(run):
    """Where a (method, ablation, seed) run's stage two and evaluations go."""
    method, ablation, seed = run
    return f"results/{DATASET}/{method}/{ablation}/seed{seed}"


def stage2_dir(run):
    return f"{run_dir(run)}/pretrain_stage2"


def stage1_run(wildcards):
    """The first (method, ablation, seed) whose stage one has this hash (they all compute the same thing)."""
    return next(run for run, digest in STAGE1.items() if digest == wildcards.stage1)


def wildcard_run(wildcards):
    return (wildcards.method, wildcards.ablation, int(wildcards.seed))


def stage_outputs(runs=None):
    """Both stages' outputs of the given (default: every) (method, ablation, seed) runs."""
    return [
        f"{folder}/{name}"
        for run in runs or RUNS
        for folder in (stage1_dir(run), stage2_dir(run))
        for name in ("model.safetensors", "metrics.json", "loss_curves.png")
    ]


# The keys each step's result depends on, from their classification in the schema (`x-affects`). A rule hands
# its command only the overrides of these keys, so that changing, say, a stage-two setting does not change the
# params of (and so rerun) the data rules.
DATA_KEYS = step_keys(CONFIG, "data")
CONCEPT_KEYS = step_keys(CONFIG, "concepts")
REGION_KEYS = step_keys(CONFIG, "regions")
# Keys that change nothing a step computes but that its command reads: how and where it runs. They reach the
# command outside `params:` (LAUNCH_ARGS in the shell line), so that running the same workflow with another
# profile (local -> SLURM) or cadence is not a params change that reruns every trained stage.
RUN_KEYS = step_keys(CONFIG, "launch")


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
    run = stage1_run(wildcards)
    return config_args(pair_step_keys(run[0], run[1], "stage1"), run)


def step_args(step):
    """The params function of a per-(method, ablation, seed) rule: the overrides of the keys `step` depends on
    (the keys of a (method, ablation), whatever its seed: computed once)."""
    return lambda wildcards: config_args(
        pair_step_keys(wildcards.method, wildcards.ablation, step),
        wildcard_run(wildcards),
    )


def evaluation_outputs(runs=None):
    """The metrics JSON of every downstream task of the given (default: every) (method, ablation, seed) runs."""
    return [
        f"{run_dir(run)}/evaluate/{task}.json"
        for run in runs or RUNS
        for task in SUMMARY_TASKS
    ]


def summary_outputs():
    """The (method, ablation) table (CSV, markdown, JSON), the seed statistics and the bar chart of every task."""
    folder = f"results/summary/{DATASET}"
    return (
        [f"{folder}/ablations.{ext}" for ext in ("csv", "md", "json")]
        + [f"{folder}/statistics.{ext}" for ext in ("md", "json")]
        + [f"{folder}/{task}.png" for task in SUMMARY_TASKS]
    )


def config_args(keys, run=None):
    """`--root` and the overrides under `keys` but not under RUN_KEYS (plus `method.name=<m> ablation=<a>
    train_seed=<s>` of a (method, ablation, seed) run) to hand to `mvptr`, shell-quoted: a rule's command may run
    in another working directory (--directory, a cluster node) and composes the same config from them.
    """
    extra = (
        [f"method.name={run[0]}", f"ablation={run[1]}", f"train_seed={run[2]}"]
        if run
        else []
    )
    picked = overrides_under(keys, exclude=RUN_KEYS)
    return " ".join(
        shlex.quote(item) for item in ["--root", str(ROOT), *picked, *extra]
    )


def trainer_resources(rule):
    """Resources of a GPU rule, which runs on the head (localrule: its trainer is the only allocation): the
    trainer's job, from the config's launch section (and launch.rules.<rule>); --set-resources RULE:gpu=4 etc.
    replace them. Resources, not params: changing them reruns nothing."""
    launch = {**CONFIG["launch"], **(CONFIG["launch"].get("rules") or {}).get(rule, {})}
    strings = ("slurm_partition", "slurm_account", "qos", "constraint", "slurm_extra")
    return {
        "gpu": launch["gpus_per_node"],
        "cpus_per_task": launch["cpus_per_task"],
        "mem_mb": (
            int(launch["mem_gb"] * 1000) if launch.get("mem_gb") else 0
        ),  # 0: the cluster's default
        "runtime": launch["timeout_min"],
        **{key: launch.get(key) or "" for key in strings},  # "": not set
    }


def trainer_threads(rule):
    """The cores of this machine a GPU rule's job takes: its trainer's torch threads (launch.cpus_per_task, and
    launch.rules.<rule>) when it runs here (local, debug); 1 when it runs on SLURM nodes (the rule only waits).
    """
    launch = {**CONFIG["launch"], **(CONFIG["launch"].get("rules") or {}).get(rule, {})}
    return 1 if CONFIG["launch"]["cluster"] == "slurm" else launch["cpus_per_task"]


def trainer_args(rule):
    """The shell words that hand a GPU rule's resources to its command as launch.rules.<rule>.* overrides
    (after LAUNCH_ARGS, so they win); `gpus` and `mem_mb` (0: keep the config's) become the GPUs, the processes
    per node and the memory of the trainer's job (mvptr.launch.launcher.LaunchSettings.from_config).
    """
    key = f"launch.rules.{rule}"
    words = [
        f"{key}.gpus={{resources.gpu}}",
        f"{key}.mem_mb={{resources.mem_mb}}",
        f"{key}.cpus_per_task={{resources.cpus_per_task}}",
        f"{key}.timeout_min={{resources.runtime}}",
    ]
    words += [
        f"{key}.{name}={{resources.{name}:q}}"
        for name in (
            "slurm_partition",
            "slurm_account",
            "qos",
            "constraint",
            "slurm_extra",
        )
    ]
    return " ".join(words)


def dvc_exports():
    """The stable-path files DVC reads (workflow/rules/dvc.smk): metrics and plot data."""
    return [
        "results/dvc/metrics.json",
        "results/dvc/plots/losses",
        "results/dvc/plots/tasks.json",
    ]


STUDY_SEEDS = 3


def study_outputs():
    """What `snakemake study` builds: everything `all` does, with at least STUDY_SEEDS seeds."""
    if len(SEEDS) < STUDY_SEEDS:
        raise WorkflowError(
            f"study: config key 'seeds' lists {len(SEEDS)} seed(s); the study needs at least {STUDY_SEEDS}: "
            "run `snakemake study --configfile configs/study.yaml` (make study)"
        )
    return [
        dataset_dir(),
        *concept_outputs(),
        regions_dir(),
        *stage_outputs(),
        *evaluation_outputs(),
        *summary_outputs(),
        *dvc_exports(),
    ]
