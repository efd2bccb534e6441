"""`mvptr compare`: the (method, ablation) summary (CSV, markdown, a bar chart per task, a narrow headline table;
means over seeds) from a study's evaluation files or its MLflow runs, and from the files the seed statistics
(statistics.md, statistics.json: `mvptr.seed_stats`).

    mvptr compare --evaluations FILE ... [--out-dir results/summary] [--runs ...] [--methods ...]  (the rule)
    mvptr compare [--tracking-uri URI] [--experiment NAME] [--out-dir results/summary] [--stage evaluate ...]
                  [--runs mvptr/full simla/full ...] [--methods m ...] [--ablations a b c] [--root DIR]

Why a command: the `summarize` rule calls it with the evaluation JSON files it depends on (so the summary
depends on nothing else), and a user can point it at any MLflow store (the cluster's tracking
server, or a copy of results/mlflow.db). The store defaults to `mvptr.tracking.tracking_uri()`
($MLFLOW_TRACKING_URI, else results/mlflow.db); the experiment to the study of the default config
(`mvptr-<dataset.name>`). No matching run exits with status 2 and says what was searched. `key=value`
tokens after a list option (`--ablations full seed=3`) are config overrides, not names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mvptr.config import add_config_arguments
from mvptr.errors import ConfigError, DataError
from mvptr.headline import HEADLINE_METRICS

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient



def cmd_compare(args: argparse.Namespace) -> None:
    from mvptr.compare import evaluations_table, read_evaluations, row_name, summary_table, write_summary

    move_overrides(args)
    if args.overrides:  # they name the experiment (MLflow) only, but a bad one is an error either way
        from mvptr.config import config_from_args

        config_from_args(args)
    runs = [parse_run(text) for text in args.runs] if args.runs is not None else None
    found = None
    if args.evaluations:
        found = read_evaluations(args.evaluations, args.ablations, args.methods, runs)
        table = evaluations_table(found, args.metrics or None, args.methods, args.ablations, runs)
    else:
        table = summary_table(*_store(args), args.stage, args.ablations, args.metrics or None, args.methods, runs)
    missing = [row_name(key) for key, row in table.iterrows() if row.isna().all()]
    if missing:
        print(f"mvptr compare: warning: no finished runs for {', '.join(missing)}", file=sys.stderr)
    written = write_summary(table, args.out_dir)
    if found is not None:  # the statistics need every seed's item scores: the files have them, MLflow not
        from mvptr.seed_stats import write_statistics

        written += write_statistics(found, args.methods, args.out_dir)
    print(json.dumps({"rows": [row_name(key) for key in table.index], "columns": len(table.columns),
                      "written": [str(p) for p in written]}))


def _store(args: argparse.Namespace) -> tuple[MlflowClient, str]:
    """The MLflow client and experiment to read; DataError where the SQLite store named is not there."""
    from mvptr.tracking import client, experiment_name, sqlite_path, tracking_uri

    if args.experiment is None:
        from mvptr.config import config_from_args

        args.experiment = experiment_name(config_from_args(args))
    uri = args.tracking_uri or tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there and report no experiment
        raise DataError(f"--tracking-uri: no MLflow store at {db} ({uri}); pass --tracking-uri, set "
                        "MLFLOW_TRACKING_URI or read the evaluation files with --evaluations")
    return client(uri), args.experiment


def move_overrides(args: argparse.Namespace) -> None:
    """`key=value` tokens that a list option (--ablations full seed=3) swallowed are config overrides: argparse
    gives an option with nargs="+" every token up to the next option, so move them to `args.overrides`."""
    for name in LIST_OPTIONS:
        values = getattr(args, name)
        if values is not None:
            setattr(args, name, [v for v in values if "=" not in v])
            args.overrides = [*args.overrides, *(v for v in values if "=" in v)]
            if not getattr(args, name):
                raise ConfigError(f"--{name.replace('_', '-')}: no value besides the config overrides "
                                  f"{' '.join(v for v in values if '=' in v)}")


def parse_run(text: str) -> tuple[str, str]:
    """`method/ablation` -> (method, ablation)."""
    method, sep, ablation = text.partition("/")
    if not sep or not method or not ablation or "/" in ablation:
        raise ConfigError(f"--runs {text!r}: not of the form method/ablation (e.g. simla/full)")
    return method, ablation


LIST_OPTIONS = ["stage", "ablations", "methods", "runs", "metrics"]


def register(groups: argparse._SubParsersAction) -> None:
    compare = groups.add_parser("compare", help="tabulate and chart the methods' and ablations' task metrics",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("--tracking-uri", default=None,
                         help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    compare.add_argument("--experiment", default=None,
                         help="MLflow experiment (default: the configured dataset's, mvptr-<dataset folder>)")
    compare.add_argument("--out-dir", type=Path, default=Path("results/summary"),
                         help="where ablations.csv, ablations.md and <task>.png go (default results/summary)")
    compare.add_argument("--stage", nargs="+", default=["evaluate"],
                         help="stage tags of the runs to read (default evaluate)")
    compare.add_argument("--ablations", nargs="+", default=None, help="only these ablations (default all)")
    compare.add_argument("--methods", nargs="+", default=None,
                         help="only these methods (the MLflow tag `method`), rows in this order (default all)")
    compare.add_argument("--evaluations", nargs="+", type=Path, default=None, metavar="FILE",
                         help="build the table from these evaluation JSON files (<method>/<ablation>/seed<k>/evaluate/"
                              "<task>.json, as `mvptr evaluate run --out` writes them) instead of MLflow")
    compare.add_argument("--runs", nargs="+", default=None, metavar="METHOD/ABLATION",
                         help="only these (method, ablation) runs; one without results gets a row of n/a")
    compare.add_argument("--metrics", nargs="+", default=HEADLINE_METRICS,
                         help="shell-style patterns of the <task>/<metric> columns to keep; '*' keeps every metric "
                              "(default: the headline metric of each downstream task)")
    add_config_arguments(compare)  # the config whose dataset names the default experiment
    compare.set_defaults(func=cmd_compare)
