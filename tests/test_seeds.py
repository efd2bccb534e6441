"""Tests of mvptr.seeds: named streams get distinct seeds, a seed depends on its own names only (a task added to
the list moves no other task's seed), the value is numpy's SeedSequence of the SHA-256 words of the names, the
same in every process whatever its PYTHONHASHSEED.

Run: `.venv/bin/pytest tests/test_seeds.py` (a second).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mvptr.data.order import batch_indices
from mvptr.data.task_files import TASKS
from mvptr.seeds import derive_seed


def _streams(seed: int) -> list[tuple[str | int, ...]]:
    """The pre-training streams of 2 stages x 20 ranks and the fine-tuning stream of every task."""
    pretrain = [("pretrain", f"stage{stage}", "rank", rank) for stage, rank in itertools.product((1, 2), range(20))]
    return pretrain + [("finetune", task) for task in TASKS]


def test_distinct_names_give_distinct_seeds():
    # The old arithmetic, seed * 1000 + 17 * stage + rank, gave stage 1 rank 17 the seed of stage 2 rank 0.
    seeds = [derive_seed(seed, *names) for seed in (0, 1) for names in _streams(seed)]
    assert len(set(seeds)) == len(seeds)
    assert derive_seed(0, "pretrain", "stage1", "rank", 17) != derive_seed(0, "pretrain", "stage2", "rank", 0)
    assert derive_seed(0, "finetune", "vqa") != derive_seed(1, "finetune", "vqa")
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_a_task_added_to_the_list_moves_no_other_tasks_seed():
    # The old arithmetic, seed * 1000 + TASKS.index(task), gave every task after an inserted one a new seed.
    def task_seeds(tasks: tuple[str, ...]) -> dict[str, int]:
        return {task: derive_seed(3, "finetune", task) for task in tasks}

    grown = ("captioning", *TASKS)
    assert task_seeds(grown)["captioning"] not in task_seeds(TASKS).values()
    assert {task: seed for task, seed in task_seeds(grown).items() if task in TASKS} == task_seeds(TASKS)


def test_the_seed_is_numpys_seed_sequence_of_the_names():
    words = [int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
             for name in ("pretrain", "stage1", "rank")] + [2]
    expected = np.random.SeedSequence(7, spawn_key=words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    assert derive_seed(7, "pretrain", "stage1", "rank", 2) == int(expected)


def test_the_seed_is_the_same_in_another_process_with_another_hash_seed():
    code = "from mvptr.seeds import derive_seed; print(derive_seed(5, 'finetune', 'vqa'), derive_seed(5, 'x', 1))"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout.split()
        assert [int(value) for value in out] == [derive_seed(5, "finetune", "vqa"), derive_seed(5, "x", 1)]


@pytest.mark.parametrize("name", [-1, 1.5, True, None])
def test_a_name_that_is_no_string_or_non_negative_int_is_refused(name: object):
    with pytest.raises(ValueError, match="seed name"):
        derive_seed(0, "finetune", name)  # type: ignore[arg-type]


def test_the_data_order_of_an_epoch_is_shuffled_by_its_derived_seed():
    # Epoch 1 of 10 items in batches of 5: steps 2 and 3.
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(4, "order", 1))).tolist()
    assert batch_indices(10, 5, 2, seed=4) + batch_indices(10, 5, 3, seed=4) == expected
