"""The interface every pre-training method's model implements, and the parts all of them share.

Why: the trainer, the checkpointing, DDP and the whole of `mvptr.evaluate` talk to MVPTR, SIMLA and SemVLP
through these few methods only, never through a method's attributes, so that a method is a plug-in:
a model file (`mvptr.models.<name>`), a config file (`configs/methods/<name>.yaml`) and its objectives
(`mvptr.objectives.<name>`).

    encode_text(input_ids, attention_mask)            -> TextEncoding: the text [CLS] vector and the token
                                                         states the fusion starts from
    encode_image(batch)                               -> ImageEncoding: global vector, regions, their mask
    fuse(tokens, text_mask, image, num_layers=None)   -> Fusion: text and region states after the cross-modal
                                                         layers (the first `num_layers` only, for REC)
    num_fusion_layers                                 how many layers `fuse` can run
    pool(fusion)                                      (B, H) joint vector for classification heads
    match_logits(fusion)                              (B, 2) ITM logits, class 1 = the pair matches
    text_embedding(text), image_embedding(image)      L2-normalised (B, P) contrastive embeddings
    contrastive_embeddings(text, image)               both
    heads[name]                                       the heads the objectives declared (`Objective.head`)
    has_contrastive                                   whether the model has contrastive embeddings (SemVLP has
                                                      none: its retrieval scores every pair by ITM)
    step_mode(step)                                   context of one pre-training step, yielding the name of
                                                      the step's mode (SemVLP: single / two stream; else None)

Every model is a transformers `PreTrainedModel` with its `PreTrainedConfig`: `save_pretrained` /
`from_pretrained` and `gradient_checkpointing_enable()` work as users of that library expect. The heads are
built from `config.objectives` (one per distinct `Objective.head_name`), so a checkpoint rebuilds the same
modules; the LM head, where there is one, is tied to the shared word embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import BertConfig, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEncoder, BertPooler

from mvptr.regions.boxes import NUM_BOX_VALUES

Batch = Mapping[str, Tensor]


class TextEncoding(NamedTuple):
    """A text encoder's output."""

    cls: Tensor  # (B, H) the text [CLS] vector of the uni-modal pass (the contrastive embedding reads it)
    tokens: Tensor  # (B, L, H) what `fuse` starts from (MVPTR: the text encoder's output; SIMLA: the embeddings)


class ImageEncoding(NamedTuple):
    """An image encoder's output."""

    cls: Tensor  # (B, H) the global image vector (the visual [CLS])
    regions: Tensor  # (B, R, H) the region states
    region_mask: Tensor  # (B, R) bool, True on real regions
    tags: Tensor | None = None  # (B, T, H) the object-tag states, for methods that encode tags (MVPTR, SemVLP)
    tag_mask: Tensor | None = None  # (B, T) bool, True on real tag slots (where a method's fusion reads the tags)

    def rows(self, index: Tensor) -> ImageEncoding:
        """The encodings of the images `index` (a negative's image, the images of a batch's questions)."""
        return type(self)(*(None if part is None else part[index] for part in self))


class Fusion(NamedTuple):
    """The cross-modal layers' output: text positions first, then the regions (a method whose regions do not
    attend to the text returns the image encoder's region states)."""

    text: Tensor  # (B, L, H)
    regions: Tensor  # (B, R, H)


class VLConfig(PreTrainedConfig):
    """What every method's config holds: widths, the special token ids and the objectives whose heads the
    model carries. `from_project` reads them from the merged project config."""

    # Rows of the shared word-embedding table: tokenizer word pieces + new concept rows.
    vocab_size: int = 30522
    # Width of a region's detector feature; the 6 box values are appended inside the model.
    region_feature_dim: int = 2048
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    # Dropout of the embeddings, the region projection, attention probabilities and every sub-layer (BERT: 0.1).
    dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    # LayerNorm after the region projection (VinVL/Oscar's `use_img_layernorm`).
    region_layernorm: bool = True
    # Width of the contrastive projections; None keeps hidden_size.
    projection_dim: int | None = None
    # Bias in the contrastive projections (MVPTR: none; ALBEF/SIMLA: yes).
    projection_bias: bool = False
    temperature_init: float = 0.07
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    # Special word pieces (BERT's uncased vocabulary by default; from_project reads them from the tokenizer).
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # The word-piece vocabulary (model.tokenizer), for objectives that need words (PSL's stop words).
    tokenizer: str = "minilm"
    # The objectives the model was built for: one head per distinct head name (`mvptr.objectives`).
    objectives: list[str] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if max(self.special_token_ids) >= self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} does not hold the special token ids "
                             f"{self.special_token_ids}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_project(cls, cfg: Mapping[str, Any], vocab_size: int, region_feature_dim: int,
                     **overrides: Any) -> VLConfig:
        """Build from the merged project config: every `model.*` and `method.*` key that names a field, the
        special token ids of the tokenizer `model.tokenizer`, and the method's objectives; `overrides` win."""
        import dataclasses

        from mvptr.text import load_tokenizer  # the tokenizer is needed only here, not to build a model

        tokenizer = load_tokenizer(cfg["model"]["tokenizer"])
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} word pieces")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for section in ("model", "method") for key, value in cfg[section].items()
                  if key in names}
        values.update(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                      sep_token_id=tokenizer.sep_token_id, mask_token_id=tokenizer.mask_token_id,
                      objectives=list(cfg["pretrain"]["objectives"]))
        values.update(overrides)
        return cls(vocab_size=vocab_size, region_feature_dim=region_feature_dim, **values)

    @property
    def embedding_dim(self) -> int:
        """Width of the contrastive embeddings."""
        return self.projection_dim or self.hidden_size

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids that are never masked: padding, [CLS], [SEP] and [MASK] itself."""
        return (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)

    def bert_config(self, num_layers: int = 0, cross_attention: bool = False) -> BertConfig:
        """The transformers config of one stack (or of the embeddings and heads, with no layers).

        `cross_attention` gives every layer a cross-attention sub-layer (transformers allows it on decoder
        layers only; `bidirectional` makes their self-attention bidirectional again).
        """
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range, layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id, is_decoder=cross_attention, add_cross_attention=cross_attention,
            attn_implementation="sdpa")


def bidirectional(encoder: BertEncoder) -> BertEncoder:
    """Make the self-attention of a cross-attention stack bidirectional: transformers builds such layers as
    decoder layers, whose self-attention is causal whenever no mask tensor is passed."""
    for layer in encoder.layer:
        layer.attention.self.is_causal = False
    return encoder


def padding_mask(config: BertConfig, hidden: Tensor, mask: Tensor, keys: Tensor | None = None) -> Tensor | None:
    """The SDPA mask transformers builds from a 2-D padding mask (None when nothing is padded); with `keys`,
    the mask of queries `hidden` over the padded `keys` (cross-attention)."""
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask.bool(),
                                     encoder_hidden_states=keys)


class RegionEmbeddings(nn.Sequential):
    """(B, R, feature_dim) features + (B, R, 6) boxes -> (B, R, H): Linear (+ LayerNorm) + dropout, no
    position embedding (METHODS.md, MVPTR inputs; shared by every method so that they read regions alike)."""

    def __init__(self, config: VLConfig) -> None:
        hidden = config.hidden_size
        super().__init__(
            nn.Linear(config.region_feature_dim + NUM_BOX_VALUES, hidden),
            nn.LayerNorm(hidden, eps=config.layer_norm_eps) if config.region_layernorm else nn.Identity(),
            nn.Dropout(config.dropout))

    def forward(self, region_feats: Tensor, region_boxes: Tensor) -> Tensor:  # type: ignore[override]
        weight = self[0].weight
        return super().forward(torch.cat([region_feats.to(weight.dtype), region_boxes.to(weight.dtype)], dim=-1))


class VLModel(PreTrainedModel):
    """Base of every method's model: BERT initialisation, the heads of its objectives, the shared heads'
    interface. A subclass builds its encoders, then calls `post_init()` (which adds the heads)."""

    config: VLConfig
    config_class = VLConfig
    base_model_prefix = "vl"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def post_init(self) -> None:
        """Add the heads (after the subclass's encoders, so that a tied tensor is named by its embedding first),
        then transformers' initialisation and tying."""
        from mvptr.objectives import build_heads  # objectives name the heads; models do not import them eagerly

        self.heads = build_heads(self.config)
        self.heads["pooler"] = BertPooler(self.config.bert_config())
        if "lm" in self.heads:
            # The LM head predicts over the shared table: words, concepts and tags are scored by their embedding.
            # transformers ties (and saves once) what this maps; the subclass names its word embeddings.
            self._tied_weights_keys = {"heads.lm.decoder.weight": self.word_embeddings_key,
                                       "heads.lm.decoder.bias": "heads.lm.bias"}
        super().post_init()

    # The state-dict key of the shared word-embedding table (every method's `self.embeddings`, BertEmbeddings).
    word_embeddings_key = "embeddings.word_embeddings.weight"

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def embed_tokens(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, L, H) the shared embeddings of the token ids (positions and token types included)."""
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        init = getattr(module, "reset_extra_parameters", None)
        if init is not None:
            init()

    # --- the interface ---------------------------------------------------------------------------------

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextEncoding:
        raise NotImplementedError

    def encode_image(self, batch: Batch) -> ImageEncoding:
        raise NotImplementedError

    def fuse(self, tokens: Tensor, text_mask: Tensor, image: ImageEncoding, num_layers: int | None = None) -> Fusion:
        """The cross-modal layers over `TextEncoding.tokens` (B, L, H) and the image."""
        raise NotImplementedError

    @classmethod
    def fusion_layers(cls, cfg: Mapping[str, Any]) -> int:
        """How many layers `fuse` can run, for a model of the project config `cfg` (checked before a job)."""
        raise NotImplementedError

    @property
    def num_fusion_layers(self) -> int:
        raise NotImplementedError

    def pool(self, fusion: Fusion) -> Tensor:
        """(B, H) the pooler on the fused text [CLS]."""
        return self.heads["pooler"](fusion.text)

    def match_logits(self, fusion: Fusion) -> Tensor:
        """(B, 2) ITM logits on the pooled joint vector; class 1 = the pair matches."""
        return self.heads["itm"](self.pool(fusion))

    def pretrained_prefixes(self, checkpoint_layers: int) -> dict[str, str]:
        """Model parameter prefix -> BERT checkpoint key prefix (each method maps the layers onto its stacks)."""
        raise NotImplementedError

    def load_pretrained_bert(self, path: Path | str) -> dict[str, list[str]]:
        """Initialise from a BERT-family checkpoint (`mvptr.models.bert_init`); returns loaded/missing/unused."""
        from mvptr.models.bert_init import load_pretrained_bert

        return load_pretrained_bert(self, path, self.pretrained_prefixes)

    def text_embedding(self, text: TextEncoding) -> Tensor:
        """(B, P) L2-normalised contrastive embedding of the text [CLS]."""
        return self.heads["contrastive"].embed_text(text.cls)

    def image_embedding(self, image: ImageEncoding) -> Tensor:
        """(B, P) L2-normalised contrastive embedding of the image's global vector."""
        return self.heads["contrastive"].embed_image(image.cls)

    def contrastive_embeddings(self, text: TextEncoding, image: ImageEncoding) -> tuple[Tensor, Tensor]:
        return self.text_embedding(text), self.image_embedding(image)

    @property
    def has_contrastive(self) -> bool:
        """Whether an objective gave the model contrastive embeddings (MVPTR's VSC, SIMLA's ITC)."""
        return "contrastive" in self.heads

    @contextlib.contextmanager
    def step_mode(self, step: int) -> Iterator[str | None]:
        """The context in which pre-training step `step` runs, yielding the name of its mode for the logs; a
        method with one way of fusing has no modes (None). SemVLP alternates single- and two-stream steps."""
        yield None


def masked_region_states(regions: Tensor, batch: Batch, mask_embedding: Tensor) -> Tensor:
    """(B, R, H) the region embeddings with those where `batch["masked_regions"]` (B, R) is True replaced by the
    learned `mask_embedding` (H,) (masked region modelling: SIMLA's XMM, SemVLP's MOP); unchanged without it."""
    if "masked_regions" not in batch:
        return regions
    masked = batch["masked_regions"].bool()[..., None]
    return torch.where(masked, mask_embedding.to(regions.dtype), regions)


def run_stack(encoder: BertEncoder, hidden: Tensor, mask: Tensor, num_layers: int | None = None,
              keys: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Run the first `num_layers` (default all) layers of a BERT stack over `hidden` with padding `mask`,
    cross-attending to `keys` (with `key_mask`) where given. One loop, so that the layers' gradient
    checkpointing (transformers' `GradientCheckpointingLayer`) applies."""
    layers = encoder.layer if num_layers is None else encoder.layer[:num_layers]
    attention = padding_mask(encoder.config, hidden, mask)
    cross = padding_mask(encoder.config, hidden, key_mask, keys) if keys is not None else None
    for layer in layers:
        hidden = layer(hidden, attention, encoder_hidden_states=keys, encoder_attention_mask=cross)
    return hidden
