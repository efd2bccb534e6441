"""Import the released pre-trained weights of MVPTR and SIMLA as this project's pre-trained model artifact.

Why: the published models (MVPTR's `pretrained_base`, Junction4Nako/mvp_pytorch; SIMLA's 4M checkpoint,
codezakh/SIMLA) are what a user wants to fine-tune through this project's evaluation protocol, beside the
project's own pre-training runs. The evaluation reads a stage's `model.safetensors` (`mvptr evaluate run
--weights`, written by `safetensors.torch.save_model` in `mvptr.train.loop`): this project's parameter names,
shapes and conventions. Each method's released state dict is renamed by one table of rules (MVPTR_RULES,
SIMLA_RULES), derived from the released model code (only the names and shapes; no code of theirs is used).

Run:
    mvptr import-checkpoint --method mvptr --checkpoint pretrained_models/base/pytorch_model.bin
        --vocab results/D/concepts/concept_vocab.json --regions results/D/regions --out DIR [key=value ...]
    -> DIR/model.safetensors (what `mvptr evaluate run --weights` reads) and DIR/import_report.json
(`mvptr.models.commands`), or in Python:
    state = read_checkpoint("checkpoint_29.pth")              # mvptr.checkpoint_files: .bin/.pt/.pth, .safetensors
    model, report = import_checkpoint(state, cfg, vocab_size, region_feature_dim)

A rule maps released keys (a regular expression over the whole key) to one of our parameters, with a
conversion: `copy`; `rows` (the first rows only: the word-piece rows of a table whose other rows are concepts,
which differ between the released vocabulary and this project's); `transpose` (MVPTR's projections are
matrices applied as `x @ P`, ours are nn.Linear: `x @ W.T`); `swap_classes` (MVPTR's ITM head has class 0 =
match, ours class 1); `temperature` (MVPTR learns CLIP's logit scale s, logits = sim * exp(s); ours divides
by a temperature: exp(-s)). A rule without a target names released weights that have no counterpart here,
and why. The report:
    loaded          {our parameter: the released key it was read from}
    partial         {our parameter: which rows were copied} (the others keep their initialisation)
    filled          {our parameter: why it was set without a released counterpart} (SIMLA's zero token types)
    missing         {our parameter: why} the parameters the checkpoint did not fill: they keep the fresh
                    initialisation of `build_model` (seeded by the config's `seed`)
    unused          {released key: why} every released key not loaded (no counterpart, a momentum copy, ...)
    shape_mismatch  [{checkpoint, model, checkpoint_shape, model_shape}] keys whose tensor does not fit (the
                    parameter keeps its initialisation and is listed as missing)
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mvptr.errors import ConfigError, DataError
from mvptr.models import build_model
from mvptr.models.base import VLModel

UNRECOGNISED = "not a released name of this method (no rule of its table matches)"
SHAPE_MISMATCH = "the released tensor has another shape (see shape_mismatch): keeps its initialisation"


@dataclass(frozen=True)
class Rule:
    """Released keys matching `pattern` (whole key) -> our parameter `target` (with \\1.. of the pattern's
    groups), converted by `how`; `target` None: no counterpart here, `why` says why."""

    pattern: str
    target: str | None
    how: str = "copy"
    why: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """What importing one method's release needs besides its rules."""

    rules: tuple[Rule, ...]
    # Our parameters set to zeros when the checkpoint lacks them, and why (a released model without them).
    zero_if_absent: Mapping[str, str] = field(default_factory=dict)
    # Why our parameters under a prefix are not in the checkpoint (the report's and the CLI's explanation).
    missing_why: Mapping[str, str] = field(default_factory=dict)


# MVPTR: the pre-training model `BiBertImgForPreTraining` of oscar/modeling/modeling_vlbert.py (what
# oscar/run_pretrain_ml.py trains and `save_pretrained`s as pytorch_model.bin): `bert` = `BiBertImgModel` (the
# shared `embeddings`; `txt_encoder`, `vis_encoder`, `mul_encoder`, each a `CaptionBertEncoder` of
# num_hidden_layers // 2 layers numbered from 0, so BERT-base is 6+6+6 and layer i of a stack is our layer i;
# `img_embedding` Linear(2054 -> 768) and, with use_img_layernorm, `LayerNorm`; `pooler`; `txt_proj` and
# `vis_proj` (768, 768) matrices applied as `x @ P`), the heads `cls` (`BertPreTrainingHeads`: the MLM head
# over the first only_word_size rows and `seq_relationship`, the ITM head, label 0 = matched pair), `half_mlm`
# (the visual encoder's tag head), `qa_head` and `logit_scale`. Layer and head module names are those of
# transformers/pytorch_transformers/modeling_bert.py in that repository (BertLayer: attention.self.query/key/
# value, attention.output.dense/LayerNorm, intermediate.dense, output.dense/LayerNorm).
MVPTR_RULES = (
    Rule(r"bert\.embeddings\.word_embeddings\.weight", "embeddings.word_embeddings.weight", "rows"),
    Rule(r"bert\.embeddings\.(position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)",
         r"embeddings.\1.\2"),
    Rule(r"bert\.embeddings\.position_ids", None,  # not in the release: in a copy re-saved by newer transformers
         why="a buffer (0, 1, 2, ...), not a weight"),
    Rule(r"bert\.txt_encoder\.layer\.(\d+)\.(.+)", r"text_encoder.layer.\1.\2"),
    Rule(r"bert\.vis_encoder\.layer\.(\d+)\.(.+)", r"visual_encoder.layer.\1.\2"),
    Rule(r"bert\.mul_encoder\.layer\.(\d+)\.(.+)", r"cross_encoder.layer.\1.\2"),
    Rule(r"bert\.img_embedding\.(weight|bias)", r"region_embeddings.0.\1"),
    Rule(r"bert\.LayerNorm\.(weight|bias)", r"region_embeddings.1.\1"),
    Rule(r"bert\.pooler\.dense\.(weight|bias)", r"heads.pooler.dense.\1"),
    Rule(r"bert\.txt_proj", "heads.contrastive.text_proj.weight", "transpose"),
    Rule(r"bert\.vis_proj", "heads.contrastive.image_proj.weight", "transpose"),
    Rule(r"logit_scale", "heads.contrastive.temperature", "temperature"),
    Rule(r"cls\.predictions\.transform\.(.+)", r"heads.lm.transform.\1"),
    Rule(r"cls\.predictions\.bias", "heads.lm.bias", "rows"),
    Rule(r"cls\.predictions\.decoder\.weight", None,
         why="tied to the word embeddings (bert.embeddings.word_embeddings.weight); heads.lm is tied likewise"),
    Rule(r"cls\.seq_relationship\.(weight|bias)", r"heads.itm.\1", "swap_classes"),
    Rule(r"half_mlm\..+", None,
         why="the visual encoder's own tag head; this project's MCR and MLM share heads.lm (cls.predictions)"),
    Rule(r"qa_head\..+", None,
         why="the pre-training VQA head over the released answer list; fine-tuning builds its own task head"),
    Rule(r"bert\.(code_embeddings|input_embeddings)\..+", None,
         why="discrete-code image features (img_feature_type dis_code*); this project reads region features"),
)

MVPTR_SPEC = MethodSpec(
    rules=MVPTR_RULES,
    missing_why={
        "region_embeddings.1.": "no bert.LayerNorm: pre-trained without use_img_layernorm (run_pretrain_ml.py's "
                                "default); the LayerNorm after the region projection keeps its initialisation, as "
                                "in MVPTR's own fine-tuning (run_retrieval.py: use_img_layernorm=1); "
                                "method.region_layernorm=false leaves it out",
    })

# SIMLA: `SIMLA` of models/simla/pretrain.py (what Pretrain.py trains; its checkpoint_NN.pth is
# {"model": state_dict, "optimizer", "lr_scheduler", "config", "epoch"}): `text_encoder` = models/med.py's
# `BertForMaskedLM` (`bert` = `BertModel(add_pooling_layer=False)`: `embeddings` with word and position
# embeddings only (no token types) and a `position_ids` buffer; `encoder.layer.i` with `attention`,
# `crossattention` (configs/shared_bert.json: add_cross_attention in all 12 layers), `intermediate`, `output`;
# `cls.predictions` with `decoder.bias` linked to `bias`), `visual_encoder` = models/vit.py's ViT-B/16,
# `vision_proj`/`text_proj` Linear(768 -> 256), `temp`, `itm_head` Linear(768 -> 2) (label 1 = matched, as
# ours), `mim_head` Linear(768 -> 8192 dVAE tokens), `concept_head` Linear(256 -> 30522) (PSL), the momentum
# copies `*_m` and the ITC queues. The fine-tuned checkpoints (models/simla/retrieval.py) hold `text_encoder`
# as a `BertModel` (no `.bert.`; Retrieval.py strips it): both spellings are read.
_SIMLA_TEXT = r"text_encoder\.(?:bert\.)?"
SIMLA_RULES = (
    Rule(r"(visual_encoder|vision_proj|text_encoder|text_proj|mim_head|concept_head)_m\..+", None,
         why="momentum (EMA) copy: this project's momentum model is made from the model when training starts "
             "(mvptr.objectives.momentum) and is not part of model.safetensors"),
    Rule(r"image_queue|text_queue|idx_queue|queue_ptr", None,
         why="ITC queue: this project's queue starts empty in the objective, not in model.safetensors"),
    Rule(_SIMLA_TEXT + r"embeddings\.word_embeddings\.weight", "embeddings.word_embeddings.weight", "rows"),
    Rule(_SIMLA_TEXT + r"embeddings\.(position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)",
         r"embeddings.\1.\2"),
    Rule(_SIMLA_TEXT + r"embeddings\.position_ids", None, why="a buffer (0, 1, 2, ...), not a weight"),
    Rule(_SIMLA_TEXT + r"encoder\.layer\.(\d+)\.((?:attention|crossattention|intermediate|output)\..+)",
         r"encoder.layer.\1.\2"),
    Rule(_SIMLA_TEXT + r"pooler\.dense\.(weight|bias)", r"heads.pooler.dense.\1"),
    Rule(r"text_encoder\.cls\.predictions\.transform\.(.+)", r"heads.lm.transform.\1"),
    Rule(r"text_encoder\.cls\.predictions\.bias", "heads.lm.bias", "rows"),
    Rule(r"text_encoder\.cls\.predictions\.decoder\.(weight|bias)", None,
         why="tied: decoder.weight to the word embeddings, decoder.bias to predictions.bias; heads.lm likewise"),
    Rule(r"text_proj\.(weight|bias)", r"heads.contrastive.text_proj.\1"),
    Rule(r"vision_proj\.(weight|bias)", r"heads.contrastive.image_proj.\1"),
    Rule(r"temp", "heads.contrastive.temperature"),
    Rule(r"itm_head\.(weight|bias)", r"heads.itm.\1"),
    Rule(r"concept_head\.(weight|bias)", r"heads.psl.\1", "rows"),
    Rule(r"visual_encoder\..+", None,
         why="SIMLA's ViT-B/16 over image patches: this project's SIMLA encodes region features instead "
             "(region_embeddings, image_encoder)"),
    Rule(r"mim_head\..+", None,
         why="predicts DALL-E dVAE tokens of masked patches; this project's XMM head predicts region tags/features"),
)

SIMLA_SPEC = MethodSpec(
    rules=SIMLA_RULES,
    zero_if_absent={
        "embeddings.token_type_embeddings.weight": "SIMLA's BertEmbeddings (models/med.py) has no token types: "
                                                   "zeros make ours add nothing, as the released model",
    },
    missing_why={
        "region_embeddings.": "the released image encoder is a ViT over pixels (visual_encoder.*, not mapped)",
        "image_encoder.": "the released image encoder is a ViT over pixels (visual_encoder.*, not mapped)",
        "image_cls": "the released image encoder is a ViT over pixels (visual_encoder.*, not mapped)",
        "region_mask_embedding": "the released XMM masks patches of the ViT (visual_encoder.mask_token)",
        "heads.xmm.": "the released XMM head predicts dVAE tokens of patches (mim_head, not mapped)",
        "heads.pooler.": "SIMLA has no pooler (BertModel(add_pooling_layer=False)): its ITM head reads the "
                         "[CLS] state, ours the pooled one; the pooler keeps its initialisation",
    })

SPECS = {"mvptr": MVPTR_SPEC, "simla": SIMLA_SPEC}


# --- mapping ---------------------------------------------------------------------------------------------------

class _Mismatch(Exception):
    pass


def _converted(source: Tensor, target: Tensor, how: str, word_pieces: int) -> tuple[Tensor, int | None]:
    """(value, rows): what `target` (or its first `rows` rows) takes from the released `source`."""
    source = source.detach()
    if how == "rows":
        rows = min(source.shape[0], target.shape[0], word_pieces) if source.dim() else 0
        if not rows or source.shape[1:] != target.shape[1:]:
            raise _Mismatch
        return source[:rows], (None if rows == target.shape[0] == source.shape[0] else rows)
    value = {"copy": lambda t: t, "transpose": lambda t: t.T if t.dim() == 2 else t,
             "swap_classes": lambda t: t.flip(0), "temperature": lambda t: torch.exp(-t)}[how](source)
    if value.shape != target.shape:
        raise _Mismatch
    return value, None


def _match(rules: Sequence[Rule], key: str) -> tuple[Rule | None, str | None]:
    for rule in rules:
        found = re.fullmatch(rule.pattern, key)
        if found:
            return rule, (found.expand(rule.target) if rule.target is not None else None)
    return None, None


def _why_missing(name: str, spec: MethodSpec) -> str:
    return next((why for prefix, why in spec.missing_why.items() if name.startswith(prefix)),
                "not in the checkpoint: keeps its initialisation")


@torch.no_grad()
def map_state(model: VLModel, state: Mapping[str, Tensor], spec: MethodSpec, word_pieces: int) -> dict[str, Any]:
    """Copy the released `state` into `model` by `spec`'s rules; returns the report (module docstring).
    `word_pieces`: rows of the word-piece vocabulary, the rows a `rows` rule may copy."""
    params = dict(model.named_parameters(remove_duplicate=False))
    report: dict[str, Any] = {"loaded": {}, "partial": {}, "filled": {}, "missing": {}, "unused": {},
                              "shape_mismatch": []}
    done: dict[int, str] = {}  # id of a filled parameter (tied ones have several names) -> the released key
    for key in sorted(state):
        rule, target = _match(spec.rules, key)
        if rule is None or target is None:
            report["unused"][key] = rule.why if rule is not None else UNRECOGNISED
            continue
        parameter = params.get(target)
        if parameter is None:
            report["unused"][key] = "the model of this config has no such parameter (model.*/method.* differ from " \
                                    "the checkpoint's, e.g. fewer layers)"
            continue
        if id(parameter) in done:
            report["unused"][key] = f"{target} is already loaded from {done[id(parameter)]}"
            continue
        try:
            value, rows = _converted(state[key], parameter, rule.how, word_pieces)
        except _Mismatch:
            report["shape_mismatch"].append({"checkpoint": key, "model": target,
                                             "checkpoint_shape": list(state[key].shape),
                                             "model_shape": list(parameter.shape)})
            continue
        (parameter if rows is None else parameter[:rows]).copy_(value)
        done[id(parameter)] = key
        report["loaded"][target] = key
        if rows is not None:
            report["partial"][target] = (f"rows [0, {rows}) of {parameter.shape[0]} (checkpoint: "
                                         f"{state[key].shape[0]}); the others keep their initialisation")
    for name, why in spec.zero_if_absent.items():
        parameter = params.get(name)
        if parameter is not None and id(parameter) not in done:
            parameter.zero_()
            done[id(parameter)] = "zeros"
            report["filled"][name] = why
    mismatched = {entry["model"] for entry in report["shape_mismatch"]}
    report["missing"] = {name: SHAPE_MISMATCH if name in mismatched else _why_missing(name, spec)
                         for name, parameter in model.named_parameters() if id(parameter) not in done}
    return report


# --- MVPTR's concept rows --------------------------------------------------------------------------------------

def _phrase_key(phrase: Sequence[str]) -> str | None:
    """This project's name (mvptr.concepts.vocab.concept_key) of a released SPICE tuple: (object,),
    (object, attribute) -> "attribute object", (subject, relation, object) -> "subject relation object"."""
    if len(phrase) == 1:
        return phrase[0]
    if len(phrase) == 2:
        return f"{phrase[1]} {phrase[0]}"
    if len(phrase) == 3:
        return " ".join(phrase)
    return None


def concept_rows(id2phrase: Mapping[str, Sequence[str]], vocab: Mapping[str, Any]) -> dict[int, int]:
    """{our embedding row: the released row} of the concepts that have a row of their own in both vocabularies
    under the same name. `id2phrase`: MVPTR's datasets/mvp/id2phrase_new.json (row -> SPICE tuple); `vocab`:
    this project's concept_vocab.json."""
    released: dict[str, int] = {}
    for row, phrase in id2phrase.items():
        key = _phrase_key(phrase) if isinstance(phrase, Sequence) and not isinstance(phrase, str) else None
        if key is not None:
            released.setdefault(key, int(row))
    return {int(entry["id"]): released[key] for key, entry in vocab["concepts"].items()
            if not entry["reuses_word"] and key in released}


@torch.no_grad()
def _copy_concept_rows(model: VLModel, state: Mapping[str, Tensor], report: dict[str, Any],
                       rows: Mapping[int, int]) -> None:
    name = model.word_embeddings_key
    key = report["loaded"].get(name)
    if key is None or not rows:
        return
    table, source = model.get_input_embeddings().weight, state[key]
    pairs = [(ours, theirs) for ours, theirs in sorted(rows.items())
             if ours < table.shape[0] and theirs < source.shape[0]]
    if pairs:
        ours, theirs = (torch.tensor(side) for side in zip(*pairs))
        table[ours] = source[theirs].to(table.dtype)
    report["partial"][name] = (report["partial"].get(name, "all rows") +
                               f"; {len(pairs)} concept rows copied from the released concepts of the same name")


# --- the import ------------------------------------------------------------------------------------------------

def import_checkpoint(state: Mapping[str, Tensor], cfg: Mapping[str, Any], vocab_size: int,
                      region_feature_dim: int, *, concepts: Mapping[int, int] | None = None,
                      source: str = "the checkpoint") -> tuple[VLModel, dict[str, Any]]:
    """A model of `cfg` (`build_model`) with the released weights `state` mapped onto it, and the report.

    `concepts` {our row: released row} (MVPTR, from `concept_rows`) also copies those concept embeddings.
    ConfigError: a method without a released checkpoint; DataError (naming `source`): nothing of `state` is a
    released name of the method, or no released weight matrix fits the model (another width)."""
    from mvptr.text import load_tokenizer

    method = cfg["method"]["name"]
    if method not in SPECS:
        raise ConfigError(f"config key 'method.name': no released checkpoint of {method!r} to import; "
                          f"methods: {', '.join(SPECS)}")
    model = build_model(cfg, vocab_size, region_feature_dim)
    report = map_state(model, state, SPECS[method], len(load_tokenizer(cfg["model"]["tokenizer"])))
    if not report["loaded"] and not report["shape_mismatch"] and all(
            why == UNRECOGNISED for why in report["unused"].values()):
        raise DataError(f"{source}: none of its {len(state)} keys is a released {method} name "
                        f"(e.g. {next(iter(sorted(state)), '')!r}); is it another method's checkpoint?")
    if not any(state[key].dim() >= 2 for key in report["loaded"].values()):
        first = report["shape_mismatch"][0] if report["shape_mismatch"] else {}
        raise DataError(f"{source}: no released weight matrix fits the {method} model of this config "
                        f"({len(report['shape_mismatch'])} shape mismatches, e.g. {first.get('checkpoint')} "
                        f"{first.get('checkpoint_shape')} vs {first.get('model_shape')}); the released models "
                        f"are BERT-base (model.name=bert_base)")
    if concepts:
        _copy_concept_rows(model, state, report, concepts)
    return model, {"method": method, **report}


def save_weights(model: VLModel, path: Path | str) -> None:
    """`path` as a pre-training stage writes its model.safetensors (`safetensors.torch.save_model`: tied tensors
    once, the dropped names in the metadata), atomically: staged beside it, then renamed over it (as
    mvptr.atomic does; save_model writes a file, not bytes)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    try:
        save_model(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # safetensors reports a failed write (disk full) as "I/O error: ... (os error 28)", naming no file
        code = re.search(r"\(os error (\d+)\)", str(err)) if isinstance(err, SafetensorError) else None
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
        raise
