"""The downloader, the archive extraction and the pickle reader against a real HTTP server on 127.0.0.1.

Each fault a real download meets is made by the server (tests/loopback_http.py): a connection cut mid-file, a
404, a server too slow to answer, a server that ignores Range, a file that is not what its checksum says; and
each escape an archive can attempt is built with tarfile/zipfile. No test touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from loopback_http import LoopbackServer

from mvptr.data.archives import UnsafeArchiveError, extract_archive
from mvptr.data.download import DownloadError, DownloadSettings, RemoteFile, download_files, fetch_file
from mvptr.data.safe_pickle import load_plain_pickle
from mvptr.errors import DataError

FAST = DownloadSettings(workers=2, retries=2, backoff_s=0.01, timeout_s=1.0)
PAYLOAD = os.urandom(300_000)


def quiet(_: str) -> None:
    pass


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "big.bin").write_bytes(PAYLOAD)
    (folder / "small.json").write_text('{"a": 1}')
    return folder


def remote(server, name: str, data: bytes, **published) -> RemoteFile:
    return RemoteFile(name, server.url(name), size=len(data), **published)


def test_a_clean_parallel_download_lands_verified_files_and_their_manifest(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    with LoopbackServer(served) as server:
        files = [remote(server, "big.bin", PAYLOAD, sha256=hashlib.sha256(PAYLOAD).hexdigest()),
                 remote(server, "small.json", b'{"a": 1}', md5=hashlib.md5(b'{"a": 1}').hexdigest())]
        landed = download_files(files, out, FAST, quiet, recorded={})
        assert (out / "big.bin").read_bytes() == PAYLOAD and (out / "small.json").read_bytes() == b'{"a": 1}'
        assert landed["big.bin"]["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        assert landed["big.bin"]["checksum"] == "published"
        assert not list(out.glob("*.part"))
        # A second run with the manifest trusts the files it verified: no request is made.
        before = sum(server.requests.values())
        download_files(files, out, FAST, quiet, recorded=landed)
        assert sum(server.requests.values()) == before


def test_a_connection_cut_mid_file_resumes_without_fetching_the_bytes_already_there(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    with LoopbackServer(served) as server:
        server.cut["/big.bin"] = 100_000
        entry = fetch_file(remote(server, "big.bin", PAYLOAD), out, FAST, quiet)
        assert (out / "big.bin").read_bytes() == PAYLOAD
        assert server.requests["/big.bin"] == 2
        assert server.ranges[-1] == ("/big.bin", "bytes=100000-")
        assert server.bytes_sent["/big.bin"] == len(PAYLOAD)  # the first 100,000 bytes were not sent twice
        assert entry["checksum"] == "recorded now"


def test_an_interrupted_download_never_looks_finished_and_the_next_run_resumes_it(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    no_retry = DownloadSettings(retries=0, backoff_s=0.0, timeout_s=1.0)
    with LoopbackServer(served) as server:
        server.cut["/big.bin"] = 50_000
        with pytest.raises(DownloadError, match="after 1 attempts"):
            fetch_file(remote(server, "big.bin", PAYLOAD), out, no_retry, quiet)
        assert not (out / "big.bin").exists() and (out / "big.bin.part").stat().st_size == 50_000
        fetch_file(remote(server, "big.bin", PAYLOAD), out, no_retry, quiet)
        assert (out / "big.bin").read_bytes() == PAYLOAD and not (out / "big.bin.part").exists()
        assert server.bytes_sent["/big.bin"] == len(PAYLOAD)


def test_a_server_that_ignores_range_is_fetched_again_from_byte_zero(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin.part").write_bytes(PAYLOAD[:1000])
    with LoopbackServer(served) as server:
        server.ignore_range = True
        fetch_file(remote(server, "big.bin", PAYLOAD), out, FAST, quiet)
    assert (out / "big.bin").read_bytes() == PAYLOAD


def test_a_wrong_checksum_is_a_clear_error_and_the_file_is_kept_aside_unused(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    with LoopbackServer(served) as server:
        bad = remote(server, "big.bin", PAYLOAD, sha256="0" * 64)
        with pytest.raises(DownloadError, match=r"big\.bin: downloaded file has sha256 [0-9a-f]{64}, expected 0{64}"):
            fetch_file(bad, out, FAST, quiet)
    assert not (out / "big.bin").exists() and (out / "big.bin.rejected").read_bytes() == PAYLOAD


def test_a_recorded_checksum_is_verified_on_the_next_download(served: Path, tmp_path: Path):
    out = tmp_path / "out"
    with LoopbackServer(served) as server:
        file = remote(server, "big.bin", PAYLOAD)
        first = fetch_file(file, out, FAST, quiet)
        (out / "big.bin").unlink()
        (served / "big.bin").write_bytes(PAYLOAD[::-1])  # the source changed under the same URL and size
        with pytest.raises(DownloadError, match="expected " + first["sha256"]):
            fetch_file(file, out, FAST, quiet, recorded=first)


def test_a_404_is_retried_then_named(served: Path, tmp_path: Path):
    with LoopbackServer(served) as server:
        gone = RemoteFile("gone.zip", server.url("gone.zip"))
        with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:\d+/gone\.zip: download failed after 3 attempts: 404"):
            fetch_file(gone, tmp_path / "out", FAST, quiet)
        assert server.requests["/gone.zip"] == FAST.retries + 1
    assert not (tmp_path / "out" / "gone.zip").exists()


def test_a_server_that_does_not_answer_in_time_is_retried_then_named(served: Path, tmp_path: Path):
    with LoopbackServer(served) as server:
        server.delay["/small.json"] = 2.0
        slow = RemoteFile("small.json", server.url("small.json"))
        with pytest.raises(DownloadError, match=r"/small\.json: download failed after 3 attempts: .*[Tt]imed? ?out"):
            fetch_file(slow, tmp_path / "out", FAST, quiet)
        assert server.requests["/small.json"] == FAST.retries + 1


def test_every_failing_file_is_tried_and_the_error_says_how_many_failed(served: Path, tmp_path: Path):
    with LoopbackServer(served) as server:
        files = [RemoteFile("gone1", server.url("gone1")), RemoteFile("gone2", server.url("gone2")),
                 remote(server, "small.json", b'{"a": 1}')]
        with pytest.raises(DownloadError, match=r"\(1 more file\(s\) failed"):
            download_files(files, tmp_path / "out", FAST, quiet, recorded={})
    assert (tmp_path / "out" / "small.json").is_file()


def test_a_mirror_replaces_the_longest_matching_prefix():
    settings = DownloadSettings(mirrors={"http://a.org/": "http://m1/", "http://a.org/zips/": "http://m2/z/"})
    assert settings.resolve("http://a.org/zips/x.zip") == "http://m2/z/x.zip"
    assert settings.resolve("http://a.org/y.json") == "http://m1/y.json"
    assert settings.resolve("http://b.org/y.json") == "http://b.org/y.json"


# --- archives -----------------------------------------------------------------------------------------------

def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _device(name: str, kind: bytes = tarfile.CHRTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def test_a_safe_tar_and_zip_unpack_into_the_target(tmp_path: Path):
    target = tmp_path / "target"
    tar = _tar(tmp_path / "ok.tar.gz", _file("data/a.txt", b"a"), _link("data/b.txt", "a.txt", tarfile.SYMTYPE))
    assert extract_archive(tar, target) == ["data"]
    assert (target / "data" / "a.txt").read_bytes() == b"a" and (target / "data" / "b.txt").read_bytes() == b"a"
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("ann/captions.json", "{}")
    assert extract_archive(tmp_path / "ok.zip", target) == ["ann"]
    assert (target / "ann" / "captions.json").read_text() == "{}"
    assert not [p for p in target.iterdir() if p.name.startswith(".extract")]


TAR_ESCAPES = {
    "absolute path": [_file("/tmp/mvptr-escape-abs.txt")],
    "dot-dot": [_file("../escape.txt")],
    "symlink out": [_link("out", "../outside", tarfile.SYMTYPE), _file("out/escape.txt")],
    "absolute symlink": [_link("abs", "/etc/passwd", tarfile.SYMTYPE)],
    "hard link out": [_link("hard", "../outside.txt", tarfile.LNKTYPE)],
    "absolute hard link": [_link("hard", "/etc/passwd", tarfile.LNKTYPE)],
    # b -> a/.. looks inside while a does not exist yet; once a -> . is unpacked, b is the parent folder.
    "symlink chain out": [_link("a", ".", tarfile.SYMTYPE), _link("b", "a/..", tarfile.SYMTYPE),
                          _file("b/escape.txt")],
    "nested symlink out": [_link("sub/up", "../..", tarfile.SYMTYPE), _file("sub/up/escape.txt")],
    "device file": [_device("dev")],
    "block device": [_device("blk", tarfile.BLKTYPE)],
    "fifo": [_device("fifo", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("kind", sorted(TAR_ESCAPES))
def test_a_tar_member_that_could_escape_is_refused_before_anything_is_written(tmp_path: Path, kind: str):
    (tmp_path / "outside.txt").write_text("mine")
    archive = _tar(tmp_path / "evil.tar.gz", _file("first.txt"), *TAR_ESCAPES[kind])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match=r"evil\.tar\.gz: member .* refused"):
        extract_archive(archive, tmp_path / "target")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == sorted([*before, Path("target")])  # an empty target, nothing anywhere else
    assert (tmp_path / "outside.txt").read_text() == "mine"
    assert not Path("/tmp/mvptr-escape-abs.txt").exists()


def _zip_with(path: Path, name: str, mode: int | None = None, data: bytes = b"x") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("first.txt", b"x")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


ZIP_ESCAPES = {
    "absolute path": ("/tmp/mvptr-escape-abs.txt", None),
    "dot-dot": ("../escape.txt", None),
    "nested dot-dot": ("a/../../escape.txt", None),
    "symlink": ("link", stat.S_IFLNK | 0o777),
    "device file": ("dev", stat.S_IFCHR | 0o666),
    "fifo": ("fifo", stat.S_IFIFO | 0o666),
    "backslash dot-dot": ("..\\..\\escape.txt", None),
    "backslash absolute": ("\\tmp\\escape.txt", None),
    "drive letter": ("C:/escape.txt", None),
    "drive-relative": ("C:escape.txt", None),
    "UNC path": ("\\\\server\\share\\escape.txt", None),
}


@pytest.mark.parametrize("kind", sorted(ZIP_ESCAPES))
def test_a_zip_member_that_could_escape_is_refused_before_anything_is_written(tmp_path: Path, kind: str):
    name, mode = ZIP_ESCAPES[kind]
    archive = _zip_with(tmp_path / "evil.zip", name, mode, b"../outside" if mode else b"x")
    with pytest.raises(UnsafeArchiveError, match=r"evil\.zip: member .* refused"):
        extract_archive(archive, tmp_path / "target")
    assert list((tmp_path / "target").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "target"]


def test_a_file_that_is_no_archive_is_named(tmp_path: Path):
    (tmp_path / "x.zip").write_bytes(b"not an archive")
    with pytest.raises(DataError, match=r"x\.zip: not a zip, tar or gzip archive"):
        extract_archive(tmp_path / "x.zip", tmp_path / "target")


# --- pickles --------------------------------------------------------------------------------------------------

class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_plain_pickle_loads_and_one_that_names_a_callable_is_refused(tmp_path: Path):
    refs = [{"ref_id": 1, "split": "testA", "sentences": [{"sent_id": 3, "sent": "man left"}], "box": (1.0, 2)}]
    (tmp_path / "refs.p").write_bytes(pickle.dumps(refs, protocol=2))
    assert load_plain_pickle(tmp_path / "refs.p") == refs
    (tmp_path / "evil.p").write_bytes(pickle.dumps([_Boom(tmp_path / "pwned")], protocol=2))
    with pytest.raises(DataError, match=r"evil\.p: the pickle asks for posix\.system"):
        load_plain_pickle(tmp_path / "evil.p")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "set.p").write_bytes(pickle.dumps({1, 2}, protocol=2))
    with pytest.raises(DataError, match=r"builtin\w*\.set"):
        load_plain_pickle(tmp_path / "set.p")
