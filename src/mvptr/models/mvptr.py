"""MVPTR (Li et al., ACM MM 2022): three BERT stacks that align vision and language at several levels.

Why this file exists: it is the whole MVPTR network in one place, built from transformers' BERT modules
(`BertEmbeddings`, `BertEncoder`/`BertLayer` with SDPA attention, `BertPooler`, `BertLMPredictionHead`), so
that the objectives in `mvptr.tasks` (MCR, VSC, ITM, MLM, WPG) can call its three stacks separately.
The specification is the MVPTR section of METHODS.md.

    text     [CLS] words concepts [SEP]  --shared embeddings-->  text encoder (num_text_layers)
    image    [CLS] tags [SEP]            --shared embeddings--\
             regions: Linear(feature_dim + 6 -> hidden) (+ LayerNorm) + dropout, no position embedding
                                                               -> visual encoder (num_visual_layers)
    cross    [text outputs ; region outputs] (the tags and the visual [CLS] are dropped)
                                                               -> cross-modal encoder (num_cross_layers)
    heads    pooler on cross position 0 -> ITM Linear(hidden -> 2); LM head tied to the word embeddings
             (MLM, MCR); two bias-free projections of the uni-modal [CLS] vectors and a learnable
             temperature (VSC)

One word-embedding table serves words, textual concepts and object tags: rows `[0, len(tokenizer))` are the
tokenizer's word pieces, the rows after them are the concepts that got a new row (`mvptr.concepts.vocab`),
so `vocab_size` is the vocabulary's `embedding_rows`. Concepts follow the words in the text sequence and take
the next position ids (a packed sequence, so the default `arange` positions are right). Text tokens have
token type 0; tags have token type 1 (`tag_token_type`), as the released code's segment B.

Use:
    config = MVPTRConfig.from_config(cfg, vocab_size=vocab["embedding_rows"], region_feature_dim=128)
    model = MVPTRModel(config)                       # BERT initialisation from scratch
    load_pretrained_bert(model, "path/to/bert")      # or start from a BERT checkpoint (mapping below)
    text = model.encode_text(input_ids, attention_mask)                                  # (B, L, H)
    image = model.encode_image(tag_ids, tag_mask, region_feats, region_boxes, region_mask)
    joint = model.cross(text, attention_mask, image.regions, region_mask)               # (B, L + R, H)

The model has no `forward`: an objective calls the stacks it needs (ITM runs `cross` alone on negatives).
Under DistributedDataParallel, wrap a module whose `forward` computes the step's losses. The LM head's
decoder shares its weight with the word embeddings (and its bias with `lm_head.bias`): save with
`safetensors.torch.save_model`, which handles shared tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BertConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertLMPredictionHead, BertPooler

from mvptr.regions.boxes import NUM_BOX_VALUES


@dataclass
class MVPTRConfig:
    """Sizes and options of an MVPTR model; `from_config` reads them from the project config."""

    # Rows of the shared word-embedding table: tokenizer word pieces + new concept rows.
    vocab_size: int
    # Width of a region's detector feature; the 6 box values are appended inside the model.
    region_feature_dim: int
    hidden_size: int = 768
    num_text_layers: int = 6
    num_visual_layers: int = 6
    num_cross_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    # Dropout of the embeddings, the region projection, attention probabilities and every sub-layer (BERT: 0.1).
    dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    # Token type of the tags: the released code feeds `[CLS] tags [SEP]` as BERT's segment B.
    tag_token_type: int = 1
    # LayerNorm after the region projection (VinVL/Oscar's `use_img_layernorm`).
    region_layernorm: bool = True
    # Width of the VSC projections; None keeps hidden_size (the released code projects hidden -> hidden).
    vsc_dim: int | None = None
    temperature_init: float = 0.07
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    # Special word pieces (BERT's uncased vocabulary by default; from_config reads them from the tokenizer).
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        specials = (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        if max(specials) >= self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} does not hold the special token ids {specials}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vocab_size: int, region_feature_dim: int,
                    **overrides: Any) -> MVPTRConfig:
        """Build from the merged project config: every `cfg["model"]` key that names a field is used, the
        special token ids come from the tokenizer `model.tokenizer`, and `overrides` win over both."""
        from mvptr.text import load_tokenizer  # the tokenizer is needed only here, not to build a model

        model_cfg = cfg["model"]
        tokenizer = load_tokenizer(model_cfg["tokenizer"])
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} word pieces")
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {key: value for key, value in model_cfg.items() if key in names}
        values.update(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                      sep_token_id=tokenizer.sep_token_id, mask_token_id=tokenizer.mask_token_id)
        values.update(overrides)
        return cls(vocab_size=vocab_size, region_feature_dim=region_feature_dim, **values)

    @property
    def projection_dim(self) -> int:
        return self.vsc_dim or self.hidden_size

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids that are never masked: padding, [CLS], [SEP] and [MASK] itself."""
        return (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)

    def bert_config(self, num_layers: int = 0) -> BertConfig:
        """The transformers config of one stack (or of the embeddings and heads, with no layers)."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range, layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id, attn_implementation="sdpa")


class ImageEncoding(NamedTuple):
    """The visual encoder's output, split where the cross-modal encoder needs it."""

    tags: Tensor  # (B, T, H) at `[CLS] tags [SEP]`; tags[:, 0] is the visual [CLS]
    regions: Tensor  # (B, R, H) at the regions


class MVPTRModel(nn.Module):
    """Shared embeddings, text / visual / cross-modal BERT stacks and the heads of the five objectives."""

    def __init__(self, config: MVPTRConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        shared = config.bert_config()
        self.embeddings = BertEmbeddings(shared)
        self.text_encoder = BertEncoder(config.bert_config(config.num_text_layers))
        self.visual_encoder = BertEncoder(config.bert_config(config.num_visual_layers))
        self.cross_encoder = BertEncoder(config.bert_config(config.num_cross_layers))
        self.region_embeddings = nn.Sequential(
            nn.Linear(config.region_feature_dim + NUM_BOX_VALUES, hidden),
            nn.LayerNorm(hidden, eps=config.layer_norm_eps) if config.region_layernorm else nn.Identity(),
            nn.Dropout(config.dropout),
        )
        self.pooler = BertPooler(shared)
        self.lm_head = BertLMPredictionHead(shared)
        self.text_proj = nn.Linear(hidden, config.projection_dim, bias=False)
        self.visual_proj = nn.Linear(hidden, config.projection_dim, bias=False)
        self.temperature = nn.Parameter(torch.tensor(config.temperature_init))
        self.itm_head = nn.Linear(hidden, 2)
        self.apply(self._init_weights)
        self.tie_weights()

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

    def tie_weights(self) -> None:
        """The LM head predicts over the shared table: words, concepts and tags are scored by their embedding."""
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.lm_head.decoder.bias = self.lm_head.bias

    @staticmethod
    def _run(encoder: BertEncoder, hidden: Tensor, mask: Tensor) -> Tensor:
        # The SDPA mask is built by transformers from the 2-D padding mask (None when nothing is padded).
        attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask.bool())
        return encoder(hidden, attention_mask=attention).last_hidden_state

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Text encoder over `[CLS] words concepts [SEP]`: (B, L) ids -> (B, L, H)."""
        hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        return self._run(self.text_encoder, hidden, attention_mask)

    def embed_regions(self, region_feats: Tensor, region_boxes: Tensor) -> Tensor:
        """(B, R, feature_dim) features + (B, R, 6) boxes -> (B, R, H); regions get no position embedding."""
        weight = self.region_embeddings[0].weight
        inputs = torch.cat([region_feats.to(weight.dtype), region_boxes.to(weight.dtype)], dim=-1)
        return self.region_embeddings(inputs)

    def encode_image(self, tag_ids: Tensor, tag_mask: Tensor, region_feats: Tensor, region_boxes: Tensor,
                     region_mask: Tensor) -> ImageEncoding:
        """Visual encoder over `[CLS] tags [SEP]` followed by the regions."""
        token_types = torch.full_like(tag_ids, self.config.tag_token_type)
        tags = self.embeddings(input_ids=tag_ids, token_type_ids=token_types)
        regions = self.embed_regions(region_feats, region_boxes)
        mask = torch.cat([tag_mask.bool(), region_mask.bool()], dim=1)
        hidden = self._run(self.visual_encoder, torch.cat([tags, regions], dim=1), mask)
        num_tags = tag_ids.shape[1]
        return ImageEncoding(tags=hidden[:, :num_tags], regions=hidden[:, num_tags:])

    def cross(self, text_hidden: Tensor, text_mask: Tensor, region_hidden: Tensor, region_mask: Tensor) -> Tensor:
        """Cross-modal encoder over `[text outputs ; region outputs]`: (B, L + R, H). Position 0 is the text
        [CLS], which the pooler reads."""
        hidden = torch.cat([text_hidden, region_hidden], dim=1)
        mask = torch.cat([text_mask.bool(), region_mask.bool()], dim=1)
        return self._run(self.cross_encoder, hidden, mask)


# --- Initialising from a BERT checkpoint ------------------------------------------------------------------

# Tensors whose first dimension may differ from the checkpoint's: the model's vocabulary has concept rows
# after the word pieces (they keep their initialisation), and the model may keep fewer positions.
_ROW_PREFIX = {"embeddings.word_embeddings.weight", "lm_head.bias", "embeddings.position_embeddings.weight"}
_POSITIONS = "embeddings.position_embeddings.weight"


def read_bert_state(path: Path | str) -> dict[str, Tensor]:
    """A BERT checkpoint's tensors, keys without the `bert.` prefix and with TF-era gamma/beta renamed.

    `path` is a file (.safetensors or a torch .bin) or a folder holding model.safetensors or pytorch_model.bin.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = files[0]
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                               weights_only=True)
    renamed = {}
    for key, tensor in state.items():
        key = key.removeprefix("bert.")
        if key.endswith("LayerNorm.gamma") or key.endswith("LayerNorm.beta"):
            key = key.rsplit(".", 1)[0] + (".weight" if key.endswith("gamma") else ".bias")
        renamed[key] = tensor
    return renamed


def bert_layer_sources(num_layers: int, checkpoint_layers: int, from_top: bool) -> list[int]:
    """Which checkpoint layer initialises each layer of a stack.

    Bottom-aligned (text, visual): layer i <- i, the top checkpoint layer repeated if the stack is deeper.
    Top-aligned (cross): the last `num_layers` layers, the bottom one repeated if the checkpoint is shallower.
    """
    if from_top:
        return [max(0, checkpoint_layers - num_layers + i) for i in range(num_layers)]
    return [min(i, checkpoint_layers - 1) for i in range(num_layers)]


def pretrained_prefixes(config: MVPTRConfig, checkpoint_layers: int) -> dict[str, str]:
    """Model parameter prefix -> checkpoint key prefix (see `load_pretrained_bert`)."""
    prefixes = {"embeddings.": "embeddings.", "pooler.": "pooler.",
                "lm_head.transform.": "cls.predictions.transform.", "lm_head.bias": "cls.predictions.bias"}
    stacks = (("text_encoder", config.num_text_layers, False), ("visual_encoder", config.num_visual_layers, False),
              ("cross_encoder", config.num_cross_layers, True))
    for stack, num_layers, from_top in stacks:
        for i, source in enumerate(bert_layer_sources(num_layers, checkpoint_layers, from_top)):
            prefixes[f"{stack}.layer.{i}."] = f"encoder.layer.{source}."
    return prefixes


def _checkpoint_key(name: str, prefixes: Mapping[str, str]) -> str | None:
    for prefix, source in prefixes.items():
        if name.startswith(prefix):
            return source + name[len(prefix):]
    return None


@torch.no_grad()
def _copy(target: Tensor, source: Tensor, name: str) -> None:
    if target.shape == source.shape:
        target.copy_(source)
        return
    fits = name in _ROW_PREFIX and target.shape[1:] == source.shape[1:]
    if not fits or (source.shape[0] > target.shape[0] and name != _POSITIONS):
        raise ValueError(f"{name}: checkpoint shape {tuple(source.shape)} does not fit the model's "
                         f"{tuple(target.shape)}")
    rows = min(source.shape[0], target.shape[0])
    target[:rows].copy_(source[:rows])


def load_pretrained_bert(model: MVPTRModel, path: Path | str) -> dict[str, list[str]]:
    """Initialise `model` from a BERT-family checkpoint with L layers (e.g. bert-base-uncased, MiniLM).

    Mapping (model <- checkpoint):
        embeddings.*                      <- embeddings.* (word rows [0, V_ckpt) only: the concept rows
                                             after the tokenizer's vocabulary keep their initialisation;
                                             the first max_position_embeddings positions)
        text_encoder.layer.i              <- encoder.layer.min(i, L-1)          (layers 0..nt-1)
        visual_encoder.layer.i            <- encoder.layer.min(i, L-1)          (layers 0..nv-1)
        cross_encoder.layer.j             <- encoder.layer.max(0, L-nc+j)       (the last nc layers)
        pooler.*                          <- pooler.*
        lm_head.transform.*, lm_head.bias <- cls.predictions.transform.*, cls.predictions.bias (if present)
    So BERT-base (12 layers) into 6+6+6 gives text and visual <- 0..5 and cross <- 6..11. Not mapped, kept at
    their initialisation: region_embeddings, text_proj, visual_proj, temperature, itm_head (BERT's NSP head
    has the opposite label convention). Keys may carry a `bert.` prefix.

    Returns {"loaded": model parameters set, "missing": model parameters left as they were, "unused":
    checkpoint keys not used}. A tensor whose shape does not fit raises ValueError.
    """
    state = read_bert_state(path)
    layer_ids = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")}
    if not layer_ids:
        raise ValueError(f"{path}: no encoder.layer.* tensors; not a BERT checkpoint")
    prefixes = pretrained_prefixes(model.config, max(layer_ids) + 1)
    loaded, missing, used = [], [], set()
    # named_parameters lists a tied tensor once (under embeddings.word_embeddings / lm_head.bias).
    for name, parameter in model.named_parameters():
        source = _checkpoint_key(name, prefixes)
        if source is None or source not in state:
            missing.append(name)
            continue
        _copy(parameter, state[source], name)
        loaded.append(name)
        used.add(source)
    return {"loaded": loaded, "missing": missing, "unused": sorted(set(state) - used)}
