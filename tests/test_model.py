"""Invariant 1: a causal language model with shifted targets."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemoe import model as model_module
from nemoe.model import NemoeLM, split_block
from tests.conftest import tiny_config


def test_targets_are_inputs_shifted_by_one():
    block = torch.arange(20).view(2, 10)
    inputs, targets = split_block(block)
    assert inputs.shape == targets.shape == (2, 9)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets[:, -1], block[:, -1])


@pytest.mark.parametrize("top_k", [1, 2])
def test_future_tokens_never_change_past_logits(top_k):
    cfg = tiny_config(moe={"top_k": top_k})
    model = NemoeLM(cfg).eval()
    x = torch.randint(0, 32, (2, 16))
    base = model(x).logits
    for t in (0, 5, 14):
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 32
        out = model(changed).logits
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"logits at <= {t} changed"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def _fit_random_tokens(model, vocab, steps=150, seq=16):
    """Train on fresh i.i.d. uniform tokens each step; return the held-out loss."""
    gen = torch.Generator().manual_seed(1)
    heldout = torch.randint(0, vocab, (64, seq + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        out = model(*split_block(torch.randint(0, vocab, (16, seq + 1), generator=gen)))
        (out.loss_ce + 0.01 * out.loss_lb).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(*split_block(heldout)).loss_ce.item()


def test_random_tokens_cannot_beat_log_vocab():
    vocab = 16
    cfg = tiny_config(model={"vocab_size": vocab, "dropout": 0.0})
    heldout = _fit_random_tokens(NemoeLM(cfg), vocab)
    assert heldout >= math.log(vocab) - 0.05


def test_random_token_check_catches_a_missing_causal_mask(monkeypatch):
    """Negative control: the same check fails for a model that can see the future."""
    vocab = 16
    sdpa = F.scaled_dot_product_attention

    def leaky(q, k, v, is_causal=False, **kw):
        return sdpa(q, k, v, is_causal=False, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", leaky)
    cfg = tiny_config(model={"vocab_size": vocab, "dropout": 0.0})
    heldout = _fit_random_tokens(NemoeLM(cfg), vocab)
    assert heldout < math.log(vocab) - 0.5


def test_param_counts():
    cfg = tiny_config()
    counts = NemoeLM(cfg).count_params()
    assert counts["total"] > counts["live"] > counts["active_per_token"] > 0
