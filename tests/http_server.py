"""A file server on 127.0.0.1 that fails on chosen requests, for the stream-fault tests.

It serves a folder over HTTP/1.1 with byte ranges (what fsspec's HTTP files, and so
`datasets` streaming, ask for). Once armed, the n-th GET after arming gets the fault the
plan names for n (a key `n` counts every GET, a key `(name, n)` the GETs of that file):

    drop   headers and half the body, then the connection is shut (a reset mid-body)
    500    an internal server error
    429    too many requests

The server accepts connections in a bounded loop (each is handled on a thread of its own):
it ends by itself after `max_requests` connections or `lifetime_s` seconds, whichever comes
first, and at `close()`.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FaultyServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        path = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        return path if path.is_file() and self.server.root in path.parents else None

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            return self._empty(404)
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        path = self._file()
        fault = self.server.next_fault(self.path)
        if path is None:
            return self._empty(404)
        if fault in ("500", "429"):
            return self._empty(int(fault))
        data = path.read_bytes()
        start, end, ranged = 0, len(data) - 1, self.headers.get("Range")
        if ranged:
            first, last = ranged.split("=", 1)[1].split("-", 1)
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if fault == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, plan: dict | None = None, fail_all_after: int | None = None,
                 max_requests: int = 20_000, lifetime_s: float = 900.0):
        """plan: {n: fault} for the n-th GET after arm() (1-based); fail_all_after: every GET after
        that many (after arming) answers 500."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.plan, self.fail_all_after = Path(root).resolve(), dict(plan or {}), fail_all_after
        self.max_requests, self.deadline = max_requests, time.monotonic() + lifetime_s
        self.timeout = 0.1  # handle_request() returns after this when idle, so the loop can end
        self.lock = threading.Lock()
        self.armed, self.gets_after_arm, self.fired, self.gets_by_file = False, 0, [], {}
        self.requests, self._closing = 0, False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def arm(self) -> None:
        with self.lock:
            self.armed = True

    def heal(self) -> None:
        """No more faults from now on."""
        with self.lock:
            self.plan, self.fail_all_after = {}, None

    def next_fault(self, path: str) -> str | None:
        with self.lock:
            if not self.armed:
                return None
            self.gets_after_arm += 1
            n, name = self.gets_after_arm, path.split("?")[0].lstrip("/")
            self.gets_by_file[name] = self.gets_by_file.get(name, 0) + 1
            fault = self.plan.pop(n, None) or self.plan.pop((name, self.gets_by_file[name]), None)
            if fault is None and self.fail_all_after is not None and n > self.fail_all_after:
                fault = "500"
            if fault is not None:
                self.fired.append((n, fault, path))
            return fault

    def handle_error(self, request, client_address) -> None:  # a client that hung up: not a test failure
        pass

    def verify_request(self, request, client_address) -> bool:  # called once per connection accepted
        self.requests += 1
        return True

    def _loop(self) -> None:
        while not self._closing and self.requests < self.max_requests and time.monotonic() < self.deadline:
            self.handle_request()  # one connection, or nothing within self.timeout
        self.server_close()

    def close(self) -> None:
        self._closing = True
        self.thread.join(5)


def serve(root: os.PathLike, **kwargs) -> FaultyServer:
    return FaultyServer(Path(root), **kwargs)


def fail_fast(patch) -> None:
    """With a pytest MonkeyPatch: read faults reach nemoe's own retry at once (one attempt in
    `datasets`, no sleeps between its retries or at thread shutdown) and nemoe retries quickly."""
    import datasets

    from nemoe import data
    for name, value in (("STREAMING_READ_MAX_RETRIES", 1), ("STREAMING_READ_RETRY_INTERVAL", 0),
                        ("STREAMING_OPEN_MAX_RETRIES", 1), ("STREAMING_OPEN_RETRY_INTERVAL", 0),
                        ("SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)):
        patch.setattr(datasets.config, name, value)
    patch.setattr(data, "RETRY_FIRST_DELAY_S", 0.01)
