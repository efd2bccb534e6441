"""The resumable training state of a stage: saved every N steps, loaded with `torch.load(weights_only=True)`.

Why: a preempted or killed job must continue exactly where it stopped. The state holds the model,
optimiser and scheduler, every random state the step consumes (torch's global CPU generator for dropout,
CUDA's, and the objectives' masking/sampling generator), the step (which fixes the data position, see
`mvptr.train.distributed.batch_indices`), the loss history and the MLflow run id. It lives in the rule's
checkpoint directory (a `params:` entry, not an output: Snakemake deletes outputs before a rerun), one file
per rank (`state-rank{r}.pt`; model and optimiser are the same on every rank, the generators are not),
written to a temporary name and renamed, so a kill mid-write leaves the previous checkpoint intact.

Use:
    save_state(ckpt_dir, rank, state_dict)
    state = load_state(ckpt_dir, rank)     # None when there is no checkpoint yet
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from mvptr.atomic import atomic_write_bytes


def state_path(ckpt_dir: Path | str, rank: int) -> Path:
    return Path(ckpt_dir) / f"state-rank{rank}.pt"


def save_state(ckpt_dir: Path | str, rank: int, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(state_path(ckpt_dir, rank), buffer.getvalue())


def load_state(ckpt_dir: Path | str, rank: int) -> dict[str, Any] | None:
    path = state_path(ckpt_dir, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
