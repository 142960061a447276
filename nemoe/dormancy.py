"""Dormant expert neurons, measured in every run (plasticity.csv, TensorBoard).

ReDo's activation score (Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep
Reinforcement Learning", eq. 1), per expert: neuron j's mean |h_j| over the tokens
the expert received, divided by the mean of that over the expert's neurons,

    s_j = mean_x |h_j(x)| / ((1/H) sum_k mean_x |h_k(x)|),

and neuron j is tau-dormant when s_j <= tau. An expert is its own two-layer MLP, so
the "layer" of the definition is one expert's hidden layer: each expert is scaled
by its own mean. Per MoE layer the fraction of dormant neurons is taken over the
live experts that received probe tokens (an expert without tokens has no score).

`probe_dormancy` runs the fixed probe batch once through the bare model in eval mode
under no_grad, with its own recorder in place of `ExpertPool.capture` for the pass
(neuron plasticity's recorder comes back after it): no parameter, buffer, optimizer
state, routing count or random stream changes, so training is the same bit for bit
with or without it. The trainer measures at every log row (log.every_steps).
"""

from __future__ import annotations

import contextlib

import torch

from nemoe.model import split_block

TAUS = (0.0, 0.025, 0.1)


def activity_scores(abs_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(E, H) ReDo scores from per-expert sums of |h| over tokens (E, H) and token counts (E,).
    A row without tokens or with all-zero activity scores 0 everywhere."""
    mean = abs_sum.double() / tokens.double().clamp_min(1).unsqueeze(-1)            # (E, H) mean |h|
    return mean / mean.mean(dim=-1, keepdim=True).clamp_min(1e-30)


def dormant_fractions(scores: torch.Tensor, measured: torch.Tensor, taus=TAUS) -> dict[float, float]:
    """tau -> share of the neurons of the `measured` experts (E,) bool with score <= tau."""
    rows = scores[measured]
    if rows.numel() == 0:
        return {}
    return {tau: float((rows <= tau).double().mean()) for tau in taus}


class _Recorder:
    """ExpertPool.capture for one probe pass: sum |h| and tokens per slot."""

    def __init__(self, pool):
        n_slots, _, width = pool.w_in.shape
        self.abs_sum = torch.zeros(n_slots, width, dtype=torch.float64, device=pool.w_in.device)
        self.tokens = torch.zeros(n_slots, dtype=torch.float64, device=pool.w_in.device)

    def __call__(self, slot: int, h: torch.Tensor) -> torch.Tensor:
        self.abs_sum[slot] += h.detach().float().abs().sum(0).double()
        self.tokens[slot] += h.shape[0]
        return h


@torch.no_grad()
def probe_dormancy(model, probe_batch: torch.Tensor, autocast=contextlib.nullcontext, taus=TAUS) -> list[dict]:
    """plasticity.csv rows (granularity neuron, name dormant_<tau>, per layer) on the probe batch."""
    layers = model.moe_layers
    pools = [layer.experts for layer in layers]
    recorders = [_Recorder(pool) for pool in pools]
    saved = [pool.capture for pool in pools]
    was_training = model.training
    device = pools[0].w_in.device
    model.eval()
    try:
        for pool, recorder in zip(pools, recorders):
            pool.capture = recorder
        with autocast():
            model(split_block(probe_batch.to(device))[0])
    finally:
        for pool, capture in zip(pools, saved):
            pool.capture = capture
        model.train(was_training)
    rows = []
    for li, (layer, rec) in enumerate(zip(layers, recorders)):
        measured = layer.active.to(rec.tokens.device) & (rec.tokens > 0)
        fractions = dormant_fractions(activity_scores(rec.abs_sum, rec.tokens), measured, taus)
        rows += [{"granularity": "neuron", "layer": li, "unit": "", "name": f"dormant_{tau:g}", "value": value}
                 for tau, value in fractions.items()]
    return rows
