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

Balancing (moe.balance). `aux_loss`: the Switch load-balance loss below, weighted
by moe.lb_coef in the objective. `bias` (auxiliary-loss-free, DeepSeek-V3, Liu et
al. 2024, sec. 2.1.2): a per-slot fp32 buffer `select_bias` b is added to the
router logits for the top-k *selection* only,

    chosen = topk(logits + offset + b)      gates = the router's own p_i (no b)

so b decides which experts a token goes to, never how much their outputs weigh,
and no gradient flows through it. After every applied optimizer step the train
module moves it against the load of the step (`update_select_bias`, counts
summed over micro-batches and data-parallel ranks, so every rank moves it the
same way): b_i += u * sign(mean load - load_i), over the fully open experts only.
Free slots and ramping newborns keep their b: a free slot has offset -inf (no b
can select it) and a newborn's low traffic is the ramp's doing, not a reason to
push it. `both` = the loss and the bias. What a slot's b is after morphogenesis
(nemoe/plasticity/experts.py): a split child copies its parent's b, a crossover
child gets the blend alpha*b_a + (1-alpha)*b_b, a freed slot 0; a newborn's
offset is -inf at birth, so whatever its b, the birth leaves the output unchanged.
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

    lb_loss: torch.Tensor   # () Switch load-balance loss as trained (n_live * sum f_i P_i)
    z_loss: torch.Tensor    # () router z-loss
    counts: torch.Tensor    # (E,) token-choices routed to each slot in this batch
    balance: torch.Tensor   # () the same measure over the experts that can take traffic: 1.0 = even


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
                 activation: str = "gelu", select_bias: bool = False):
        """activation: model.activation; select_bias: carry the auxiliary-loss-free selection bias
        (moe.balance: bias or both)."""
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
        # (E,) fp32 selection bias (balance: bias / both); a None buffer is not in the state
        # dict, so with balance: aux_loss the model, its checkpoints and its numbers are as before.
        self.register_buffer("select_bias", torch.zeros(n_slots) if select_bias else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of an aux_loss run has no bias: it starts at 0. One with a bias loaded
        # into a model without (balance changed with --allow-config-change): the bias is dropped.
        key = prefix + "select_bias"
        if self.select_bias is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.select_bias)
        elif self.select_bias is None:
            state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def route(self, x: torch.Tensor):
        """Router in fp32. x: (N, C) -> top-k slots (N, k), gates (N, k), aux losses."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())     # (N, E)
            logits = logits + self.route_offset                           # free slots -> -inf
            probs = logits.softmax(dim=-1)                                # (N, E), 0 on free slots
            if self.select_bias is None:
                top_logits, top_idx = logits.topk(self.top_k, dim=-1)    # (N, k)
            else:
                # The bias picks the experts, the gates below stay the router's (selection only).
                top_idx = (logits + self.select_bias).topk(self.top_k, dim=-1).indices
                top_logits = logits.gather(1, top_idx)                    # (N, k)
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
            f_dot_p = (frac * probs.mean(dim=0)).sum()
            lb_loss = n_live * f_dot_p
            # Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
            balance = self.routable_experts() * f_dot_p.detach()
        return top_idx, gates, MoEAux(lb_loss=lb_loss, z_loss=z_loss, counts=counts, balance=balance)

    @torch.no_grad()
    def routable_experts(self) -> torch.Tensor:
        """How many experts can take traffic, a ramping newborn counted by its routing weight:
        (sum w)^2 / sum w^2 with w = exp(offset) (1 open, r ramping, 0 free or just born).

        The reported balance is this times sum f_i P_i: it reads 1.0 when token shares and mean
        probabilities are both w_i / sum w (the ramps the only preference), e.g. two even experts
        beside a newborn at r = 0 (n_live reads 3/2 there). With no newborn it equals n_live
        exactly, and the reported value the trained one. The objective keeps n_live (lb_loss),
        so aux_loss runs train exactly as before.
        """
        w = self.route_offset.exp()
        return w.sum().pow(2) / w.pow(2).sum()

    @torch.no_grad()
    def update_select_bias(self, counts: torch.Tensor, rate: float) -> None:
        """One auxiliary-loss-free update (DeepSeek-V3): b_i += rate * sign(mean load - load_i).

        counts: (E,) token-choices per slot of one optimizer step, summed over micro-batches
        and ranks (the same on every rank, so every rank's bias stays the same). Only fully
        open experts (offset 0) move, and the mean is over them; ties with the mean stay.
        """
        open_ = self.route_offset == 0
        load = counts.to(self.select_bias.device, torch.float64)
        mean = (load * open_).sum() / open_.sum().clamp_min(1)     # no host sync (GPU)
        step = (rate * torch.sign(mean - load)).to(self.select_bias.dtype)
        self.select_bias += torch.where(open_, step, torch.zeros_like(step))

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
