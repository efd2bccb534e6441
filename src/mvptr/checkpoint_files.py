"""Read the tensors of a checkpoint file, whatever form it was saved in, without running any of its code.

Why: released weights come as torch pickles (.bin/.pt/.pth, often wrapping the state dict in `model` or
`state_dict`, keys prefixed by DistributedDataParallel's `module.`), as safetensors, or as a `save_pretrained`
folder. Both readers of foreign weights use this one: `mvptr import-checkpoint` (mvptr.models.import_checkpoint)
and the region detector's `regions.detector.weights` (mvptr.regions.detector). Pickles are read with
`torch.load(weights_only=True)`; a pickle that names other classes (SIMLA's holds its hydra config) is read
again with each class replaced by an inert stand-in, so nothing of the file's own code runs.

Use: `state = read_checkpoint("checkpoint_29.pth")` -> {name: tensor}; DataError naming the file otherwise.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mvptr.errors import DataError

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
# Inside a checkpoint folder (MVPTR's release is a `save_pretrained` folder), in this order.
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
# Top-level keys whose value is the state dict (SIMLA saves {"model", "optimizer", "config", ...}).
WRAPPERS = ("model", "state_dict", "module")


class _Inert:
    """What every object of a class other than tensors and plain containers becomes when a checkpoint is read
    (SIMLA's holds its hydra config): nothing of the file's classes runs, and the object is dropped."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True); a file whose pickle names other classes is read again with each of them
    replaced by an inert stand-in (still weights_only: only tensors and plain containers are built)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable torch checkpoint ({_one_line(err)})") from err
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # a legacy (non-zip) file: no way to list its classes safely
        raise DataError(f"{path}: torch.load(weights_only=True) refused it ({_one_line(first)})") from err
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: torch.load(weights_only=True) refused it ({_one_line(err)})") from err


def _one_line(err: BaseException) -> str:
    """The line of `err` that names what was refused (torch's weights_only error puts it under advice)."""
    lines = [line.split("WeightsUnpickler error:")[-1].split(" Please ")[0].strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if line.startswith(("Trying to load", "Unsupported"))]
    return (named or lines or [type(err).__name__])[0]


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside `obj`: under a top-level `model`/`state_dict`/`module` key if there is one, its
    tensors only, keys without DistributedDataParallel's `module.` prefix."""
    while isinstance(obj, Mapping) and any(isinstance(obj.get(key), Mapping) for key in WRAPPERS):
        obj = next(obj[key] for key in WRAPPERS if isinstance(obj.get(key), Mapping))
    if not isinstance(obj, Mapping):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            name = str(key)
            while name.startswith("module."):
                name = name[len("module."):]
            state[name] = value
    if not state:
        raise DataError(f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    return state


def read_checkpoint(path: Path | str) -> dict[str, Tensor]:
    """The released weights in `path`: a .bin/.pt/.pth torch file (read with weights_only=True), a
    .safetensors file, or a folder holding model.safetensors or pytorch_model.bin (a `save_pretrained` folder)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise DataError(f"{path}: a folder without {' or '.join(FOLDER_FILES)}")
        path = found[0]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise DataError(f"{path}: unknown checkpoint format {path.suffix!r}; expected {', '.join(CHECKPOINT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(path), path)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{path}: not a readable safetensors file ({_one_line(err)})") from err
    return _unwrap(_torch_load(path), path)
