"""`mvptr data ...` subcommands: download sources, generate the synthetic world, prepare and check a dataset.

    mvptr data sources [key=value ...]                       the sources the configured dataset needs
    mvptr data download --source SOURCE --out DIR [key=value ...]     (the download_source rule)
    mvptr data web-images --source SOURCE --dir DIR [key=value ...]   (the fetch_web_images rule; img2dataset)
    mvptr data synth --size tiny --seed 0 --out DIR
    mvptr data prepare [--out DIR] [--downloads DIR] [key=value ...] (the prepare_data rule; default DIR: where the
                                                                     workflow reads it)
    mvptr data check DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvptr.config import add_config_arguments, config_from_args, dataset_dir
from mvptr.errors import ConfigError


def check_synth_options(args: argparse.Namespace) -> None:
    """--num-images and --image-size within the config schema's bounds for dataset.synthetic (the world needs
    10 images to give val and test one each), before any work; ConfigError naming the option otherwise."""
    from mvptr.config import read_yaml, schema_path

    bounds = read_yaml(schema_path())["properties"]["dataset"]["properties"]["synthetic"]["properties"]
    for option, key in (("--num-images", "num_images"), ("--image-size", "image_size")):
        value, low, high = getattr(args, key), bounds[key].get("minimum"), bounds[key].get("maximum")
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            allowed = " and ".join(f"{word} {limit}" for word, limit in (("at least", low), ("at most", high))
                                   if limit is not None)
            raise ConfigError(f"{option} {value}: must be {allowed}")


def cmd_synth(args: argparse.Namespace) -> None:
    from mvptr.data.synthetic import SIZES, generate_world

    check_synth_options(args)

    manifest = generate_world(args.out, num_images=args.num_images or SIZES[args.size], seed=args.seed,
                              image_size=args.image_size)
    print(json.dumps(manifest["counts"], sort_keys=True))


def cmd_prepare(args: argparse.Namespace) -> None:
    from mvptr.data.prepare import prepare

    cfg = config_from_args(args)
    # By default, the folder the workflow reads (resources/datasets/<name>-<hash>, relative to the working
    # directory), so that a later `snakemake` finds it prepared.
    out = args.out or dataset_dir(cfg)
    manifest = prepare(cfg, out, args.downloads, log=log, root=args.root)
    print(f"prepared {out}", flush=True)
    print(json.dumps(manifest["counts"], sort_keys=True))


def log(line: str) -> None:
    print(line, flush=True)


def cmd_sources(args: argparse.Namespace) -> None:
    from mvptr.data.catalog import needed_sources, web_sources

    cfg = config_from_args(args)
    web = set(web_sources(cfg, args.root))
    for name in needed_sources(cfg, args.root):
        print(f"{name}{' (web images)' if name in web else ''}")


def cmd_download(args: argparse.Namespace) -> None:
    from mvptr.data.catalog import download_settings, load_source
    from mvptr.data.fetch import download_source

    cfg = config_from_args(args)
    manifest = download_source(load_source(args.source, cfg, args.root), args.out, download_settings(cfg), log)
    print(json.dumps({"files": len(manifest["files"]), "bytes": manifest["bytes"]}, sort_keys=True))


def cmd_web_images(args: argparse.Namespace) -> None:
    from mvptr.data.catalog import load_source
    from mvptr.data.web_images import fetch_web_images

    cfg = config_from_args(args)
    summary = fetch_web_images(load_source(args.source, cfg, args.root), args.dir, cfg, log)
    print(json.dumps({k: summary[k] for k in ("urls", "landed", "dead")}, sort_keys=True))


def cmd_check(args: argparse.Namespace) -> None:
    from mvptr.data.coco import open_prepared

    ds = open_prepared(args.dataset_dir)
    counts = {split: len(ds.image_ids(split)) for split in sorted(set(ds.splits.values()))}
    counts["captions"] = len(ds.captions_coco.dataset["annotations"])
    print(json.dumps(counts, sort_keys=True))


def register(groups: argparse._SubParsersAction) -> None:
    data = groups.add_parser("data", help="datasets").add_subparsers(dest="cmd", required=True)
    synth = data.add_parser("synth", help="generate the embedded synthetic world (images, captions, task files)")
    synth.add_argument("--size", choices=["tiny", "small", "default"], default="default")
    synth.add_argument("--num-images", type=int, default=None, help="instead of the size preset (at least 10)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128, help="side of the square images in pixels (64-1024)")
    synth.add_argument("--out", type=Path, required=True)
    synth.set_defaults(func=cmd_synth)

    sources = data.add_parser("sources", help="list the download sources the configured dataset needs")
    add_config_arguments(sources)
    sources.set_defaults(func=cmd_sources)

    download = data.add_parser("download", help="fetch, verify and unpack one source's files (resumable)")
    download.add_argument("--source", required=True, help="a configs/datasets/<source>.yaml with a `source:` entry")
    download.add_argument("--out", type=Path, required=True, help="the source's folder, resources/downloads/SOURCE")
    add_config_arguments(download)
    download.set_defaults(func=cmd_download)

    web = data.add_parser("web-images", help="fetch a downloaded URL list's images with img2dataset")
    web.add_argument("--source", required=True)
    web.add_argument("--dir", type=Path, required=True, help="the source's folder, resources/downloads/SOURCE")
    add_config_arguments(web)
    web.set_defaults(func=cmd_web_images)

    prep = data.add_parser("prepare", help="prepare the configured dataset where the workflow reads it")
    prep.add_argument("--out", type=Path, default=None,
                      help="the folder to write (default: where the workflow reads it, resources/datasets/<name>-<hash>)")
    prep.add_argument("--downloads", type=Path, default=Path("resources/downloads"),
                      help="where the download steps put the sources (a corpus only)")
    add_config_arguments(prep)
    prep.set_defaults(func=cmd_prepare)

    check = data.add_parser("check", help="open a prepared dataset folder and print its counts")
    check.add_argument("dataset_dir", type=Path)
    check.set_defaults(func=cmd_check)
