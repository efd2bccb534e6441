"""SIMLA (Khan et al., ECCV 2022) on regions: one shared BERT stack run in a text mode and a multimodal mode.

Why this file exists: it is the whole SIMLA network of this project in one place, built from transformers'
BERT modules (`BertEmbeddings`, `BertEncoder` whose `BertLayer`s carry a cross-attention sub-layer, SDPA
attention), implementing the interface of `mvptr.models.base`. Its objectives (ITC, ITM, MLM, XMM, PSL) live
in `mvptr.objectives` and add their heads. The specification is the SIMLA section of METHODS.md; the released
code runs a ViT over image patches, this project reads the same region store as MVPTR (features + boxes),
so that the methods differ in their objectives and architecture, not in their inputs.

    text       [CLS] words concepts [SEP] --shared embeddings--> the shared stack in `text` mode (its
               cross-attention sub-layers skipped): the text [CLS] for ITC
    image      [CLS] (a learned vector) + regions: Linear(feature_dim + 6 -> hidden) (+ LayerNorm) + dropout,
               no position embedding -> image encoder (method.num_image_layers, default model.num_visual_layers)
    fuse       the shared stack in `multimodal` mode: the token *embeddings* again, every layer
               cross-attending to the image tokens ([CLS] + regions); the regions are not changed by it
    xmm        the shared stack with the image tokens as queries, cross-attending to the text embeddings
               (SIMLA's image-side reconstruction, `reconstruct_image`)
    heads      the ITC projections (with bias) and temperature, the ITM head, the LM head tied to the word
               embeddings, the XMM and PSL heads (their objectives declare them)
Depth: the shared stack has model.num_text_layers + model.num_cross_layers layers, so that at BERT-base
(6 + 6) it is SIMLA's 12-layer BERT and the layer budget matches MVPTR's.

Use:
    model = SIMLAModel(SIMLAConfig.from_project(cfg, vocab_size=rows, region_feature_dim=128))
    text = model.encode_text(input_ids, attention_mask)          # TextEncoding(cls, tokens = the embeddings)
    image = model.encode_image(batch)                             # batch["masked_regions"] masks regions (XMM)
    fusion = model.fuse(text.tokens, attention_mask, image)
    attention = model.cls_attention(text.tokens, attention_mask, image)   # (B, heads, L), PSL's keywords
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder

from mvptr.models.base import (
    Batch,
    Fusion,
    ImageEncoding,
    RegionEmbeddings,
    TextEncoding,
    bidirectional,
    masked_region_states,
    run_stack,
)
from mvptr.models.bert_init import HEAD_PREFIXES, bert_layer_sources
from mvptr.models.shared_stack import SharedStackConfig, SharedStackModel


class SIMLAConfig(SharedStackConfig):
    """Sizes and options of a SIMLA model (`VLConfig` plus the shared stack and the image encoder)."""

    model_type = "simla"

    num_visual_layers: int = 6
    # Layers of the image encoder over the regions; None: num_visual_layers.
    num_image_layers: int | None = None
    projection_bias: bool = True
    projection_dim: int | None = 256

    @property
    def image_layers(self) -> int:
        return self.num_image_layers or self.num_visual_layers


class SIMLAModel(SharedStackModel):
    """Shared embeddings, the shared text / multimodal stack, the region encoder and the heads of its objectives."""

    config: SIMLAConfig
    config_class = SIMLAConfig

    def __init__(self, config: SIMLAConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config.bert_config())
        self.encoder = bidirectional(BertEncoder(config.bert_config(config.num_shared_layers, cross_attention=True)))
        self.image_encoder = BertEncoder(config.bert_config(config.image_layers))
        self.region_embeddings = RegionEmbeddings(config)
        # The image [CLS] and the embedding of a masked region (XMM), learned.
        self.image_cls = nn.Parameter(torch.zeros(config.hidden_size))
        self.region_mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.post_init()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.image_cls.normal_(0.0, self.config.initializer_range)
            self.region_mask_embedding.normal_(0.0, self.config.initializer_range)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextEncoding:
        """The shared stack in text mode for the [CLS] vector; the fusion starts again from the embeddings."""
        embedded = self.embed_tokens(input_ids)
        hidden = run_stack(self.encoder, embedded, attention_mask)
        return TextEncoding(cls=hidden[:, 0], tokens=embedded)

    def encode_image(self, batch: Batch) -> ImageEncoding:
        """The image encoder over `[CLS] regions`; regions where `batch["masked_regions"]` (B, R) is True are
        replaced by the learned mask embedding first (XMM)."""
        region_mask = batch["region_mask"].bool()
        regions = masked_region_states(self.region_embeddings(batch["region_feats"], batch["region_boxes"]), batch,
                                       self.region_mask_embedding)
        cls = self.image_cls.to(regions.dtype).expand(regions.shape[0], 1, -1)
        mask = torch.cat([region_mask.new_ones(region_mask.shape[0], 1), region_mask], dim=1)
        hidden = run_stack(self.image_encoder, torch.cat([cls, regions], dim=1), mask)
        return ImageEncoding(cls=hidden[:, 0], regions=hidden[:, 1:], region_mask=region_mask)

    @staticmethod
    def image_tokens(image: ImageEncoding) -> tuple[Tensor, Tensor]:
        """(B, 1 + R, H) `[CLS] regions` and their mask, what the text cross-attends to."""
        tokens = torch.cat([image.cls[:, None], image.regions], dim=1)
        mask = torch.cat([image.region_mask.new_ones(image.region_mask.shape[0], 1), image.region_mask], dim=1)
        return tokens, mask

    def fuse(self, tokens: Tensor, text_mask: Tensor, image: ImageEncoding, num_layers: int | None = None) -> Fusion:
        """The shared stack in multimodal mode: the text embeddings, every layer cross-attending to the image."""
        keys, key_mask = self.image_tokens(image)
        text = run_stack(self.encoder, tokens, text_mask, num_layers, keys=keys, key_mask=key_mask)
        return Fusion(text=text, regions=image.regions)

    def reconstruct_image(self, image: ImageEncoding, text_embeddings: Tensor, text_mask: Tensor) -> Tensor:
        """(B, R, H) XMM's image side: the image tokens through the shared stack as queries, cross-attending to
        the text embeddings (as the released code), at the regions (the [CLS] is not masked, so dropped)."""
        tokens, mask = self.image_tokens(image)
        out = run_stack(self.encoder, tokens, mask, keys=text_embeddings, key_mask=text_mask)
        return out[:, 1:]

    def cls_attention(self, tokens: Tensor, text_mask: Tensor, image: ImageEncoding) -> Tensor:
        """(B, heads, L) the last layer's self-attention probabilities of the text [CLS] in multimodal mode
        (PSL's keyword votes), 0 on padding. Computed from that layer's query and key projections, as SDPA
        does not return its attention weights."""
        keys, key_mask = self.image_tokens(image)
        last = self.encoder.layer[-1]
        hidden = run_stack(self.encoder, tokens, text_mask, self.num_fusion_layers - 1, keys=keys, key_mask=key_mask)
        attention = last.attention.self
        heads, width = attention.num_attention_heads, attention.attention_head_size
        query = attention.query(hidden[:, :1]).view(hidden.shape[0], 1, heads, width).transpose(1, 2)
        key = attention.key(hidden).view(hidden.shape[0], -1, heads, width).transpose(1, 2)
        scores = (query @ key.transpose(-1, -2)).squeeze(2) * attention.scaling  # (B, heads, L)
        scores = scores.float().masked_fill(~text_mask.bool()[:, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def pretrained_prefixes(self, checkpoint_layers: int) -> dict[str, str]:
        """Model parameter prefix -> BERT checkpoint key prefix, for a checkpoint of L layers:
            embeddings.*, heads.pooler.*, heads.lm.*   <- embeddings.*, pooler.*, cls.predictions.* (if present)
            encoder.layer.i (self-attention, FFN)      <- encoder.layer.min(i, L-1)   (SIMLA starts from BERT)
            image_encoder.layer.i                      <- encoder.layer.min(i, L-1)   (as MVPTR's visual stack)
        The cross-attention sub-layers keep their initialisation (BERT has none), as do the region embeddings,
        the image [CLS] and the ITC, ITM, XMM and PSL heads."""
        config = self.config
        prefixes = dict(HEAD_PREFIXES)
        for stack, num_layers in (("encoder", config.num_shared_layers), ("image_encoder", config.image_layers)):
            for i, source in enumerate(bert_layer_sources(num_layers, checkpoint_layers, from_top=False)):
                for part in ("attention.", "intermediate.", "output."):
                    prefixes[f"{stack}.layer.{i}.{part}"] = f"encoder.layer.{source}.{part}"
        return prefixes
