"""Seed statistics of a study: mean +- std over seeds, and each ablation's paired difference from its method's
full model with a 95% bootstrap interval.

Why: one seed per ablation makes most differences noise. With `seeds:` every (method, ablation) runs once per
training seed, on the same test items; this module says which differences survive that noise.

What is computed, for each headline metric (`mvptr.compare.HEADLINE`: one per task, retrieval's ITM hard-negative
accuracy and grounding's three kinds):
- mean and sample standard deviation (ddof 1; none with one seed) over the seeds of each (method, ablation);
- for every ablation of a method against the method's `full` row, over the seeds both have: the difference of
  the means, and a 95% percentile interval from a paired bootstrap over the test items (`paired_bootstrap`,
  Koehn's paired bootstrap): each item's difference ablation - full is first averaged over the seeds, then the
  items are resampled with replacement (one draw for both rows, so that a hard item stays hard for both). The
  items are the metric's own (`item_scores` of the evaluation JSON: a text for retrieval R@1, a question, a
  hypothesis, an expression, a statement, a phrase for grounding). The interval is the test set's sampling
  error of the seed-averaged difference; the seed-to-seed variation is the std beside the means. (Resampling
  the seeds too would count the item noise twice - each seed's mean already holds it - and with 3 seeds gives
  only 10 distinct draws; a test checks that this interval excludes a null difference about 5% of the time.)
  A difference whose interval excludes 0 is marked `*`.

Written by `mvptr compare --evaluations ...` (the workflow's summarize rule) as statistics.md and statistics.json.

Use:
    stats = seed_statistics(found, methods)                 # found: mvptr.compare.read_evaluations(...)
    diff, low, high = paired_bootstrap(ablation, full)      # (seeds, items) arrays
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.compare import REFERENCE_ABLATION, Key, Row, headline_columns, row_name, row_order

RESAMPLES = 2000
LEVEL = 0.95
_CHUNK = 250  # resamples drawn at once: memory (chunk x items) stays small on COCO's 25,000 texts


def paired_bootstrap(ablation: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference of the means, interval low, interval high) of `ablation` - `reference`, both (seeds, items)
    arrays of per-item scores, row s of both from seed s and column i the same test item: the per-item
    differences averaged over the seeds, the items resampled with replacement (multinomial weights), the
    percentile interval."""
    diff = np.asarray(ablation, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.ndim != 2 or not diff.size:
        raise ValueError(f"expected (seeds, items) arrays of the same shape, got {np.shape(ablation)} and "
                         f"{np.shape(reference)}")
    per_item = diff.mean(axis=0)
    n_items = per_item.shape[0]
    rng = np.random.default_rng(seed)
    replicates = []
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        weights = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=count) / n_items  # (count, items)
        replicates.append(weights @ per_item)
    low, high = np.percentile(np.concatenate(replicates), [50 * (1 - level), 50 * (1 + level)])
    return float(per_item.mean()), float(low), float(high)


def _locate(column: str) -> tuple[str, str, list[str]]:
    """`<task>/splits/<split>/<metric path>` -> (task, split, metric path parts)."""
    task, _, split, *metric = column.split("/")
    return task, split, metric


def _value(result: Mapping[str, Any], split: str, metric: Sequence[str]) -> float | None:
    node: Any = result.get("splits", {}).get(split, {})
    for part in metric:
        node = node.get(part) if isinstance(node, Mapping) else None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _items(result: Mapping[str, Any], split: str, metric: Sequence[str]) -> np.ndarray | None:
    scores = result.get("splits", {}).get(split, {}).get("item_scores", {}).get("/".join(metric))
    return None if scores is None else np.asarray(scores, dtype=np.float64)


def seed_statistics(found: Mapping[Key, Mapping[str, Any]], methods: Sequence[str] | None = None,
                    resamples: int = RESAMPLES) -> dict[str, Any]:
    """{"metrics": {short name: column}, "rows": {"method/ablation": {"seeds": [...], short name: {"mean", "std",
    "n", and against full: "diff", "low", "high", "excludes_zero"}}}, "resamples", "level", "interval"} from
    {(method, ablation, seed, task): evaluation JSON}."""
    from mvptr.headline import flat_metrics

    columns = sorted({f"{task}/{name}" for (_, _, _, task), result in found.items()
                      for name in flat_metrics(result)})
    picked = headline_columns(columns)
    by_run: dict[Row, dict[int, dict[str, Mapping[str, Any]]]] = {}
    for (method, ablation, seed, task), result in found.items():
        by_run.setdefault((method, ablation), {}).setdefault(seed, {})[task] = result
    rows: dict[str, Any] = {}
    for run in row_order(list(by_run), methods):
        seeds = by_run[run]
        reference = by_run.get((run[0], REFERENCE_ABLATION)) if run[1] != REFERENCE_ABLATION else None
        row: dict[str, Any] = {"seeds": sorted(seeds)}
        for name, column in picked.items():
            task, split, metric = _locate(column)
            values = [v for s in sorted(seeds) if task in seeds[s]
                      for v in [_value(seeds[s][task], split, metric)] if v is not None]
            if not values:
                continue
            cell: dict[str, Any] = {"mean": float(np.mean(values)), "n": len(values),
                                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
            if reference is not None:
                cell.update(_difference(seeds, reference, task, split, metric, resamples))
            row[name] = cell
        rows[row_name(run)] = row
    return {"metrics": picked, "rows": rows, "resamples": resamples, "level": LEVEL,
            "interval": "paired bootstrap over test items of the seed-averaged difference (percentile)"}


def _difference(seeds: Mapping[int, Mapping[str, Mapping[str, Any]]],
                reference: Mapping[int, Mapping[str, Mapping[str, Any]]], task: str, split: str,
                metric: Sequence[str], resamples: int) -> dict[str, Any]:
    """diff, low, high and excludes_zero of a row against the full row, over their common seeds with item scores
    of the same test items; {} where there are none."""
    pairs = []
    for seed in sorted(set(seeds) & set(reference)):
        if task in seeds[seed] and task in reference[seed]:
            mine, theirs = _items(seeds[seed][task], split, metric), _items(reference[seed][task], split, metric)
            if mine is not None and theirs is not None and mine.shape == theirs.shape and mine.size:
                pairs.append((mine, theirs))
    if not pairs or len({mine.shape for mine, _ in pairs}) != 1:
        return {}
    diff, low, high = paired_bootstrap(np.stack([m for m, _ in pairs]), np.stack([t for _, t in pairs]), resamples)
    return {"diff": diff, "low": low, "high": high, "paired_seeds": len(pairs),
            "excludes_zero": bool(low > 0 or high < 0)}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def statistics_markdown(stats: Mapping[str, Any]) -> str:
    """Two markdown tables: mean +- std over seeds per (method, ablation), and the paired differences from each
    method's full model with their 95% intervals (`*`: the interval excludes 0)."""
    names = list(stats["metrics"])
    header = "| run | seeds | " + " | ".join(names) + " |"
    rule = "| --- | ---: |" + " ---: |" * len(names)
    means, diffs = [header, rule], [header, rule]
    for run, row in stats["rows"].items():
        seeds = str(len(row["seeds"]))
        cells = [f"{_fmt(c['mean'])} ± {_fmt(c['std'])}" if (c := row.get(n)) else "n/a" for n in names]
        means.append(f"| {run} | {seeds} | " + " | ".join(cells) + " |")
        if run.endswith(f"/{REFERENCE_ABLATION}"):
            continue
        cells = []
        for name in names:
            c = row.get(name) or {}
            cells.append(f"{_fmt(c['diff'], '+.1f')} [{_fmt(c['low'], '+.1f')}, {_fmt(c['high'], '+.1f')}]"
                         f"{'*' if c['excludes_zero'] else ''}" if "diff" in c else "n/a")
        diffs.append(f"| {run} | {seeds} | " + " | ".join(cells) + " |")
    legend = [f"- {name}: {column}" for name, column in stats["metrics"].items()]
    return "\n".join([
        "Mean ± sample std over seeds (n/a: one seed).", "", *means, "",
        f"Difference from the method's full model, mean over seeds, with its {round(100 * stats['level'])}% "
        f"interval ({stats['interval']}, {stats['resamples']} resamples); * : the interval excludes 0.", "",
        *diffs, "", *legend]) + "\n"


def write_statistics(found: Mapping[Key, Mapping[str, Any]], methods: Sequence[str] | None,
                     out_dir: Path | str) -> list[Path]:
    """statistics.json and statistics.md in `out_dir`, each written atomically."""
    stats = seed_statistics(found, methods)
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "statistics.json", stats)
    atomic_write_bytes(out_dir / "statistics.md", statistics_markdown(stats).encode("utf-8"))
    return [out_dir / "statistics.json", out_dir / "statistics.md"]
