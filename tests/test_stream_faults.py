"""The data stream under faults, without a model: dropped connections, HTTP 500 / 429 and
failing Hub reads are retried at the exact position (identical batches), a long outage ends
in DataUnavailable, read-ahead keeps the consumer's position, parquet resumes skip row groups.

Remote sources are `files` sources given as http:// URLs of a server on 127.0.0.1
(tests/http_server.py) read through `datasets`' own fsspec support; `datasets`' own read
retries are cut to one attempt so that every fault reaches nemoe's retry.
"""

from __future__ import annotations

import gc
import importlib
import re
import time

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.packaged_modules.parquet.parquet import Parquet
from huggingface_hub.errors import HfHubHTTPError

from nemoe import sources
from nemoe.data import DataConfig, DataInterrupted, DataUnavailable, SourceConfig, TokenStream
from nemoe.tokenizer import get_tokenizer
from tests.fixtures_data import fineweb_rows, write_alpaca
from tests.http_server import fail_fast, serve


@pytest.fixture(autouse=True, scope="module")
def _fast_failures():
    """Faults reach nemoe at once: one read attempt in `datasets`, no sleeps, short back-off."""
    with pytest.MonkeyPatch.context() as patch:
        fail_fast(patch)
        yield
        gc.collect()


def write_web(path, n=400, row_group_size=8):
    """FineWeb-like parquet with small row groups: every few documents open a new shard (and a request)."""
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(fineweb_rows(n))), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    write_web(d / "web.parquet")
    write_alpaca(d / "alpaca.jsonl", n=12)   # small: it cycles, so it is fetched again and again
    return d


def mixture(web: str, alpaca: str, prefetch: int = 0, **kwargs) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="web", kind="files", path=web, weight=0.7),
                               SourceConfig(name="alpaca", kind="files", path=alpaca, format="alpaca", weight=0.3)],
                      heldout_fraction=0.1, seed=3, prefetch_batches=prefetch, **kwargs)


def local(folder, **kwargs) -> DataConfig:
    return mixture(str(folder / "web.parquet"), str(folder / "alpaca.jsonl"), **kwargs)


def batches(stream: TokenStream, n: int, batch_size: int = 4) -> list[torch.Tensor]:
    return [stream.next_batch(batch_size) for _ in range(n)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- #
# Faults over HTTP
# --------------------------------------------------------------------------- #

# slow: opening a stream over HTTP takes a few seconds; the fast loop keeps the read-ahead case.
@pytest.mark.parametrize("prefetch", [pytest.param(0, marks=pytest.mark.slow), 4])
def test_http_faults_are_retried_and_change_nothing(folder, tok, prefetch):
    expected = batches(TokenStream(local(folder), tok, 16), 40)
    plan = {("web.parquet", 3): "drop", ("web.parquet", 20): "500", ("alpaca.jsonl", 2): "drop",
            ("web.parquet", 40): "429"}
    server = serve(folder, plan=plan)
    notes = []
    try:
        cfg = mixture(server.url("web.parquet"), server.url("alpaca.jsonl"), prefetch)
        stream = TokenStream(cfg, tok, 16, notify=notes.append)
        server.arm()   # start-up reads are not faulted: they answer with a clear error instead
        got = batches(stream, 40)
    finally:
        server.close()
    assert sorted(f for _, f, _ in server.fired) == ["429", "500", "drop", "drop"], server.fired
    assert same(got, expected), "a recovered fault changes no batch"
    # One note per failed read; two faults can fail one read (the interleave reads its sources in parallel).
    assert len(notes) >= 3 and all("reopening the stream at its position" in n for n in notes)
    assert all(re.search(r"data source '(web|alpaca)' \(files: http://127.0.0.1", n) for n in notes), notes


def _hub_error(status: int) -> HfHubHTTPError:
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])  # the Hub client's HTTP library
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/datasets/org/web/x.parquet"))
    return HfHubHTTPError(f"{status} Server Error", response=response)


def test_hf_source_reads_retry_injected_failures(folder, tok, monkeypatch, tmp_path):
    """An hf source (its load redirected to a local parquet file) whose shard reads fail: a 503,
    a 429 and a reset connection, raised inside `datasets`' parquet reader."""
    hub = tmp_path / "org" / "web"   # like a Hub file path (hf://datasets/org/web@.../x.parquet): it names the dataset
    hub.mkdir(parents=True)
    (hub / "train.parquet").write_bytes((folder / "web.parquet").read_bytes())

    def hub_load(path, name=None, split=None, streaming=True):
        return datasets.load_dataset("parquet", data_files=str(hub / "train.parquet"), split="train", streaming=True)

    monkeypatch.setattr(sources, "load_dataset", hub_load)
    cfg = DataConfig(sources=[SourceConfig(name="web", kind="hf", path="org/web")], heldout_fraction=0.1, seed=3)
    expected = batches(TokenStream(cfg, tok, 16), 30)

    real, shards_opened = Parquet._generate_tables, {"n": 0, "armed": False}
    faults = {3: _hub_error(503), 6: _hub_error(429), 10: ConnectionResetError(104, "Connection reset by peer")}

    def flaky(self, files, row_groups_list):   # the n-th shard (row group) opened fails before its first table
        shards_opened["n"] += 1
        fault = faults.pop(shards_opened["n"], None) if shards_opened["armed"] else None
        if fault is not None:
            raise fault
        yield from real(self, files, row_groups_list)

    monkeypatch.setattr(Parquet, "_generate_tables", flaky)   # before the loader binds it
    notes = []
    stream = TokenStream(cfg, tok, 16, notify=notes.append)
    shards_opened.update(n=0, armed=True)   # start-up reads are not faulted: count from the first training read
    assert same(batches(stream, 30), expected)
    assert not faults, "every injected failure was raised"
    assert [re.search(r"\): (\w+): ", n).group(1) for n in notes] == ["HfHubHTTPError", "HfHubHTTPError",
                                                                        "ConnectionResetError"], notes
    assert "'web' (hf: org/web)" in notes[0]


@pytest.mark.slow   # a stream over HTTP, reopened many times
def test_outage_longer_than_retry_minutes_raises_then_the_stream_continues(folder, tok):
    expected = batches(TokenStream(local(folder), tok, 16), 30)
    server = serve(folder, fail_all_after=0)
    try:
        cfg = mixture(server.url("web.parquet"), server.url("alpaca.jsonl"), prefetch=2, retry_minutes=0.005)
        stream = TokenStream(cfg, tok, 16, notify=lambda text: None)
        got = batches(stream, 10)
        server.arm()
        with pytest.raises(DataUnavailable, match=r"longer than data.retry_minutes \(0.005\)(.|\n)*--resume"):
            for _ in range(20):
                position = stream.state_dict()
                got += stream.next_batches(2, 4)
        assert stream.state_dict() == position, "it stops at the start of the unfinished step"
        server.heal()
        got += batches(stream, 30 - len(got))
    finally:
        server.close()
    assert same(got, expected), "after the outage the stream goes on from its position"


@pytest.mark.slow   # a stream over HTTP
def test_stop_signal_ends_a_wait_for_data_at_the_step_start(folder, tok):
    server = serve(folder, fail_all_after=0)
    stop = {"now": False}
    try:
        cfg = mixture(server.url("web.parquet"), server.url("alpaca.jsonl"), prefetch=2)
        stream = TokenStream(cfg, tok, 16, notify=lambda text: stop.update(now=True), should_stop=lambda: stop["now"])
        stream.next_batches(2, 4)
        server.arm()
        with pytest.raises(DataInterrupted):
            for _ in range(50):
                start = stream.state_dict()
                stream.next_batches(2, 4)
    finally:
        server.close()
    assert stream.state_dict() == start, "the position goes back to the start of the unfinished step"


# --------------------------------------------------------------------------- #
# Read-ahead and resume
# --------------------------------------------------------------------------- #

def test_read_ahead_checkpoints_the_consumers_position(folder, tok):
    inline = TokenStream(local(folder), tok, 16)
    ahead = TokenStream(local(folder, prefetch=8), tok, 16)
    assert same(batches(ahead, 5), batches(inline, 5))
    producer = ahead._source.current
    for _ in range(200):   # let the producer fill its queue: it is then 8 batches ahead
        if producer.items.full():
            break
        time.sleep(0.05)
    assert producer.items.full()
    state = ahead.state_dict()
    assert state == inline.state_dict(), "the state is where training stands, not where the reader is"
    resumed = TokenStream(local(folder), tok, 16)
    resumed.load_state_dict(state)
    assert same(batches(resumed, 10), batches(ahead, 10))


@pytest.mark.parametrize("prefetch", [0, 4])
def test_a_batch_of_leftover_tokens_keeps_the_loaded_position(folder, tok, prefetch):
    """After load_state_dict, a batch made of pending tokens alone reads no document, and `datasets`
    reports its pre-load state until it reads: the stream must keep the loaded position. (The
    random-kill test found this: a resume at such a step restarted the data.)"""
    cfg = local(folder, prefetch=prefetch)
    first = TokenStream(cfg, tok, 16)
    batches(first, 7)
    state = {**first.state_dict(), "pending_tokens": [int(t) % 50000 for t in range(3 * 4 * 17 + 5)]}
    straight = TokenStream(cfg, tok, 16)
    straight.load_state_dict(state)
    expected = batches(straight, 6)
    hop = TokenStream(cfg, tok, 16)
    hop.load_state_dict(state)
    got = batches(hop, 1)   # from the pending tokens only
    assert hop.state_dict()["dataset"] == state["dataset"]
    again = TokenStream(cfg, tok, 16)
    again.load_state_dict(hop.state_dict())
    assert same(got + batches(again, 5), expected)


def test_parquet_resume_skips_row_groups_and_old_states_keep_their_layout(tmp_path, tok, monkeypatch):
    """Resuming re-reads at most the formatting batch in progress (`datasets` replays a batched map
    from its batch's start, up to two batches back) and the row groups it spans, wherever the
    position is; the old one-shard-per-file layout reads the whole file up to the position."""
    monkeypatch.setattr(sources, "MAP_BATCH_ROWS", 16)   # small formatting batches: the replay is small
    path = write_web(tmp_path / "big.parquet", n=2000, row_group_size=50)   # 40 row groups
    cfg = DataConfig(sources=[SourceConfig(name="web", kind="files", path=str(path))], heldout_fraction=0.1, seed=3,
                     prefetch_batches=0)   # no read-ahead: every row read is the resume's
    stream = TokenStream(cfg, tok, 16)
    batches(stream, 600)   # well into the file
    state = stream.state_dict()
    assert state["shards"] == "row_groups" and state["dataset"] and state["pending_tokens"] is not None

    real, rows_read = Parquet._generate_tables, []

    def counting(self, files, row_groups_list):
        for key, table in real(self, files, row_groups_list):
            rows_read.append(len(table))
            yield key, table

    monkeypatch.setattr(Parquet, "_generate_tables", counting)
    resumed = TokenStream(cfg, tok, 16)
    rows_read.clear()   # start-up probes read the first row group; count the resume only
    resumed.load_state_dict(state)
    expected = batches(stream, 5)
    assert same(batches(resumed, 5), expected)
    new_layout = sum(rows_read)
    assert new_layout <= 2 * 16 + 2 * 50, f"resume read {new_layout} rows: it should skip the row groups before"

    # A state written when a shard was the whole file (no "shards" key) resumes in that layout:
    # an old checkpoint at the start, read on to the same depth.
    legacy = TokenStream(cfg, tok, 16)
    legacy.load_state_dict({k: v for k, v in legacy.state_dict().items() if k != "shards"})
    assert legacy.state_dict()["shards"] == "files"
    batches(legacy, 600)
    old_state = {k: v for k, v in legacy.state_dict().items() if k != "shards"}
    following = batches(legacy, 5)
    restored = TokenStream(cfg, tok, 16)
    rows_read.clear()
    restored.load_state_dict(old_state)
    assert same(batches(restored, 5), following) and same(following, expected), "both layouts: the same data"
    assert sum(rows_read) > 5 * new_layout, "the old layout reads the file again up to the position"


def test_files_sources_take_http_urls_only(tmp_path):
    ok = DataConfig(sources=[SourceConfig(name="w", kind="files", path="https://example.org/data/web.parquet")])
    assert ok.validate() == []
    bad = DataConfig(sources=[SourceConfig(name="w", kind="files", path="ftp://example.org/web.parquet"),
                              SourceConfig(name="x", kind="files", path="http://example.org/notes.docx")])
    problems = "\n".join(bad.validate())
    assert "only http:// and https:// URLs" in problems and "unsupported type" in problems
