"""The `mvptr` command: one subcommand per workflow step, so that Snakemake rules stay one-line wiring.

    mvptr config show [key=value ...]              merged, validated config and its hash
    mvptr data synth --size tiny --seed 0 --out DIR
    mvptr data prepare --out DIR [key=value ...]   the prepare_data rule
    mvptr data check DIR                           open a prepared dataset and print its counts

Every subcommand that takes `key=value` overrides also takes `--root DIR` and `--base FILE`.
Bad input (config or data) exits with status 2 and one message naming the key, file or id.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mvptr.config import ConfigError, config_hash, dataset_dir, load_config


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None,
                        help="project folder holding configs/ and workflow/ (default: $MVPTR_ROOT, the working "
                             "directory if it has them, else the checkout the package was installed from)")
    parser.add_argument("--base", type=Path, default=None, help="base config file (default ROOT/configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1")


def cmd_config_show(args: argparse.Namespace) -> None:
    cfg = load_config(args.overrides, args.base, args.root)
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")
    print(f"# dataset folder: {dataset_dir(cfg)}")


def cmd_data_synth(args: argparse.Namespace) -> None:
    from mvptr.data.synthetic import SIZES, generate_world

    manifest = generate_world(args.out, num_images=args.num_images or SIZES[args.size], seed=args.seed,
                              image_size=args.image_size)
    print(json.dumps(manifest["counts"], sort_keys=True))


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from mvptr.data.prepare import prepare

    cfg = load_config(args.overrides, args.base, args.root)
    manifest = prepare(cfg, args.out)
    print(json.dumps(manifest["counts"], sort_keys=True))


def cmd_data_check(args: argparse.Namespace) -> None:
    from mvptr.data.coco import open_prepared

    ds = open_prepared(args.dataset_dir)
    counts = {split: len(ds.image_ids(split)) for split in sorted(set(ds.splits.values()))}
    counts["captions"] = len(ds.captions_coco.dataset["annotations"])
    print(json.dumps(counts, sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvptr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True)

    config = groups.add_parser("config", help="inspect the merged config").add_subparsers(dest="cmd", required=True)
    show = config.add_parser("show", help="print the merged, validated config and its hash")
    _with_config(show)
    show.set_defaults(func=cmd_config_show)

    data = groups.add_parser("data", help="datasets").add_subparsers(dest="cmd", required=True)
    synth = data.add_parser("synth", help="generate the embedded synthetic world")
    synth.add_argument("--size", choices=["tiny", "small", "default"], default="default")
    synth.add_argument("--num-images", type=int, default=None, help="instead of the size preset")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--out", type=Path, required=True)
    synth.set_defaults(func=cmd_data_synth)

    prep = data.add_parser("prepare", help="the prepare_data step for the configured dataset")
    prep.add_argument("--out", type=Path, required=True)
    _with_config(prep)
    prep.set_defaults(func=cmd_data_prepare)

    check = data.add_parser("check", help="open a prepared dataset folder and print its counts")
    check.add_argument("dataset_dir", type=Path)
    check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mvptr.data.coco import DataError

    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"mvptr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
