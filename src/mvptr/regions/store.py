"""The region store: one HDF5 file per split holding every image's region features, boxes and tags.

Why: pre-training reads the regions of random images millions of times. VinVL ships them as base64 text
in a TSV, which costs a seek, a text split and a base64 decode per read; here a read is an O(1) index
lookup plus three binary slices, and no text is decoded after the file is opened.

Layout (N regions in all, M images, D = feature width):
    features    float16 (N, D)   region features, the regions of one image contiguous
    boxes       float32 (N, 6)   [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
    tags        int32   (N,)     object tag of each region, an index into tag_vocab
    tag_vocab   str     (V,)     tag names (UTF-8)
    image_ids   int64   (M,)     with offsets int64 (M,) and counts int32 (M,): the index by image id
    attrs       format, format_version, feature_dim, and whatever the writer was given (split, config hash)

A store is written to a temporary name beside its final path and renamed only once complete, so a file
under the final name is always whole. Opened read-only, it is safe to share between processes; a
RegionStore object that crosses a fork or is pickled (DataLoader workers) reopens its file by itself.

Use:
    with RegionStoreWriter("train.h5", feature_dim=128, tag_vocab=["circle", ...]) as writer:
        writer.add(image_id, Regions(features, boxes, tags))
    with RegionStore("train.h5") as store:
        regions = store.get(image_id)          # Regions(features (n, D) float16, boxes (n, 6), tags (n,))
        store.tag_names(regions)               # ["circle", ...]
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from mvptr.errors import DataError
from mvptr.regions.boxes import NUM_BOX_VALUES

FORMAT = "mvptr-region-store"
FORMAT_VERSION = 1
# Rows buffered before they are appended to the file: fewer, larger HDF5 writes.
_FLUSH_ROWS = 4096
# Target bytes per feature chunk: a few images' rows, so one read touches one or two chunks.
_CHUNK_BYTES = 1 << 17


@dataclass(frozen=True)
class Regions:
    """The regions of one image, in store order (largest or most confident first)."""

    features: np.ndarray  # (n, D) float16
    boxes: np.ndarray  # (n, 6) float32
    tags: np.ndarray  # (n,) int32, indices into the store's tag_vocab

    def __len__(self) -> int:
        return len(self.tags)


def _checked(image_id: int, regions: Regions, feature_dim: int, vocab_size: int) -> Regions:
    """The regions in store dtypes; a shape, a non-finite value or a tag that does not fit names the image."""
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float16's range: named below, no warning
        features = np.asarray(regions.features, dtype=np.float16)
    boxes = np.asarray(regions.boxes, dtype=np.float32)
    tags = np.asarray(regions.tags, dtype=np.int32)
    n = len(tags)
    if features.shape != (n, feature_dim) or boxes.shape != (n, NUM_BOX_VALUES) or tags.ndim != 1:
        raise ValueError(f"image {image_id}: regions have features {features.shape}, boxes {boxes.shape}, "
                         f"tags {tags.shape}; expected ({n}, {feature_dim}), ({n}, {NUM_BOX_VALUES}), ({n},)")
    if not (np.isfinite(features).all() and np.isfinite(boxes).all()):  # a float16 beyond +-65504 is infinite
        raise ValueError(f"image {image_id}: regions hold NaN or infinity (or features beyond float16's range)")
    if n and (tags.min() < 0 or tags.max() >= vocab_size):
        raise ValueError(f"image {image_id}: tag ids must be in [0, {vocab_size}), got {tags.min()}..{tags.max()}")
    return Regions(features, boxes, tags)


def _naming(path: Path, err: OSError) -> OSError:
    """HDF5's error on a failed write (errno set, several lines naming the temporary file) as the OS error alone,
    naming the store: `[Errno 28] No space left on device: 'train.h5'`."""
    return OSError(err.errno, os.strerror(err.errno), str(path))


class RegionStoreWriter:
    """Stream images' regions into a new store; the file appears under `path` only when `close()` succeeds.

    Used as a context manager, an exception inside the block deletes the temporary file instead.
    """

    def __init__(self, path: Path | str, feature_dim: int, tag_vocab: Sequence[str],
                 attrs: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.feature_dim = feature_dim
        self.tag_vocab = list(tag_vocab)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".tmp-")
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            # No chunk cache: a write that fails (disk full) raises at that write; cached, it would fail inside
            # HDF5's close, which then crashes the process.
            self._file = h5py.File(self._tmp, "w", rdcc_nbytes=0)
            self._file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                                     "feature_dim": feature_dim, **(attrs or {})})
            self._create_row_datasets()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._ids: list[int] = []
        self._counts: list[int] = []
        self._seen: set[int] = set()
        self._pending: list[Regions] = []
        self._pending_rows = 0
        self._rows_written = 0

    def _create_row_datasets(self) -> None:
        # track_times=False: no timestamps in the file, so the same regions give the same bytes.
        chunk_rows = max(1, _CHUNK_BYTES // (2 * self.feature_dim))
        for name, dtype, row in (("features", np.float16, (self.feature_dim,)),
                                 ("boxes", np.float32, (NUM_BOX_VALUES,)), ("tags", np.int32, ())):
            self._file.create_dataset(name, shape=(0, *row), maxshape=(None, *row), chunks=(chunk_rows, *row),
                                      dtype=dtype, track_times=False)

    def add(self, image_id: int, regions: Regions) -> None:
        """Append one image's regions (possibly none); an image id may be added once."""
        image_id = int(image_id)
        if image_id in self._seen:
            raise ValueError(f"image {image_id} added twice to region store {self.path}")
        self._seen.add(image_id)
        regions = _checked(image_id, regions, self.feature_dim, len(self.tag_vocab))
        self._ids.append(image_id)
        self._counts.append(len(regions))
        self._pending.append(regions)
        self._pending_rows += len(regions)
        if self._pending_rows >= _FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending_rows:
            start, stop = self._rows_written, self._rows_written + self._pending_rows
            try:
                for name in ("features", "boxes", "tags"):
                    dataset = self._file[name]
                    dataset.resize(stop, axis=0)
                    dataset[start:stop] = np.concatenate([getattr(r, name) for r in self._pending])
            except OSError as err:
                if not err.errno:
                    raise
                raise _naming(self.path, err) from err
            self._rows_written = stop
        self._pending.clear()
        self._pending_rows = 0

    def _write_index(self) -> None:
        counts = np.asarray(self._counts, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        options = {"track_times": False}
        self._file.create_dataset("image_ids", data=np.asarray(self._ids, dtype=np.int64), **options)
        self._file.create_dataset("offsets", data=offsets.astype(np.int64), **options)
        self._file.create_dataset("counts", data=counts.astype(np.int32), **options)
        self._file.create_dataset("tag_vocab", data=self.tag_vocab, dtype=h5py.string_dtype("utf-8"), **options)

    def close(self) -> None:
        """Finish the file, flush it to disk and move it to its final name (on failure: drop it)."""
        try:
            self._flush()
            self._write_index()
            self._file.close()
            with open(self._tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(self._tmp, 0o644)  # mkstemp makes it private; a store is shared like any output
            os.replace(self._tmp, self.path)
        except OSError as err:
            self.abort()
            if not err.errno:
                raise
            raise _naming(self.path, err) from err
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far."""
        with contextlib.suppress(Exception):
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> RegionStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RegionStore:
    """Read-only access to one store: the index is loaded once, then `get` is a dict lookup and three slices."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid = -1
        self._rows: tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset] | None = None
        self._open()
        handle = self._file
        self.attrs: dict[str, Any] = dict(handle.attrs)
        self.feature_dim = int(self.attrs["feature_dim"])
        self.tag_vocab: list[str] = [name.decode("utf-8") for name in handle["tag_vocab"][()]]
        self.image_ids: np.ndarray = handle["image_ids"][()]
        offsets, counts = handle["offsets"][()].tolist(), handle["counts"][()].tolist()
        self._index: dict[int, tuple[int, int]] = dict(zip(self.image_ids.tolist(), zip(offsets, counts)))

    def _open(self) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
        """This process's features, boxes and tags datasets: a handle inherited through fork is never reused."""
        if self._rows is None or self._pid != os.getpid():
            try:
                handle = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise FileNotFoundError(f"region store not found: {self.path}") from None
            except OSError as err:  # not HDF5, truncated: bad input, named (DataError)
                raise DataError(f"cannot open region store {self.path}: {err}") from err
            found = handle.attrs.get("format")
            if found != FORMAT:
                handle.close()
                raise DataError(f"{self.path} is not a region store (attribute format={found!r}, expected {FORMAT!r})")
            self._file, self._pid = handle, os.getpid()
            self._rows = (handle["features"], handle["boxes"], handle["tags"])
        return self._rows

    def get(self, image_id: int) -> Regions:
        try:
            offset, count = self._index[int(image_id)]
        except KeyError:
            raise KeyError(f"image {image_id} is not in region store {self.path}") from None
        features, boxes, tags = self._open()
        stop = offset + count
        return Regions(features[offset:stop], boxes[offset:stop], tags[offset:stop])

    def tag_names(self, regions: Regions) -> list[str]:
        return [self.tag_vocab[t] for t in regions.tags.tolist()]

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, (int, np.integer)) and int(image_id) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._rows = None, None

    def __enter__(self) -> RegionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # An h5py handle cannot be pickled; the receiving process opens its own.
        return {**self.__dict__, "_file": None, "_rows": None, "_pid": -1}
