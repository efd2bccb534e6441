"""Pre-training objectives, one module each, and the bits they share.

Why: each objective of a method is a loss function over a model and a batch of tensors, so that a schedule
(`two_stage`, `joint`, an ablation) is just a choice of which losses to add and how to weigh them. MVPTR's
five live in `mcr`, `vsc`, `itm`, `mlm` and `wpg`; BERT-style masking is in `masking`. This module holds what
several of them need: the batch layout, one encoding of the matched pairs that VSC, ITM, MLM and WPG share
within a step, which pairs may serve as negatives, and random draws that honour a `torch.Generator`.

Batch (a mapping of tensors; B pairs, L text slots, T tag slots, R region slots):
    input_ids       (B, L) long   [CLS] words concepts [SEP], then padding (concepts take the next positions)
    attention_mask  (B, L)        1 on real tokens
    concept_mask    (B, L) bool   True on the textual-concept positions
    concept_links   (B, L, L) bool  [b, c, w] True when the concept at position c was parsed from the word at
                                  position w (the word -> concept map: masking word w masks concept c)
    tag_ids         (B, T) long   [CLS] tags [SEP], then padding (tags as word pieces)
    tag_mask        (B, T)
    region_feats    (B, R, D)     region features (float16 is fine)
    region_boxes    (B, R, 6)     [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
    region_mask     (B, R)
    image_ids       (B,) long     which image each pair shows (duplicates are never negatives)
    caption_ids     (B,) long     optional: which caption (identical token ids also count as the same caption)

Every objective returns `(loss, logs)`: a scalar tensor and a dict of detached scalars; the caller sums the
weighted losses. Step sketch (stage two):
    encoded = PairEncoding(model, batch)
    total = sum(w[name] * fn(model, batch, encoded)[0] for name, fn in (("vsc", vsc_loss), ("itm", itm_loss),
                                                                       ("mlm", mlm_loss), ("wpg", wpg_loss)))
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mvptr.models.mvptr import ImageEncoding, MVPTRModel

Batch = Mapping[str, Tensor]
Logs = dict[str, Tensor]


def encode_image(model: MVPTRModel, batch: Batch) -> ImageEncoding:
    """The visual encoder on the batch's tags and regions."""
    return model.encode_image(batch["tag_ids"], batch["tag_mask"], batch["region_feats"], batch["region_boxes"],
                              batch["region_mask"])


class PairEncoding:
    """The uni-modal encodings of a batch's matched pairs, and their cross-modal output computed once, on the
    first use, so that ITM and WPG share one forward of the cross-modal encoder."""

    def __init__(self, model: MVPTRModel, batch: Batch) -> None:
        self.model = model
        self.batch = batch
        self.text: Tensor = model.encode_text(batch["input_ids"], batch["attention_mask"])
        self.image: ImageEncoding = encode_image(model, batch)

    @cached_property
    def cross(self) -> Tensor:
        """(B, L + R, H) cross-modal output of the matched pairs."""
        return self.model.cross(self.text, self.batch["attention_mask"], self.image.regions,
                                self.batch["region_mask"])


def allowed_negatives(batch: Batch, released_quirk: bool = False) -> Tensor:
    """(B, B) bool: [i, j] True when text i and image j may form a negative pair.

    A pair is a positive, never a negative, when it shares the image (same `image_ids`) or the caption (same
    `caption_ids`, or identical token ids). `released_quirk=True` excludes only the diagonal, as the released
    code did, so a duplicate image or caption can be taken for a negative. Both criteria are symmetric, so the
    same matrix serves texts -> images and images -> texts.
    """
    ids = batch["input_ids"]
    same = torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)
    if not released_quirk:
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
