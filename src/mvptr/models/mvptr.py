"""MVPTR (Li et al., ACM MM 2022): three BERT stacks that align vision and language at several levels.

Why this file exists: it is the whole MVPTR network in one place, built from transformers' BERT modules
(`BertEmbeddings`, `BertEncoder`/`BertLayer` with SDPA attention, `BertPooler`), implementing the interface of
`mvptr.models.base` so that the trainer and the evaluation never reach into its attributes. Its objectives
(MCR, VSC, ITM, MLM, WPG) live in `mvptr.objectives` and add their heads (`model.heads`). The specification
is the MVPTR section of METHODS.md.

    text     [CLS] words concepts [SEP]  --shared embeddings-->  text encoder (num_text_layers)
    image    [CLS] tags [SEP]            --shared embeddings--\
             regions: Linear(feature_dim + 6 -> hidden) (+ LayerNorm) + dropout, no position embedding
                                                               -> visual encoder (num_visual_layers)
    fuse     [text outputs ; region outputs] (the tags and the visual [CLS] are dropped)
                                                               -> cross-modal encoder (num_cross_layers)
    heads    pooler on cross position 0 (+ ITM Linear(hidden -> 2)); LM head tied to the word embeddings
             (MLM, MCR); the contrastive head: two bias-free projections of the uni-modal [CLS] vectors and a
             learnable temperature (VSC)

One word-embedding table serves words, textual concepts and object tags: rows `[0, len(tokenizer))` are the
tokenizer's word pieces, the rows after them are the concepts that got a new row (`mvptr.concepts.vocab`),
so `vocab_size` is the vocabulary's `embedding_rows`. Concepts follow the words in the text sequence and take
the next position ids (a packed sequence, so the default `arange` positions are right). Text tokens have
token type 0; tags have token type 1 (`tag_token_type`), as the released code's segment B.

Use:
    config = MVPTRConfig.from_project(cfg, vocab_size=vocab["embedding_rows"], region_feature_dim=128)
    model = MVPTRModel(config)                       # BERT initialisation from scratch
    model.load_pretrained_bert("path/to/bert")       # or start from a BERT checkpoint (pretrained_prefixes)
    text = model.encode_text(input_ids, attention_mask)          # TextEncoding(cls (B, H), tokens (B, L, H))
    image = model.encode_image(batch)                # tags, regions, region_mask of a collated batch
    fusion = model.fuse(text.tokens, attention_mask, image)                              # Fusion(text, regions)
    model.save_pretrained(folder); MVPTRModel.from_pretrained(folder)

The model has no `forward`: an objective calls the stacks it needs (ITM runs `fuse` alone on negatives).
Under DistributedDataParallel, wrap a module whose `forward` computes the step's losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder

from mvptr.models.base import Batch, Fusion, ImageEncoding, RegionEmbeddings, TextEncoding, VLConfig, VLModel, run_stack
from mvptr.models.bert_init import HEAD_PREFIXES, bert_layer_sources


class MVPTRConfig(VLConfig):
    """Sizes and options of an MVPTR model (`VLConfig` plus the three stacks)."""

    model_type = "mvptr"

    num_text_layers: int = 6
    num_visual_layers: int = 6
    num_cross_layers: int = 6
    # Token type of the tags: the released code feeds `[CLS] tags [SEP]` as BERT's segment B.
    tag_token_type: int = 1


class MVPTRModel(VLModel):
    """Shared embeddings, text / visual / cross-modal BERT stacks and the heads of its objectives."""

    config: MVPTRConfig
    config_class = MVPTRConfig

    def __init__(self, config: MVPTRConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config.bert_config())
        self.text_encoder = BertEncoder(config.bert_config(config.num_text_layers))
        self.visual_encoder = BertEncoder(config.bert_config(config.num_visual_layers))
        self.cross_encoder = BertEncoder(config.bert_config(config.num_cross_layers))
        self.region_embeddings = RegionEmbeddings(config)
        self.post_init()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextEncoding:
        """Text encoder over `[CLS] words concepts [SEP]`: (B, L) ids -> its (B, L, H) output, which the
        cross-modal encoder continues from."""
        hidden = run_stack(self.text_encoder, self.embeddings(input_ids=input_ids), attention_mask)
        return TextEncoding(cls=hidden[:, 0], tokens=hidden)

    def encode_image(self, batch: Batch) -> ImageEncoding:
        """Visual encoder over `[CLS] tags [SEP]` followed by the regions; the visual [CLS] is the image vector."""
        tag_ids, region_mask = batch["tag_ids"], batch["region_mask"].bool()
        token_types = torch.full_like(tag_ids, self.config.tag_token_type)
        tags = self.embeddings(input_ids=tag_ids, token_type_ids=token_types)
        regions = self.region_embeddings(batch["region_feats"], batch["region_boxes"])
        mask = torch.cat([batch["tag_mask"].bool(), region_mask], dim=1)
        hidden = run_stack(self.visual_encoder, torch.cat([tags, regions], dim=1), mask)
        num_tags = tag_ids.shape[1]
        return ImageEncoding(cls=hidden[:, 0], regions=hidden[:, num_tags:], region_mask=region_mask,
                             tags=hidden[:, :num_tags])

    def fuse(self, tokens: Tensor, text_mask: Tensor, image: ImageEncoding, num_layers: int | None = None) -> Fusion:
        """Cross-modal encoder (its first `num_layers` layers) over `[text outputs ; region outputs]`."""
        hidden = torch.cat([tokens, image.regions], dim=1)
        mask = torch.cat([text_mask.bool(), image.region_mask], dim=1)
        out = run_stack(self.cross_encoder, hidden, mask, num_layers)
        return Fusion(text=out[:, : tokens.shape[1]], regions=out[:, tokens.shape[1]:])

    @classmethod
    def fusion_layers(cls, cfg: Mapping[str, Any]) -> int:
        return cfg["model"]["num_cross_layers"]

    @property
    def num_fusion_layers(self) -> int:
        return self.config.num_cross_layers

    def pretrained_prefixes(self, checkpoint_layers: int) -> dict[str, str]:
        """Model parameter prefix -> BERT checkpoint key prefix, for a checkpoint of L layers:
            embeddings.*, heads.pooler.*, heads.lm.*   <- embeddings.*, pooler.*, cls.predictions.* (if present)
            text_encoder.layer.i                       <- encoder.layer.min(i, L-1)      (layers 0..nt-1)
            visual_encoder.layer.i                     <- encoder.layer.min(i, L-1)      (layers 0..nv-1)
            cross_encoder.layer.j                      <- encoder.layer.max(0, L-nc+j)   (the last nc layers)
        So BERT-base (12 layers) into 6+6+6 gives text and visual <- 0..5 and cross <- 6..11. Not mapped, kept
        at their initialisation: region_embeddings, the contrastive and ITM heads (BERT's NSP head has the
        opposite label convention)."""
        config = self.config
        prefixes = dict(HEAD_PREFIXES)
        stacks = (("text_encoder", config.num_text_layers, False),
                  ("visual_encoder", config.num_visual_layers, False),
                  ("cross_encoder", config.num_cross_layers, True))
        for stack, num_layers, from_top in stacks:
            for i, source in enumerate(bert_layer_sources(num_layers, checkpoint_layers, from_top)):
                prefixes[f"{stack}.layer.{i}."] = f"encoder.layer.{source}."
        return prefixes
