"""Turn a study's evaluations into one table of (method, ablation) x task metrics: CSV, markdown, bar charts,
and a narrow headline table (one number per task).

Why: the point of the study is the comparison of methods and ablations. The workflow's `summarize` rule builds
it from the evaluation JSON files it depends on (`evaluations_table`), so that the summary is a function of
its inputs only and deleting or replacing the MLflow store changes nothing; a user can build the same table
from the MLflow runs (`summary_table`, e.g. on the cluster's tracking server), MLflow being the place to
browse them. Both give the same columns: the runs' metric names are the JSON's keys joined by '/'.

What is read from MLflow: the FINISHED child runs (those with `mlflow.parentRunId`) whose `stage` tag is one of `stages`;
for each (method, ablation, seed, task) the latest such run (by end time), and of it each metric's final value (the
value at the latest step, which is what MLflow keeps as a run's metric). Columns are `<task>/<metric>`; rows are
(method, ablation) pairs (the `method` and `ablation` tags), methods in the order asked for (else
alphabetical), within a method `full` first, then alphabetical; a cell is the mean over the seeds (the `seed`
tag) that have the metric.

From files: each results/<dataset>/<method>/<ablation>/seed<k>/evaluate/<task>.json that `mvptr evaluate run` (or
`mvptr evaluate grounding`) wrote; from these also the seed statistics (`mvptr.seed_stats`: mean +- std over
seeds and the paired differences of each ablation from its method's full model, with 95% bootstrap intervals).

Use:
    mvptr compare --evaluations results/synthetic-*/*/*/seed*/evaluate/*.json [--runs ...] [--methods ...]
    mvptr compare [--tracking-uri URI] [--experiment NAME] [--out-dir results/summary] [--stage evaluate ...]
                  [--runs mvptr/full simla/full ...] [--methods mvptr simla] [--ablations a b c]
    from mvptr.compare import summary_table; df = summary_table(client, "mvptr-synthetic", ["evaluate"])
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.errors import DataError
from mvptr.tracking import PARENT_RUN_ID_TAG, search_all_runs

if TYPE_CHECKING:  # pandas, matplotlib and mlflow are imported inside the functions: `mvptr --help` stays fast
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

REFERENCE_ABLATION = "full"  # the method as configured: the row every other row is read against
CSV_NAME = "ablations.csv"
MD_NAME = "ablations.md"
JSON_NAME = "ablations.json"
HEADLINE_NAME = "headline.md"
# The numbers of the headline table (what `make demo` prints) and of the seed statistics: a short name, the task
# and the metric, the first of these present on the task's reported split (the last of EVAL_SPLITS: test, testB,
# test1); retrieval's text-to-image R@1, re-ranked by ITM where that ran, and its ITM head's hard-negative
# accuracy (match / no match at margin 0) and ranking (own image above the hard negative); grounding's accuracy
# per concept kind. The full table keeps every headline metric.
HEADLINE = [("IR@1", "retrieval", ["fine_tuned_itm/ir_r_at_1", "fine_tuned_vsc/ir_r_at_1", "zero_shot/ir_r_at_1"]),
            ("ITM", "retrieval", ["itm_hard_negative_accuracy"]),
            ("ITM-rank", "retrieval", ["itm_hard_negative_ranking"]), ("VQA", "vqa", ["overall"]),
            ("VE", "ve", ["accuracy"]), ("REC", "rec", ["accuracy"]), ("NLVR2", "nlvr2", ["accuracy"]),
            ("G-obj", "grounding", ["object"]), ("G-att", "grounding", ["attribute"]),
            ("G-rel", "grounding", ["relation"])]


class NoRunsError(DataError):
    """No finished run (or evaluation file) matches what was asked for; the message says what was searched."""


Row = tuple[str, str]  # (method, ablation)
Key = tuple[str, str, int, str]  # (method, ablation, seed, task)


def row_order(rows: Sequence[Row], methods: Sequence[str] | None = None) -> list[Row]:
    """Methods in the order given (the others after them, alphabetical); within one, `full` first."""
    rank = {name: i for i, name in enumerate(methods or [])}
    return sorted(set(rows), key=lambda r: (rank.get(r[0], len(rank)), r[0], r[1] != REFERENCE_ABLATION, r[1]))


def row_name(row: Row) -> str:
    return "/".join(row)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def latest_runs(client: MlflowClient, experiment: str, stages: Sequence[str], ablations: Sequence[str] | None = None,
                methods: Sequence[str] | None = None,
                runs: Sequence[Row] | None = None) -> dict[Key, Run]:
    """{(method, ablation, seed, task): the latest FINISHED child run of one of `stages`}, only of the given
    ablations, methods and (method, ablation) runs where those are given."""
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        raise NoRunsError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}")
    latest: dict[Key, Run] = {}
    for stage in dict.fromkeys(stages):
        query = f"tags.stage = {_quote(stage)} and attributes.status = 'FINISHED'"
        for run in search_all_runs(client, [found.experiment_id], query):
            tags = run.data.tags
            if PARENT_RUN_ID_TAG not in tags or not {"method", "ablation", "task"} <= set(tags):
                continue  # a parent, or a run logged before runs were nested: not a (stage, task) result
            method, ablation = tags["method"], tags["ablation"]
            if ((ablations is not None and ablation not in ablations) or (methods is not None and method not in methods)
                    or (runs is not None and (method, ablation) not in runs)):
                continue
            key = (method, ablation, int(tags.get("seed", 0)), tags["task"])
            order = (run.info.end_time or 0, run.info.start_time or 0, run.info.run_id)
            if key not in latest or order > (latest[key].info.end_time or 0, latest[key].info.start_time or 0,
                                             latest[key].info.run_id):
                latest[key] = run
    return latest


def summary_table(client: MlflowClient, experiment: str, stages: Sequence[str],
                  ablations: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None, runs: Sequence[Row] | None = None) -> pd.DataFrame:
    """Rows: (method, ablation) (`row_order`), index levels `method` and `ablation`; columns: `<task>/<metric>`,
    sorted; cells: final values of the latest finished runs of `stages` in the MLflow `experiment`.

    `metrics`: shell-style patterns (fnmatch) of the columns to keep (default: every metric of the runs).
    `ablations`, `methods`, `runs`: keep only these (default all).

    Runs asked for by name (`runs`, and not left out by `methods` or `ablations`) but without results get a row
    of NaN, so that the gap shows in the summary. Raises NoRunsError when nothing matches at all.
    """
    found = latest_runs(client, experiment, stages, ablations, methods, runs)
    if not found:
        raise NoRunsError(f"no FINISHED child runs with stage {' or '.join(map(repr, stages))}"
                          f"{_filters(methods, ablations, runs)} in MLflow experiment {experiment!r} at "
                          f"{client.tracking_uri}")
    return build_table(seed_means({key: run.data.metrics for key, run in found.items()}), metrics, methods,
                       ablations, runs)


def seed_means(found: Mapping[Key, Mapping[str, float]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(method, ablation, seed, task): metrics} -> {(method, ablation, task): each metric's mean over the seeds
    that have it}."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for (method, ablation, _, task), metrics in found.items():
        cell = values.setdefault((method, ablation, task), {})
        for metric, value in metrics.items():
            cell.setdefault(metric, []).append(float(value))
    return {key: {metric: sum(v) / len(v) for metric, v in cell.items()} for key, cell in values.items()}


SEED_FOLDER = re.compile(r"seed(0|[1-9][0-9]*)")


def evaluation_key(path: Path) -> Key:
    """(method, ablation, seed, task) of an evaluation JSON at <...>/<method>/<ablation>/seed<k>/evaluate/<task>.json,
    the layout the workflow writes them in."""
    parts = path.parts
    seed = SEED_FOLDER.fullmatch(parts[-3]) if len(parts) >= 5 else None
    if seed is None or parts[-2] != "evaluate" or path.suffix != ".json":
        raise DataError(f"--evaluations {path}: not of the form <method>/<ablation>/seed<k>/evaluate/<task>.json")
    return parts[-5], parts[-4], int(seed.group(1)), path.stem


def read_evaluations(paths: Sequence[Path], ablations: Sequence[str] | None = None,
                     methods: Sequence[str] | None = None,
                     runs: Sequence[Row] | None = None) -> dict[Key, dict[str, Any]]:
    """{(method, ablation, seed, task): the evaluation JSON} of the files the filters keep. Raises DataError
    naming an unreadable file, NoRunsError when the filters leave none."""
    found: dict[Key, dict[str, Any]] = {}
    for path in paths:
        method, ablation, seed, task = evaluation_key(Path(path))
        if ((ablations is not None and ablation not in ablations) or (methods is not None and method not in methods)
                or (runs is not None and (method, ablation) not in runs)):
            continue
        try:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"--evaluations {path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"--evaluations {path}: not a readable JSON file ({err})") from None
        if not isinstance(result, dict) or result.get("task", task) != task:
            raise DataError(f"--evaluations {path}: not the evaluation of task {task!r} (its 'task' is "
                            f"{result.get('task') if isinstance(result, dict) else None!r})")
        found[(method, ablation, seed, task)] = result
    if not found:
        raise NoRunsError(f"no evaluation files{_filters(methods, ablations, runs)} among the "
                          f"{len(paths)} given with --evaluations")
    return found


def evaluations_table(found: Mapping[Key, Mapping[str, Any]], metrics: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None, ablations: Sequence[str] | None = None,
                      runs: Sequence[Row] | None = None) -> pd.DataFrame:
    """The table of `summary_table` from the evaluation JSON files (`read_evaluations`) instead of MLflow: the
    same `<task>/<metric>` columns (`flat_metrics`, the names the runs log), means over the seeds, so the summary
    does not depend on the MLflow store."""
    from mvptr.headline import flat_metrics

    return build_table(seed_means({key: flat_metrics(result) for key, result in found.items()}), metrics, methods,
                       ablations, runs)


def _filters(methods: Sequence[str] | None, ablations: Sequence[str] | None, runs: Sequence[Row] | None) -> str:
    return "".join(f" for {what} {', '.join(map(str, names))}" for what, names in
                   (("methods", methods), ("ablations", ablations), ("runs", [row_name(r) for r in runs or []]))
                   if names)


def build_table(found: Mapping[tuple[str, str, str], Mapping[str, float]], metrics: Sequence[str] | None = None,
                methods: Sequence[str] | None = None, ablations: Sequence[str] | None = None,
                runs: Sequence[Row] | None = None) -> pd.DataFrame:
    """{(method, ablation, task): {metric: value}} -> the summary table (see `summary_table`)."""
    import pandas as pd

    cells: dict[Row, dict[str, float]] = {}
    for (method, ablation, task), values in found.items():
        row = cells.setdefault((method, ablation), {})
        for metric, value in values.items():
            column = f"{task}/{metric}"
            if metrics is None or any(fnmatch.fnmatchcase(column, pattern) for pattern in metrics):
                row[column] = float(value)
    # A requested run that the other filters leave out is not a gap: it gets no row (not a false row of n/a).
    gaps = [r for r in runs or [] if (methods is None or r[0] in methods) and (ablations is None or r[1] in ablations)]
    rows = row_order([*cells, *gaps], methods)
    columns = sorted({column for row in cells.values() for column in row})
    index = pd.MultiIndex.from_tuples(rows, names=["method", "ablation"])
    return pd.DataFrame([cells.get(row, {}) for row in rows], index=index, columns=columns).astype("float64")


def _cell(value: float, spec: str = ".4g") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table, written by hand: pandas' to_markdown needs `tabulate`, which is not a dependency."""
    def escape(text: object) -> str:
        return str(text).replace("|", "\\|")

    names = list(table.index.names)
    header = [*names, *table.columns]
    rule = "|" + "|".join([" --- "] * len(names) + [" ---: "] * len(table.columns)) + "|"  # metrics right-aligned
    lines = ["| " + " | ".join(map(escape, header)) + " |", rule]
    for key, row in table.iterrows():
        lines.append("| " + " | ".join([*map(escape, key), *(_cell(v) for v in row)]) + " |")
    return "\n".join(lines) + "\n"


def headline_columns(columns: Sequence[str]) -> dict[str, str]:
    """{short name: column} of the table's `columns` (those with a value), in `HEADLINE`'s order (a task it does
    not name comes after, with its first column)."""
    from mvptr.data.task_files import EVAL_SPLITS

    picked: dict[str, str] = {}
    tasks = dict.fromkeys(c.split("/", 1)[0] for c in columns)
    for name, task, metrics in HEADLINE:
        split = EVAL_SPLITS.get(task, ("test",))[-1]
        present = [c for c in (f"{task}/splits/{split}/{m}" for m in metrics) if c in columns]
        if present:
            picked[name] = present[0]
    named = {task for _, task, _ in HEADLINE}
    for task in tasks:
        if task not in named:
            picked[task] = next(c for c in columns if c.split("/", 1)[0] == task)
    return picked


def filled_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if table[c].notna().any()]


def headline_table(table: pd.DataFrame) -> str:
    """A narrow markdown table, columns padded to align in a terminal: a row per (method, ablation), a column
    per task (`headline_columns`), then which metric each column is."""
    picked = headline_columns(filled_columns(table))
    rows = [["run", *picked]] + [[row_name(key), *(_cell(row[c], ".1f") for c in picked.values())]
                                 for key, row in table.iterrows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    legend = [f"- {name}: {column}" for name, column in picked.items()]
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:]), "", *legend]) + "\n"


def task_chart(table: pd.DataFrame, task: str) -> bytes:
    """PNG: one panel per metric of `task`, a bar per (method, ablation), coloured by method; panels because
    metrics differ in scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [c for c in table.columns if c.split("/", 1)[0] == task]
    ncols = min(len(columns), 4)
    nrows = math.ceil(len(columns) / ncols)
    # A Figure with its own Agg canvas, not pyplot: no global backend or figure registry to leak between calls.
    fig = Figure(figsize=(max(3.0, 0.6 * len(table)) * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    methods = list(dict.fromkeys(table.index.get_level_values("method")))
    colors = [f"C{methods.index(method) % 10}" for method in table.index.get_level_values("method")]
    for ax, column in zip(axes, columns):
        values = table[column].to_numpy(dtype=float)
        bars = ax.bar(range(len(table)), values, color=colors)
        ax.bar_label(bars, labels=["" if math.isnan(v) else _cell(v) for v in values], fontsize=8)
        ax.margins(y=0.12)  # room for the labels above the tallest bar
        ax.set_xticks(range(len(table)), [row_name(r) for r in table.index], rotation=30, ha="right")
        ax.set_title(column.split("/", 1)[1])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    fig.suptitle(task)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def chart_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task) + ".png"


def write_summary(table: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """ablations.csv, ablations.md, ablations.json (DVC metrics: {"method/ablation": {metric: value}}, NaN left
    out), headline.md (`headline_table`) and `<task>.png` per task in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    written = [out_dir / CSV_NAME, out_dir / MD_NAME, out_dir / JSON_NAME, out_dir / HEADLINE_NAME]
    atomic_write_json(written[2], {row_name(key): {k: float(v) for k, v in row.items() if not math.isnan(v)}
                                   for key, row in table.iterrows()})
    # repr-precision floats, so that the CSV holds exactly what MLflow holds
    atomic_write_bytes(written[0], table.to_csv(float_format=None, lineterminator="\n").encode("utf-8"))
    atomic_write_bytes(written[1], markdown_table(table).encode("utf-8"))
    atomic_write_bytes(written[3], headline_table(table).encode("utf-8"))
    for task in dict.fromkeys(c.split("/", 1)[0] for c in table.columns):
        path = out_dir / chart_name(task)
        atomic_write_bytes(path, task_chart(table, task))
        written.append(path)
    return written
