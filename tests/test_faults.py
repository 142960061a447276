"""The read-failure classification (nemoe/faults.py), pinned against the installed libraries'
real exception types: instances built with their own constructors, and errors their clients
raise for real against 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import aiohttp
import datasets
import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from nemoe.data import is_read_fault
from nemoe.faults import classify

URL = "https://huggingface.co/datasets/org/web/resolve/main/x.parquet"


def hub_error(status: int, cls=HfHubHTTPError) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("GET", URL))
    return cls(f"{status} error", response=response)


def requests_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


def aiohttp_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(request_info=None, history=(), status=status, message="error")


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer from err
    except BaseException as err:  # noqa: BLE001
        return err


def raised_while_handling(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 -- the implicit __context__ is the point
    except BaseException as err:  # noqa: BLE001
        return err


CASES = {
    # The Hub client's HTTP library (huggingface_hub 1.x+: httpx2): transport errors are not OSErrors.
    "httpx2.ConnectError": (httpx2.ConnectError("refused"), "retry"),
    "httpx2.ReadTimeout": (httpx2.ReadTimeout("timed out"), "retry"),
    "httpx2.ConnectTimeout": (httpx2.ConnectTimeout("timed out"), "retry"),
    "httpx2.RemoteProtocolError": (httpx2.RemoteProtocolError("peer closed connection"), "retry"),
    "httpx2.ReadError": (httpx2.ReadError("reset"), "retry"),
    "HfHubHTTPError 500": (hub_error(500), "retry"),
    "HfHubHTTPError 503": (hub_error(503), "retry"),
    "HfHubHTTPError 429": (hub_error(429), "retry"),
    "HfHubHTTPError 401": (hub_error(401), "not_found"),
    "HfHubHTTPError 403": (hub_error(403), "not_found"),
    "RepositoryNotFoundError 404": (hub_error(404, RepositoryNotFoundError), "not_found"),
    "httpx2.HTTPStatusError 502": (httpx2.HTTPStatusError("bad gateway", request=httpx2.Request("GET", URL),
                                                          response=httpx2.Response(502)), "retry"),
    # requests
    "requests ConnectionError": (requests.exceptions.ConnectionError("refused"), "retry"),
    "requests ReadTimeout": (requests.exceptions.ReadTimeout("timed out"), "retry"),
    "requests ChunkedEncodingError": (requests.exceptions.ChunkedEncodingError("cut"), "retry"),
    "requests HTTPError 504": (requests_error(504), "retry"),
    "requests HTTPError 404": (requests_error(404), "not_found"),
    # aiohttp (fsspec's HTTP files: `files` sources given as URLs)
    "aiohttp ServerDisconnectedError": (aiohttp.ServerDisconnectedError(), "retry"),
    "aiohttp ClientPayloadError": (aiohttp.ClientPayloadError("Response payload is not completed"), "retry"),
    "aiohttp ClientOSError": (aiohttp.ClientOSError(104, "Connection reset by peer"), "retry"),
    "aiohttp NonHttpUrlClientError (fsspec reopening during an outage)":
        (aiohttp.NonHttpUrlClientError("127.0.0.1:8000/alpaca.jsonl"), "retry"),
    "aiohttp ClientResponseError 500": (aiohttp_error(500), "retry"),
    "aiohttp ClientResponseError 429": (aiohttp_error(429), "retry"),
    "aiohttp ClientResponseError 403": (aiohttp_error(403), "not_found"),
    # sockets and storage
    "ConnectionResetError": (ConnectionResetError(104, "Connection reset by peer"), "retry"),
    "TimeoutError": (TimeoutError("timed out"), "retry"),
    "OSError EIO (a mount gone)": (OSError(5, "Input/output error"), "retry"),
    "OSError without errno (arrow: a page that does not decode)": (OSError("Couldn't deserialize thrift"), "data"),
    "FileNotFoundError": (FileNotFoundError(2, "No such file"), "not_found"),
    "datasets DatasetNotFoundError": (datasets.exceptions.DatasetNotFoundError("no such dataset"), "not_found"),
    # data that arrived but cannot be parsed
    "pyarrow ArrowInvalid": (pa.ArrowInvalid("JSON parse error: Invalid value"), "data"),
    "pyarrow ArrowTypeError": (pa.ArrowTypeError("expected str"), "data"),
    "json.JSONDecodeError": (json.JSONDecodeError("Expecting value", "{x", 1), "data"),
    "UnicodeDecodeError": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "data"),
    # none of these: a bug, or an error its caller handles
    "ValueError (unknown config)": (ValueError("BuilderConfig 'x' not found"), None),
    "RuntimeError": (RuntimeError("boom"), None),
    "KeyError": (KeyError("text"), None),
    # chains: a transport error anywhere wins; otherwise the outermost kind
    "datasets' 'Server Disconnected' from a 503": (raised_from(ConnectionError("Server Disconnected"), hub_error(503)),
                                                    "retry"),
    "ArrowInvalid from a RemoteProtocolError": (raised_from(pa.ArrowInvalid("truncated"),
                                                            httpx2.RemoteProtocolError("incomplete body")), "retry"),
    "ArrowInvalid while handling a ReadTimeout": (raised_while_handling(pa.ArrowInvalid("x"), httpx2.ReadTimeout("t")),
                                                  "retry"),
    "RuntimeError from an HfHubHTTPError 500": (raised_from(RuntimeError("wrapped"), hub_error(500)), "retry"),
    "RuntimeError from a 404": (raised_from(RuntimeError("wrapped"), hub_error(404)), "not_found"),
    "RuntimeError from an ArrowInvalid": (raised_from(RuntimeError("wrapped"), pa.ArrowInvalid("bad")), "data"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_classification_by_what_the_error_is(name):
    err, kind = CASES[name]
    assert classify(err) == kind
    assert is_read_fault(err) == (kind in ("retry", "not_found")), "mid-run: retried until data.retry_minutes"


def test_a_corrupt_parquet_page_is_data_not_an_outage():
    """pyarrow reports a page it cannot decode as a bare OSError (no errno): a data error."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(40)]}), buffer, row_group_size=10)
    data = bytearray(buffer.getvalue())
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(2).column(0)
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = bytes(column.total_compressed_size)
    with pytest.raises(OSError) as info:
        pq.ParquetFile(io.BytesIO(bytes(data))).read_row_group(2)
    assert classify(info.value) == "data", info.value


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_the_installed_clients_raise_for_a_refused_connection():
    url = f"http://127.0.0.1:{closed_port()}/x"
    raised = []
    for call in (lambda: httpx2.get(url, timeout=2), lambda: requests.get(url, timeout=2)):
        with pytest.raises(Exception) as info:
            call()
        raised.append(info.value)

    async def fetch():
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                await response.read()
    with pytest.raises(Exception) as info:
        asyncio.run(fetch())
    raised.append(info.value)
    assert [type(e).__module__.split(".")[0] for e in raised] == ["httpx2", "requests", "aiohttp"]
    assert [classify(e) for e in raised] == ["retry"] * 3, [type(e) for e in raised]


def test_a_cycle_in_the_chain_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert classify(a) is None
