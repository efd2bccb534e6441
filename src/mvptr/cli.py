"""The `mvptr` command: one subcommand per workflow step, so that Snakemake rules stay one-line wiring.

For developers (users read `mvptr --help`, whose command list is built from the registered subcommands' help):
each step's subcommands live beside its code (a `commands.py` with `register(groups)`), listed in
COMMAND_MODULES; a group's subcommands hang off its own subparsers. Subcommands that take `key=value`
overrides also take `--root DIR` and `--base FILE`. Bad input (config, data, a path the user named) and a full
disk exit with status 2 and one line `mvptr: error: ...` naming the key, file or id; any other exception is a
bug and keeps its traceback.

Run: `mvptr --help`, `mvptr --version`, `mvptr config show [key=value ...]`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from mvptr.config import add_config_arguments, config_from_args, config_hash, dataset_dir
from mvptr.errors import ConfigError, DataError

COMMAND_MODULES = ["mvptr.data.commands", "mvptr.concepts.commands", "mvptr.regions.commands",
                   "mvptr.train.commands", "mvptr.compare_commands", "mvptr.evaluate.commands",
                   "mvptr.dvc_stages", "mvptr.models.commands", "mvptr.estimate_commands"]

DESCRIPTION = """\
Run the steps of the mvptr workflow (data, concepts, regions, pre-training, evaluation, summary) one at a
time; Snakemake (`snakemake all`, `make demo`) runs them all. `mvptr COMMAND --help` tells more."""


def cmd_config_show(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")
    print(f"# dataset folder: {dataset_dir(cfg)}")


def commands(groups: argparse._SubParsersAction) -> list[tuple[str, str]]:
    """(command, help) of every registered command: `group subcommand` for a group, else the command alone."""
    listed = []
    for entry in groups._choices_actions:  # argparse keeps each add_parser's name and help here, in order
        nested = [a for a in groups.choices[entry.dest]._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            listed += [(f"{entry.dest} {sub.dest}", sub.help or "") for sub in nested[0]._choices_actions]
        else:
            listed.append((entry.dest, entry.help or ""))
    return listed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvptr", usage="mvptr [-h] [--version] COMMAND ...",
                                     description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mvptr {importlib.metadata.version('mvptr')}")
    # help=SUPPRESS: the epilog lists every command with its subcommands instead of argparse's list of groups
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND", help=argparse.SUPPRESS)
    config = groups.add_parser("config", help="inspect the merged config").add_subparsers(dest="cmd", required=True)
    show = config.add_parser("show", help="print the merged, validated config and its hash")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(groups)
    listed = commands(groups)
    width = max(len(name) for name, _ in listed) + 2
    parser.epilog = "commands:\n" + "\n".join(f"  {name.ljust(width)}{what}" for name, what in listed)
    return parser


USER_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; with `argv` None (the `mvptr` program itself) the process then ends at once (`exit_now`)."""
    code = run(argv)
    if argv is None:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: freeing the modules of torch, transformers and MLflow
    takes one to two seconds, paid by every job of the workflow (a tenth of a demo evaluation). Whatever the
    command wrote is closed by then; the log handlers and the standard streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"mvptr: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        # a path the user named that cannot be read or written, or a full disk (other OSErrors, and other
        # exceptions, are bugs)
        if not isinstance(err, USER_PATH_ERRORS) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"mvptr: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
