"""Read VinVL's TSV region features, and import them into a region store.

Why: VinVL (and Oscar, MVPTR) publish region features for COCO, Flickr30k, GQA, ... as TSV files; to
run this project on them, they are converted once into the region store (mvptr.regions.store), whose
reads decode no text. The format, as written by scene_graph_benchmark and read by Oscar's TSVFile:

    features.tsv       one row per image: `image_id \\t num_boxes \\t base64(float32 array num_boxes x 2054)`;
                       of each region's 2054 values, the first 2048 are the feature and the last 6 the box
                       values [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
    features.lineidx   the byte offset of each row of features.tsv, one decimal number per line
    predictions.tsv    one row per image: `image_id \\t {"objects": [{"class": name, "rect": [x1, y1, x2, y2],
                       "conf": score}, ...], "image_h": H, "image_w": W}`, objects in the same order as the
                       feature rows; the object tags are the `class` names

Image ids are integers, or keys whose last `_`-separated part is one (`coco_391895`). A malformed row - values
that hold NaN or infinity, or features beyond float16's range (the store's dtype) among them - is a DataError
naming the file, line and image.

Use:
    mvptr regions import-vinvl --features features.tsv --predictions predictions.tsv --out train.h5
    import_vinvl(features_tsv, predictions_tsv, out_h5)                # -> summary dict
    with FeaturesTsv("features.tsv") as tsv: key, values = tsv.row(7)   # random access through lineidx
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from mvptr.atomic import atomic_write_bytes
from mvptr.errors import DataError
from mvptr.regions.boxes import NUM_BOX_VALUES
from mvptr.regions.store import Regions, RegionStoreWriter


def lineidx_path(tsv: Path | str) -> Path:
    """`features.tsv` -> `features.lineidx` (Oscar's convention)."""
    return Path(tsv).with_suffix(".lineidx")


def parse_image_id(key: str, where: str) -> int:
    try:
        return int(key.rsplit("_", 1)[-1])
    except ValueError:
        raise DataError(f"{where}: image id {key!r} is not an integer (nor ends in _<integer>)") from None


def decode_row(line: bytes, where: str) -> tuple[str, np.ndarray]:
    """One features.tsv row -> (image key, float32 array num_boxes x values per region)."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) < 3:
        raise DataError(f"{where}: expected `image_id \\t num_boxes \\t base64 features`, found {len(fields)} field(s)")
    key = fields[0].decode("utf-8", errors="backslashreplace")  # named in messages; parse_image_id checks it
    try:
        num_boxes = int(fields[1])
        values = np.frombuffer(base64.b64decode(fields[-1], validate=True), dtype=np.float32)
    except (ValueError, binascii.Error) as err:
        raise DataError(f"{where} (image {key}): bad num_boxes or base64 features: {err}") from err
    if num_boxes == 0:
        return key, values.reshape(0, 0)
    if num_boxes < 0 or values.size % num_boxes:
        raise DataError(f"{where} (image {key}): {values.size} float32 values do not split into {num_boxes} boxes")
    return key, values.reshape(num_boxes, values.size // num_boxes)


class FeaturesTsv:
    """Random access to the rows of a features.tsv through its lineidx: seek, read one line, decode."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        index = lineidx_path(self.path)
        try:
            self.offsets = np.loadtxt(index, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read line index {index} of {self.path}: {err}") from err
        self._file: IO[bytes] = open(self.path, "rb")  # kept open across reads; closed by close()

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, index: int) -> tuple[str, np.ndarray]:
        self._file.seek(int(self.offsets[index]))
        return decode_row(self._file.readline(), f"{self.path} row {index}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeaturesTsv:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_features_tsv(path: Path | str, rows: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write (image key, float32 num_boxes x 2054 array) rows as features.tsv + features.lineidx."""
    lines, offsets, position = [], [], 0
    for key, values in rows:
        values = np.ascontiguousarray(values, dtype=np.float32)
        line = b"\t".join([key.encode("utf-8"), str(len(values)).encode(), base64.b64encode(values.tobytes())]) + b"\n"
        offsets.append(position)
        position += len(line)
        lines.append(line)
    atomic_write_bytes(path, b"".join(lines))
    atomic_write_bytes(lineidx_path(path), "".join(f"{offset}\n" for offset in offsets).encode())


def _iter_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as handle:
            yield from enumerate(handle)
    except FileNotFoundError as err:
        raise DataError(f"file not found: {path}") from err


def read_predictions(path: Path) -> dict[str, list[tuple[str, float]]]:
    """image key -> its objects' (class, conf), in file order."""
    out: dict[str, list[tuple[str, float]]] = {}
    for number, line in _iter_rows(path):
        key, _, text = line.decode("utf-8", errors="backslashreplace").rstrip("\r\n").partition("\t")
        try:
            objects = json.loads(text)["objects"]
            out[key] = [(str(obj["class"]), float(obj.get("conf", 1.0))) for obj in objects]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:  # ValueError: JSON, conf
            raise DataError(f"{path} line {number + 1} (image {key}): expected `image_id \\t "
                            f"{{\"objects\": [{{\"class\": ..., \"conf\": ...}}]}}`: {err}") from err
    return out


def _feature_width(path: Path) -> int:
    """Values per region of the first row with boxes, less the 6 box values."""
    for number, line in _iter_rows(path):
        _, values = decode_row(line, f"{path} line {number + 1}")
        if len(values):
            if values.shape[1] <= NUM_BOX_VALUES:
                raise DataError(f"{path} line {number + 1}: {values.shape[1]} values per region, need more than "
                                f"the {NUM_BOX_VALUES} box values")
            return values.shape[1] - NUM_BOX_VALUES
    raise DataError(f"{path}: no row has any box")


def _regions(values: np.ndarray, objects: list[tuple[str, float]], tag_ids: dict[str, int],
             max_regions: int | None, where: str) -> Regions:
    if len(objects) != len(values):
        raise DataError(f"{where}: {len(values)} feature rows but {len(objects)} objects in the predictions")
    keep = np.arange(len(values))
    if max_regions is not None:  # the most confident boxes, in file order among equals
        keep = np.argsort([-conf for _, conf in objects], kind="stable")[:max_regions]
    tags = np.array([tag_ids[objects[k][0]] for k in keep], dtype=np.int32)
    return Regions(values[keep, :-NUM_BOX_VALUES], values[keep, -NUM_BOX_VALUES:], tags)


def _vocabulary(objects: Iterable[dict[str, list[tuple[str, float]]]]) -> list[str]:
    return sorted({name for image_objects in objects for image in image_objects.values() for name, _ in image})


def _rows(features: Path, predictions: Path, objects: dict[str, list[tuple[str, float]]], tag_ids: dict[str, int],
          dim: int, max_regions: int | None) -> Iterator[tuple[int, Regions, str]]:
    """(image id, its regions, where) for every row of features.tsv, checked against its predictions."""
    for number, line in _iter_rows(features):
        where = f"{features} line {number + 1}"
        key, values = decode_row(line, where)
        if key not in objects:
            raise DataError(f"{where}: image {key} has no row in {predictions}")
        if len(values) and values.shape[1] != dim + NUM_BOX_VALUES:
            raise DataError(f"{where} (image {key}): {values.shape[1]} values per region, expected "
                            f"{dim + NUM_BOX_VALUES} like the first row")
        values = values.reshape(len(values), dim + NUM_BOX_VALUES)
        yield (parse_image_id(key, where), _regions(values, objects[key], tag_ids, max_regions,
                                                    f"{where} (image {key})"), where)


def _add(writer: RegionStoreWriter, image_id: int, regions: Regions, where: str) -> None:
    try:
        writer.add(image_id, regions)
    except ValueError as err:  # e.g. the same image id twice
        raise DataError(f"{where}: {err}") from err


def import_vinvl(features: Path | str, predictions: Path | str, out: Path | str,
                 max_regions: int | None = None) -> dict[str, Any]:
    """Convert a VinVL features.tsv + predictions.tsv pair into one region store (written atomically)."""
    features, predictions = Path(features), Path(predictions)
    objects = read_predictions(predictions)
    vocab = _vocabulary([objects])
    dim = _feature_width(features)
    images = regions = 0
    attrs = {"source": "vinvl", "features": str(features), "predictions": str(predictions)}
    with RegionStoreWriter(out, dim, vocab, attrs) as writer:
        for image_id, image_regions, where in _rows(features, predictions, objects,
                                                    {name: k for k, name in enumerate(vocab)}, dim, max_regions):
            _add(writer, image_id, image_regions, where)
            images, regions = images + 1, regions + len(image_regions)
    return {"images": images, "regions": regions, "feature_dim": dim, "tags": len(vocab)}


@dataclass(frozen=True)
class VinvlFiles:
    """One source's released pair, and the offset its image ids take in the prepared corpus (the source's
    catalog `id_offset`: COCO 0, Visual Genome 1e9, ...)."""

    features: Path
    predictions: Path
    id_offset: int = 0


def import_vinvl_corpus(files: Sequence[VinvlFiles], splits: Mapping[int, str], out_dir: Path | str,
                        max_regions: int | None = None) -> dict[str, Any]:
    """Region stores for a whole prepared corpus ({split}.h5, as the region step writes them) from VinVL's
    released pairs of its sources. Rows of images the corpus does not have are counted and passed over; the
    corpus's images that no file covers are returned (`uncovered`) for the caller to list as skipped."""
    out_dir = Path(out_dir)
    objects = [read_predictions(Path(f.predictions)) for f in files]
    vocab = _vocabulary(objects)
    tag_ids = {name: k for k, name in enumerate(vocab)}
    dims = {_feature_width(Path(f.features)) for f in files}
    if len(dims) != 1:
        raise DataError(f"VinVL files of different feature widths {sorted(dims)}: "
                        f"{', '.join(str(f.features) for f in files)}")
    (dim,) = dims
    written: set[int] = set()
    counts = {split: {"images": 0, "regions": 0} for split in sorted(set(splits.values()))}
    outside = 0
    writers = {split: RegionStoreWriter(out_dir / f"{split}.h5", dim, vocab, {"source": "vinvl", "split": split})
               for split in counts}
    try:
        for f, image_objects in zip(files, objects):
            for image_id, regions, where in _rows(Path(f.features), Path(f.predictions), image_objects, tag_ids,
                                                  dim, max_regions):
                image_id += f.id_offset
                if image_id not in splits:
                    outside += 1
                    continue
                split = splits[image_id]
                _add(writers[split], image_id, regions, where)
                written.add(image_id)
                counts[split]["images"] += 1
                counts[split]["regions"] += len(regions)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {"splits": counts, "feature_dim": dim, "tags": len(vocab), "rows_outside_corpus": outside,
            "uncovered": sorted(set(splits) - written)}
