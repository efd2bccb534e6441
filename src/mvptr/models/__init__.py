"""The table of methods: `method.name` -> its model class, one file per method in this package.

Why one explicit table: a method is picked by name from the config; the table names the module and class,
imported when the model is built (no registry filled by import side effects, and `import mvptr.models` stays
cheap). A method also has its layer `configs/methods/<name>.yaml` (its options and objectives) and an entry in
the schema's `method_name` (tests/test_models.py checks that the three agree).

Use:
    model = build_model(cfg, vocab_size, region_feature_dim)      # a fresh model of cfg's method
    cls = model_class("simla"); cls.from_pretrained(folder)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvptr.models.base import VLModel

# method.name -> "module:class"
METHODS = {
    "mvptr": "mvptr.models.mvptr:MVPTRModel",
    "simla": "mvptr.models.simla:SIMLAModel",
    "semvlp": "mvptr.models.semvlp:SemVLPModel",
}


def model_class(name: str) -> type[VLModel]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg: Mapping[str, Any], vocab_size: int, region_feature_dim: int) -> VLModel:
    """A fresh model of `method.name`, identical on every rank (initialised from the config's train_seed)."""
    import torch

    cls = model_class(cfg["method"]["name"])
    config = cls.config_class.from_project(cfg, vocab_size=vocab_size, region_feature_dim=region_feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["train_seed"])
        return cls(config)
