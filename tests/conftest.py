"""Shared fixtures: tiny configs and models (CPU, fp32, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from nemoe.config import config_from_dict

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def tiny_config(**sections):
    """A tiny valid Config; `sections` override whole keys, e.g. moe={"top_k": 2}."""
    raw = {
        "model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 16,
                  "d_expert": 48},
        "moe": {"experts_init": 2, "experts_min": 2, "experts_max": 4, "top_k": 1},
        "train": {"device": "cpu", "seed": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


def act(mechanism, optimizer, step: int, tokens: int = 0, probe_loss=lambda: 1.0, expert_id=None):
    """Run one mechanism's act() as nemoe.plasticity.Plasticity does, outside a trainer."""
    from nemoe.plasticity import ActContext, Probe
    if expert_id is None:
        expert_id = getattr(mechanism, "expert_id", lambda layer, slot: -1)
    return mechanism.act(ActContext(optimizer, step, tokens, Probe(probe_loss), expert_id))
