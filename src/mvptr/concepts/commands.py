"""`mvptr concepts ...` subcommands: parse captions into concepts, score the parser, build the concept vocabulary.

    mvptr concepts extract --dataset DIR --out concepts.json [--n-process N] [key=value ...]
    mvptr concepts quality --dataset DIR --concepts concepts.json --out quality.json [key=value ...]
    mvptr concepts vocab   --dataset DIR --concepts concepts.json --out vocab.json [key=value ...]
    mvptr concepts tasks   --dataset DIR --tasks vqa ve rec nlvr2 --out task_concepts.json [--n-process N]

`extract` writes {caption id: {"image_id", "text", "objects", "attributes", "relations", "spans"}} for every
caption of the prepared dataset; `tasks` {text: scene graph} for every text of the downstream task files, which
the evaluations read instead of parsing them in every job; `quality` needs the dataset's gold tuples (`annotations/scene_graphs.json`,
which the synthetic world has); `vocab` counts the training split only. spaCy and transformers are imported
inside the commands so that `mvptr --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvptr.atomic import atomic_write_json
from mvptr.concepts.parser import KINDS
from mvptr.config import add_config_arguments, config_from_args
from mvptr.errors import ConfigError

if TYPE_CHECKING:  # pycocotools is imported lazily so that `mvptr --help` stays fast
    from mvptr.data.coco import CocoFormatDataset

GOLD_GRAPHS = Path("annotations") / "scene_graphs.json"
_RECORD_KEYS = ("image_id", "text", *KINDS, "spans")


def read_concepts(path: Path) -> dict[str, dict[str, Any]]:
    """A file written by `mvptr concepts extract`; a malformed record names its caption id."""
    from mvptr.data.coco import read_json
    from mvptr.errors import DataError

    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a concepts file: expected {{caption id: record}}")
    for caption_id, record in data.items():
        missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise DataError(f"{path}: caption {caption_id} lacks {', '.join(missing)}")
    return data


def dataset_captions(ds: CocoFormatDataset, split: str | None = None) -> list[tuple[int, int, str]]:
    """(caption id, image id, text) of every caption of the split (all by default), in image id order."""
    return [(cid, image_id, text) for image_id in ds.image_ids(split) for cid, text in ds.captions(image_id)]


def check_extracted_from(concepts: dict[str, dict[str, Any]], concepts_path: Path, ds: CocoFormatDataset,
                         dataset_dir: Path) -> None:
    """The concepts file holds exactly the captions of the dataset, with the same texts (not a stale file)."""
    from mvptr.errors import DataError

    captions = {str(cid): text for cid, _, text in dataset_captions(ds)}
    wrong = [cid for cid, text in captions.items() if cid not in concepts or concepts[cid]["text"] != text]
    wrong += sorted(set(concepts) - set(captions))
    if wrong:
        raise DataError(f"{concepts_path} was not extracted from {dataset_dir} (re-run `mvptr concepts extract`): "
                        f"{len(wrong)} caption(s) missing, unknown or with another text; first ids: "
                        f"{', '.join(wrong[:5])}")


def cmd_extract(args: argparse.Namespace) -> None:
    from mvptr.concepts.parser import SceneGraphParser
    from mvptr.data.coco import open_prepared

    cfg = config_from_args(args)["concepts"]
    ds = open_prepared(args.dataset)
    captions = dataset_captions(ds)
    n_process = args.n_process or cfg["n_process"]
    try:
        parser = SceneGraphParser(cfg["spacy_model"], batch_size=cfg["batch_size"], n_process=n_process)
    except OSError as err:
        raise ConfigError(f"config key 'concepts.spacy_model': {err}") from err
    graphs = parser.parse(text for _, _, text in captions)
    out = {str(cid): {"image_id": image_id, **graph.to_json()} for (cid, image_id, _), graph in zip(captions, graphs)}
    atomic_write_json(args.out, out)
    totals = {kind: sum(len(r[kind]) for r in out.values()) for kind in KINDS}
    print(json.dumps({"captions": len(out), **totals}, sort_keys=True))


def cmd_tasks(args: argparse.Namespace) -> None:
    """The scene graphs of every downstream task text, keyed by the text: the evaluations read them instead of
    loading spaCy and parsing the same questions, hypotheses, expressions and statements once per job."""
    from mvptr.concepts.parser import SceneGraphParser
    from mvptr.data.task_files import task_texts

    cfg = config_from_args(args)["concepts"]
    texts = task_texts(args.dataset, args.tasks)
    try:
        parser = SceneGraphParser(cfg["spacy_model"], batch_size=cfg["batch_size"], n_process=args.n_process or
                                  cfg["n_process"])
    except OSError as err:
        raise ConfigError(f"config key 'concepts.spacy_model': {err}") from err
    graphs = parser.parse(texts)
    atomic_write_json(args.out, {text: graph.to_json() for text, graph in zip(texts, graphs, strict=True)})
    print(json.dumps({"texts": len(texts), "tasks": args.tasks}))


def cmd_quality(args: argparse.Namespace) -> None:
    from mvptr.concepts.quality import score
    from mvptr.data.coco import open_prepared, read_json
    from mvptr.errors import DataError

    gold_path = args.dataset / GOLD_GRAPHS
    if not gold_path.is_file():
        raise DataError(f"{args.dataset} has no gold scene graphs ({gold_path} not found): `concepts quality` "
                        "needs a dataset with gold tuples, such as the synthetic world")
    gold = read_json(gold_path)
    if not isinstance(gold, dict) or not isinstance(gold.get("captions"), dict):
        raise DataError(f"{gold_path} has no 'captions' mapping of caption id -> gold tuples")
    concepts = read_concepts(args.concepts)
    check_extracted_from(concepts, args.concepts, open_prepared(args.dataset), args.dataset)
    try:
        report = score(concepts, gold["captions"])
    except KeyError as err:
        raise DataError(f"{args.concepts} does not match {gold_path}: {err.args[0]}") from err
    atomic_write_json(args.out, report)
    from mvptr.tracking import log_run

    metrics = {f"{kind}_{m}": report[kind][m] for kind in KINDS for m in ("precision", "recall", "f1")}
    log_run(config_from_args(args), stage="concepts", task="concept_quality", metrics=metrics)
    print(json.dumps({kind: round(report[kind]["f1"], 4) for kind in KINDS}))


def cmd_vocab(args: argparse.Namespace) -> None:
    from mvptr.concepts.parser import SceneGraph
    from mvptr.concepts.vocab import build_concept_vocab
    from mvptr.data.coco import open_prepared
    from mvptr.text import load_tokenizer

    cfg = config_from_args(args)
    ds = open_prepared(args.dataset)
    concepts = read_concepts(args.concepts)
    check_extracted_from(concepts, args.concepts, ds, args.dataset)
    train_ids = [str(cid) for cid, _, _ in dataset_captions(ds, "train")]
    try:
        tokenizer = load_tokenizer(cfg["model"]["tokenizer"])
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    vocab = build_concept_vocab((SceneGraph.from_json(concepts[cid]) for cid in train_ids), tokenizer,
                                cfg["concepts"]["min_count"])
    vocab["tokenizer"] = cfg["model"]["tokenizer"]
    atomic_write_json(args.out, vocab)
    print(json.dumps({"embedding_rows": vocab["embedding_rows"], **{k: v["kept"] for k, v in vocab["stats"].items()}},
                     sort_keys=True))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(groups: argparse._SubParsersAction) -> None:
    concepts = groups.add_parser("concepts", help="textual concepts").add_subparsers(dest="cmd", required=True)
    extract = concepts.add_parser("extract", help="parse every caption of a prepared dataset into concepts")
    extract.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    extract.add_argument("--out", type=Path, required=True, help="concepts JSON to write")
    extract.add_argument("--n-process", type=positive_int, default=None, help="spaCy processes (default concepts.n_process)")
    add_config_arguments(extract)
    extract.set_defaults(func=cmd_extract)

    quality = concepts.add_parser("quality", help="precision/recall/F1 of the concepts against gold tuples")
    quality.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder with gold tuples")
    quality.add_argument("--concepts", type=Path, required=True, help="file written by `concepts extract`")
    quality.add_argument("--out", type=Path, required=True, help="quality JSON to write (also logged to MLflow)")
    add_config_arguments(quality)
    quality.set_defaults(func=cmd_quality)

    vocab = concepts.add_parser("vocab", help="the concept vocabulary of the training captions")
    vocab.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    vocab.add_argument("--concepts", type=Path, required=True, help="file written by `concepts extract`")
    vocab.add_argument("--out", type=Path, required=True, help="vocabulary JSON to write")
    add_config_arguments(vocab)
    vocab.set_defaults(func=cmd_vocab)

    tasks = concepts.add_parser("tasks", help="parse every text of the downstream task files into concepts")
    tasks.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder")
    tasks.add_argument("--tasks", nargs="+", required=True, choices=["vqa", "ve", "rec", "nlvr2"])
    tasks.add_argument("--out", type=Path, required=True, help="{text: scene graph} JSON to write")
    tasks.add_argument("--n-process", type=positive_int, default=None, help="spaCy processes (default concepts.n_process)")
    add_config_arguments(tasks)
    tasks.set_defaults(func=cmd_tasks)
