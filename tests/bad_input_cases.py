"""Helpers of tests/test_bad_input.py: the tally of bad inputs tried per kind, and ways to spoil good files.

Why: the bad-input tests feed the readers thousands of spoiled files; each try goes through `Tally.attempt`,
which counts it, lets a result or the project's own error (ConfigError, DataError) through, and counts any
other exception as a crash before re-raising it, so that the counts written to
results/reliability/bad_inputs.json are those of what really ran.

    tally = Tally(); outcome = tally.attempt("coco json", lambda: CocoFormatDataset.open(...), [captions_path])
    doc = mutate(json_doc, path, "set", value)       # a copy with one node replaced, deleted or doubled
    paths = node_paths(json_doc)                     # the nodes `mutate` can reach, breadth first
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from mvptr.errors import ConfigError, DataError

# Any JSON value, small: what a broken export or a hand edit puts where a record's field belongs.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "1", "-1", "NaN", "\x00", "\udcff", "a" * 300, 2**63, 10**400]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
ACTIONS = ("set", "delete", "double")


def cli_line(err: Exception) -> str:
    """The message as `mvptr` prints it (mvptr.cli.main joins a multi-line message into one line)."""
    return " ".join(str(err).split())


class Tally:
    """Cases tried and crashes (any exception but the project's own errors) per kind of input."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "crashed": 0})

    def attempt(self, kind: str, call: Callable[[], Any], names: Sequence[str | Path]) -> Any:
        """`call()`'s result, or the ConfigError/DataError it raised after checking that its message is one line
        that names one of `names` (the files, keys or positions the input came from)."""
        self.counts[kind]["tried"] += 1
        try:
            return call()
        except (ConfigError, DataError) as err:
            self.check_message(kind, err, names)
            return err
        except BaseException:
            self.counts[kind]["crashed"] += 1
            raise

    def check_message(self, kind: str, err: Exception, names: Sequence[str | Path]) -> None:
        line = cli_line(err)
        if isinstance(err, DataError) and "\n" in str(err):
            self.fail(kind, f"a DataError of more than one line: {str(err)[:300]!r}")
        if not any(str(name) in line for name in names):
            self.fail(kind, f"the message names none of {[str(n) for n in names]}: {line[:300]!r}")

    def fail(self, kind: str, why: str) -> None:
        self.counts[kind]["crashed"] += 1
        raise AssertionError(why)

    def table(self) -> dict[str, Any]:
        kinds = {kind: dict(counts) for kind, counts in sorted(self.counts.items())}
        return {"kinds": kinds, "tried": sum(c["tried"] for c in kinds.values()),
                "crashed": sum(c["crashed"] for c in kinds.values())}


def node_paths(doc: Any, limit: int = 300) -> list[tuple[Any, ...]]:
    """Paths (keys and indices) to the nodes of a JSON document, the root first, breadth first, at most `limit`."""
    paths: list[tuple[Any, ...]] = []
    queue: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while queue and len(paths) < limit:
        path, node = queue.pop(0)
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        queue += [((*path, key), child) for key, child in children]
    return paths


def mutate(doc: Any, path: tuple[Any, ...], action: str, value: Any = None) -> Any:
    """A copy of `doc` whose node at `path` is replaced by `value` ("set"), removed ("delete") or, in a list,
    repeated ("double": the same record twice, so its id too)."""
    doc = copy.deepcopy(doc)
    if not path:
        return value if action == "set" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "set":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    return doc


def dumps(doc: Any) -> bytes:
    """JSON as a careless writer makes it: NaN and Infinity allowed, lone surrogates as they are."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=True).encode("utf-8", errors="surrogateescape")
