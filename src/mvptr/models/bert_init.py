"""Initialising a method's model from a BERT checkpoint (bert-base-uncased, the packaged MiniLM, ...).

Why: every method is built from BERT layers, and the papers start from BERT-base; each method maps the
checkpoint's layers onto its own stacks (`VLModel.pretrained_prefixes`), the copying is common to all.

Use: `report = model.load_pretrained_bert("path/to/bert")` -> {"loaded", "missing", "unused"}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# The heads every method shares take BERT's pooler and MLM head.
HEAD_PREFIXES = {"embeddings.": "embeddings.", "heads.pooler.": "pooler.",
                 "heads.lm.transform.": "cls.predictions.transform.", "heads.lm.bias": "cls.predictions.bias"}

# Tensors whose first dimension may differ from the checkpoint's: the model's vocabulary has concept rows
# after the word pieces (they keep their initialisation), and the model may keep fewer positions.
_ROW_PREFIX = {"embeddings.word_embeddings.weight", "heads.lm.bias", "embeddings.position_embeddings.weight"}
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


def load_pretrained_bert(model: nn.Module, path: Path | str,
                         prefixes_for: Callable[[int], Mapping[str, str]]) -> dict[str, list[str]]:
    """Initialise `model` from a BERT-family checkpoint with L layers (e.g. bert-base-uncased, MiniLM), by the
    mapping `prefixes_for(L)`: model parameter prefix -> checkpoint key prefix (each method's own, see its
    `pretrained_prefixes`). Keys may carry a `bert.` prefix. Word-embedding rows [0, V_ckpt) only are copied
    (the concept rows after the tokenizer's vocabulary keep their initialisation), and the first
    max_position_embeddings positions.

    Returns {"loaded": model parameters set, "missing": model parameters left as they were, "unused":
    checkpoint keys not used}. A tensor whose shape does not fit raises ValueError.
    """
    state = read_bert_state(path)
    layer_ids = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")}
    if not layer_ids:
        raise ValueError(f"{path}: no encoder.layer.* tensors; not a BERT checkpoint")
    prefixes = prefixes_for(max(layer_ids) + 1)
    loaded, used, done = [], set(), set()
    # A tied tensor has several names (heads.lm.decoder.weight is embeddings.word_embeddings.weight): it is
    # loaded under the first name the mapping knows.
    named = list(model.named_parameters(remove_duplicate=False))
    for name, parameter in named:
        source = _checkpoint_key(name, prefixes)
        if id(parameter) in done or source is None or source not in state:
            continue
        _copy(parameter, state[source], name)
        loaded.append(name)
        used.add(source)
        done.add(id(parameter))
    missing = [name for name, parameter in model.named_parameters() if id(parameter) not in done]
    return {"loaded": loaded, "missing": missing, "unused": sorted(set(state) - used)}
