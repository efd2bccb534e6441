"""The concept vocabulary: which parsed concepts MVPTR embeds, and under which embedding ids.

Why: MVPTR appends textual concepts to the caption as extra tokens that share the word-embedding table.
It keeps the concepts seen in at least `concepts.min_count` training captions (paper: 50); a one-word
concept that is a whole word piece of the tokenizer ("dog") reuses that word's embedding row, and every
other concept ("red circle", "man ride on horse", or a one-word concept the tokenizer splits) gets a new
row appended after the tokenizer's vocabulary: ids len(tokenizer), len(tokenizer) + 1, ... in a fixed
order (objects, then attributes, then relations; alphabetical within each kind).

Concept keys (one string per concept, the way the vocabulary names them):
    object "circle" -> "circle";  attribute ("circle", "red") -> "red circle";
    relation ("circle", "left of", "square") -> "circle left of square"

Run: `mvptr concepts vocab --dataset DIR --concepts FILE --out FILE [key=value ...]`, or
    vocab = build_concept_vocab(training_graphs, load_tokenizer("minilm"), min_count=5)
    concept_ids(graph, vocab)   # [(id, [(start, end), ...]), ...] for the graph's concepts in the vocabulary
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from mvptr.concepts.parser import KINDS, SceneGraph, Span


class Tokenizer(Protocol):
    """What the vocabulary needs of a (Hugging Face) tokenizer."""

    def __len__(self) -> int: ...

    def get_vocab(self) -> dict[str, int]: ...


def concept_key(kind: str, concept: Any) -> str:
    """The vocabulary's name of a concept (see the module docstring)."""
    if kind == "objects":
        return concept
    if kind == "attributes":
        obj, attribute = concept
        return f"{attribute} {obj}"
    return " ".join(concept)


def caption_counts(graphs: Iterable[SceneGraph]) -> tuple[Counter[tuple[str, str]], int]:
    """(kind, key) -> number of captions that mention it (a caption counts once), and the caption count."""
    counts: Counter[tuple[str, str]] = Counter()
    n = 0
    for graph in graphs:
        n += 1
        counts.update({(kind, concept_key(kind, c)) for kind in KINDS for c in getattr(graph, kind)})
    return counts, n


def _check_unique(keys: Iterable[tuple[str, str]]) -> None:
    kinds: dict[str, str] = {}
    for kind, key in keys:
        if kinds.setdefault(key, kind) != kind:
            raise ValueError(f"concept key {key!r} names concepts of two kinds: {kinds[key]} and {kind}")


def build_concept_vocab(graphs: Iterable[SceneGraph], tokenizer: Tokenizer, min_count: int) -> dict[str, Any]:
    """Keep the concepts of at least `min_count` of the training captions `graphs`; assign MVPTR's ids."""
    counts, n_captions = caption_counts(graphs)
    _check_unique(counts)
    words = tokenizer.get_vocab()
    base = len(tokenizer)
    kept = sorted((KINDS.index(kind), key) for (kind, key), count in counts.items() if count >= min_count)
    concepts: dict[str, dict[str, Any]] = {}
    next_id = base
    for kind_index, key in kept:
        kind = KINDS[kind_index]
        reuses = " " not in key and key in words
        concepts[key] = {"id": words[key] if reuses else next_id, "kind": kind,
                         "count": counts[kind, key], "reuses_word": reuses}
        next_id += not reuses
    stats = {kind: {"seen": sum(k == kind for k, _ in counts),
                    "kept": sum(c["kind"] == kind for c in concepts.values()),
                    "reuse_word_id": sum(c["kind"] == kind and c["reuses_word"] for c in concepts.values())}
             for kind in KINDS}
    for kind_stats in stats.values():
        kind_stats["dropped"] = kind_stats["seen"] - kind_stats["kept"]
        kind_stats["new_ids"] = kind_stats["kept"] - kind_stats["reuse_word_id"]
    return {"min_count": min_count, "training_captions": n_captions, "tokenizer_size": base,
            "embedding_rows": next_id, "stats": stats, "concepts": concepts}


def concept_ids(graph: SceneGraph, vocab: Mapping[str, Any]) -> list[tuple[int, list[Span]]]:
    """(embedding id, character spans of its words) for each concept of `graph` that the vocabulary keeps,
    objects first, then attributes, then relations, each in caption order."""
    table = vocab["concepts"]
    out = []
    for kind in KINDS:
        for concept, spans in getattr(graph, kind).items():
            entry = table.get(concept_key(kind, concept))
            if entry is not None and entry["kind"] == kind:
                out.append((entry["id"], list(spans)))
    return out
