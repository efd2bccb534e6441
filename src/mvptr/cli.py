"""The `mvptr` command: one subcommand per workflow step, so that Snakemake rules stay one-line wiring.

    mvptr config show [key=value ...]              merged, validated config and its hash
    mvptr data synth|prepare|check ...             mvptr.data.commands

Each step's subcommands live beside its code (a `commands.py` with `register(groups)`), listed in
COMMAND_MODULES. Subcommands that take `key=value` overrides also take `--root DIR` and `--base FILE`.
Bad input (config or data) exits with status 2 and one message naming the key, file or id.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import yaml

from mvptr.config import add_config_arguments, config_from_args, config_hash, dataset_dir
from mvptr.errors import ConfigError

COMMAND_MODULES = ["mvptr.data.commands", "mvptr.concepts.commands", "mvptr.regions.commands",
                   "mvptr.train.commands", "mvptr.compare_commands", "mvptr.evaluate.commands",
                   "mvptr.dvc_stages", "mvptr.models.commands", "mvptr.estimate_commands"]


def cmd_config_show(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")
    print(f"# dataset folder: {dataset_dir(cfg)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvptr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True)
    config = groups.add_parser("config", help="inspect the merged config").add_subparsers(dest="cmd", required=True)
    show = config.add_parser("show", help="print the merged, validated config and its hash")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mvptr.errors import DataError

    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"mvptr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
