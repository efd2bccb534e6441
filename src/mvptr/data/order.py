"""The order in which a training step reads its examples: a function of (seed, step), split among the ranks.

Why: a run resumed at step s must read exactly the batches a straight run reads from step s on, with no
sampler state to checkpoint, and every rank must read its own share of the same global batch. Pre-training
(`mvptr.train.loop`) and downstream fine-tuning (`mvptr.evaluate.finetune`) both draw their batches here.

Use: `indices = batch_indices(len(pairs), batch_size=64, step=120, seed=0, rank=1, world_size=2)`
"""

from __future__ import annotations

import torch

from mvptr.seeds import derive_seed


def batch_indices(num_items: int, batch_size: int, step: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """This rank's share of global batch `step` (epochs of `num_items // batch_size` full batches).

    Epoch e shuffles the items with a generator seeded by (seed, "order", e) (`mvptr.seeds`), global batch b
    is the next `batch_size` indices, and rank r takes every world-th of them: a run resumed at step s reads
    exactly the batches a straight run reads, on any number of ranks."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not divide among {world_size} ranks")
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_items} training pairs")
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))
    batch = order[within * batch_size:(within + 1) * batch_size]
    return batch[rank::world_size].tolist()
