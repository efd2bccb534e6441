"""`mvptr import-checkpoint`: the released MVPTR or SIMLA weights as this project's pre-trained model artifact.

    mvptr import-checkpoint --method mvptr|simla --checkpoint FILE --out DIR
        (--vocab concept_vocab.json | --vocab-size N) (--regions DIR | --feature-dim N)
        [--id2phrase id2phrase_new.json] [--root DIR] [--base FILE] [key=value ...]

Writes, each atomically:
    DIR/model.safetensors    the model of the composed config with the released weights mapped onto it
                             (`mvptr.models.import_checkpoint`), in the format of a pre-training stage's output:
                             what `mvptr evaluate run --weights` and the workflow's evaluate rules read
    DIR/import_report.json   what was loaded, partly loaded, filled, left missing, unused or of another shape,
                             with the config hash and overrides the evaluation must use to rebuild the same model
and prints a one-line summary, then the count of missing and unused keys for each reason.

The config is composed as every command composes it, with `method.name` set by --method and
`model.name=bert_base` (the released models are BERT-base) unless the overrides name a model. The model's
shape must be the one the evaluation builds: its vocabulary rows are the concept vocabulary's
`embedding_rows` (--vocab, as the evaluate rule's --vocab) and its region feature width the region store's
(--regions, as the evaluate rule's --regions), or give them as numbers. --id2phrase (MVPTR's
datasets/mvp/id2phrase_new.json, with --vocab) also copies the embeddings of the released concepts that this
project's vocabulary has under the same name.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from mvptr.config import add_config_arguments, config_from_args, config_hash, parse_overrides
from mvptr.errors import ConfigError, DataError

IMPORTABLE = ("mvptr", "simla")
WEIGHTS, REPORT = "model.safetensors", "import_report.json"
# The released models are BERT-base (METHODS.md).
DEFAULT_MODEL = "bert_base"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{what} {path}: cannot be read as JSON ({err})") from err


def vocab_rows(path: Path) -> int:
    """Rows of the shared embedding table: the concept vocabulary's `embedding_rows` (as the evaluation)."""
    vocab = _read_json(path, "--vocab")
    if not isinstance(vocab, dict) or not isinstance(vocab.get("embedding_rows"), int):
        raise DataError(f"--vocab {path}: no integer 'embedding_rows' (not a concept_vocab.json)")
    return vocab["embedding_rows"]


def region_feature_dim(folder: Path) -> int:
    """The feature width of the region stores in `folder` (train.h5, else the first store)."""
    from mvptr.regions.store import RegionStore

    stores = [folder / "train.h5"] if (folder / "train.h5").is_file() else sorted(folder.glob("*.h5"))
    if not stores:
        raise DataError(f"--regions {folder}: no region store (*.h5)")
    try:
        with RegionStore(stores[0]) as store:
            return store.feature_dim
    except (OSError, KeyError) as err:
        raise DataError(f"--regions {stores[0]}: not a readable region store ({err})") from err


def import_overrides(method: str, overrides: list[str]) -> list[str]:
    """The command line's overrides after `method.name` and the default `model.name`."""
    if method not in IMPORTABLE:
        raise ConfigError(f"--method {method!r}: no released checkpoint to import; methods: {', '.join(IMPORTABLE)}")
    given = {section: value for section, value in parse_overrides(overrides).items() if isinstance(value, dict)}
    asked = given.get("method", {}).get("name", method)
    if asked != method:
        raise ConfigError(f"config key 'method.name': {asked!r} contradicts --method {method}")
    model = [] if "name" in given.get("model", {}) else [f"model.name={DEFAULT_MODEL}"]
    return [f"method.name={method}", *model, *overrides]


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    """The one-line JSON summary, then `missing`/`unused` counts per reason and every shape mismatch."""
    counts = {key: len(report[key]) for key in ("loaded", "partial", "filled", "missing", "unused", "shape_mismatch")}
    lines = [json.dumps({"method": report["method"], "checkpoint": report["checkpoint"], "out": str(out), **counts})]
    for kind in ("missing", "unused"):
        groups = Counter(report[kind].values())
        for why, count in sorted(groups.items(), key=lambda item: (-item[1], item[0])):
            example = next(key for key, reason in report[kind].items() if reason == why)
            lines.append(f"  {kind:8s} {count:5d}  {why} (e.g. {example})")
    lines += [f"  shape    {m['checkpoint']} {m['checkpoint_shape']} -> {m['model']} {m['model_shape']}"
              for m in report["shape_mismatch"]]
    return lines


def cmd_import(args: argparse.Namespace) -> None:
    overrides = import_overrides(args.method, list(args.overrides))
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "overrides": overrides}))
    if args.id2phrase is not None and (args.method != "mvptr" or args.vocab is None):
        raise ConfigError("--id2phrase: MVPTR's concept rows are matched to this project's concept vocabulary: "
                          "needs --method mvptr and --vocab")
    vocab_size = vocab_rows(args.vocab) if args.vocab is not None else args.vocab_size
    feature_dim = region_feature_dim(args.regions) if args.regions is not None else args.feature_dim
    # torch and transformers are imported only once the arguments are known to be usable.
    from mvptr.atomic import atomic_write_json
    from mvptr.checkpoint_files import read_checkpoint
    from mvptr.models.import_checkpoint import concept_rows, import_checkpoint, save_weights

    concepts = None
    if args.id2phrase is not None:
        concepts = concept_rows(_read_json(args.id2phrase, "--id2phrase"), _read_json(args.vocab, "--vocab"))
    state = read_checkpoint(args.checkpoint)
    model, report = import_checkpoint(state, cfg, vocab_size, feature_dim, concepts=concepts,
                                      source=str(args.checkpoint))
    report = {"checkpoint": str(args.checkpoint.resolve()), "config_hash": config_hash(cfg), "overrides": overrides,
              "vocab_size": vocab_size, "region_feature_dim": feature_dim, **report}
    save_weights(model, args.out / WEIGHTS)
    atomic_write_json(args.out / REPORT, report)
    print("\n".join(summary_lines(report, args.out / WEIGHTS)))


def register(groups: argparse._SubParsersAction) -> None:
    cmd = groups.add_parser("import-checkpoint", help="released MVPTR/SIMLA weights as a pre-trained model.safetensors",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--method", required=True, help=f"whose release the checkpoint is: {' | '.join(IMPORTABLE)}")
    cmd.add_argument("--checkpoint", type=Path, required=True,
                     help="the released weights: .bin/.pt/.pth, .safetensors, or a save_pretrained folder")
    cmd.add_argument("--out", type=Path, required=True, help=f"folder of {WEIGHTS} and {REPORT}")
    rows = cmd.add_mutually_exclusive_group(required=True)
    rows.add_argument("--vocab", type=Path, help="concept_vocab.json the evaluation reads (its embedding_rows)")
    rows.add_argument("--vocab-size", type=int, help="rows of the shared embedding table")
    width = cmd.add_mutually_exclusive_group(required=True)
    width.add_argument("--regions", type=Path, help="folder of the region stores the evaluation reads")
    width.add_argument("--feature-dim", type=int, help="width of a region's feature vector")
    cmd.add_argument("--id2phrase", type=Path, default=None,
                     help="MVPTR's id2phrase_new.json: also copy the released concepts' rows (needs --vocab)")
    add_config_arguments(cmd)
    cmd.set_defaults(func=cmd_import)
