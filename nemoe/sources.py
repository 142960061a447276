"""Data sources: loading and the mixture (their settings: nemoe/config/data.py; formats and the
held-out rule: nemoe/documents.py).

Pipeline (DESIGN section 6), per source:

    load (hf hub / local or http(s) files / built-in corpus), streaming
    -> documents {"text", "source"}      format: text field, alpaca template, wikitext articles
    -> held-out rule                      the source's eval split, else a hash of the text
    -> repeat forever (on_exhausted: cycle)
then `interleave_datasets` draws each next document from a source chosen at random
with the configured weights. `nemoe.data.TokenStream` turns the mixture into packed
token blocks.

Parquet sources are split into one `datasets` shard per row group
(`IterableDataset.reshard()`), so a stream state that points into the middle of a
large file resumes by opening that row group, not by reading every row before it.
"""

from __future__ import annotations

import codecs
import os
import sys
import time

import datasets
from datasets import Features, IterableDataset, Value, interleave_datasets, load_dataset

from nemoe import faults
from nemoe.builtin_corpus import builtin_corpus
from nemoe.config import lib as configlib
from nemoe.config.data import DataConfig, SourceConfig, is_url, loader_for, matching_files
from nemoe.documents import format_batch, is_heldout, required_columns
from nemoe.errors import UserError
from nemoe.faults import brief as _brief, duration as _duration

DOC_FEATURES = Features({"text": Value("string"), "source": Value("string")})

# Start-up reads that fail: the first back-off delay (doubling) and its cap; they go on for up to
# data.retry_minutes. Tests patch these.
HUB_BACKOFF_S = 2.0
HUB_MAX_BACKOFF_S = 120.0
# Rows per batched formatting call. WikiText rows are lines and articles are grouped
# within one call, so an article that straddles two calls becomes two documents:
# larger calls cut fewer articles (WikiText-103 averages ~60 lines per article).
MAP_BATCH_ROWS = 256
WIKITEXT_BATCH_ROWS = 2048


def _weights(cfg: DataConfig) -> list[float]:
    total = sum(s.weight for s in cfg.sources)
    return [s.weight / total for s in cfg.sources]


# --------------------------------------------------------------------------- #
# Opening sources (errors a user can cause become UserErrors that name the source)
# --------------------------------------------------------------------------- #

def _describe(src: SourceConfig) -> str:
    config = f", config {src.config}" if src.config else ""
    return f"data source {src.name!r} ({src.kind}: {src.path}{config})"


def _failure_message(src: SourceConfig, err: BaseException, kind: str) -> str:
    if kind == "data":
        return (f"{_describe(src)} cannot be parsed: {_brief(err)}. Check that its files are "
                f"{src.format} data of the type their names say (fix or remove the file)")
    what = "was not found or is not accessible" if kind == "not_found" else "cannot be reached"
    if src.kind != "hf":
        return f"{_describe(src)} {what}: {_brief(err)}"
    hint = ("Check its path and config against huggingface.co (a gated dataset needs "
            "`huggingface-cli login`). To train without it, " if kind == "not_found"
            else "Without access to the Hugging Face Hub, ")
    return (f"{_describe(src)} {what}: {type(err).__name__}: {err}\n{hint}train on the built-in corpus "
            "with `--config local.yaml`, or point this source at local copies of the data with "
            "`kind: files` and `path: <file or glob>`.")


def _with_retries(action, src: SourceConfig, cfg: DataConfig):
    """Run a start-up read of `src` (opening it, its first row, its held-out text): a transport
    failure (nemoe/faults.py) is retried with a doubling back-off for up to data.retry_minutes,
    then, like any other access or parse error, it becomes one UserError naming the source."""
    since, attempt = time.monotonic(), 0
    while True:
        try:
            return action()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 -- classified below; anything else re-raises
            kind = faults.classify(err)
            if kind is None:
                raise
            if kind == "retry" and src.kind == "hf" and datasets.config.HF_HUB_OFFLINE:
                kind = "unreachable"   # offline mode: the client refuses at once, every time
            if kind != "retry":
                raise UserError(_failure_message(src, err, kind)) from None
            waited = time.monotonic() - since
            left = cfg.retry_minutes * 60 - waited
            if left <= 0:
                raise UserError(
                    f"{_describe(src)} cannot be reached: reading it failed for {_duration(waited)}, longer than "
                    f"data.retry_minutes ({cfg.retry_minutes:g}); last error: {_brief(err)}. Nothing was "
                    "lost: run the same command again (with --resume to continue a run) once it is reachable"
                ) from None
            delay = min(HUB_BACKOFF_S * 2**attempt, HUB_MAX_BACKOFF_S, left)
            attempt += 1
            # A formatted string, not `err` itself: a record holding the exception would keep
            # every frame of its traceback (and their streams) alive.
            print(f"warning: {_describe(src)}: {_brief(err)}; retrying in {delay:.1f} s (attempt {attempt}; "
                  f"gives up in {_duration(left)}, data.retry_minutes {cfg.retry_minutes:g})",
                  file=sys.stderr, flush=True)
            time.sleep(delay)


def source_of_error(err: BaseException, sources: list[SourceConfig]) -> str:
    """Which source a read error came from, for the retry log line ("the training data" when unknown).

    The error's traceback (and those of its causes) passes through the `datasets` loader
    that was reading: its local `file` (or `files`) names the file or URL, which belongs
    to one source's path (a `files` pattern's matches, or the Hub id inside an hf:// path).
    """
    for name in _files_in_traceback(err):
        for src in sources:
            if src.kind == "hf" and src.path and src.path in name:
                return _describe(src)
            if src.kind == "files":
                patterns = [p for p in (src.path, src.eval_split) if p]
                if any(name == f or os.path.abspath(name) == os.path.abspath(f)
                       for p in patterns for f in matching_files(p)):
                    return _describe(src)
    return "the training data"


def _files_in_traceback(err: BaseException) -> list[str]:
    names, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals
            file, files = local.get("file"), local.get("files")
            if isinstance(file, str):
                names.append(file)
            elif isinstance(files, (list, tuple)) and files and isinstance(files[0], str):
                names.append(files[0])
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return names[::-1]  # innermost first


def _is_utf8(path: str, chunk: int = 1 << 20) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _load_raw(src: SourceConfig, part: str, reshard: bool = True, strict: bool = True,
              order_seed: int | None = None, max_chars: int = 0) -> IterableDataset:
    """The source's raw rows, streaming; `part` is "train" or "heldout" (its eval split).

    order_seed: read the rows in the permutation this seed draws (builtin and local files
    sources; see DataConfig.shuffle), None: in corpus order. max_chars: builtin documents cut
    into pieces of at most this many characters (DataConfig.max_doc_chars; 0: whole).

    reshard: parquet files become one shard per row group (a no-op for other formats), so
    resuming skips whole row groups instead of reading them; False gives the layout that
    stream states written before row-group shards (no "shards" key) point into.
    strict (start-up): a bad option or pattern is a UserError naming the source, and the
    non-UTF-8 warning is printed. Read failures propagate: source_documents retries them.
    """
    if src.kind == "builtin":
        corpus = builtin_corpus(src.path, max_chars)
        return (corpus if order_seed is None else corpus.shuffle(seed=order_seed)).to_iterable_dataset(num_shards=1)
    if src.kind == "files":
        pattern = src.eval_split if part == "heldout" and src.eval_split else src.path
        files = matching_files(pattern)
        if not files:
            raise UserError(f"{_describe(src)}: no file matches {pattern!r}")
        loader = loader_for(files[0])
        options = {}
        if loader == "text":
            # Undecodable bytes become U+FFFD instead of ending the run; say which files have them.
            options = {"sample_by": "paragraph", "encoding_errors": "replace"}
            for path in files if strict else ():
                if not is_url(path) and not _is_utf8(path):
                    print(f"warning: {_describe(src)}: {path} is not valid UTF-8; undecodable bytes "
                          f"are read as U+FFFD", file=sys.stderr, flush=True)
        try:
            if order_seed is not None:  # an indexable copy (the `datasets` cache), read permuted
                table = load_dataset(loader, data_files=files, split="train", **options)
                return table.shuffle(seed=order_seed).to_iterable_dataset(num_shards=1)
            raw = load_dataset(loader, data_files=files, split="train", streaming=True, **options)
            return raw.reshard() if reshard else raw
        except ValueError as err:
            if not strict or faults.classify(err) is not None:
                raise  # a read that failed: classified by the caller
            raise UserError(f"{_describe(src)}: cannot read {pattern!r}: {type(err).__name__}: {err}") from None
    split = src.eval_split if part == "heldout" and src.eval_split else src.split
    try:
        raw = load_dataset(src.path, src.config, split=split, streaming=True)
        return raw.reshard() if reshard else raw
    except ValueError as err:
        if faults.classify(err) is not None:
            raise
        raise UserError(f"{_describe(src)}: {err}") from None  # unknown config or split name


def _first_row(ds: IterableDataset) -> dict | None:
    """The first row of `ds` (None when empty); errors propagate."""
    rows = iter(ds)
    try:
        return next(rows, None)
    finally:
        rows.close()  # end the probe now rather than at garbage collection


def _guarded(action, src: SourceConfig, cfg: DataConfig, strict: bool = True):
    """`action()`: at start-up (strict) under the retries and messages of _with_retries."""
    return _with_retries(action, src, cfg) if strict and src.kind != "builtin" else action()


def source_documents(src: SourceConfig, cfg: DataConfig, part: str, reshard: bool = True,
                     strict: bool = True) -> IterableDataset:
    """One source as a stream of {"text", "source"} documents; part "train" or "heldout".
    reshard: see _load_raw. strict (start-up): read failures are retried (_with_retries) and
    errors a user can cause become UserErrors naming the source; False (a reopen after a read
    fault): errors propagate as they are, for the caller's retries."""
    def load():
        raw = _load_raw(src, part, reshard, strict, _order_seed(src, cfg, part), cfg.max_doc_chars)
        if raw.column_names is not None:
            return raw, raw.column_names
        first = _first_row(raw)   # the loader does not declare them: read the first row
        return raw, list(first) if first is not None else required_columns(src)
    raw, columns = _guarded(load, src, cfg, strict)
    missing = [c for c in required_columns(src) if c not in columns]
    if missing:
        raise UserError(f"{_describe(src)} has no column {', '.join(map(repr, missing))} "
                        f"(format {src.format}); its columns are: {', '.join(columns)}. "
                        "Set text_field to the column holding the text.")
    docs = raw.map(format_batch, batched=True, fn_kwargs={"src": src}, remove_columns=columns,
                   batch_size=WIKITEXT_BATCH_ROWS if src.format == "wikitext" else MAP_BATCH_ROWS,
                   features=DOC_FEATURES)
    if src.eval_split is None:  # the hash rule splits this source's own stream
        keep_heldout = part == "heldout"
        docs = docs.filter(lambda doc: is_heldout(doc["text"], cfg.heldout_fraction) == keep_heldout)
    return docs


def _order_seed(src: SourceConfig, cfg: DataConfig, part: str) -> int | None:
    """The permutation a shuffled source is read in: per source from the data seed for training,
    one fixed permutation for held-out documents (the same evaluation set for every run seed)."""
    if not cfg.shuffle:
        return None
    return configlib.derive_seed(0 if part == "heldout" or cfg.seed is None else cfg.seed, f"data/{src.name}/{part}")


def training_mixture(cfg: DataConfig, reshard: bool = True, strict: bool = True) -> IterableDataset:
    """All sources' training documents interleaved by weight (a `datasets` IterableDataset).
    strict: also check that every source yields a training document (see _load_raw)."""
    parts = []
    for src in cfg.sources:
        docs = source_documents(src, cfg, "train", reshard, strict)
        if strict and _guarded(lambda: _first_row(docs), src, cfg) is None:
            raise UserError(f"{_describe(src)} yields no training documents (is it empty, or all held out?)")
        parts.append(docs.repeat(None) if cfg.on_exhausted == "cycle" else docs)
    # With every source repeating forever, "first_exhausted" never triggers under "cycle";
    # under "stop" it ends the mixture when any source runs out, keeping the proportions honest.
    seed = 0 if cfg.seed is None else cfg.seed  # None only for a DataConfig used outside a Config
    return interleave_datasets(parts, probabilities=_weights(cfg), seed=seed,
                               stopping_strategy="first_exhausted")
