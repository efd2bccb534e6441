"""Seeds of the project's random streams, derived from the config's `seed` and the stream's names.

Why: seeds made by arithmetic (`seed * 1000 + 17 * stage + rank`, `seed * 1000 + TASKS.index(task)`) collide
(stage 1 rank 17 is stage 2 rank 0) and move when a list grows (a task inserted before VQA gave VQA another
seed). Here a stream is named, ("pretrain", "stage1", "rank", 0) or ("finetune", "vqa"), and its seed is
numpy's SeedSequence(seed, spawn_key=names): the construction numpy uses to spawn independent streams. A name is
a non-negative int (a rank, an epoch) or a string, which enters as the first 8 bytes of the SHA-256 of its UTF-8
text: stable across processes and machines (Python's hash() of a str is salted per process).

Use:
    torch.manual_seed(derive_seed(cfg["train_seed"], "pretrain", "stage1", "rank", 0))
    derive_seed(cfg["train_seed"], "finetune", "vqa")      # a 63-bit int: fits torch.manual_seed, numpy and int64
"""

from __future__ import annotations

import hashlib

import numpy as np


def _spawn_word(name: str | int) -> int:
    if isinstance(name, str):
        return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    if isinstance(name, bool) or not isinstance(name, int) or name < 0:
        raise ValueError(f"seed name {name!r}: allowed: a string or a non-negative integer")
    return name


def derive_seed(seed: int, *names: str | int) -> int:
    """The 63-bit seed of the stream `names` under the config's `seed`."""
    sequence = np.random.SeedSequence(seed, spawn_key=tuple(_spawn_word(name) for name in names))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
