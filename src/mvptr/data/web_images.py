"""Fetch a web-scale image list (CC3M, SBU: a URL and a caption per row) with img2dataset, into shards of files.

Why img2dataset: it is the tool the field uses for exactly this (LAION, CC3M/CC12M, SBU in LAVIS and
OpenCLIP), maintained, fast (processes x threads), and it already does what a URL list needs: resizing,
retries, a per-URL success/failure table (one parquet file per shard, with the HTTP error of each dead URL)
and resume (`incremental_mode`: a finished shard is not fetched again). Its dependencies (opencv, wandb,
albumentations, an older pandas) would clash with the core environment, so it runs as a command from its own
environment (`download.img2dataset`; `make img2dataset` makes one at .venv-img2dataset), never imported here.
The shards use img2dataset's `files` format (`<shard>/<key>.jpg` + `.json`): the prepared dataset's images are
then plain files that the COCO-format reader opens like any other.

Run: `mvptr data web-images --source SOURCE --dir resources/downloads/SOURCE [key=value ...]` (the fetch_web_images rule),
after the download step has fetched the source's URL list. It writes `url_list.parquet` (id, url, caption),
`images/` (img2dataset's output) and `images.json`: how many URLs there were, how many landed, how many were
dead and why.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mvptr.atomic import atomic_write_json
from mvptr.data.catalog import Source
from mvptr.data.download import Log
from mvptr.errors import ConfigError, DataError

IMAGES_DIR = "images"
SUMMARY = "images.json"
URL_LIST = "url_list.parquet"


def url_list(source: Source, source_dir: Path) -> pd.DataFrame:
    """The source's rows as (id, url, caption), from the files its download step unpacked.

    options.list: {file, sep, columns} of one table (CC3M's TSV: caption then URL, no header), or
    options.urls / options.captions: two line-aligned text files (SBU)."""
    opts = source.options
    if "list" in opts:
        spec = opts["list"]
        table = pd.read_csv(source_dir / spec["file"], sep=spec.get("sep", "\t"), header=None,
                            names=spec["columns"], dtype=str, quoting=3, keep_default_na=False)
    else:
        urls = (source_dir / opts["urls"]).read_text(encoding="utf-8").splitlines()
        captions = (source_dir / opts["captions"]).read_text(encoding="utf-8").splitlines()
        if len(urls) != len(captions):
            raise DataError(f"{source_dir / opts['urls']}: {len(urls)} URLs but {len(captions)} captions in "
                            f"{source_dir / opts['captions']}")
        table = pd.DataFrame({"url": urls, "caption": captions})
    table = table[["url", "caption"]].reset_index(drop=True)
    table.insert(0, "id", range(len(table)))
    return table


def status_table(images_dir: Path) -> pd.DataFrame:
    """img2dataset's per-URL table over every shard: id, url, status, error_message, key."""
    shards = sorted(images_dir.glob("*.parquet"))
    if not shards:
        raise DataError(f"{images_dir}: img2dataset wrote no shard table (*.parquet)")
    return pd.concat([pd.read_parquet(p, columns=["id", "url", "key", "status", "error_message"]) for p in shards],
                     ignore_index=True)


def fetch_web_images(source: Source, source_dir: Path, cfg: Mapping[str, Any], log: Log) -> dict[str, Any]:
    """Run img2dataset over the source's URL list into `source_dir/images`; returns the summary it wrote."""
    web, d = source.web_images, cfg["download"]
    table = url_list(source, source_dir)
    table.to_parquet(source_dir / URL_LIST, index=False)
    command = [d["img2dataset"], "--url_list", str(source_dir / URL_LIST), "--input_format", "parquet",
               "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["id"]',
               "--output_format", "files", "--output_folder", str(source_dir / IMAGES_DIR),
               "--image_size", str(web["image_size"]), "--resize_mode", web["resize_mode"],
               "--resize_only_if_bigger", "True", "--number_sample_per_shard", str(web["shard_size"]),
               "--processes_count", str(d["web_processes"]), "--thread_count", str(d["web_threads"]),
               "--retries", str(d["retries"]), "--timeout", str(int(d["timeout_s"])),
               "--incremental_mode", "incremental", "--enable_wandb", "False"]
    log(f"web images {source.name}: {len(table)} URLs -> {source_dir / IMAGES_DIR} ({' '.join(command[:1])})")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise ConfigError(f"config key 'download.img2dataset': {d['img2dataset']!r} is not an executable; "
                          f"run `make img2dataset` and set download.img2dataset=.venv-img2dataset/bin/img2dataset"
                          ) from err
    for line in (proc.stdout + proc.stderr).splitlines()[-20:]:
        log(f"img2dataset: {line}")
    if proc.returncode != 0:
        raise DataError(f"img2dataset failed for {source.name} (exit {proc.returncode}); see the lines above")
    status = status_table(source_dir / IMAGES_DIR)
    dead = status[status["status"] != "success"]
    summary = {"source": source.name, "urls": len(table), "landed": int((status["status"] == "success").sum()),
               "dead": len(dead), "not_tried": len(table) - len(status),
               "dead_by_reason": {str(k): int(v) for k, v in dead["error_message"].fillna("unknown")
                                  .value_counts().sort_index().items()}}
    atomic_write_json(source_dir / SUMMARY, summary)
    log(f"web images {source.name}: {summary['landed']} of {summary['urls']} landed, {summary['dead']} dead")
    return summary


def read_summary(source_dir: Path) -> dict[str, Any]:
    return json.loads((source_dir / SUMMARY).read_text(encoding="utf-8"))
