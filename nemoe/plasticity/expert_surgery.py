"""Expert surgery: write one expert's parameter slots and the matching slots of every optimizer
state tensor (nemoe/plasticity/experts.py decides, this module operates). Nothing is rebuilt;
the optimizer, GradScaler and LR schedule are never reset."""

from __future__ import annotations

import math

import torch

from nemoe.moe import MoELayer
from nemoe.plasticity.base import add_relative_noise_, element_states


# --------------------------------------------------------------------------- #
# Surgery: parameter slots and their optimizer state
# --------------------------------------------------------------------------- #

def slot_params(layer: MoELayer) -> list[torch.nn.Parameter]:
    """Every parameter of the layer that has the expert slot as its first axis."""
    e = layer.experts
    return [e.w_in, e.b_in, e.w_out, e.b_out, layer.router.weight]


@torch.no_grad()
def copy_slot(layer: MoELayer, optimizer, src: int, dst: int, mutation_std: float,
              generator: torch.Generator) -> None:
    """dst := src + noise, noise ~ N(0, (mutation_std * RMS(src tensor))^2); moments and
    selection bias copied."""
    if layer.select_bias is not None:
        layer.select_bias[dst] = layer.select_bias[src]
    for p in slot_params(layer):
        p[dst] = p[src]
        if mutation_std > 0:
            add_relative_noise_(p[dst], p[src], mutation_std, generator)
        for s in element_states(optimizer, p):
            s[dst] = s[src]


@torch.no_grad()
def blend_slots(layer: MoELayer, optimizer, a: int, b: int, dst: int, alpha: float) -> None:
    """dst := alpha * a + (1 - alpha) * b, for parameters, router rows, moments and selection bias."""
    if layer.select_bias is not None:
        layer.select_bias[dst] = alpha * layer.select_bias[a] + (1 - alpha) * layer.select_bias[b]
    for p in slot_params(layer):
        p[dst] = alpha * p[a] + (1 - alpha) * p[b]
        for s in element_states(optimizer, p):
            s[dst] = alpha * s[a] + (1 - alpha) * s[b]


@torch.no_grad()
def clear_slot(layer: MoELayer, optimizer, slot: int) -> None:
    """Free a slot: no routing, zero parameters, moments and selection bias."""
    layer.active[slot] = False
    layer.route_offset[slot] = -math.inf
    layer.usage_counts[slot] = 0
    if layer.select_bias is not None:
        layer.select_bias[slot] = 0
    for p in slot_params(layer):
        p[slot] = 0
        for s in element_states(optimizer, p):
            s[slot] = 0


def open_slot(layer: MoELayer, slot: int) -> None:
    """Make a slot live with routing weight 0 (opened later by the ramp)."""
    layer.active[slot] = True
    layer.route_offset[slot] = -math.inf
    layer.usage_counts[slot] = 0
