"""The `data` section of the run config: the sources of the training mixture and how they are read.

What a source may say and the rules across its fields; opening and mixing the sources is
nemoe/sources.py, the document formats and the held-out rule nemoe/documents.py. Fields follow
nemoe/config/lib.py's conventions (see nemoe/config/__init__.py).
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from nemoe.config import lib as configlib
from nemoe.config.lib import setting
from nemoe.errors import UserError

FILE_LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
# data.tokenizer bytes: a larger LM head than this is only padding, and a sign of a forgotten model.vocab_size.
BYTES_MAX_VOCAB = 1024
# The built-in corpora (nemoe/builtin_corpus.py builds them): a builtin source's path names one.
BUILTIN_CORPORA = ("prose", "code", "docs", "docstrings", "code_net", "code_core")


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
    files = matching_files(pattern)
    if not files:
        return [f"{pattern!r} matches no file (relative paths start at {os.getcwd()})"]
    loaders = {loader_for(f) for f in files}
    if None in loaders:
        return [f"{pattern!r} matches files of an unsupported type; use {', '.join(FILE_LOADERS)}"]
    if len(loaders) > 1:
        return [f"{pattern!r} mixes file types ({', '.join(sorted(loaders))}); use one type per source"]
    return []


def matching_files(pattern: str) -> list[str]:
    if is_url(pattern):
        return [pattern]  # one file; checked when it is opened
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))


def loader_for(path: str) -> str | None:
    return FILE_LOADERS.get(Path(urlparse(path).path if is_url(path) else path).suffix.lower())
