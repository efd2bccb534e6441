"""Fetch a dataset's files over HTTP: parallel, resumable, retried, verified and atomic.

Why: the paper-scale corpora are tens of files of up to 20 GB on servers that drop connections. A file is
fetched into `<name>.part` and renamed to `<name>` only once its size and checksum are right, so a finished
name is always a verified file; a cut connection resumes where it stopped (HTTP Range), a failing server is
retried with exponential backoff and then named in a one-line error; a file whose checksum is wrong is moved
aside to `<name>.rejected` and never used. A file whose source publishes no checksum gets its sha256 recorded
on the first download (the manifest), and every later download of it must match that record.

A person at a terminal sees one progress bar per file (tqdm, only when stderr is a terminal); a rule's log gets
a progress line every few seconds (mvptr.progress).

Use:
    files = [RemoteFile("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", size=13510573713)]
    landed = download_files(files, Path("resources/downloads/coco2014"), DownloadSettings(), log=print,
                            recorded={})    # name -> manifest entry: {url, size, sha256, md5?}
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from mvptr.errors import DataError
from mvptr.progress import Progress

Log = Callable[[str], None]
_CHUNK = 1 << 20


class DownloadError(DataError):
    """A file that could not be fetched or verified; the message names its URL."""


class _Incomplete(OSError):
    """A response that ended before its Content-Length: retried from where it stopped."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source: where it lives and what it must be (size and checksums where known)."""

    name: str
    url: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DownloadSettings:
    """How to fetch: parallel files, attempts per file, backoff between them, per-request timeout, mirrors."""

    workers: int = 4
    retries: int = 4
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    # URL prefix -> replacement prefix, e.g. {"http://images.cocodataset.org/": "https://mirror.example/coco/"}
    mirrors: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, url: str) -> str:
        """`url` with the longest matching mirror prefix replaced."""
        for prefix in sorted(self.mirrors, key=len, reverse=True):
            if url.startswith(prefix):
                return self.mirrors[prefix] + url[len(prefix):]
        return url


def file_digests(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _expected(file: RemoteFile, recorded: Mapping[str, Any] | None) -> dict[str, str]:
    """The checksums the file must have: the published ones, else those recorded by an earlier download."""
    published = {algo: value for algo, value in (("md5", file.md5), ("sha256", file.sha256)) if value}
    if published:
        return published
    if recorded and recorded.get("url") == file.url and recorded.get("sha256"):
        return {"sha256": recorded["sha256"]}
    return {}


def _verify(file: RemoteFile, url: str, path: Path, expected: Mapping[str, str]) -> dict[str, str]:
    """Check size and checksums of a complete download; a bad file is moved to `<name>.rejected`."""
    size = path.stat().st_size
    problem, digests = None, {}
    if file.size is not None and size != file.size:  # no need to hash a file of the wrong size
        problem = f"size {size} bytes, expected {file.size}"
    else:
        digests = file_digests(path)
        problem = next((f"{algo} {digests[algo]}, expected {value.lower()}" for algo, value in expected.items()
                        if digests[algo] != value.lower()), None)
    if problem:
        rejected = path.with_name(file.name + ".rejected")
        os.replace(path, rejected)
        raise DownloadError(f"{url}: downloaded file has {problem}; kept aside as {rejected}, not used")
    return digests


class _Fetch:
    """One file's transfer: requests with Range from the bytes already in `<name>.part`."""

    def __init__(self, file: RemoteFile, out_dir: Path, settings: DownloadSettings, log: Log) -> None:
        self.file, self.settings, self.log = file, settings, log
        self.url = settings.resolve(file.url)
        self.part = out_dir / (file.name + ".part")
        self.bar = tqdm(total=file.size, unit="B", unit_scale=True, desc=file.name, disable=not sys.stderr.isatty(),
                        leave=False)
        self.progress = Progress(f"download {file.name}", max(1, (file.size or 0) >> 20), "MB", log)

    def _log_progress(self, have: int) -> None:
        mb = have >> 20
        if mb > self.progress.done:
            self.progress.advance(mb - self.progress.done)

    def _request_once(self) -> None:
        have = self.part.stat().st_size if self.part.exists() else 0
        if self.file.size is not None and have == self.file.size:
            return
        # identity: the bytes on disk are the bytes the checksum covers, and a Range counts them.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        with requests.get(self.url, headers=headers, stream=True, timeout=self.settings.timeout_s) as response:
            if response.status_code == 416 and have:  # nothing past what we have: the part is complete
                return
            response.raise_for_status()
            resumed = response.status_code == 206
            if have and not resumed:  # the server ignored Range: start over
                self.log(f"download {self.file.name}: {self.url} does not resume (HTTP {response.status_code}); "
                         f"fetching from byte 0")
                have = 0
            self.bar.reset(total=self.file.size)
            self.bar.update(have)
            length = response.headers.get("Content-Length")
            with open(self.part, "ab" if resumed else "wb") as handle:
                # read1 hands over the bytes as they arrive, so a cut connection loses none that came.
                while chunk := response.raw.read1(_CHUNK):
                    handle.write(chunk)
                    self.bar.update(len(chunk))
                    self._log_progress(handle.tell())
                handle.flush()
                os.fsync(handle.fileno())
                got = handle.tell() - (have if resumed else 0)
            if length is not None and got < int(length):
                raise _Incomplete(f"connection closed after {got} of {length} bytes")

    def run(self) -> None:
        """Fetch into the part file, retrying with exponential backoff; DownloadError after the last try."""
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                self._request_once()
                return
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
                if attempt == attempts:
                    raise DownloadError(f"{self.url}: download failed after {attempts} attempts: {err}") from err
                wait = self.settings.backoff_s * 2 ** (attempt - 1)
                have = self.part.stat().st_size if self.part.exists() else 0
                self.log(f"download {self.file.name}: attempt {attempt}/{attempts} failed ({err}); {have} bytes "
                         f"kept, retrying in {wait:.1f}s")
                time.sleep(wait)
            finally:
                self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def fetch_file(file: RemoteFile, out_dir: Path, settings: DownloadSettings, log: Log,
               recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Make `out_dir/<name>` the verified file; returns its manifest entry (url, size, md5, sha256, checksum)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / file.name
    expected = _expected(file, recorded)
    if target.is_file() and recorded and recorded.get("url") == file.url \
            and recorded.get("size") == target.stat().st_size and recorded.get("mtime_ns") == target.stat().st_mtime_ns:
        return dict(recorded)  # verified when it landed, untouched since
    if target.is_file():
        digests = _verify(file, file.url, target, expected)
    else:
        fetch = _Fetch(file, out_dir, settings, log)
        try:
            fetch.run()
        finally:
            fetch.close()
        digests = _verify(file, fetch.url, fetch.part, expected)
        os.replace(fetch.part, target)
        log(f"download {file.name}: {target.stat().st_size} bytes, sha256 {digests['sha256']}")
    checksum = "published" if (file.md5 or file.sha256) else ("recorded" if expected else "recorded now")
    return {"url": file.url, "size": target.stat().st_size, "mtime_ns": target.stat().st_mtime_ns, **digests,
            "checksum": checksum}


def download_files(files: list[RemoteFile], out_dir: Path, settings: DownloadSettings, log: Log,
                   recorded: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fetch every file (`settings.workers` at a time); name -> manifest entry. All files are tried; then the
    first failure is raised, saying how many failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    landed: dict[str, dict[str, Any]] = {}
    failures: list[DownloadError] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, settings.workers)) as pool:
        futures = {pool.submit(fetch_file, f, out_dir, settings, log, recorded.get(f.name)): f for f in files}
        for future in concurrent.futures.as_completed(futures):
            try:
                landed[futures[future].name] = future.result()
            except DownloadError as err:
                failures.append(err)
    if failures:
        more = f" ({len(failures) - 1} more file(s) failed, see the log)" if len(failures) > 1 else ""
        for err in failures[1:]:
            log(str(err))
        raise DownloadError(f"{failures[0]}{more}")
    return landed
