"""The download step of one source: fetch its files, unpack its archives, write the manifest of what landed.

Why: `resources/downloads/<source>/` is shared by every config that reads the source, and it is what
`prepare_data` reads. The manifest (`manifest.json`, written last and atomically) is the step's output: it
lists every file with its URL, size and checksums (published, or recorded by the first download and verified by
every later one) and the top-level names each archive added. A rerun fetches only what is missing or changed;
an interrupted run keeps its `.part` files, which the next run resumes.

Run: `mvptr data download --source SOURCE --out resources/downloads/SOURCE [key=value ...]` (the download_source rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mvptr.atomic import atomic_write_json
from mvptr.data.archives import extract_archive
from mvptr.data.catalog import Source
from mvptr.data.download import DownloadSettings, Log, download_files

MANIFEST = "manifest.json"


def read_manifest(source_dir: Path) -> dict[str, Any]:
    """The manifest of a finished download step, or {} when there is none yet."""
    path = source_dir / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def download_source(source: Source, out_dir: Path, settings: DownloadSettings, log: Log) -> dict[str, Any]:
    """Fetch and unpack `source` into `out_dir`; returns the manifest it wrote."""
    previous = read_manifest(out_dir)
    landed = download_files(list(source.files), out_dir, settings, log, recorded=previous.get("files", {}))
    extracted: dict[str, Any] = {}
    for file in source.files:
        if not file.extract:
            continue
        before = previous.get("extracted", {}).get(file.name)
        if before and before["sha256"] == landed[file.name]["sha256"] \
                and all((out_dir / name).exists() for name in before["names"]):
            extracted[file.name] = before
            continue
        log(f"extract {file.name}")
        extracted[file.name] = {"sha256": landed[file.name]["sha256"],
                                "names": extract_archive(out_dir / file.name, out_dir)}
    manifest = {"source": source.name, "files": dict(sorted(landed.items())), "extracted": extracted,
                "bytes": sum(entry["size"] for entry in landed.values())}
    atomic_write_json(out_dir / MANIFEST, manifest)
    log(f"download {source.name}: {len(landed)} file(s), {manifest['bytes']} bytes, {len(extracted)} unpacked")
    return manifest
