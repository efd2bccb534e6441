"""Random draws that honour a `torch.Generator`, and which pairs of a batch may serve as negatives.

Why one place: ITM, WPG and SIMLA's ITC all pick partners among the pairs of a batch, and every objective's
masking and sampling must be reproducible from the step's generator (a resumed run draws the same).

Use: `allowed = allowed_negatives(batch)`, `choice, valid = pick_negatives(scores, allowed, "softmax", g)`
"""

from __future__ import annotations

import torch
from torch import Tensor

from mvptr.objectives import Batch


def allowed_negatives(batch: Batch, allow_duplicates: bool = False) -> Tensor:
    """(B, B) bool: [i, j] True when text i and image j may form a negative pair.

    A pair is a positive, never a negative, when it shares the image (same `image_ids`) or the caption (same
    `caption_ids`, or identical token ids). `allow_duplicates=True` excludes only the diagonal, as MVPTR's
    released code did, so a duplicate image or caption can be taken for a negative. Both criteria are
    symmetric, so the same matrix serves texts -> images and images -> texts.
    """
    ids = batch["input_ids"]
    same = torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)
    if not allow_duplicates:
        image_ids = batch["image_ids"]
        same |= image_ids[:, None] == image_ids[None, :]
        if "caption_ids" in batch:
            caption_ids = batch["caption_ids"]
            same |= caption_ids[:, None] == caption_ids[None, :]
        tokens = ids * batch["attention_mask"].long()
        same |= (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)
    return ~same


def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    # A generator draws on its own device; results are moved to `like`'s device afterwards.
    return generator.device if generator is not None else like.device


def uniform(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) samples on `like`'s device, reproducible with `generator`."""
    return torch.rand(shape, generator=generator, device=_draw_device(generator, like)).to(like.device)


def random_ids(shape: tuple[int, ...] | torch.Size, high: int, like: Tensor,
               generator: torch.Generator | None = None) -> Tensor:
    """Integers in [0, high) on `like`'s device."""
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, like)).to(like.device)


def permutation(n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return torch.randperm(n, generator=generator, device=_draw_device(generator, like)).to(like.device)


def pick_negatives(scores: Tensor, allowed: Tensor, sampling: str = "argmax",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For each row, the column to pair it with, among its allowed columns.

    sampling: "argmax" the highest score (the hardest negative); "softmax" a draw from softmax(scores) over the
    allowed columns; "random" a uniform draw over the allowed columns (scores unused).
    Returns (choice (B,) long, valid (B,) bool); a row with no allowed column is not valid.
    """
    valid = allowed.any(dim=1)
    if sampling == "argmax":
        return scores.masked_fill(~allowed, float("-inf")).argmax(dim=1), valid
    if sampling not in ("softmax", "random"):
        raise ValueError(f"sampling {sampling!r}: expected argmax, softmax or random")
    logits = scores.float() if sampling == "softmax" else torch.zeros_like(scores, dtype=torch.float)
    # Rows without an allowed column draw uniformly (and are dropped by `valid`) instead of producing NaN.
    usable = allowed | ~valid[:, None]
    probs = torch.softmax(logits.masked_fill(~usable, float("-inf")), dim=1)
    choice = torch.multinomial(probs.to(_draw_device(generator, probs)), 1, generator=generator)
    return choice.squeeze(1).to(scores.device), valid
