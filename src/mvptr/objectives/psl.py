"""PSL, SIMLA's pseudo-keyword labels: predict from the image embedding which words the caption is about.

Why: ITC aligns whole vectors, XMM single regions and words; PSL adds a conceptual level - the image's
contrastive embedding must predict the caption's keywords, chosen by where the momentum model's [CLS] attends
in the multimodal mode, and the momentum model's own predictions as soft labels.

Per METHODS.md (SIMLA), with the momentum model, without gradient:
    votes      its last layer's self-attention of the text [CLS] in multimodal mode (`cls_attention`, the
               text cross-attending to the model's image, as the released code); each head votes for its
               `votes_per_head` (4) most attended positions among the candidates
    keywords   the `keywords` (5) positions with the most votes (those with at least one); their token ids
               are the multi-hot hard labels over the shared table
    soft       sigmoid(its psl head on its own image embedding)
    loss       (1 - a) BCE(psl head(the model's image embedding), hard) + a BCE(same, soft), a = distill x the
               ramp (0 -> 1 over method.distill_ramp_steps)
Candidates: the real tokens that are neither special ([PAD], [CLS], [SEP], [MASK]) nor English stop words
(spaCy's list, as word pieces of the model's tokenizer). `exclude_special_and_stop_words: false` reproduces
the released code: every position is a candidate, padding included (its attention is 0, so it wins ties), the
top `keywords` positions are taken whatever their votes, and only [CLS] is cleared from the labels - so [SEP]
and [PAD] become "keywords".

Options (`pretrain.objectives.psl`): weight, votes_per_head, keywords, distill, exclude_special_and_stop_words.

Use: `loss, logs = PSL(options, model.config)(model, batch, encoded, ctx)`;
     `keyword_labels(attention, input_ids, candidates, 4, 5, vocab_size)` is the selection alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvptr.objectives import Batch, Logs, Objective, PairEncoding, StepContext, distill_weight
from mvptr.objectives.masking import maskable

if TYPE_CHECKING:
    from mvptr.models.base import VLConfig, VLModel


@cache
def stop_word_ids(tokenizer_name: str) -> tuple[int, ...]:
    """The ids of spaCy's English stop words that are whole word pieces of the tokenizer."""
    from spacy.lang.en.stop_words import STOP_WORDS

    from mvptr.text import load_tokenizer

    vocab = load_tokenizer(tokenizer_name).get_vocab()
    return tuple(sorted(vocab[word] for word in STOP_WORDS if word in vocab))


def keyword_labels(attention: Tensor, input_ids: Tensor, candidates: Tensor | None, votes_per_head: int,
                   keywords: int, vocab_size: int, cls_token_id: int | None = None) -> Tensor:
    """(B, vocab_size) multi-hot labels of each caption's keywords.

    attention (B, heads, L): the [CLS] row of the momentum model's last self-attention. With `candidates`
    (B, L) bool, each head votes for its `votes_per_head` most attended candidates and the keywords are the
    `keywords` candidates with most votes (ties: the earlier position), at least one vote each. Without (the
    released code), every position votes and is counted, and `cls_token_id` is cleared from the labels.
    """
    batch, heads, length = attention.shape
    if candidates is not None:
        attention = attention.masked_fill(~candidates[:, None, :], -1.0)
    k = min(votes_per_head, length)
    top = attention.topk(k, dim=-1)
    votes = torch.ones_like(top.values) if candidates is None else (top.values >= 0).float()
    counts = torch.zeros(batch, length, device=attention.device).scatter_add_(
        1, top.indices.reshape(batch, -1), votes.reshape(batch, -1))
    # topk of counts - position / (length + 1): among equal counts the earlier position wins, deterministically.
    ranked = (counts - torch.arange(length, device=counts.device) / (length + 1)).topk(min(keywords, length), dim=-1)
    chosen = counts.gather(1, ranked.indices) > 0 if candidates is not None else torch.ones_like(ranked.indices,
                                                                                                dtype=torch.bool)
    labels = torch.zeros(batch, vocab_size, device=attention.device)
    labels.scatter_(1, input_ids.gather(1, ranked.indices), chosen.float())
    if candidates is None and cls_token_id is not None:
        labels[:, cls_token_id] = 0.0
    return labels


class PSL(Objective):
    name = "psl"
    head_name = "psl"
    uses_momentum = True
    options_schema = {
        "votes_per_head": {"type": "integer", "minimum": 1, "description": "positions each head votes for (4)"},
        "keywords": {"type": "integer", "minimum": 1, "description": "keywords kept per caption (5)"},
        "distill": distill_weight("weight of the momentum model's predictions as soft labels (SIMLA 0.4)"),
        "exclude_special_and_stop_words": {
            "type": "boolean",
            "description": "keywords are never special tokens or stop words (false: the released code, where "
                           "[SEP] and [PAD] can be keywords)"},
    }

    def __init__(self, options: Mapping[str, Any], config: VLConfig) -> None:
        super().__init__(options, config)
        self.vocab_size, self.cls_token_id = config.vocab_size, config.cls_token_id
        self.special = config.special_token_ids
        excluded = torch.zeros(config.vocab_size, dtype=torch.bool)
        if options["exclude_special_and_stop_words"]:
            excluded[[i for i in stop_word_ids(config.tokenizer) if i < config.vocab_size]] = True
        # Derived from the tokenizer, not state: not saved in the checkpoint.
        self.register_buffer("stop_words", excluded, persistent=False)

    @staticmethod
    def head(config: VLConfig) -> nn.Module:
        """The concept head: the image's contrastive embedding -> a logit per row of the shared table."""
        return nn.Linear(config.embedding_dim, config.vocab_size)

    def candidates(self, batch: Batch) -> Tensor | None:
        if not self.options["exclude_special_and_stop_words"]:
            return None
        ids = batch["input_ids"]
        return maskable(ids, batch["attention_mask"], self.special) & ~self.stop_words[ids]

    def forward(self, model: VLModel, batch: Batch, encoded: PairEncoding | None,
                ctx: StepContext) -> tuple[Tensor, Logs]:
        if encoded is None:
            encoded = PairEncoding(model, batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher, encodings = ctx.momentum, ctx.teacher(batch)
        with torch.no_grad():
            image = type(encoded.image)(*(None if part is None else part.detach() for part in encoded.image))
            attention = teacher.cls_attention(encodings.text.tokens, mask, image)
            hard = keyword_labels(attention, ids, self.candidates(batch), self.options["votes_per_head"],
                                  self.options["keywords"], self.vocab_size, self.cls_token_id)
            soft = torch.sigmoid(teacher.heads["psl"](teacher.image_embedding(encodings.image)).float())
        logits = model.heads["psl"](model.image_embedding(encoded.image)).float()
        alpha = self.options["distill"] * ctx.ramp
        loss = (1 - alpha) * F.binary_cross_entropy_with_logits(logits, hard)
        if alpha > 0:
            loss = loss + alpha * F.binary_cross_entropy_with_logits(logits, soft)
        return loss, {"psl": loss.detach(), "psl_keywords": hard.sum(dim=1).mean()}


OBJECTIVE = PSL
