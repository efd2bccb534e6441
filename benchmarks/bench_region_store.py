"""Random-access reads per second: the HDF5 region store against its limit (raw numpy memmap reads of the same
bytes) and against VinVL's TSV with a line index.

Why: pre-training reads the regions of random images, over and over. VinVL/Oscar read them from a TSV:
seek to the row's byte offset (features.lineidx), read the line, split it, base64-decode, reshape. The
region store (mvptr.regions.store) looks the image up in an in-memory index and slices binary arrays.
This writes the same random regions (VinVL-sized: 2048-d features + 6 box values, 10-50 boxes per
image) in both formats, then reads the same images in the same random order from each, in one run.
Both files were just written, so both are read from the page cache: this compares decoding and lookup
cost, not disk speed. The TSV side returns float32 (its format); the store returns float16 (its format).
The limit: the same float16 features, float32 boxes and int32 tags as three flat .npy files read through
`np.load(mmap_mode="r")` slices copied out, an offset table in memory; `vs_memmap` = store reads/s over those,
target >= 0.5.

Run: `.venv/bin/python benchmarks/bench_region_store.py [--images 500] [--reads 3000] [--dim 2048] [--seed 0]`
Writes `results/benchmarks/region_store.json` (atomically) and prints the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mvptr.atomic import atomic_write_json
from mvptr.config import project_root
from mvptr.regions.store import Regions, RegionStore, RegionStoreWriter
from mvptr.regions.vinvl import FeaturesTsv, write_features_tsv

MIN_BOXES, MAX_BOXES = 10, 50


def random_rows(rng: np.random.Generator, images: int, dim: int) -> list[tuple[str, np.ndarray]]:
    """(image key, float32 boxes x (dim + 6)) per image, like a VinVL features.tsv."""
    rows = []
    for image_id in range(1, images + 1):
        n = int(rng.integers(MIN_BOXES, MAX_BOXES + 1))
        values = np.concatenate([rng.standard_normal((n, dim)), rng.random((n, 6))], axis=1).astype(np.float32)
        rows.append((str(image_id), values))
    return rows


def write_store(path: Path, rows: list[tuple[str, np.ndarray]], dim: int) -> None:
    with RegionStoreWriter(path, dim, ["thing"]) as writer:
        for key, values in rows:
            writer.add(int(key), Regions(values[:, :dim], values[:, dim:], np.zeros(len(values), dtype=np.int32)))


class MemmapRegions:
    """The store's bytes as three flat memory-mapped arrays and an image -> (start, stop) table: the limit."""

    def __init__(self, folder: Path, rows: list[tuple[str, np.ndarray]], dim: int) -> None:
        stops = np.cumsum([len(values) for _, values in rows])
        self.spans = {int(key): (int(stop - len(values)), int(stop)) for (key, values), stop in zip(rows, stops)}
        arrays = {"features": np.concatenate([v[:, :dim] for _, v in rows]).astype(np.float16),
                  "boxes": np.concatenate([v[:, dim:] for _, v in rows]).astype(np.float32),
                  "tags": np.zeros(int(stops[-1]), dtype=np.int32)}
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        self.maps = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in arrays}

    def get(self, image_id: int) -> tuple[np.ndarray, ...]:
        start, stop = self.spans[image_id]
        return tuple(np.array(array[start:stop]) for array in self.maps.values())


def reads_per_second(read: Callable[[int], Any], order: list[int]) -> dict[str, float]:
    start = time.perf_counter()
    for image_id in order:
        read(image_id)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "reads_per_s": round(len(order) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=2048, help="feature width (VinVL: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=project_root() / "results" / "benchmarks" / "region_store.json")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = random_rows(rng, args.images, args.dim)
    order = rng.integers(1, args.images + 1, size=args.reads).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tsv_path, store_path = Path(tmp) / "features.tsv", Path(tmp) / "store.h5"
        write_features_tsv(tsv_path, rows)
        write_store(store_path, rows, args.dim)
        with FeaturesTsv(tsv_path) as tsv, RegionStore(store_path) as store:
            # Oscar keeps an image id -> row number map (imageid2idx.json) beside the TSV.
            row_of = {int(key): k for k, (key, _) in enumerate(rows)}
            first = order[0]
            from_tsv = tsv.row(row_of[first])[1][:, :args.dim].astype(np.float16)
            if not np.array_equal(store.get(first).features, from_tsv):
                raise AssertionError(f"image {first}: the store and the TSV disagree")
            raw = MemmapRegions(Path(tmp), rows, args.dim)
            if not np.array_equal(store.get(first).features, raw.get(first)[0]):
                raise AssertionError(f"image {first}: the store and the memmap disagree")
            tsv_rate = reads_per_second(lambda image_id: tsv.row(row_of[image_id]), order)
            store_rate = reads_per_second(store.get, order)
            memmap_rate = reads_per_second(raw.get, order)
        sizes = {name: round(path.stat().st_size / 2**20, 1)
                 for name, path in (("tsv_mb", tsv_path), ("store_mb", store_path))}

    report = {
        "images": args.images, "reads": args.reads, "feature_dim": args.dim,
        "boxes_per_image": [MIN_BOXES, MAX_BOXES], "regions": int(sum(len(values) for _, values in rows)),
        "seed": args.seed, "cpu_count": os.cpu_count(),
        "files": sizes, "hdf5_store": store_rate, "vinvl_tsv": tsv_rate, "numpy_memmap": memmap_rate,
    }
    report["vs_memmap"] = round(store_rate["reads_per_s"] / memmap_rate["reads_per_s"], 3)
    report["target"] = 0.5
    report["speedup"] = round(store_rate["reads_per_s"] / tsv_rate["reads_per_s"], 2)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
