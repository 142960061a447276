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


# Past logits may change by rounding only. A changed future token goes to other experts,
# so a past token is computed in a slice of another length, at another offset, and a
# matmul may sum it in another order: bit-identical fp32 results across slice lengths
# are not a property of the model, so this test does not ask for them. It runs the
# model in float64 (rounding ~1e-16 relative; the router's fp32 logits see the same
# input unless that moved, and would then move a gate by ~1e-7 relative at most) and
# allows 1e-9. A real leak moves past logits by > 1e-3 here
# (test_causality_check_catches_a_missing_causal_mask), six orders of magnitude more.
PAST_TOLERANCE = 1e-9
FUTURE_CHANGES = (0, 5, 14)   # change the token at t + 1, compare positions <= t


def future_token_changes(model):
    """For each t in FUTURE_CHANGES: (largest change of a logit at a position <= t,
    largest change at t + 1, whether any layer's per-expert token counts changed)."""
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
        results = []
        for t in FUTURE_CHANGES:
            changed = x.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 7) % 32
            out = model(changed)
            past = (out.logits[:, : t + 1] - base.logits[:, : t + 1]).abs().max().item()
            now = (out.logits[:, t + 1] - base.logits[:, t + 1]).abs().max().item()
            rerouted = any(not torch.equal(a, b) for a, b in zip(base.counts, out.counts))
            results.append((past, now, rerouted))
    return results


def causality_model(top_k):
    """Four live experts, more than top_k: a changed future token goes to other experts,
    so the per-expert slices change length and past tokens sit at other offsets in them."""
    cfg = tiny_config(moe={"top_k": top_k, "experts_init": 4, "experts_min": 2, "experts_max": 4})
    return NemoeLM(cfg).eval().double()


@pytest.mark.parametrize("top_k", [1, 2])
def test_future_tokens_never_change_past_logits(top_k):
    for t, (past, now, rerouted) in zip(FUTURE_CHANGES, future_token_changes(causality_model(top_k))):
        assert past <= PAST_TOLERANCE, f"logits at <= {t} changed by {past:.3g}"
        assert now > 1e-3, f"the changed token at {t + 1} should change its own logits"
        assert rerouted, f"changing token {t + 1} must change the per-expert counts (the path under test)"


@pytest.mark.parametrize("top_k", [1, 2])
def test_causality_check_catches_a_missing_causal_mask(top_k, monkeypatch):
    """Negative control: with attention that sees the future, past logits move far beyond the tolerance."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, is_causal=False, **kw: sdpa(q, k, v, is_causal=False, **kw))
    for past, _, _ in future_token_changes(causality_model(top_k)):
        assert past > 1e6 * PAST_TOLERANCE


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
