"""The workflow's artifacts that pre-training and fine-tuning read, and the command-line flags that name them.

Why one place: `mvptr pretrain stage` and `mvptr evaluate run` read the same four artifacts (the outputs of the
data, concept and region rules) and a job folder; their flags, help and path resolution are written once here,
in a module light enough for `mvptr --help` (no torch).

The paths a pre-training stage (`StagePaths`) and a fine-tuning (`TaskPaths`) are handed live here too, so that
the commands that submit them build them without importing the trainers (torch: seconds per workflow job).

Use:
    add_artifact_arguments(parser)                 # --dataset --concepts --vocab --regions --job-dir
    paths = StagePaths(**artifact_paths(args), ckpt_dir=...)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mvptr.errors import DataError

HELP = {"dataset": "prepared dataset folder (with the task files)", "concepts": "concepts.json",
        "vocab": "concept_vocab.json", "regions": "folder of the region stores"}


@dataclass(frozen=True)
class Artifacts:
    """The workflow's artifacts that pre-training and fine-tuning read (the outputs of the data, concept and
    region rules)."""

    dataset: Path  # prepared dataset folder
    concepts: Path  # concepts.json
    vocab: Path  # concept_vocab.json
    regions: Path  # folder of {split}.h5


# Where a job folder keeps the id of its MLflow run, so that a requeued job logs into the same run.
RUN_FILE = "run.json"
# Where a pre-training job keeps the steps it could not log while the MLflow store was down (mvptr.train.tracker).
PENDING_FILE = "mlflow-pending.jsonl"
# A stage's last weights in its checkpoint directory (mvptr.train.loop writes them, the stage command moves them).
FINAL_WEIGHTS = "final.safetensors"


@dataclass(frozen=True)
class StagePaths(Artifacts):
    """The artifacts a stage reads, and its checkpoint directory."""

    ckpt_dir: Path
    init_weights: Path | None = None  # stage two: the stage-one weights


@dataclass(frozen=True)
class TaskPaths(Artifacts):
    """The artifacts a fine-tuning reads, and where to save the fine-tuned weights (None: not saved)."""

    weights: Path  # the model to fine-tune (model.safetensors of a pre-training stage, or never trained)
    save_to: Path | None = None
    run_dir: Path | None = None  # MLflow: the run id is kept in run_dir/RUN_FILE; None: nothing is logged
    task_concepts: Path | None = None  # {text: scene graph} of the task texts (`mvptr concepts tasks`); None: parse


def add_artifact_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --concepts, --vocab, --regions (required) and --job-dir (the submitit folder)."""
    for name, what in HELP.items():
        parser.add_argument(f"--{name}", type=Path, required=True, help=what)
    parser.add_argument("--job-dir", type=Path, required=True, help="submitit folder and job id (beside the log)")


KIND = {"dataset": "folder", "concepts": "file", "vocab": "file", "regions": "folder"}


def artifact_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The four artifacts of the parsed flags, as absolute paths (a job may run in another directory). Checked
    before any job is submitted: DataError naming the option and path of one that is missing, and likewise for
    --init-weights and --weights where the command has them and they are given."""
    for name, kind in [*KIND.items(), ("init_weights", "file"), ("weights", "file")]:
        path = getattr(args, name, None)
        if path is not None and not (path.is_dir() if kind == "folder" else path.is_file()):
            raise DataError(f"--{name.replace('_', '-')} {path}: no such {kind}")
    return {name: getattr(args, name).resolve() for name in HELP}
