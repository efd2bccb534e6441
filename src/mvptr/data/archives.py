"""Unpack downloaded archives (zip, tar, tar.gz, a gzipped file) without letting any member escape the target folder.

Why: an archive from the web is input, not code; a member named `/etc/x` or `../../x`, a symlink or hard link
pointing out of the target, or a device file must be refused before anything is written. Tar archives go
through the standard library's `data` extraction filter (PEP 706), which refuses all of those; zip archives
have no filter in the standard library, so each member's name and mode are checked here (absolute, drive or
`..` names and symlinks are refused). Every member is checked before the first one is written; a tar member
that escapes only through links unpacked before it (`a -> .`, `b -> a/..`, then `b/x`) is caught by the filter
as it is written, and refused the same way. The archive is unpacked into a temporary folder beside the target
whose entries are moved in only when all of it unpacked: a refused or interrupted extraction leaves nothing
in the target and nothing that looks finished.

Use:
    names = extract_archive(Path("downloads/coco2014/annotations_trainval2014.zip"), Path("downloads/coco2014"))
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from mvptr.errors import DataError


class UnsafeArchiveError(DataError):
    """An archive member that would land outside the target folder (or is a device file)."""


def _check_tar(archive: Path, tar: tarfile.TarFile, target: Path) -> None:
    for member in tar.getmembers():
        if member.name.startswith("/") or (member.islnk() and member.linkname.startswith("/")):
            # The data filter would strip the slash and extract inside; an archive that asks for it is refused.
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} refused (absolute path); nothing was "
                                     f"extracted")
        try:
            tarfile.data_filter(member, str(target))
        except tarfile.FilterError as err:
            raise _refused(archive, err) from err


def _refused(archive: Path, err: tarfile.FilterError) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: member {err.tarinfo.name!r} refused ({type(err).__name__}: {err}); "
                              f"nothing was extracted")


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        mode = info.external_attr >> 16
        reason = None
        if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
            reason = "absolute path"
        elif ".." in parts:
            reason = "path with '..'"
        elif stat.S_ISLNK(mode):
            reason = "symbolic link"
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            reason = "not a regular file or folder"
        if reason:
            raise UnsafeArchiveError(f"{archive}: member {name!r} refused ({reason}); nothing was extracted")


def extract_archive(archive: Path, target: Path) -> list[str]:
    """Unpack `archive` into `target` (created); returns the top-level names it added, sorted.
    UnsafeArchiveError before anything is written when a member could escape."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    staging = Path(tempfile.mkdtemp(dir=target, prefix=f".extract-{archive.name}-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf)
                zf.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                _check_tar(archive, tar, staging)
                try:
                    tar.extractall(staging, filter="data")
                except tarfile.FilterError as err:
                    raise _refused(archive, err) from err
        elif archive.suffix == ".gz":  # one gzipped file (SNLI-VE's jsonl.gz): its name without .gz
            with gzip.open(archive) as src, open(staging / archive.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            raise DataError(f"{archive}: not a zip, tar or gzip archive")
        names = sorted(os.listdir(staging))
        for name in names:
            dest = target / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(staging / name, dest)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)
