"""`mvptr regions ...` subcommands: build a region store from images, or import VinVL's TSV features.

    mvptr regions extract --dataset DIR --out DIR [key=value ...]    (the extract_region_features rule)
    mvptr regions import-vinvl --features features.tsv --predictions predictions.tsv --out store.h5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvptr.config import add_config_arguments, config_from_args


def cmd_extract(args: argparse.Namespace) -> None:
    from mvptr.regions.extract import extract_region_features

    summary = extract_region_features(config_from_args(args), args.dataset, args.out)
    print(json.dumps(summary, sort_keys=True))


def cmd_import_vinvl(args: argparse.Namespace) -> None:
    from mvptr.regions.vinvl import import_vinvl

    print(json.dumps(import_vinvl(args.features, args.predictions, args.out, args.max_regions), sort_keys=True))


def register(groups: argparse._SubParsersAction) -> None:
    regions = groups.add_parser("regions", help="region features").add_subparsers(dest="cmd", required=True)
    extract = regions.add_parser("extract", help="train the region backbone and write one region store per split")
    extract.add_argument("--dataset", type=Path, required=True, help="a prepared dataset folder (mvptr data prepare)")
    extract.add_argument("--out", type=Path, required=True,
                         help="folder for {split}.h5, backbone.safetensors, backbone_metrics.json, skipped.json")
    add_config_arguments(extract)
    extract.set_defaults(func=cmd_extract)

    vinvl = regions.add_parser("import-vinvl", help="convert VinVL features.tsv + predictions.tsv to a region store")
    vinvl.add_argument("--features", type=Path, required=True, help="features.tsv (image_id, num_boxes, base64)")
    vinvl.add_argument("--predictions", type=Path, required=True, help="predictions.tsv (image_id, objects JSON)")
    vinvl.add_argument("--out", type=Path, required=True, help="the region store to write (.h5)")
    vinvl.add_argument("--max-regions", type=int, default=None,
                       help="keep only the most confident boxes of each image (default: all)")
    vinvl.set_defaults(func=cmd_import_vinvl)
