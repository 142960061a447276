"""Data sources: configuration, loading and the mixture (formats and the held-out rule: nemoe/documents.py).

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
import glob
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import datasets
from datasets import Features, IterableDataset, Value, interleave_datasets, load_dataset

from nemoe import configlib, faults
from nemoe.builtin_corpus import BUILTIN_CORPORA, builtin_corpus
from nemoe.configlib import setting
from nemoe.documents import format_batch, is_heldout, required_columns
from nemoe.errors import UserError
from nemoe.faults import brief as _brief, duration as _duration

FILE_LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
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
# data.tokenizer bytes: a larger LM head than this is only padding, and a sign of a forgotten model.vocab_size.
BYTES_MAX_VOCAB = 1024



# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

@dataclass
class SourceConfig:
    name: str = ""
    """Label of the source in logs and eval.csv; unique within data.sources."""
    kind: Literal["hf", "files", "builtin"] = "hf"
    """Where documents come from: hf (Hugging Face Hub), files (local files) or builtin."""
    path: str = ""
    """hf: dataset id; files: a file path or glob, or an http(s):// URL of one file (.parquet,
    .jsonl/.json, or .txt whose blank-line separated paragraphs are the documents); builtin: prose
    or code."""
    config: str | None = None
    """hf: the dataset's config name (e.g. sample-10BT, wikitext-103-raw-v1)."""
    split: str = "train"
    """hf: the split streamed for training."""
    format: Literal["text", "alpaca", "wikitext"] = "text"
    """text: one field per row; alpaca: instruction/input/output rows become one prompt-response
    document; wikitext: rows are lines, grouped into articles at ' = Title = ' headings."""
    text_field: str = "text"
    """Column holding the document text (format text and wikitext; builtin ignores it)."""
    weight: float = setting(1.0, gt=0, lt=math.inf)
    """Relative share of documents drawn from this source (weights are normalised)."""
    eval_split: str | None = None
    """Held-out text of this source: hf, a split name (e.g. validation); files, a path or glob of
    held-out files. The training stream then uses all of `split`/`path`. None: the hash rule."""


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(name="prose", kind="builtin", path="prose", weight=0.7),
            SourceConfig(name="code", kind="builtin", path="code", weight=0.3)]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = setting(factory=_default_sources, unsafe=True)
    """The mixture; each entry a SourceConfig (or a mapping with its keys)."""
    heldout_fraction: float = setting(0.01, gt=0, lt=1, unsafe=True)
    """Hash rule: the share of a source's documents held out for evaluation (sources without eval_split)."""
    seed: int | None = setting(None, unsafe=True)
    """Seed of the mixture's source choices. None (default): derived from train.seed when the Config
    is built, so each run seed gives its own data order; an explicit value always wins. (A
    DataConfig used on its own, outside a Config, mixes with seed 0 when this is None.)"""
    tokenizer: Literal["gpt2", "bytes"] = setting("gpt2", unsafe=True)
    """How text becomes token ids: gpt2 (GPT-2 BPE, 50257 ids) or bytes (UTF-8 bytes plus
    end-of-text, 257 ids: set model.vocab_size between 257 and 1024, e.g. 320). A run resumes only with
    the tokenizer it was trained with."""
    shuffle: bool = setting(False, unsafe=True)
    """Read builtin and local `files` sources in a random document order drawn from the data seed
    (an exact permutation, so resume stays exact; a source that cycles repeats its permutation).
    Their held-out documents are read in one fixed permutation, the same for every seed, so the
    evaluation set is spread across the corpus and identical across runs. hf and http(s) sources
    stream in their own order and cannot be shuffled. False: corpus order."""
    max_doc_chars: int = setting(0, ge=0, unsafe=True)
    """Builtin sources: documents longer than this many characters are cut at line ends into
    pieces of at most this length, each its own document (shuffled, held out and packed as
    one), so no single file fills a source's stream for hundreds of steps (the built-in code
    corpus has files of up to 757 KB). 0: whole documents. Other kinds are read as they are."""
    heldout_doc_tokens: int = setting(0, ge=0, unsafe=True)
    """At most this many tokens of each held-out document go into the evaluation batches, so they
    are drawn from many documents rather than a few long ones (0: whole documents)."""
    mix_blocks: int = setting(0, ge=0, unsafe=True)
    """Serve the packed training blocks (rows of seq_len+1 tokens) in a seeded random order within
    consecutive windows of this many blocks, so a batch's rows come from many documents instead of
    one stretch of one or two (packed in reading order, a 16 x 256-byte batch is 4 KB of one
    document, and its gradient is that document's). Each window is a permutation, drawn from the
    data seed and the window's index: every block is trained on once, and resume stays exact (it
    re-reads the current window). Memory: one window of int64 tokens. 0: reading order."""
    on_exhausted: Literal["cycle", "stop"] = "cycle"
    """When a source runs out: cycle (start it again) or stop (end training data with an error; the
    run saves a checkpoint and stops)."""
    retry_minutes: float = setting(30.0, ge=0)
    """A read that fails mid-run (connection dropped, HTTP 5xx / 429 after `datasets`' own retries,
    a Drive mount gone) reopens the stream at its exact position and retries with back-off for up
    to this many minutes; past that the run saves a checkpoint and exits 2. Start-up reads (opening
    a source, the held-out text, also on --resume) retry as long, then exit 2 with one line."""
    prefetch_batches: int = setting(8, ge=0)
    """Micro-batches a background thread reads, tokenizes and packs ahead of training (0: read on
    the training thread). The checkpointed position is the last batch training took, not the
    producer's, so resume stays exact."""

    def __post_init__(self):
        """Sources given as mappings (YAML shape) become SourceConfigs; a bad entry is a UserError."""
        problems: list[str] = []
        sources = configlib.coerce(self.sources, list[SourceConfig], "data.sources", problems)
        if problems:
            raise UserError("invalid data config:\n  - " + "\n  - ".join(problems))
        self.sources = sources

    def validate(self) -> list[str]:
        """Every problem with this data config, one readable line each (empty when usable).

        A Config validates its data section itself (config_from_dict); this is for a
        DataConfig built on its own. TokenStream and heldout_batches do not validate.
        """
        return configlib.validate(self, "data")

    def check(self, cfg=None) -> list[str]:
        """The rules across fields: at least one source, unique names, each source's kind-specific rules."""
        problems = []
        if not self.sources:
            problems.append("data.sources is empty: list at least one source "
                            "(e.g. {name: prose, kind: builtin, path: prose})")
        if self.tokenizer == "bytes" and cfg is not None and cfg.model.init_from:
            problems.append("model.init_from starts from a GPT-2 model, which reads GPT-2 tokens: "
                            "set data.tokenizer: gpt2")
        if self.tokenizer == "bytes" and cfg is not None and cfg.model.vocab_size > BYTES_MAX_VOCAB:
            problems.append(f"data.tokenizer is bytes (257 ids) but model.vocab_size is {cfg.model.vocab_size}: "
                            f"set model.vocab_size between 257 and {BYTES_MAX_VOCAB} (e.g. 320)")
        names = [s.name for s in self.sources]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"data.sources: the name {dup!r} is used more than once; names must be unique")
        for i, src in enumerate(self.sources):
            problems += _source_problems(src, f"data.sources[{i}] ({src.name or 'unnamed'})")
            if self.shuffle and not _can_shuffle(src):
                problems.append(f"data.sources[{i}] ({src.name or 'unnamed'}): data.shuffle reads builtin and "
                                f"local files sources in a permuted order; a {src.kind} source"
                                f"{' read over http(s)' if src.kind == 'files' else ''} streams in its own "
                                "order (set data.shuffle: false)")
        return problems


def _source_problems(src: SourceConfig, where: str) -> list[str]:
    """A source's rules beyond its field types and bounds: names, paths, what each kind allows."""
    problems = []
    if not src.name:
        problems.append(f"{where}: name is empty; give every source a unique name")
    if not src.text_field:
        problems.append(f"{where}: text_field is empty")
    if src.kind == "builtin":
        if src.path not in BUILTIN_CORPORA:
            problems.append(f"{where}: builtin path must be one of {', '.join(BUILTIN_CORPORA)}, got {src.path!r}")
        if src.format != "text":
            problems.append(f"{where}: builtin sources have format text, got {src.format!r}")
        if src.eval_split is not None:
            problems.append(f"{where}: builtin sources have no eval_split; the hash rule holds text out")
    elif src.kind == "hf" and not src.path:
        problems.append(f"{where}: path is empty; give the Hub dataset id (e.g. HuggingFaceFW/fineweb)")
    elif src.kind == "files":
        for role, pattern in (("path", src.path), ("eval_split", src.eval_split)):
            if role == "path" or pattern is not None:
                problems += [f"{where}: {role} {msg}" for msg in _file_problems(pattern)]
    return problems


def _can_shuffle(src: SourceConfig) -> bool:
    """Whether a source can be read as an exact permutation (an indexable dataset)."""
    return src.kind == "builtin" or (src.kind == "files" and not any(
        is_url(p) for p in (src.path, src.eval_split) if p))


def is_url(pattern: str) -> bool:
    """An http(s) URL (read through `datasets`' fsspec support) rather than a local path or glob."""
    return urlparse(pattern).scheme in ("http", "https")


def _file_problems(pattern: str) -> list[str]:
    if not pattern:
        return ["is empty; give a file path or glob"]
    if "://" in pattern and not is_url(pattern):
        return [f"{pattern!r}: only http:// and https:// URLs are read (or a local path or glob)"]
    files = _matching_files(pattern)
    if not files:
        return [f"{pattern!r} matches no file (relative paths start at {os.getcwd()})"]
    loaders = {_loader_for(f) for f in files}
    if None in loaders:
        return [f"{pattern!r} matches files of an unsupported type; use {', '.join(FILE_LOADERS)}"]
    if len(loaders) > 1:
        return [f"{pattern!r} mixes file types ({', '.join(sorted(loaders))}); use one type per source"]
    return []


def _matching_files(pattern: str) -> list[str]:
    if is_url(pattern):
        return [pattern]  # one file; checked when it is opened
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))


def _loader_for(path: str) -> str | None:
    return FILE_LOADERS.get(Path(urlparse(path).path if is_url(path) else path).suffix.lower())


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
                       for p in patterns for f in _matching_files(p)):
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
        files = _matching_files(pattern)
        if not files:
            raise UserError(f"{_describe(src)}: no file matches {pattern!r}")
        loader = _loader_for(files[0])
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
