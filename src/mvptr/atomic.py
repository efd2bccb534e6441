"""Write files and folders atomically: to a temporary name beside the target, then rename.

Why: an interrupted step must never leave a half-written output that a later step (or Snakemake's
timestamp check) mistakes for a finished one.

Use:
    atomic_write_json(path, obj)
    with atomic_dir(out_dir) as tmp:   # fill tmp; it replaces out_dir only if the block succeeds
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        # mkstemp creates the file 0600; give it the permissions of a plain open() (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno and not err.filename:  # a failed write (disk full) names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Deterministic JSON (sorted keys, two-space indent, trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
