"""BERT-style masking and the masked-token loss, shared by MCR (tags, concepts) and MLM (words).

Why one place: every masked objective must mask the same way (METHODS.md: pick 15% of the candidates, then
replace 80% of the picks by [MASK], 10% by a random id and keep 10%), never touch special tokens, and be
reproducible from a `torch.Generator`. MLM also masks the textual concepts parsed from a masked word, so
that the concept cannot give the word away.

Use:
    candidates = maskable(ids, attention_mask, config.special_token_ids)
    masked, labels = mask_tokens(ids, candidates, config.mask_token_id, config.vocab_size, generator)
    masked = mask_linked_concepts(masked, labels != IGNORE_INDEX, concept_links, config.mask_token_id)
    loss = token_prediction_loss(model.heads["lm"], hidden, labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvptr.objectives.sampling import random_ids, uniform

# Label of the positions that are not predicted (torch's cross-entropy default).
IGNORE_INDEX = -100
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


def maskable(ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int]) -> Tensor:
    """(B, N) bool: real tokens that are not special ([PAD], [CLS], [SEP], [MASK])."""
    special = torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    return attention_mask.bool() & ~special


def mask_tokens(ids: Tensor, candidates: Tensor, mask_token_id: int, vocab_size: int,
                generator: torch.Generator | None = None, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """Pick each candidate with probability `prob`; of the picks, 80% -> [MASK], 10% -> a random id in
    [0, vocab_size), 10% kept. Returns (masked ids, labels): labels hold the original id at the picks and
    IGNORE_INDEX elsewhere."""
    picked = candidates & (uniform(ids.shape, ids, generator) < prob)
    labels = ids.masked_fill(~picked, IGNORE_INDEX)
    action = uniform(ids.shape, ids, generator)
    to_mask = picked & (action < MASK_FRACTION)
    to_random = picked & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    masked = ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids(ids.shape, vocab_size, ids, generator), masked)
    return masked, labels


def mask_linked_concepts(ids: Tensor, masked_words: Tensor, concept_links: Tensor, mask_token_id: int) -> Tensor:
    """Replace by [MASK] every concept linked to a masked word.

    ids (B, L); masked_words (B, L) bool; concept_links (B, L, L) bool, [b, c, w] = concept c comes from word w.
    The concept is always replaced (never kept or randomised): "dog" reuses the word's own id, so keeping it
    would show the masked word.
    """
    linked = (concept_links.bool() & masked_words[:, None, :]).any(dim=-1)
    return ids.masked_fill(linked, mask_token_id)


def token_prediction_loss(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of `head` (the tied LM head) at the labelled positions of `hidden` (B, N, H)."""
    picked = labels != IGNORE_INDEX
    if not picked.any():
        # Nothing was masked in this batch: a zero that still reaches the head and the encoders, so that every
        # rank's backward (and DDP's gradient hooks) sees the same parameters.
        return head(hidden[:, 0]).sum() * 0.0
    logits = head(hidden[picked])
    return F.cross_entropy(logits.float(), labels[picked])
