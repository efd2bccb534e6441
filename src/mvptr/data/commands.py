"""`mvptr data ...` subcommands: generate the synthetic world, prepare and check a dataset folder.

    mvptr data synth --size tiny --seed 0 --out DIR
    mvptr data prepare --out DIR [key=value ...]   (the prepare_data rule)
    mvptr data check DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvptr.config import add_config_arguments, config_from_args


def cmd_synth(args: argparse.Namespace) -> None:
    from mvptr.data.synthetic import SIZES, generate_world

    manifest = generate_world(args.out, num_images=args.num_images or SIZES[args.size], seed=args.seed,
                              image_size=args.image_size)
    print(json.dumps(manifest["counts"], sort_keys=True))


def cmd_prepare(args: argparse.Namespace) -> None:
    from mvptr.data.prepare import prepare

    manifest = prepare(config_from_args(args), args.out)
    print(json.dumps(manifest["counts"], sort_keys=True))


def cmd_check(args: argparse.Namespace) -> None:
    from mvptr.data.coco import open_prepared

    ds = open_prepared(args.dataset_dir)
    counts = {split: len(ds.image_ids(split)) for split in sorted(set(ds.splits.values()))}
    counts["captions"] = len(ds.captions_coco.dataset["annotations"])
    print(json.dumps(counts, sort_keys=True))


def register(groups: argparse._SubParsersAction) -> None:
    data = groups.add_parser("data", help="datasets").add_subparsers(dest="cmd", required=True)
    synth = data.add_parser("synth", help="generate the embedded synthetic world")
    synth.add_argument("--size", choices=["tiny", "small", "default"], default="default")
    synth.add_argument("--num-images", type=int, default=None, help="instead of the size preset")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--out", type=Path, required=True)
    synth.set_defaults(func=cmd_synth)

    prep = data.add_parser("prepare", help="the prepare_data step for the configured dataset")
    prep.add_argument("--out", type=Path, required=True)
    add_config_arguments(prep)
    prep.set_defaults(func=cmd_prepare)

    check = data.add_parser("check", help="open a prepared dataset folder and print its counts")
    check.add_argument("dataset_dir", type=Path)
    check.set_defaults(func=cmd_check)
