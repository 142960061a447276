"""A Hugging Face Hub stand-in on 127.0.0.1, for tests of `kind: hf` sources (`HF_ENDPOINT`).

It answers the requests the installed `datasets` (streaming) and `huggingface_hub` make
for the three t4.yaml sources, from a folder laid out like the Hub: `<root>/<org>/<name>/<files>`
(`write_t4_repos` writes tiny synthetic copies of FineWeb, Alpaca-cleaned and WikiText-103):

    HEAD/GET /datasets/<repo>/resolve/<revision>/<path>     a file, with byte ranges (404 if absent)
    GET      /api/datasets/<repo>/revision/<revision>       the repository's info (sha, files, card data)
    GET      /api/datasets/<repo>/tree/<revision>/<dir>     a folder's entries (JSON)
    POST     /api/datasets/<repo>/paths-info/<revision>     entries of the given paths (JSON)

Every request is logged (`log`: "METHOD path" lines). Faults come from a plan: a list of
`Fault(kind, match, nth, times, after)`, each firing on the `nth` to `nth + times - 1`-th request
whose "METHOD path" matches the regex `match` (counted from the first request matching
`after`, when given):

    500, 429     an error status (429 with Retry-After: 1)
    reset        headers and half the body, then a TCP reset (RST)
    truncated    headers and half the body, then a clean close (FIN) short of Content-Length
    stall        headers and half the body, then silence for `stall_s` seconds or until the client
                 hangs up (its read timed out; `hung_up` holds how long each waited)
    refuse       the listening socket closes for `refuse_s` seconds: connections are refused, and
                 requests on connections kept alive from before are dropped unanswered
                 (`refuse_first_s`: the same from the start, before anything was served)

The server ends by itself after `lifetime_s` seconds (and at `close()`).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.fixtures_data import alpaca_rows, fineweb_rows, wikitext_lines

FINEWEB, ALPACA, WIKITEXT = "HuggingFaceFW/fineweb", "yahma/alpaca-cleaned", "Salesforce/wikitext"


@dataclass
class Fault:
    kind: str                 # 500, 429, reset, truncated, stall, refuse
    match: str                # regex searched in "METHOD path?query"
    nth: int = 1              # the first matching request that fails (1-based)
    times: int = 1            # how many matching requests in a row fail
    after: str | None = None  # count matching requests only once a request matched this regex
    seen: int = 0             # matching requests counted so far
    fired: int = 0            # faulty answers given

    def fires(self, line: str) -> bool:
        if self.after is not None:
            if re.search(self.after, line):
                self.after = None
            return False
        if not re.search(self.match, line):
            return False
        self.seen += 1
        hit = self.nth <= self.seen < self.nth + self.times
        self.fired += hit
        return hit


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args) -> None:  # the server keeps its own log
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self._answer(head=False)

    # -- routing ------------------------------------------------------------------------ #
    def _answer(self, head: bool) -> None:
        line = f"{self.command} {self.path}"
        fault = self.server.record(line)
        if fault == "refuse":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("500", "429"):
            return self._send(int(fault), b"{\"error\": \"injected\"}", head, {"Retry-After": "1"} if fault == "429" else {})
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m.group(1), m.group(2), m.group(3), head, fault)
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/]+)", path):
            return self._json(self.server.repo_info(m.group(1)), head)
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path):
            recursive = "recursive=true" in urlsplit(self.path).query
            if self.server.repo_info(m.group(1)) is not None and self.server.tree(m.group(1), m.group(3)) is None:
                return self._send(404, b"{\"error\": \"Entry not found\"}", head, {"X-Error-Code": "EntryNotFound"})
            return self._json(self.server.tree(m.group(1), m.group(3), recursive), head)
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path):
            wanted = re.findall(r"paths=([^&]+)", unquote(getattr(self, "body", b"").decode()))
            try:
                wanted = json.loads(self.body).get("paths", wanted)
            except (ValueError, AttributeError):
                pass
            return self._json(self.server.paths_info(m.group(1), wanted), head)
        self._send(404, b"{\"error\": \"not found\"}", head, {"X-Error-Code": "EntryNotFound"})

    def _json(self, payload, head: bool) -> None:
        if payload is None:
            return self._send(404, b"{\"error\": \"Repository not found\"}", head, {"X-Error-Code": "RepoNotFound"})
        self._send(200, json.dumps(payload).encode(), head, {"Content-Type": "application/json"})

    def _resolve(self, repo: str, revision: str, name: str, head: bool, fault: str | None) -> None:
        file = self.server.file(repo, name)
        if file is None:
            return self._send(404, b"Entry not found", head, {"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        start, end, ranged = 0, len(data) - 1, self.headers.get("Range")
        if ranged and not head:
            first, last = ranged.split("=", 1)[1].split("-", 1)
            start = int(first) if first else max(len(data) - int(last), 0)
            end = min(int(last) if last and first else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        headers = {"X-Repo-Commit": self.server.sha(repo), "ETag": f'"{_sha(data.hex())}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if ranged and not head:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if head:
            headers["Content-Length"] = str(len(data))
        self._send(206 if ranged and not head else 200, body, head, headers, fault)

    def _send(self, status: int, body: bytes, head: bool, headers: dict, fault: str | None = None) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        if fault in ("reset", "truncated", "stall"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault == "stall":
                self._stall()
            elif fault == "reset":   # SO_LINGER 0: close() sends a RST
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)


    def _stall(self) -> None:
        """Send nothing for stall_s seconds, or until the client hangs up (its read timed out):
        the seconds it waited go to `server.hung_up`."""
        start = time.monotonic()
        while time.monotonic() - start < self.server.stall_s:
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            try:
                gone = bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                gone = True
            if gone:
                with self.server.lock:
                    self.server.hung_up.append(time.monotonic() - start)
                return


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, faults: list[Fault] | None = None, lifetime_s: float = 600.0,
                 stall_s: float = 4.0, refuse_s: float = 2.0, refuse_first_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.faults = Path(root).resolve(), list(faults or [])
        self.stall_s, self.refuse_s = stall_s, refuse_s
        self.deadline = time.monotonic() + lifetime_s
        self.timeout = 0.1   # handle_request() returns after this when idle, so the loop can end
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.times: list[float] = []
        self.fired: list[tuple[str, str]] = []
        self.hung_up: list[float] = []   # per stall: seconds until the client gave up
        self.refused_until, self._closing = time.monotonic() + refuse_first_s, False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    # -- the repositories ------------------------------------------------------------------ #
    def sha(self, repo: str) -> str:
        return _sha(repo)

    def _repo_dir(self, repo: str) -> Path | None:
        d = (self.root / repo).resolve()
        return d if d.is_dir() and self.root in d.parents else None

    def file(self, repo: str, name: str) -> Path | None:
        d = self._repo_dir(repo)
        path = (d / name).resolve() if d else None
        return path if path is not None and path.is_file() and d in path.parents else None

    def _entry(self, d: Path, path: Path) -> dict:
        rel = path.relative_to(d).as_posix()
        if path.is_dir():
            return {"type": "directory", "oid": _sha(rel), "path": rel}
        data = path.read_bytes()
        entry = {"type": "file", "oid": _sha(data.hex()), "size": len(data), "path": rel}
        if path.suffix in (".parquet", ".json"):   # data files are LFS files on the Hub
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def repo_info(self, repo: str) -> dict | None:
        d = self._repo_dir(repo)
        if d is None:
            return None
        files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        return {"_id": _sha(repo)[:24], "id": repo, "author": repo.split("/")[0], "sha": self.sha(repo),
                "lastModified": "2024-01-01T00:00:00.000Z", "private": False, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "cardData": {},
                "siblings": [{"rfilename": f} for f in files]}

    def tree(self, repo: str, folder: str, recursive: bool = False) -> list | None:
        d = self._repo_dir(repo)
        target = (d / folder).resolve() if d else None
        if target is None or not target.is_dir() or not (target == d or d in target.parents):
            return None
        return [self._entry(d, p) for p in sorted(target.rglob("*") if recursive else target.iterdir())]

    def paths_info(self, repo: str, paths: list[str]) -> list | None:
        d = self._repo_dir(repo)
        if d is None:
            return None
        return [self._entry(d, d / p) for p in paths if (d / p).exists()]

    # -- faults and the log ---------------------------------------------------------------- #
    def record(self, line: str) -> str | None:
        with self.lock:
            self.log.append(line)
            self.times.append(time.time())
            if time.monotonic() < self.refused_until:   # a connection kept alive from before the outage
                return "refuse"
            for fault in self.faults:
                if fault.fires(line):
                    self.fired.append((fault.kind, line))
                    if fault.kind == "refuse":
                        self.refused_until = time.monotonic() + self.refuse_s
                    return fault.kind
        return None

    def handle_error(self, request, client_address) -> None:  # a client that hung up: not a test failure
        pass

    def _loop(self) -> None:
        try:
            while not self._closing and time.monotonic() < self.deadline:
                if time.monotonic() < self.refused_until:   # nobody listens: connections are refused
                    if self.socket.fileno() >= 0:
                        self.socket.close()
                    time.sleep(0.05)
                    continue
                if self.socket.fileno() < 0:
                    self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    self.socket.bind(self.server_address)
                    self.socket.listen(16)
                self.handle_request()   # one connection, or nothing within self.timeout
        finally:
            self.server_close()

    def close(self) -> None:
        self._closing = True
        self.thread.join(5)

    def requests(self) -> list[str]:
        """The distinct requests, as METHOD and path with file names, shas and ports generalised."""
        seen = []
        for line in self.log:
            pattern = re.sub(r"[0-9a-f]{40}", "<sha>", line)
            if pattern not in seen:
                seen.append(pattern)
        return seen


# --------------------------------------------------------------------------- #
# The three t4.yaml repositories, tiny
# --------------------------------------------------------------------------- #

_FINEWEB_CARD = """---
license: odc-by
task_categories:
- text-generation
language:
- en
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb (a tiny synthetic stand-in)
"""

_ALPACA_CARD = """---
license: cc-by-4.0
language:
- en
tags:
- instruction-finetuning
pretty_name: Alpaca-Cleaned
task_categories:
- text-generation
---
# Alpaca-Cleaned (a tiny synthetic stand-in)
"""

_WIKITEXT_CARD = """---
language:
- en
license:
- cc-by-sa-3.0
- gfdl
pretty_name: WikiText
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: test
    path: wikitext-103-raw-v1/test-*
  - split: train
    path: wikitext-103-raw-v1/train-*
  - split: validation
    path: wikitext-103-raw-v1/validation-*
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
# WikiText (a tiny synthetic stand-in)
"""


def _parquet(rows, path: Path, row_group_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path,
                   row_group_size=row_group_size)


def write_t4_repos(root: Path, row_group_size: int = 4) -> Path:
    """FineWeb (sample-10BT: two parquet shards), Alpaca-cleaned (one JSON list) and WikiText-103-raw
    (parquet train, validation and test splits), in the Hub's layouts, under `root`."""
    fw = root / FINEWEB
    rows = fineweb_rows(600)
    _parquet(rows[:300], fw / "sample" / "10BT" / "000_00000.parquet", row_group_size)
    _parquet(rows[300:], fw / "sample" / "10BT" / "001_00000.parquet", row_group_size)
    _parquet(fineweb_rows(8, "cc"), fw / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", row_group_size)
    (fw / "README.md").write_text(_FINEWEB_CARD)
    al = root / ALPACA
    al.mkdir(parents=True)
    (al / "alpaca_data_cleaned.json").write_text(json.dumps(alpaca_rows(600), indent=4))
    (al / "README.md").write_text(_ALPACA_CARD)
    wk = root / WIKITEXT
    lines = wikitext_lines(60)
    cut = len(lines) // 2
    for config in ("wikitext-103-raw-v1", "wikitext-2-raw-v1"):
        _parquet({"text": lines[:cut]}, wk / config / "train-00000-of-00002.parquet", 32)
        _parquet({"text": lines[cut:]}, wk / config / "train-00001-of-00002.parquet", 32)
        _parquet({"text": wikitext_lines(30)}, wk / config / "validation-00000-of-00001.parquet", 32)
        _parquet({"text": wikitext_lines(4)}, wk / config / "test-00000-of-00001.parquet", 32)
    (wk / "README.md").write_text(_WIKITEXT_CARD)
    return root


def serve(root: Path, **kwargs) -> HubServer:
    return HubServer(root, **kwargs)
