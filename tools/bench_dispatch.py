"""The MoE dispatch variants tools/bench.py times against nemoe's own (sorted) dispatch:
the seed's all-experts computation, indexing the stacked weights per slot, and a padded
batched matmul. Each computes the same output as MoELayer.forward (the bench checks it)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from nemoe.model import NemoeLM
from nemoe.moe import MoELayer, mlp


def seed_style_forward(layer: MoELayer, x: torch.Tensor):
    """The seed NEMoE's computation: every live expert on every token, outputs masked by the gates.

    Same router, gates and losses as MoELayer.forward, so only the dispatch differs;
    it costs n_live / k times the expert FLOPs of the sorted dispatch.
    """
    B, T, C = x.shape
    flat = x.reshape(-1, C)                                              # (N, C)
    top_idx, gates, aux = layer.route(flat)
    # (N, E) gate of each slot for each token, zero where the slot was not chosen.
    gate_matrix = torch.zeros(flat.size(0), layer.n_slots, device=x.device).scatter(1, top_idx, gates)
    slot_weights = layer.experts.per_slot()
    y = torch.zeros_like(flat)
    for slot in layer.active.nonzero().flatten().tolist():
        y = y + (mlp(flat, *slot_weights[slot]).float() * gate_matrix[:, slot:slot + 1]).to(flat.dtype)
    return y.view(B, T, C), aux


def indexed_forward(layer: MoELayer, x: torch.Tensor):
    """Sorted dispatch indexing the stacked weights per slot (w_in[slot]): nemoe's dispatch before the unbind."""
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    top_idx, gates, aux = layer.route(flat)
    order = torch.argsort(top_idx.flatten(), stable=True)
    token_of_choice = order // layer.top_k
    sorted_x = flat[token_of_choice]
    outputs, start = [], 0
    for slot, n in enumerate(aux.counts.tolist()):
        if n:
            outputs.append(layer.experts.expert(slot, sorted_x[start:start + n]))
            start += n
    contrib = torch.cat(outputs) * gates.flatten()[order].unsqueeze(1)
    return torch.zeros_like(flat).index_add_(0, token_of_choice, contrib).view(B, T, C), aux


def padded_forward(layer: MoELayer, x: torch.Tensor):
    """Dropless, batched: sorted token-choices padded to the busiest slot's count, one bmm per matrix.

    Pads cost compute (every slot, live or free, runs `capacity` rows); no Python loop.
    """
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    top_idx, gates, aux = layer.route(flat)
    choice_slot = top_idx.flatten()                                      # (N*k,)
    order = torch.argsort(choice_slot, stable=True)
    token_of_choice = order // layer.top_k
    sorted_slot = choice_slot[order]
    first_of_slot = torch.cumsum(aux.counts, 0) - aux.counts             # (E,)
    row = torch.arange(order.numel(), device=x.device) - first_of_slot[sorted_slot]   # rank within its slot
    capacity = int(aux.counts.max())
    e = layer.experts
    padded = flat.new_zeros(layer.n_slots, capacity, C).index_put((sorted_slot, row), flat[token_of_choice])
    h = F.gelu(torch.baddbmm(e.b_in.unsqueeze(1), padded, e.w_in))      # (E, cap, H)
    out = torch.baddbmm(e.b_out.unsqueeze(1), h, e.w_out)               # (E, cap, C)
    contrib = out[sorted_slot, row] * gates.flatten()[order].unsqueeze(1)
    return torch.zeros_like(flat).index_add_(0, token_of_choice, contrib).view(B, T, C), aux


DISPATCH = {"sorted": None,   # nemoe's MoELayer.forward: sort, one slice per expert, unbound weights
            "sorted_indexed": indexed_forward, "padded_bmm": padded_forward, "seed_all_experts": seed_style_forward}


def use_dispatch(model: NemoeLM, name: str) -> NemoeLM:
    """Swap every MoE layer's forward for a benchmark variant (None: nemoe's own)."""
    fn = DISPATCH[name]
    if fn is not None:
        for layer in model.moe_layers:
            layer.forward = types.MethodType(fn, layer)
    return model


# --------------------------------------------------------------------------- #
# Section 1 + 2: training throughput and MFU
# --------------------------------------------------------------------------- #

