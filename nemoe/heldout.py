"""Held-out evaluation sets: each source's held-out documents (nemoe/sources.py: the hash rule or
its eval split) packed into fixed batches, at most data.heldout_doc_tokens of each document."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemoe.errors import UserError
from nemoe.sources import DataConfig, SourceConfig, _describe, _guarded, source_documents


def heldout_batches(cfg: DataConfig, tokenizer, seq_len: int, n_batches: int,
                    batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Fixed evaluation batches per source name, each (B, seq_len+1), from that source's held-out text.

    Deterministic: the first held-out documents of each source (in corpus order, or in the
    fixed held-out permutation under data.shuffle), packed like training data, at most
    data.heldout_doc_tokens of each. A source with too little held-out text gives fewer
    batches (at least one).
    """
    return {name: held.batches for name, held in heldout_sets(cfg, tokenizer, seq_len, n_batches, batch_size).items()}


@dataclass
class HeldOut:
    batches: list[torch.Tensor]
    documents: int
    """How many documents the batches' tokens come from."""

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def describe_heldout(sets: dict[str, HeldOut]) -> str:
    """"prose 76 documents, 32,896 tokens; code ..." (the run's log, the comparison report)."""
    return "; ".join(f"{name} {held.documents:,} document{'s' * (held.documents != 1)}, {held.tokens:,} tokens"
                     for name, held in sets.items())


def heldout_sets(cfg: DataConfig, tokenizer, seq_len: int, n_batches: int, batch_size: int) -> dict[str, HeldOut]:
    """heldout_batches with each source's document count."""
    return {src.name: _source_heldout(src, cfg, tokenizer, seq_len + 1, n_batches, batch_size)
            for src in cfg.sources}


def _source_heldout(src: SourceConfig, cfg: DataConfig, tokenizer, block_len: int,
                    n_batches: int, batch_size: int) -> HeldOut:
    batch_tokens = batch_size * block_len
    documents = source_documents(src, cfg, "heldout")

    def collect() -> tuple[list[int], list[int]]:   # from the first held-out document again on every attempt
        tokens: list[int] = []
        ends: list[int] = []  # where each document's tokens end
        for doc in documents:
            ids = tokenizer.encode(doc["text"]) + [tokenizer.eot_id]
            tokens += ids[:cfg.heldout_doc_tokens] if cfg.heldout_doc_tokens else ids
            ends.append(len(tokens))
            if len(tokens) >= n_batches * batch_tokens:
                break
        return tokens, ends
    tokens, ends = _guarded(collect, src, cfg)
    n_full = min(n_batches, len(tokens) // batch_tokens)
    if n_full == 0:
        rule = f"split {src.eval_split!r}" if src.eval_split else f"heldout_fraction {cfg.heldout_fraction}"
        raise UserError(f"{_describe(src)}: its held-out text ({rule}) has {len(tokens)} tokens, fewer than one "
                        f"evaluation batch ({batch_size} x {block_len} = {batch_tokens}); raise "
                        "data.heldout_fraction, give the source an eval_split, or lower eval.batch_size")
    used = n_full * batch_tokens
    blocks = torch.tensor(tokens[:used], dtype=torch.int64)
    return HeldOut(list(blocks.view(n_full, batch_size, block_len).unbind(0)),
                   documents=sum(1 for start in [0] + ends[:-1] if start < used))
