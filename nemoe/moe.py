"""Mixture-of-experts feed-forward layer: router, expert pool, dropless dispatch.

The pool has a fixed number of parameter slots (`experts_max`); which slots are
live is a buffer, so morphogenesis changes values, never shapes. Each slot has a
routing offset added to its router logit:

    offset = 0          a live, graduated expert
    offset = log(r)     a newborn whose routing weight opens linearly, r: 0 -> 1
    offset = -inf       a free slot (never selected, no probability mass)

so a newborn at birth (r = 0) has exactly zero probability and the layer's
function is unchanged; its share grows only as training adapts to it. Which
slots are live is the `active` buffer (a newborn at birth is live with offset
-inf, so the offset alone cannot say it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEAux:
    """What one MoE layer reports besides its output (returned, never stored globally)."""

    lb_loss: torch.Tensor   # () Switch load-balance loss, 1.0 at perfect balance
    z_loss: torch.Tensor    # () router z-loss
    counts: torch.Tensor    # (E,) token-choices routed to each slot in this batch


# model.activation -> F.gelu's `approximate`: exact GELU, or the tanh approximation the released
# GPT-2 checkpoints use (transformers' "gelu_new").
GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


class ExpertPool(nn.Module):
    """`n_slots` two-layer GELU MLPs with their weights stacked on a leading slot axis."""

    def __init__(self, n_slots: int, d_model: int, d_hidden: int, activation: str = "gelu"):
        super().__init__()
        self.approximate = GELU_APPROXIMATE[activation]
        self.w_in = nn.Parameter(torch.empty(n_slots, d_model, d_hidden))
        self.b_in = nn.Parameter(torch.zeros(n_slots, d_hidden))
        self.w_out = nn.Parameter(torch.empty(n_slots, d_hidden, d_model))
        self.b_out = nn.Parameter(torch.zeros(n_slots, d_model))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)
        # capture(slot, h) -> h: set by neuron plasticity to record hidden activations
        # and their gradients; None (one attribute test per expert call) when it is off.
        self.capture = None

    def expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Run one expert on its tokens. x: (n, C) -> (n, C)."""
        return mlp(x, self.w_in[slot], self.b_in[slot], self.w_out[slot], self.b_out[slot], self.capture, slot,
                   self.approximate)

    def per_slot(self) -> list[tuple[torch.Tensor, ...]]:
        """(w_in, b_in, w_out, b_out) of every slot, as views made by one unbind per parameter.

        Why not `w_in[slot]` per expert: each indexing op's backward writes a zero
        gradient of the whole (E, C, H) parameter, so E experts cost O(E^2) memory
        traffic (~2x slower at E=8 on CPU: tools/bench.py, moe_layer); unbind's backward is one stack.
        """
        return list(zip(*(p.unbind(0) for p in (self.w_in, self.b_in, self.w_out, self.b_out))))


def mlp(x: torch.Tensor, w_in, b_in, w_out, b_out, capture=None, slot: int = 0,
        approximate: str = "none") -> torch.Tensor:
    """One expert: a two-layer GELU MLP. x: (n, C) -> (n, C).

    capture: ExpertPool.capture (neuron plasticity's recorder of h and dL/dh), or None;
    approximate: F.gelu's, "none" (exact) or "tanh" (GELU_APPROXIMATE).
    """
    h = F.gelu(x @ w_in + b_in, approximate=approximate)    # (n, H)
    if capture is not None:
        h = capture(slot, h)
    return h @ w_out + b_out       # (n, C)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, n_slots: int, n_active: int, top_k: int,
                 activation: str = "gelu"):
        super().__init__()
        self.n_slots, self.top_k = n_slots, top_k
        self.router = nn.Linear(d_model, n_slots, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = ExpertPool(n_slots, d_model, d_hidden, activation)
        active = torch.zeros(n_slots, dtype=torch.bool)
        active[:n_active] = True
        # Buffers, so they live in the state dict and follow .to(device).
        self.register_buffer("active", active)
        self.register_buffer("route_offset", torch.where(active, 0.0, -math.inf))
        # Token-choices per slot in this training step; ExpertMorphogenesis adds them to its
        # interval counts when the step's update is applied and clears them after every step.
        self.register_buffer("usage_counts", torch.zeros(n_slots, dtype=torch.long))

    def route(self, x: torch.Tensor):
        """Router in fp32. x: (N, C) -> top-k slots (N, k), gates (N, k), aux losses."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())     # (N, E)
            logits = logits + self.route_offset                           # free slots -> -inf
            probs = logits.softmax(dim=-1)                                # (N, E), 0 on free slots
            top_logits, top_idx = logits.topk(self.top_k, dim=-1)        # (N, k)
            if self.top_k == 1:
                # Switch Transformer (Fedus et al. 2021, eq. 2): gate = p_i, so the
                # router gets a gradient from the LM loss.
                gates = probs.gather(1, top_idx)
            else:
                # Mixtral-style: softmax over the selected logits only, so experts
                # that were not selected (e.g. one being pruned) cannot change a gate.
                gates = top_logits.softmax(dim=-1)
            counts = torch.bincount(top_idx.flatten(), minlength=self.n_slots)  # (E,) int64
            n_live = self.active.sum()
            # Switch load-balance loss: E * sum_i f_i * P_i with f_i the share of the
            # N*k token-choices sent to expert i; = 1 under perfectly even routing.
            frac = counts.float() / counts.sum()
            lb_loss = n_live * (frac * probs.mean(dim=0)).sum()
            # Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return top_idx, gates, MoEAux(lb_loss=lb_loss, z_loss=z_loss, counts=counts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                        # (N, C)
        top_idx, gates, aux = self.route(flat)
        if self.n_slots == 1:
            # One slot is a dense feed-forward layer (gate == 1): the equal-active-
            # parameters baseline of tools/bench.py and tools/compare.py, no dispatch.
            return self.experts.expert(0, flat).view(B, T, C), aux
        # Dropless dispatch: sort the N*k token-choices by slot so each expert
        # runs once on one contiguous slice, then scatter back weighted by gate.
        choice_slot = top_idx.flatten()                                # (N*k,)
        order = torch.argsort(choice_slot, stable=True)
        token_of_choice = order // self.top_k                          # (N*k,) source row
        sorted_x = flat[token_of_choice]                               # (N*k, C)
        # One host sync per layer: slice lengths must be Python ints.
        lengths = aux.counts.tolist()
        slot_weights = self.experts.per_slot()
        outputs, start = [], 0
        for slot, n in enumerate(lengths):
            if n:
                outputs.append(mlp(sorted_x[start:start + n], *slot_weights[slot], self.experts.capture, slot,
                                   self.experts.approximate))
                start += n
        expert_out = torch.cat(outputs)                                # (N*k, C)
        weight = gates.flatten()[order].unsqueeze(1)                   # (N*k, 1) fp32
        contrib = (expert_out.float() * weight).to(flat.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of_choice, contrib)
        return y.view(B, T, C), aux

    # -- slot metadata helpers used by the controller ------------------------- #
    def n_active(self) -> int:
        return int(self.active.sum())
