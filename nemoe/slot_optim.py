"""AdamW that spends nothing on free expert slots.

An expert pool stacks `experts_max` slots in one parameter per weight (nemoe/moe.py), and the
router's weight has one row per slot. torch's AdamW would update every slot of such a parameter
and keep two moments for each, from step 0, whether the slot holds an expert or not.
`SlotAdamW` keeps the stacked parameters (forward, backward, clipping, DDP, GradScaler and the
model's state dict are as before) but steps each *live* slot as a parameter of its own:

    state[p] = {"step": count, "slots": {s: {"step", "exp_avg", "exp_avg_sq"}}}   an entry per live slot s

The update runs on views of the live slots only, through the same kernel torch's AdamW uses
(fused or not, as the group says), so a live slot gets exactly the update the stacked step gave
it, bit for bit. A free slot has no entry, takes no optimizer time, and its weights are never
written (no weight decay either). Which slots are live is each layer's `active` buffer, read at
every step. Every other parameter is stepped by torch's AdamW code unchanged.

The life of an entry:
  birth   morphogenesis writes the child's moments through `slot_moments` (what
          plasticity.base.element_states returns for these parameters): views indexed like the
          stacked (E, ...) moment, so copy_slot / blend_slots work as before. The entry is made
          then, its step the parameter's count (each entry has its own copy of it for the kernel;
          all count the same applied steps).
          A live slot still without an entry starts at zero moments (at the first step; after
          a fresh layer, from step 0).
  death   `moment[slot] = 0` (clear_slot) drops the entry: the memory goes back at once. An
          entry left on a slot that is not live is dropped at the next step.
Checkpoints hold torch's optimizer state dict with these nested entries. One written before
slots had their own entries (whole (E, ...) moments per parameter) is upgraded on load: the live
slots keep their rows and the shared step, the free slots' rows (zero) are dropped.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.optimizer import _get_scalar_dtype


class SlotMoments:
    """One moment (exp_avg or exp_avg_sq) of a slotted parameter, indexed like the stacked
    (E, ...) tensor it replaces: `m[s]` or `m[s, ...]` reads (zeros for a slot without an
    entry) and writes; `m[s] = 0` gives the slot's state back."""

    def __init__(self, optimizer: "SlotAdamW", p: torch.Tensor, key: str):
        self.optimizer, self.p, self.key = optimizer, p, key
        self.slots: dict = optimizer.state[p]["slots"]

    @staticmethod
    def _split(index) -> tuple[int, tuple]:
        slot, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(slot, torch.Tensor) and slot.dim() == 0 and not slot.is_floating_point():
            slot = int(slot)
        if not isinstance(slot, int):
            raise TypeError(f"a slotted moment is indexed by one slot first, got {slot!r}")
        return slot, rest

    def __getitem__(self, index) -> torch.Tensor:
        slot, rest = self._split(index)
        entry = self.slots.get(slot)
        if entry is None:
            return self.p.new_zeros(self.p.shape[1:])[rest]
        return entry[self.key][rest]

    def __setitem__(self, index, value) -> None:
        slot, rest = self._split(index)
        zero = isinstance(value, (int, float)) and value == 0
        entry = self.slots.get(slot)
        if zero and (entry is None or not rest):
            self.slots.pop(slot, None)    # a missing entry reads as zero moments
            return
        if entry is None:
            entry = self.slots[slot] = self.optimizer.new_entry(self.p)
        entry[self.key][rest] = value


class SlotAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose slotted parameters are stepped on their live slots only.

    slotted: (layer, parameters) pairs; each parameter has the slot as its first axis and
    `layer.active` (a bool (E,) buffer) says which slots are live. Every other argument is AdamW's.
    """

    def __init__(self, params, slotted: Iterable[tuple[torch.nn.Module, list[torch.Tensor]]] = (), **kwargs):
        super().__init__(params, **kwargs)
        self.slotted = [(layer, list(ps)) for layer, ps in slotted]
        self.pool_of = {p: i for i, (_, ps) in enumerate(self.slotted) for p in ps}
        in_groups = {p for g in self.param_groups for p in g["params"]}
        if any(p not in in_groups for p in self.pool_of):
            raise ValueError("every slotted parameter must be in one of the optimizer's groups")
        if any(g["amsgrad"] for g in self.param_groups):
            raise ValueError("SlotAdamW does not support amsgrad")
        self._live: list[list[int]] | None = None

    # -- which slots are live --------------------------------------------------- #
    def live_slots(self) -> list[list[int]]:
        """Per pool, its live slots (one host read for all layers)."""
        if not self.slotted:
            return []
        rows = torch.stack([layer.active for layer, _ in self.slotted]).tolist()
        return [[s for s, on in enumerate(row) if on] for row in rows]

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _state(self, p: torch.Tensor) -> dict:
        """p's state, made on its first step: the parameter's step count (as torch keeps it) and
        no slot entries yet."""
        state = self.state[p]
        if not state:
            group = self._group_of(p)
            state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
                             if group["capturable"] or group["fused"]
                             else torch.tensor(0.0, dtype=_get_scalar_dtype()))
            state["slots"] = {}
        return state

    def new_entry(self, p: torch.Tensor) -> dict:
        """Zero moments for one slot of `p`, its step the parameter's count."""
        return {"step": self._state(p)["step"].clone(), "exp_avg": p.new_zeros(p.shape[1:]),
                "exp_avg_sq": p.new_zeros(p.shape[1:])}

    def slot_moments(self, p: torch.Tensor) -> list[SlotMoments] | None:
        """The per-element state of `p` for slot surgery (plasticity.base.element_states):
        None when `p` is not slotted, [] before its first step (no state yet, as torch's)."""
        if p not in self.pool_of:
            return None
        if "slots" not in self.state.get(p, {}):
            return []
        return [SlotMoments(self, p, "exp_avg"), SlotMoments(self, p, "exp_avg_sq")]

    # -- the step ------------------------------------------------------------------ #
    @torch.no_grad()
    def step(self, closure=None):
        self._live = self.live_slots()
        try:
            loss = super().step(closure)
        finally:
            self._live = None
        for p in self.pool_of:   # the parameter's count follows its entries' (all the same)
            state = self.state.get(p)
            if state and state["slots"]:
                state["step"].copy_(next(iter(state["slots"].values()))["step"])
        return loss

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        plain = [p for p in group["params"] if p not in self.pool_of]
        has_complex = super()._init_group({**group, "params": plain}, params_with_grad, grads, exp_avgs,
                                          exp_avg_sqs, max_exp_avg_sqs, state_steps)
        for p in group["params"]:
            pool = self.pool_of.get(p)
            if pool is None or p.grad is None:
                continue
            live = self._live[pool]
            slots = self._state(p)["slots"]
            for s in [s for s in slots if s not in live]:
                del slots[s]                       # a slot that died without clear_slot
            weights, grad = p.detach(), p.grad
            for s in live:
                entry = slots.get(s)
                if entry is None:
                    entry = slots[s] = self.new_entry(p)
                params_with_grad.append(weights[s])
                grads.append(grad[s])
                exp_avgs.append(entry["exp_avg"])
                exp_avg_sqs.append(entry["exp_avg_sq"])
                state_steps.append(entry["step"])
        return has_complex

    # -- checkpoints ------------------------------------------------------------------ #
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then the upgrade of a checkpoint written before slots had their own entries
        (the model must be loaded first: its `active` buffers say which slots are live)."""
        super().load_state_dict(state_dict)
        live = self.live_slots()
        for p, pool in self.pool_of.items():
            state = self.state.get(p)
            if not state or "slots" in state:
                continue
            self.state[p] = {"step": state["step"], "slots": {
                s: {"step": state["step"].clone(), "exp_avg": state["exp_avg"][s].clone(),
                    "exp_avg_sq": state["exp_avg_sq"][s].clone()} for s in live[pool]}}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps as state (nested entries included)."""
    def walk(node) -> int:
        if torch.is_tensor(node):
            return node.numel() * node.element_size()
        if isinstance(node, dict):
            return sum(walk(v) for v in node.values())
        return 0
    return sum(walk(s) for s in optimizer.state.values())
