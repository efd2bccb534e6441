"""Turn the MLflow runs of a study into one table of ablations x task metrics, as CSV, markdown and bar charts.

Why: the point of the study is the comparison of ablations; the runs already hold every number (see
`mvptr.tracking` for how they are laid out), so the summary is read back from MLflow rather than from
scattered JSON files, and it is the same whether the store is the embedded SQLite file or a tracking server.

What is read: the FINISHED child runs (those with `mlflow.parentRunId`) whose `stage` tag is one of `stages`;
for each (ablation, task) the latest such run (by end time), and of it each metric's final value (the value
at the latest step, which is what MLflow keeps as a run's metric). Columns are `<task>/<metric>`; rows are
ablations, `full` first, then alphabetical.

Use:
    mvptr compare [--tracking-uri URI] [--experiment NAME] [--out-dir results/summary] [--stage evaluate ...]
                  [--ablations a b c]
    from mvptr.compare import summary_table; df = summary_table(client, "mvptr-synthetic", ["evaluate"])
"""

from __future__ import annotations

import fnmatch
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mvptr.atomic import atomic_write_bytes, atomic_write_json
from mvptr.tracking import PARENT_RUN_ID_TAG, search_all_runs

if TYPE_CHECKING:  # pandas, matplotlib and mlflow are imported inside the functions: `mvptr --help` stays fast
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

REFERENCE_ABLATION = "full"  # the method as configured: the row every other row is read against
CSV_NAME = "ablations.csv"
MD_NAME = "ablations.md"
JSON_NAME = "ablations.json"


class NoRunsError(LookupError):
    """No finished run matches the experiment, stages and ablations asked for; the message says what was searched."""


def ablation_order(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=lambda name: (name != REFERENCE_ABLATION, name))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def latest_runs(client: MlflowClient, experiment: str, stages: Sequence[str],
                ablations: Sequence[str] | None = None) -> dict[tuple[str, str], Run]:
    """{(ablation, task): the latest FINISHED child run of one of `stages`}."""
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        raise NoRunsError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}")
    latest: dict[tuple[str, str], Run] = {}
    for stage in dict.fromkeys(stages):
        query = f"tags.stage = {_quote(stage)} and attributes.status = 'FINISHED'"
        for run in search_all_runs(client, [found.experiment_id], query):
            tags = run.data.tags
            if PARENT_RUN_ID_TAG not in tags or "ablation" not in tags or "task" not in tags:
                continue  # a parent, or a run logged before runs were nested: not a (stage, task) result
            if ablations is not None and tags["ablation"] not in ablations:
                continue
            key = (tags["ablation"], tags["task"])
            order = (run.info.end_time or 0, run.info.start_time or 0, run.info.run_id)
            if key not in latest or order > (latest[key].info.end_time or 0, latest[key].info.start_time or 0,
                                             latest[key].info.run_id):
                latest[key] = run
    return latest


def summary_table(client: MlflowClient, experiment: str, stages: Sequence[str],
                  ablations: Sequence[str] | None = None, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows: ablations (`full` first, then alphabetical); columns: `<task>/<metric>`, sorted; cells: final values.

    `metrics`: shell-style patterns (fnmatch) of the columns to keep (default: every metric of the runs).

    Ablations asked for by name but without runs get a row of NaN, so that the gap shows in the summary.
    Raises NoRunsError when nothing matches at all.
    """
    import pandas as pd

    runs = latest_runs(client, experiment, stages, ablations)
    if not runs:
        which = f" for ablations {', '.join(ablations)}" if ablations else ""
        raise NoRunsError(f"no FINISHED child runs with stage {' or '.join(map(repr, stages))}{which} in MLflow "
                          f"experiment {experiment!r} at {client.tracking_uri}")
    cells: dict[str, dict[str, float]] = {}
    for (ablation, task), run in runs.items():
        row = cells.setdefault(ablation, {})
        for metric, value in run.data.metrics.items():
            column = f"{task}/{metric}"
            if metrics is None or any(fnmatch.fnmatchcase(column, pattern) for pattern in metrics):
                row[column] = float(value)
    rows = ablation_order([*cells, *(ablations or [])])
    columns = sorted({column for row in cells.values() for column in row})
    table = pd.DataFrame.from_dict(cells, orient="index").reindex(index=rows, columns=columns).astype("float64")
    table.index.name = "ablation"
    return table


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table, written by hand: pandas' to_markdown needs `tabulate`, which is not a dependency."""
    def escape(text: object) -> str:
        return str(text).replace("|", "\\|")

    header = [table.index.name or "", *table.columns]
    rule = "|" + "|".join([" --- "] + [" ---: "] * len(table.columns)) + "|"  # metrics right-aligned
    lines = ["| " + " | ".join(map(escape, header)) + " |", rule]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([escape(name), *(_cell(v) for v in row)]) + " |")
    return "\n".join(lines) + "\n"


def task_chart(table: pd.DataFrame, task: str) -> bytes:
    """PNG: one panel per metric of `task`, a bar per ablation; panels because metrics differ in scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [c for c in table.columns if c.split("/", 1)[0] == task]
    ncols = min(len(columns), 4)
    nrows = math.ceil(len(columns) / ncols)
    # A Figure with its own Agg canvas, not pyplot: no global backend or figure registry to leak between calls.
    fig = Figure(figsize=(max(3.0, 0.6 * len(table)) * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(table))]
    for ax, column in zip(axes, columns):
        values = table[column].to_numpy(dtype=float)
        bars = ax.bar(range(len(table)), values, color=colors)
        ax.bar_label(bars, labels=["" if math.isnan(v) else _cell(v) for v in values], fontsize=8)
        ax.margins(y=0.12)  # room for the labels above the tallest bar
        ax.set_xticks(range(len(table)), [str(a) for a in table.index], rotation=30, ha="right")
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
    """ablations.csv, ablations.md, ablations.json (DVC metrics: {ablation: {metric: value}}, NaN left out)
    and `<task>.png` per task in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    written = [out_dir / CSV_NAME, out_dir / MD_NAME, out_dir / JSON_NAME]
    atomic_write_json(written[2], {ablation: {k: float(v) for k, v in row.items() if not math.isnan(v)}
                                   for ablation, row in table.iterrows()})
    # repr-precision floats, so that the CSV holds exactly what MLflow holds
    atomic_write_bytes(written[0], table.to_csv(float_format=None, lineterminator="\n").encode("utf-8"))
    atomic_write_bytes(written[1], markdown_table(table).encode("utf-8"))
    for task in dict.fromkeys(c.split("/", 1)[0] for c in table.columns):
        path = out_dir / chart_name(task)
        atomic_write_bytes(path, task_chart(table, task))
        written.append(path)
    return written
