"""Data pipeline: sources, formats, mixture, held-out rule, packing, exact resume, errors.

Everything runs offline on local files shaped like the real sources (tests/fixtures_data.py)
and on the built-in corpus; the Hub is only ever asked in offline mode.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import io

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch

import nemoe.builtin_corpus
from nemoe import data, sources
from nemoe.config import config_from_dict
from nemoe.data import (DataConfig, DataExhausted, SourceConfig, TokenStream, alpaca_document,
                        builtin_corpus, heldout_batches, is_heldout, source_documents)
from nemoe.errors import UserError
from nemoe.tokenizer import get_tokenizer
from tests.fixtures_data import (alpaca_rows, fineweb_rows, markers, wikitext_lines, write_alpaca,
                                 write_fineweb, write_wikitext)


@pytest.fixture(autouse=True, scope="module")
def _no_shutdown_sleep():
    # datasets sleeps 5 s whenever an interleave over parquet shards is closed (a guard for
    # arrow threads at interpreter exit, apache/arrow#45214); tests drop many streams.
    # Off for the whole module, with one collection at its end (~0.7 s a collection with
    # torch and datasets loaded: once per test it was a fifth of this module's time).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
        yield
        gc.collect()  # streams caught in reference cycles close now, while the sleep is still off


@pytest.fixture
def files(tmp_path):
    """Paths of a FineWeb-like parquet, an Alpaca-like jsonl and a WikiText-like parquet."""
    return {"fineweb": write_fineweb(tmp_path / "fineweb.parquet", n=300),
            "alpaca": write_alpaca(tmp_path / "alpaca.jsonl", n=200),
            "wikitext": write_wikitext(tmp_path / "wikitext.parquet", n_articles=100)}


def mixture_cfg(files, weights=(0.6, 0.2, 0.2), **kwargs) -> DataConfig:
    return DataConfig(sources=[
        SourceConfig(name="fineweb", kind="files", path=str(files["fineweb"]), weight=weights[0]),
        SourceConfig(name="alpaca", kind="files", path=str(files["alpaca"]), format="alpaca", weight=weights[1]),
        SourceConfig(name="wikitext", kind="files", path=str(files["wikitext"]), format="wikitext",
                     weight=weights[2]),
    ], **kwargs)


def texts(ds) -> list[str]:
    return [doc["text"] for doc in ds]


def all_documents(src: SourceConfig, cfg: DataConfig) -> list[str]:
    """Training then held-out documents of one source (the hash rule splits them)."""
    return texts(source_documents(src, cfg, "train")) + texts(source_documents(src, cfg, "heldout"))


def decoded_stream(stream: TokenStream, tok, n_batches: int, batch_size: int = 8) -> str:
    tokens = torch.cat([stream.next_batch(batch_size).flatten() for _ in range(n_batches)])
    return tok.decode(tokens)


# --------------------------------------------------------------------------- #
# 1. Each source shape loads through kind: files
# --------------------------------------------------------------------------- #

def test_fineweb_parquet_yields_its_text_column(files):
    cfg = mixture_cfg(files)
    docs = all_documents(cfg.sources[0], cfg)
    expected = [row["text"] for row in fineweb_rows(300)]
    assert sorted(docs) == sorted(expected)
    train = texts(source_documents(cfg.sources[0], cfg, "train"))
    assert train == [t for t in expected if not is_heldout(t, cfg.heldout_fraction)]  # file order kept


def test_alpaca_jsonl_becomes_prompt_response_documents(files):
    cfg = mixture_cfg(files)
    docs = sorted(all_documents(cfg.sources[1], cfg))
    rows = alpaca_rows(200)
    assert docs == sorted(alpaca_document(r["instruction"], r["input"], r["output"]) for r in rows)
    with_input = alpaca_document("Add the numbers.", "2 and 3", "5")
    assert with_input == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5"
    assert alpaca_document("Say hi.", "", "Hi.") == "### Instruction:\nSay hi.\n\n### Response:\nHi."


def test_wikitext_lines_grouped_into_articles_without_blanks(files):
    cfg = mixture_cfg(files)
    docs = all_documents(cfg.sources[2], cfg)
    assert len(docs) == 100
    assert all(doc.strip() for doc in docs)
    first = min(docs, key=lambda d: d.split("wk")[1])
    assert first.startswith(" = Article wk00000 = \n\n ")
    assert " = = Section 0 = = \n" in first
    # Every non-blank line of the file is in exactly one article, in order.
    lines = [line for line in wikitext_lines(100) if line.strip()]
    assert sum(len([x for x in d.split("\n\n")]) for d in docs) == len(lines)


def test_wikitext_as_plain_text_drops_blank_rows(files):
    src = SourceConfig(name="wiki", kind="files", path=str(files["wikitext"]))
    cfg = DataConfig(sources=[src])
    docs = all_documents(src, cfg)
    assert len(docs) == len([line for line in wikitext_lines(100) if line.strip()])
    assert all(doc.strip() for doc in docs)


def test_text_file_source_reads_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n\n\nThird.\n", encoding="utf-8")
    src = SourceConfig(name="book", kind="files", path=str(path))
    docs = all_documents(src, DataConfig(sources=[src]))
    assert len(docs) == 3 and any("still first" in d for d in docs)


def test_glob_path_reads_every_matching_file(tmp_path):
    write_fineweb(tmp_path / "part-0.parquet", n=20, prefix="fw")
    write_fineweb(tmp_path / "part-1.parquet", n=20, prefix="fx")
    src = SourceConfig(name="web", kind="files", path=str(tmp_path / "part-*.parquet"))
    assert len(all_documents(src, DataConfig(sources=[src]))) == 40


# --------------------------------------------------------------------------- #
# 2. Mixture proportions
# --------------------------------------------------------------------------- #

def test_mixture_draws_documents_in_proportion_to_weights(files, tok):
    stream = TokenStream(mixture_cfg(files, weights=(3, 1, 1)), tok, seq_len=32)  # normalised: .6/.2/.2
    n = 3000
    counts = collections.Counter(stream.next_document()["source"] for _ in range(n))
    for name, weight in zip(stream.source_names, (0.6, 0.2, 0.2)):
        assert abs(counts[name] / n - weight) < 0.03, counts
    # 3000 draws cycle through every source several times (cycle mode never runs dry).


def test_stop_mode_ends_with_a_clear_error(tmp_path, tok):
    small = write_alpaca(tmp_path / "small.jsonl", n=10)
    cfg = DataConfig(sources=[SourceConfig(name="small", kind="files", path=str(small), format="alpaca")],
                     on_exhausted="stop", heldout_fraction=0.01)
    stream = TokenStream(cfg, tok, seq_len=16)
    with pytest.raises(DataExhausted, match="on_exhausted"):
        for _ in range(1000):
            stream.next_batch(4)


# --------------------------------------------------------------------------- #
# 3. Held-out text never enters training
# --------------------------------------------------------------------------- #

def test_hash_rule_is_stable_and_takes_about_the_fraction():
    docs = [row["text"] for row in fineweb_rows(2000)]
    share = sum(is_heldout(d, 0.1) for d in docs) / len(docs)
    assert 0.07 < share < 0.13
    # Pinned: a change of hash would silently move documents between train and eval.
    assert [is_heldout(f"doc {i}", 0.5) for i in range(8)] == [False, True, False, False, True, False, False, True]
    assert is_heldout("hello world", 0.53) is True and is_heldout("hello world", 0.52) is False  # digest 0.5294


def test_heldout_documents_never_appear_in_training_batches(files, tok):
    cfg = mixture_cfg(files, heldout_fraction=0.1)
    held = {name: {m for d in texts(source_documents(src, cfg, "heldout")) for m in markers(d)}
            for name, src in zip(("fineweb", "alpaca", "wikitext"), cfg.sources)}
    assert all(held.values()), held
    all_held = set().union(*held.values())
    # Enough batches to cycle through every source several times.
    seen = markers(decoded_stream(TokenStream(cfg, tok, seq_len=64), tok, n_batches=150, batch_size=16))
    assert len(seen) > 450  # most training documents did appear ...
    assert not seen & all_held  # ... and no held-out one did
    evals = heldout_batches(cfg, tok, seq_len=32, n_batches=2, batch_size=2)
    assert list(evals) == ["fineweb", "alpaca", "wikitext"]
    for name, batches in evals.items():
        assert 1 <= len(batches) <= 2 and all(b.shape == (2, 33) and b.dtype == torch.int64 for b in batches)
        in_eval = markers(tok.decode(torch.cat([b.flatten() for b in batches])))
        assert in_eval and in_eval <= held[name]


def test_eval_split_mode_uses_the_split_and_trains_on_all_of_path(tmp_path, tok):
    train = write_fineweb(tmp_path / "train.parquet", n=120, prefix="fw")
    valid = write_fineweb(tmp_path / "valid.parquet", n=40, prefix="fv")
    src = SourceConfig(name="web", kind="files", path=str(train), eval_split=str(valid))
    cfg = DataConfig(sources=[src], heldout_fraction=0.5)
    assert len(texts(source_documents(src, cfg, "train"))) == 120  # no hash filter
    seen = markers(decoded_stream(TokenStream(cfg, tok, seq_len=64), tok, n_batches=60))
    assert {m[:2] for m in seen} == {"fw"} and len(seen) == 120
    eval_text = tok.decode(torch.cat([b.flatten() for b in heldout_batches(cfg, tok, 64, 2, 4)["web"]]))
    assert eval_text.startswith("Document fv00000.")  # deterministic: the split's first documents


def test_eval_batches_are_deterministic_and_capped(files, tok):
    cfg = mixture_cfg(files, heldout_fraction=0.1)
    first = heldout_batches(cfg, tok, seq_len=16, n_batches=50, batch_size=2)
    again = heldout_batches(cfg, tok, seq_len=16, n_batches=50, batch_size=2)
    for src in cfg.sources:
        assert all(torch.equal(a, b) for a, b in zip(first[src.name], again[src.name]))
        # Too little held-out text for 50 batches: as many full batches as exist.
        n_tokens = sum(len(tok.encode(d)) + 1 for d in texts(source_documents(src, cfg, "heldout")))
        assert len(first[src.name]) == min(50, n_tokens // (2 * 17)) >= 1
    assert min(len(b) for b in first.values()) < 50


def test_too_little_heldout_text_is_a_user_error(tmp_path, tok):
    small = write_alpaca(tmp_path / "small.jsonl", n=30)
    cfg = DataConfig(sources=[SourceConfig(name="tiny", kind="files", path=str(small), format="alpaca")],
                     heldout_fraction=0.05)
    with pytest.raises(UserError, match=r"'tiny'.*fewer than one evaluation batch"):
        heldout_batches(cfg, tok, seq_len=256, n_batches=1, batch_size=64)


# --------------------------------------------------------------------------- #
# 4. Packing and exact resume
# --------------------------------------------------------------------------- #

def test_packing_concatenates_documents_with_eot_and_never_truncates(files, tok):
    src = SourceConfig(name="alpaca", kind="files", path=str(files["alpaca"]), format="alpaca")
    cfg = DataConfig(sources=[src], on_exhausted="stop")
    stream = TokenStream(cfg, tok, seq_len=7)
    tokens = torch.cat([stream.next_batch(3).flatten() for _ in range(40)]).tolist()
    expected = []
    for doc in texts(source_documents(src, cfg, "train")):
        expected += tok.encode(doc) + [tok.eot_id]
    assert tokens == expected[:len(tokens)]


def assert_plain_python(value):
    """Only what a checkpoint (torch.load weights_only) and a YAML/JSON dump can hold."""
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value)
        for v in value.values():
            assert_plain_python(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain_python(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


def _roundtrip(stream_factory, warmup: int, k: int, batch_size: int):
    stream = stream_factory()
    for _ in range(warmup):
        stream.next_batch(batch_size)
    state = stream.state_dict()
    assert_plain_python(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the checkpoint path: weights_only load of plain python
    after = [stream.next_batch(batch_size) for _ in range(k)]
    buffer.seek(0)
    restored = stream_factory()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict() == state
    again = [restored.next_batch(batch_size) for _ in range(k)]
    assert all(torch.equal(a, b) for a, b in zip(after, again))
    return state


def test_state_roundtrip_gives_identical_batches(files, tok):
    cfg = mixture_cfg(files)
    factory = lambda: TokenStream(cfg, tok, seq_len=16)  # noqa: E731
    for warmup in (0, 3, 37):
        state = _roundtrip(factory, warmup=warmup, k=12, batch_size=4)
    assert state["pending_tokens"]  # saved mid-document: leftovers carried
    assert state["sources"] == ["fineweb", "alpaca", "wikitext"]


# slow: builds the built-in corpora, which parses the standard library (~5 s of CPU)
@pytest.mark.slow
def test_state_roundtrip_after_sources_cycle(tmp_path, tok):
    small = write_alpaca(tmp_path / "small.jsonl", n=12)
    cfg = DataConfig(sources=[
        SourceConfig(name="small", kind="files", path=str(small), format="alpaca", weight=1),
        SourceConfig(name="prose", kind="builtin", path="prose", weight=1),
    ], heldout_fraction=0.01)
    factory = lambda: TokenStream(cfg, tok, seq_len=64)  # noqa: E731
    _roundtrip(factory, warmup=60, k=20, batch_size=4)  # 'small' has wrapped around several times


def test_state_loaded_twice_and_mismatched_sources(files, tok):
    cfg = mixture_cfg(files)
    stream = TokenStream(cfg, tok, seq_len=16)
    stream.next_batch(4)
    state = stream.state_dict()
    expected = stream.next_batch(4)
    stream.load_state_dict(state)  # rewinding a stream that already iterated
    assert torch.equal(stream.next_batch(4), expected)
    following = [stream.next_batch(4) for _ in range(3)]
    stream.load_state_dict(state)
    stream.next_batch(4)
    stream.close()  # closing keeps the position: reading on continues where it was
    assert all(torch.equal(stream.next_batch(4), b) for b in following)
    other = TokenStream(DataConfig(sources=[cfg.sources[0]]), tok, seq_len=16)
    with pytest.raises(UserError, match="data state is for sources"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- #
# 5. Unreachable Hub, missing column
# --------------------------------------------------------------------------- #

@pytest.fixture
def offline(monkeypatch):
    """Offline mode: the Hub client refuses at once instead of trying the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "HUB_BACKOFF_S", 0.0)


def test_unreachable_hub_is_one_clear_user_error(offline, tok):
    cfg = DataConfig(sources=[SourceConfig(name="fineweb", kind="hf", path="HuggingFaceFW/fineweb",
                                           config="sample-10BT")])
    for build in (lambda: TokenStream(cfg, tok, 16), lambda: heldout_batches(cfg, tok, 16, 1, 2)):
        with pytest.raises(UserError) as err:
            build()
        message = str(err.value)
        assert "'fineweb'" in message and "HuggingFaceFW/fineweb" in message
        assert "--config local.yaml" in message and "kind: files" in message


def test_transient_hub_errors_are_retried(monkeypatch, tmp_path, tok):
    path = write_fineweb(tmp_path / "web.parquet", n=50)
    calls = []

    def flaky_load(*args, **kwargs):
        calls.append(args)
        if len(calls) < 3:
            raise ConnectionError("temporary failure in name resolution")
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)

    monkeypatch.setattr(sources, "HUB_BACKOFF_S", 0.0)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "load_dataset", flaky_load)
    cfg = DataConfig(sources=[SourceConfig(name="web", kind="hf", path="org/web")], retry_minutes=0.002)
    assert TokenStream(cfg, tok, 16).next_batch(2).shape == (2, 17)
    assert len(calls) == 3

    def dead_load(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("network is unreachable")

    calls.clear()
    monkeypatch.setattr(sources, "HUB_BACKOFF_S", 0.01)
    monkeypatch.setattr(sources, "load_dataset", dead_load)
    with pytest.raises(UserError, match=r"'web' \(hf: org/web\) cannot be reached(.|\n)*data.retry_minutes"):
        TokenStream(cfg, tok, 16)
    assert len(calls) > 2, "retried until data.retry_minutes"

    def missing_load(*args, **kwargs):
        calls.append(args)
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/web' doesn't exist on the Hub")

    calls.clear()
    monkeypatch.setattr(sources, "load_dataset", missing_load)
    with pytest.raises(UserError, match=r"'web' \(hf: org/web\) was not found(.|\n)*local.yaml"):
        TokenStream(cfg, tok, 16)
    assert len(calls) == 1  # retrying cannot make it exist


def test_missing_text_column_names_source_field_and_columns(files, tok):
    cfg = DataConfig(sources=[SourceConfig(name="fineweb", kind="files", path=str(files["fineweb"]),
                                           text_field="body")])
    with pytest.raises(UserError) as err:
        TokenStream(cfg, tok, 16)
    message = str(err.value)
    assert "'fineweb'" in message and "'body'" in message
    assert "text, id, dump, url" in message


def test_alpaca_format_on_a_text_file_names_the_missing_columns(files, tok):
    cfg = DataConfig(sources=[SourceConfig(name="web", kind="files", path=str(files["fineweb"]),
                                           format="alpaca")])
    with pytest.raises(UserError, match="'instruction', 'output'"):
        TokenStream(cfg, tok, 16)


def test_unreadable_local_file_is_a_user_error(tmp_path, tok):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    cfg = DataConfig(sources=[SourceConfig(name="broken", kind="files", path=str(bad))])
    with pytest.raises(UserError, match="'broken'"):
        TokenStream(cfg, tok, 16)


# --------------------------------------------------------------------------- #
# 6. Built-in corpus and validation
# --------------------------------------------------------------------------- #

# slow: builds the built-in corpora, which parses the standard library (~5 s of CPU)
@pytest.mark.slow
def test_builtin_corpora_are_sizeable_and_deterministic():
    for name in ("prose", "code"):
        corpus = builtin_corpus(name)
        size = sum(len(t) for t in corpus["text"])
        assert size > 1_000_000, (name, size)
        assert all(t.strip() for t in corpus["text"][:100])
    assert "def " in builtin_corpus("code")[0]["text"] or "import" in builtin_corpus("code")[0]["text"]
    # Same order on every call (sorted paths, sorted topics).
    nemoe.builtin_corpus._stdlib_files.cache_clear()
    builtin_corpus.cache_clear()
    assert builtin_corpus("code")["text"][:50] == builtin_corpus("code")["text"][:50]


# slow: builds the built-in corpora, which parses the standard library (~5 s of CPU)
@pytest.mark.slow
def test_builtin_default_mixture_makes_batches(tok):
    cfg = DataConfig()
    stream = TokenStream(cfg, tok, seq_len=32)
    batch = stream.next_batch(8)
    assert batch.shape == (8, 33) and batch.dtype == torch.int64
    assert 0 <= int(batch.min()) and int(batch.max()) < tok.n_vocab
    evals = heldout_batches(cfg, tok, seq_len=32, n_batches=2, batch_size=8)
    assert set(evals) == {"prose", "code"} and all(len(b) == 2 for b in evals.values())


def test_validate_collects_every_problem(tmp_path):
    cfg = DataConfig(sources=[
        SourceConfig(name="a", kind="hf", path="", weight=0.0),
        SourceConfig(name="a", kind="ftp", path="x", format="markdown", weight=-1.0),
        SourceConfig(name="b", kind="files", path=str(tmp_path / "nothing-*.parquet")),
        SourceConfig(name="c", kind="builtin", path="poetry", eval_split="validation"),
        SourceConfig(name="d", kind="files", path=str(write_alpaca(tmp_path / "x.csv", n=1))),
    ], heldout_fraction=1.5, on_exhausted="wait")
    problems = cfg.validate()
    text = "\n".join(problems)
    for expected in ("'a' is used more than once", "data.sources[0].weight must be in (0, inf), got 0",
                     "data.sources[1].weight must be in (0, inf), got -1",
                     "data.sources[1].kind must be one of hf, files, builtin, got 'ftp'",
                     "data.sources[1].format must be one of text, alpaca, wikitext, got 'markdown'",
                     "path is empty", "matches no file", "builtin path must be one of prose, code",
                     "builtin sources have no eval_split", "unsupported type",
                     "data.heldout_fraction must be in (0, 1), got 1.5", "data.on_exhausted must be cycle or stop"):
        assert expected in text, expected
    assert DataConfig(sources=[]).validate() == [
        "data.sources is empty: list at least one source (e.g. {name: prose, kind: builtin, path: prose})"]
    assert DataConfig().validate() == []
    # The same data section in a Config: one pass finds the same problems, raised once.
    with pytest.raises(UserError) as err:
        config_from_dict({"data": dataclasses.asdict(cfg)})
    assert str(err.value).startswith("invalid config:") and sorted(str(err.value).split("\n  - ")[1:]) == sorted(problems)


def test_sources_from_yaml_mappings():
    cfg = DataConfig(sources=[{"name": "web", "kind": "hf", "path": "org/web", "weight": 2}])
    assert cfg.sources == [SourceConfig(name="web", kind="hf", path="org/web", weight=2)]
    with pytest.raises(UserError, match=r"data.sources\[0\].colum: unknown key \(valid keys: name, kind, path"):
        DataConfig(sources=[{"name": "web", "colum": "text"}])
    with pytest.raises(UserError, match=r"data.sources: expected a list, got 'web'"):
        DataConfig(sources="web")


def test_mixed_string_types_interleave(tmp_path, tok):
    # Parquet text is large_string, JSON text is string: interleave refuses them unless cast.
    pd.DataFrame({"text": ["alpha beta", "gamma delta"] * 20}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("\n".join('{"text": "epsilon %d"}' % i for i in range(40)), encoding="utf-8")
    cfg = DataConfig(sources=[SourceConfig(name="a", kind="files", path=str(tmp_path / "a.parquet")),
                              SourceConfig(name="b", kind="files", path=str(tmp_path / "b.jsonl"))],
                     heldout_fraction=0.2)
    assert TokenStream(cfg, tok, 8).next_batch(4).shape == (4, 9)


def test_non_utf8_text_file_is_read_with_replacement_and_reported(tmp_path, tok, capsys):
    path = tmp_path / "latin1.txt"
    good = "".join(f"Paragraph number {i} is plain English text.\n\n" for i in range(60))
    path.write_bytes(good.encode() + "Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet.\n\n".encode("latin-1") + good.encode())
    cfg = DataConfig(sources=[SourceConfig(name="latin", kind="files", path=str(path))], heldout_fraction=0.05)
    stream = TokenStream(cfg, tok, seq_len=16)
    text = "".join(tok.decode(stream.next_batch(4)[:, :-1].flatten()) for _ in range(40))
    assert "\ufffd" in text, "undecodable bytes are read as U+FFFD"
    assert "latin1.txt is not valid UTF-8" in capsys.readouterr().err
