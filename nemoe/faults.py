"""What a failed read is: worth retrying, a missing source, or data that cannot be parsed.

One classification for every place nemoe reads data (opening a source, the held-out
text at start-up, training batches), by what the error is, not by where it came from:

    "retry"      a transport failure: any transport error of httpx2 / httpx (the Hub client),
                 requests or aiohttp (fsspec's HTTP files: its whole ClientError family, which
                 also holds the schemeless-URL error fsspec raises when it reopens a file during
                 an outage); a socket error (ConnectionError,
                 TimeoutError, other OSErrors of a failed system call such as a storage mount
                 gone); an HTTP status
                 5xx, 429 or 408 from any of them (huggingface_hub's HfHubHTTPError included)
    "not_found"  401, 403, 404, or a file or dataset that does not exist
    "data"       the bytes arrived but cannot be parsed (arrow, JSON, UTF-8; arrow reports a corrupt
                 parquet page as a bare OSError without errno): retrying cannot help
    None         none of these (a bug, or an error a caller handles itself)

The error's chain (`__cause__`, `__context__`) is walked, outermost first: libraries wrap
transport errors in their own (`datasets`' "Server Disconnected" ConnectionError, arrow's
errors raised from a Python file object that failed), and a transport error anywhere in the
chain makes the whole a transport failure, even under an arrow "invalid data" error.
Optional libraries are looked up only if they are already imported: an error of a library
that was never imported cannot occur.
"""

from __future__ import annotations

import json
import sys
from typing import Iterator, Literal

Kind = Literal["retry", "not_found", "data"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NOT_FOUND_STATUS = frozenset({401, 403, 404, 410})


def _types(module: str, *names: str) -> tuple[type, ...]:
    """The named exception classes of `module` when it is imported (and has them), else ()."""
    mod = sys.modules.get(module)
    return tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type)) if mod else ()


def transport_errors() -> tuple[type, ...]:
    """The transport error classes of the HTTP libraries in use."""
    return (_types("httpx2", "TransportError") + _types("httpx", "TransportError")
            + _types("requests.exceptions", "ConnectionError", "Timeout", "ChunkedEncodingError",
                     "ContentDecodingError")
            + _types("urllib3.exceptions", "ProtocolError", "TimeoutError", "NewConnectionError")
            + _types("aiohttp", "ClientError")   # the family; a 4xx response is sorted by its status first
            + _types("fsspec.exceptions", "FSTimeoutError") + (ConnectionError, TimeoutError))


def data_errors() -> tuple[type, ...]:
    """Errors of bytes that arrived but cannot be parsed."""
    return (_types("pyarrow", "ArrowException") + (json.JSONDecodeError, UnicodeDecodeError)
            + _types("datasets.exceptions", "DatasetGenerationError", "CastError"))


def status_of(err: BaseException) -> int | None:
    """The HTTP status an error carries: `.response.status_code` (httpx2, httpx, requests,
    huggingface_hub) or `.status` (aiohttp's ClientResponseError)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is None and isinstance(err, _types("aiohttp", "ClientResponseError")):
        status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the errors it was raised from or while handling, outermost first (no cycles)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ if err.__cause__ is not None else err.__context__


def _one(err: BaseException, transport: tuple[type, ...], data: tuple[type, ...]) -> Kind | None:
    status = status_of(err)
    if status is not None:
        if status in RETRY_STATUS or status >= 500:
            return "retry"
        if status in NOT_FOUND_STATUS:
            return "not_found"
    if isinstance(err, transport):
        return "retry"
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return "not_found"
    if type(err) is OSError and err.errno is None:   # arrow's "IOError" status: bytes that do not
        return "data"                                # parse (a corrupt parquet page), no system call failed
    if isinstance(err, OSError):   # a system call failed: EIO from a storage mount gone, ...
        return "retry"
    if isinstance(err, data):
        return "data"
    return None


def classify(err: BaseException) -> Kind | None:
    """"retry", "not_found", "data" or None (see the module's docstring); the first transport
    failure in the chain wins, else the outermost error that is one of the kinds."""
    transport, data = transport_errors(), data_errors()
    kinds = [_one(e, transport, data) for e in chain(err)]
    if "retry" in kinds:
        return "retry"
    return next((k for k in kinds if k is not None), None)


def brief(err: BaseException) -> str:
    """An error in one line: its type and the first line of its message."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:300]}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
