"""A real HTTP server on 127.0.0.1 for the download tests, with the faults a download must survive.

It serves a folder (GET with `Range: bytes=N-` answered 206, as web servers do) and counts what it sent, so a
test can tell that a resumed download did not fetch the bytes it already had. Faults are set per path:
    server.cut[path] = n        the next response for `path` closes the connection after n body bytes
    server.delay[path] = s      every response for `path` waits s seconds first (a timeout)
    server.ignore_range = True  answer 200 with the whole file even when asked for a range
A path that is not in the folder gets a 404.

Use:
    with LoopbackServer(folder) as server:
        url = server.url("a.zip"); ...; server.bytes_sent["/a.zip"], server.requests["/a.zip"]
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests[path] += 1
            srv.ranges.append((path, self.headers.get("Range")))
            cut = srv.cut.pop(path, None)
        if path in srv.delay:
            time.sleep(srv.delay[path])
        file = srv.folder / path.lstrip("/")
        if not file.is_file():
            self.send_error(404, "File not found")
            return
        data = file.read_bytes()
        start = 0
        asked = self.headers.get("Range")
        if asked and asked.startswith("bytes=") and not srv.ignore_range:
            start = int(asked[len("bytes="):].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut is not None:
            body = body[:cut]
        self.wfile.write(body)
        self.wfile.flush()
        with srv.lock:
            srv.bytes_sent[path] += len(body)
        if cut is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(2)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.ranges: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.ignore_range = False

    def url(self, name: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/{name}"


class LoopbackServer:
    """Context manager: a threaded HTTP server for `folder` on 127.0.0.1, on a free port."""

    def __init__(self, folder: Path) -> None:
        self.httpd = _Server(Path(folder))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self.httpd

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

