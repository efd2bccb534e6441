"""SemVLP (Li et al., arXiv 2103.07829) on regions: one shared Transformer pre-trained iteratively in two modes.

Why this file exists: it is the whole SemVLP network of this project, built from transformers' BERT modules
(`BertEmbeddings`, `BertEncoder`'s `BertLayer`s, `BertAttention` as the pluggable cross-attention, SDPA),
implementing the interface of `mvptr.models.base`. SemVLP has no public code; METHODS.md (SemVLP) says what is
known. Every choice the paper leaves open is a config key (`configs/methods/semvlp.yaml`, each an assumption):

    shared layers  model.num_text_layers + model.num_cross_layers BERT layers (12 at BERT-base, the same
                   budget as MVPTR and SIMLA), used by both modes
    single-stream  `[regions ; (tags ;) tokens]` concatenated, full self-attention in every layer (low-level,
                   fine-grained alignment)
    two-stream     the same layers encode the text and the image separately; in the top
                   `cross_attention_layers` (k) layers a cross-attention sub-layer (new weights, `BertAttention`)
                   lets each stream attend to the other one: text below layer L - k never sees the image
                   cross_attention_position  after_self: self-attention, cross-attention, FFN (BERT's decoder
                                             layer; keys = the other stream's self-attended states) |
                                             before_self: cross, self, FFN (LXMERT; keys = the other stream's
                                             layer input)
                   share_cross_attention     one cross-attention per layer for both directions, or one each
    mode           which of the two `fuse` runs: per pre-training step by the iterative schedule
                   (`stream_mode`: in every cycle `mode_ratio[0]` blocks of single-stream steps, then
                   `mode_ratio[1]` blocks of two-stream steps, `mode_block` steps each), and
                   `downstream_mode` for fine-tuning and evaluation
    inputs         text: `[CLS] words concepts [SEP]` through the shared embeddings (token type 0); regions as
                   every method reads them (`RegionEmbeddings`; masked ones replaced by a learned embedding for
                   MOP); with `use_tags` the regions' `[CLS] tags [SEP]` word pieces (token type 1) join the
                   image side
No contrastive head: `TextEncoding` and `ImageEncoding` hold embeddings (the fusion starts from them), and
retrieval ranks every pair by ITM (`mvptr.evaluate.finetune.retrieval`).

Use:
    model = SemVLPModel(SemVLPConfig.from_project(cfg, vocab_size=rows, region_feature_dim=128))
    with model.step_mode(step) as mode:              # "single" or "two", by the schedule
        fusion = model.fuse(model.encode_text(ids, mask).tokens, mask, model.encode_image(batch))
    model.mode = "two"                               # or set the mode by hand
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertEncoder, BertLayer

from mvptr.models.base import (
    Batch,
    Fusion,
    ImageEncoding,
    RegionEmbeddings,
    TextEncoding,
    masked_region_states,
    padding_mask,
    run_stack,
)
from mvptr.models.bert_init import HEAD_PREFIXES, bert_layer_sources
from mvptr.models.shared_stack import SharedStackConfig, SharedStackModel

MODES = ("single", "two")
CROSS_POSITIONS = ("after_self", "before_self")


def stream_mode(step: int, ratio: Sequence[int], block: int = 1) -> str:
    """The mode of pre-training step `step` (0-based): each cycle is `ratio[0]` blocks of single-stream steps,
    then `ratio[1]` blocks of two-stream steps, `block` steps per block ((1, 1), 1: S T S T ...; (2, 1), 1:
    S S T S S T ...; (1, 1), 100: 100 S, 100 T, ...). A ratio of 0 leaves that mode out."""
    single, two = ratio
    if single < 0 or two < 0 or single + two == 0 or block < 1:
        raise ValueError(f"mode_ratio {list(ratio)} and mode_block {block}: need two counts >= 0, not both 0, "
                         "and a block of at least 1 step")
    return "single" if (step // block) % (single + two) < single else "two"


class SemVLPConfig(SharedStackConfig):
    """Sizes and options of a SemVLP model (`VLConfig` plus the shared stack, its cross-attention and modes)."""

    model_type = "semvlp"

    # k: the top layers that get a cross-attention sub-layer in two-stream mode (1..layers); None:
    # num_cross_layers.
    cross_attention_layers: int | None = None
    cross_attention_position: str = "after_self"
    share_cross_attention: bool = False
    # The regions' object tags as word pieces on the image side.
    use_tags: bool = False
    # The iterative schedule: [single, two] blocks per cycle, steps per block.
    mode_ratio: list[int] | None = None
    mode_block: int = 1
    # The mode of fine-tuning and evaluation.
    downstream_mode: str = "single"
    # Outputs of the QA head: the most frequent answers of the VQA training questions (VQA v2: 3129).
    qa_answers: int = 3129

    def __post_init__(self, **kwargs: Any) -> None:
        if self.mode_ratio is None:
            self.mode_ratio = [1, 1]
        stream_mode(0, self.mode_ratio, self.mode_block)  # raises on a bad schedule
        if not 1 <= self.cross_layers <= self.num_shared_layers:
            raise ValueError(f"cross_attention_layers {self.cross_layers} must be in [1, "
                             f"{self.num_shared_layers}] (the shared layers)")
        if self.cross_attention_position not in CROSS_POSITIONS:
            raise ValueError(f"cross_attention_position {self.cross_attention_position!r}: one of {CROSS_POSITIONS}")
        if self.downstream_mode not in MODES:
            raise ValueError(f"downstream_mode {self.downstream_mode!r}: one of {MODES}")
        super().__post_init__(**kwargs)

    @property
    def cross_layers(self) -> int:
        """k, the top layers with cross-attention in two-stream mode."""
        return self.cross_attention_layers or self.num_cross_layers

    @property
    def first_cross_layer(self) -> int:
        """Index of the first layer with cross-attention in two-stream mode (L - k)."""
        return self.num_shared_layers - self.cross_layers


class CoAttention(GradientCheckpointingLayer):
    """The cross-attention sub-layers of one top layer (text -> image and image -> text; one module when
    shared) and the two-stream pass through that layer. A `GradientCheckpointingLayer`, so that activation
    checkpointing covers the two-stream top layers as it covers the plain BERT layers."""

    def __init__(self, config: SemVLPConfig) -> None:
        super().__init__()
        cross = config.bert_config(cross_attention=True)
        self.position = config.cross_attention_position
        self.text = BertAttention(cross, is_cross_attention=True)
        # Shared: the image stream uses `text` too (not registered twice, so a checkpoint holds it once).
        self.image = None if config.share_cross_attention else BertAttention(cross, is_cross_attention=True)

    def forward(self, text: Tensor, image: Tensor, text_attention: Tensor | None, image_attention: Tensor | None,
                text_cross: Tensor | None, image_cross: Tensor | None, *, layer: BertLayer) -> tuple[Tensor, Tensor]:
        def self_attend(hidden: Tensor, attention: Tensor | None) -> Tensor:
            return layer.attention(hidden, attention_mask=attention)[0]

        def cross_attend(module: BertAttention, hidden: Tensor, keys: Tensor, mask: Tensor | None) -> Tensor:
            return module(hidden, encoder_hidden_states=keys, encoder_attention_mask=mask)[0]

        image_module = self.image if self.image is not None else self.text
        if self.position == "after_self":
            text, image = self_attend(text, text_attention), self_attend(image, image_attention)
            text, image = (cross_attend(self.text, text, image, text_cross),
                           cross_attend(image_module, image, text, image_cross))
        else:
            text, image = (cross_attend(self.text, text, image, text_cross),
                           cross_attend(image_module, image, text, image_cross))
            text, image = self_attend(text, text_attention), self_attend(image, image_attention)
        return layer.feed_forward_chunk(text), layer.feed_forward_chunk(image)


class SemVLPModel(SharedStackModel):
    """Shared embeddings, the shared layers, the two-stream cross-attention of the top k layers, the heads."""

    config: SemVLPConfig
    config_class = SemVLPConfig

    def __init__(self, config: SemVLPConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config.bert_config())
        self.encoder = BertEncoder(config.bert_config(config.num_shared_layers))
        self.co_attention = nn.ModuleList(CoAttention(config) for _ in range(config.cross_layers))
        self.region_embeddings = RegionEmbeddings(config)
        # The embedding of a masked region (MOP), learned.
        self.region_mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.mode = config.downstream_mode
        self.post_init()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.region_mask_embedding.normal_(0.0, self.config.initializer_range)

    @contextlib.contextmanager
    def step_mode(self, step: int) -> Iterator[str | None]:
        """Step `step` runs in the mode of the iterative schedule (`stream_mode`); the mode is restored after."""
        previous = self.mode
        self.mode = stream_mode(step, self.config.mode_ratio, self.config.mode_block)
        try:
            yield self.mode
        finally:
            self.mode = previous

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextEncoding:
        """The shared embeddings of the tokens: both modes start from them (SemVLP has no uni-modal text
        vector of its own; `cls` is the [CLS] embedding)."""
        embedded = self.embed_tokens(input_ids)
        return TextEncoding(cls=embedded[:, 0], tokens=embedded)

    def encode_image(self, batch: Batch) -> ImageEncoding:
        """The region embeddings (those where `batch["masked_regions"]` is True replaced by the mask embedding)
        and, with `use_tags`, the tag embeddings; `cls` is the mean of the real regions' embeddings."""
        region_mask = batch["region_mask"].bool()
        regions = masked_region_states(self.region_embeddings(batch["region_feats"], batch["region_boxes"]), batch,
                                       self.region_mask_embedding)
        weights = region_mask[..., None].to(regions.dtype)
        cls = (regions * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        tags = tag_mask = None
        if self.config.use_tags:
            tag_ids = batch["tag_ids"]
            tags = self.embed_tokens(tag_ids, torch.ones_like(tag_ids))
            tag_mask = batch["tag_mask"].bool()
        return ImageEncoding(cls=cls, regions=regions, region_mask=region_mask, tags=tags, tag_mask=tag_mask)

    @staticmethod
    def image_tokens(image: ImageEncoding) -> tuple[Tensor, Tensor]:
        """(B, (T +) R, H) the image side's tokens ((tags,) regions) and their mask."""
        if image.tags is None:
            return image.regions, image.region_mask
        return torch.cat([image.tags, image.regions], dim=1), torch.cat([image.tag_mask, image.region_mask], dim=1)

    def fuse(self, tokens: Tensor, text_mask: Tensor, image: ImageEncoding, num_layers: int | None = None) -> Fusion:
        """The shared layers in the current `mode` over the text embeddings and the image side."""
        image_tokens, image_mask = self.image_tokens(image)
        if self.mode == "single":
            hidden = run_stack(self.encoder, torch.cat([image_tokens, tokens], dim=1),
                               torch.cat([image_mask, text_mask.bool()], dim=1), num_layers)
            text, image_out = hidden[:, image_tokens.shape[1]:], hidden[:, :image_tokens.shape[1]]
        else:
            text, image_out = self.two_stream(tokens, text_mask, image_tokens, image_mask, num_layers)
        return Fusion(text=text, regions=image_out[:, image_out.shape[1] - image.regions.shape[1]:])

    def two_stream(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor,
                   num_layers: int | None = None) -> tuple[Tensor, Tensor]:
        """Each stream through the shared layers alone, then (from layer L - k) with the cross-attention."""
        config = self.encoder.config
        text_attention, image_attention = padding_mask(config, text, text_mask), padding_mask(config, image, image_mask)
        text_cross = padding_mask(config, text, image_mask, image)
        image_cross = padding_mask(config, image, text_mask, text)
        first_cross = self.config.first_cross_layer
        layers = self.encoder.layer if num_layers is None else self.encoder.layer[:num_layers]
        for index, layer in enumerate(layers):
            if index < first_cross:
                text, image = layer(text, text_attention), layer(image, image_attention)
            else:
                text, image = self.co_attention[index - first_cross](
                    text, image, text_attention, image_attention, text_cross, image_cross, layer=layer)
        return text, image

    def pretrained_prefixes(self, checkpoint_layers: int) -> dict[str, str]:
        """Model parameter prefix -> BERT checkpoint key prefix, for a checkpoint of L layers:
            embeddings.*, heads.pooler.*, heads.lm.*   <- embeddings.*, pooler.*, cls.predictions.* (if present)
            encoder.layer.i                            <- encoder.layer.min(i, L-1)
        The cross-attention sub-layers keep their initialisation (BERT has none), as do the region embeddings
        and the ITM, MOP and QA heads."""
        prefixes = dict(HEAD_PREFIXES)
        for i, source in enumerate(bert_layer_sources(self.config.num_shared_layers, checkpoint_layers,
                                                      from_top=False)):
            prefixes[f"encoder.layer.{i}."] = f"encoder.layer.{source}."
        return prefixes
