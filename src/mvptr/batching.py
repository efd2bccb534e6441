"""One rule for a configured batch larger than the data: each step takes every item there is, and the log says so.

Why: a user's own folder (or a test's) can hold fewer training items than a recipe's batch. Before, pre-training
failed inside its submitted job while retrieval fine-tuning shrank its batch without a word. Now every
trainer (`mvptr pretrain stage`, `mvptr evaluate run`) counts its training items and decides BEFORE it
submits the job: a batch of at most the items there are (for pre-training, rounded down to a multiple of
ranks x grad_accum), one line in the rule's log naming the key, the configured size and the item count. A
dataset too small for even one item per rank is a ConfigError (exit 2), also before submission. Inside the
job the same function runs again on what the job really loaded (images skipped as unreadable can make it
fewer) and says so if it shrinks further.

Use:
    size, note = fit_batch("pretrain.stage1.batch_size", 64, items=30, multiple=1)   # -> 30, "mvptr: ..."
    items = count_training_pairs(dataset_dir, regions_dir)       # (caption, image) pairs of the train split
"""

from __future__ import annotations

from pathlib import Path

from mvptr.errors import ConfigError


def fit_batch(key: str, batch: int, items: int, multiple: int = 1) -> tuple[int, str | None]:
    """The batch size to use for `items` training items, and the log line when it is not the configured one."""
    if batch <= items:
        return batch, None
    size = items // multiple * multiple
    if size < max(multiple, 1):
        raise ConfigError(f"config key '{key}': the data has {items} training item(s), fewer than the {multiple} "
                          "that one step needs (one per rank and accumulation step)")
    return size, (f"mvptr: {key} is {batch} but the data has {items} training item(s): each step takes {size} "
                  "(the batch is capped at the data)")


def count_training_pairs(dataset_dir: Path | str, regions_dir: Path | str, split: str = "train") -> int:
    """(caption, image) pairs of `split` whose image has regions: what pre-training and retrieval train on."""
    from mvptr.data.coco import open_prepared
    from mvptr.regions.store import RegionStore

    ds = open_prepared(dataset_dir)
    with RegionStore(Path(regions_dir) / f"{split}.h5") as store:
        return sum(len(ds.captions(image_id)) for image_id in ds.image_ids(split) if image_id in store)


def count_task_examples(dataset_dir: Path | str, regions_dir: Path | str, task: str) -> int:
    """Training examples of a downstream task, as its file lists them (retrieval: the training pairs)."""
    if task == "retrieval":
        return count_training_pairs(dataset_dir, regions_dir)
    from mvptr.data.task_files import TRAIN_SPLIT, image_ids_by_file, read_task

    return len(read_task(dataset_dir, task, TRAIN_SPLIT[task], image_ids_by_file(dataset_dir)))
