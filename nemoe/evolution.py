"""Morphogenesis controller: experts split, cross over, serve probation and die.

Two halves, kept apart so each can be read and tested alone:

* policy -- `plan_layer` looks at one layer's expert records and usage over the
  last interval and returns the actions to take, in this order:
    1. probation review: a newborn whose probation ended graduates if its usage
       reached `probation_min_usage`, else it is removed (`failed_probation`);
    2. split: the most-used graduated expert above `split_usage` is cloned into a
       free slot (with relative mutation noise);
    3. crossover: if nothing split and a slot is free, with probability
       `crossover_prob`, two graduated parents drawn in proportion to their
       fitness are blended into a child;
    4. prune: the least-used graduated expert below `prune_usage` is removed,
       if the layer keeps at least `experts_min` graduated experts.
  Fitness is an expert's usage share averaged across intervals (an EMA): the
  traffic the router chooses to give it, which is what the layer pays it for.
* surgery -- `copy_slot`, `blend_slots`, `clear_slot` write parameter slots and
  the matching slots of every optimizer state tensor; nothing is rebuilt, and the
  optimizer, GradScaler and LR schedule are never reset.

Newborns enter with routing weight 0 (see moe.py) that opens linearly over
`ramp_steps`, so a birth never changes the model's output. Decisions use only
all-reduced usage counts and the controller's own seeded generator, so every
data-parallel rank takes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from nemoe.moe import MoELayer


@dataclass
class ExpertRecord:
    """The life of one expert in one slot (its age at step s is s - birth_step)."""

    id: int
    parents: tuple[int, ...] = ()
    birth_step: int = 0
    probation_until: int = 0    # review step; 0 for the founders, who start graduated
    origin: str = "init"        # init | split | crossover
    usage: float = 0.0          # share of routed token-choices over the last interval
    usage_ema: float = 0.0      # fitness: usage averaged across intervals

    @property
    def on_probation(self) -> bool:
        return self.probation_until > 0


@dataclass
class Action:
    kind: str                   # graduate | failed_probation | split | crossover | prune
    slot: int                   # the slot acted on (the child's slot for births)
    parents: tuple[int, ...] = ()   # parent slots for births
    usage: float = 0.0          # the usage the decision was based on
    threshold: float = 0.0      # the threshold it was compared with


@dataclass
class MorphEvent:
    """One row of events.csv: a structural event at any granularity.

    Expert events fill every field; the other granularities (neuron, head, layer)
    use `layer`, `expert` (-1 when not inside an expert), `unit` (what changed,
    e.g. "h3" or "n17 n40") and `cause` (the measurement that decided it).
    """

    step: int
    tokens: int
    event: str
    layer: int
    action: str
    expert: int
    parents: str
    usage: float
    threshold: float
    n_before: int
    n_after: int
    probe_loss_before: float
    probe_loss_after: float
    granularity: str = "expert"   # expert | neuron | head | layer
    unit: str = ""
    cause: str = ""

    def as_row(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The event's part of its training_log.txt line."""
        probe = f"Probe {self.probe_loss_before:.4f}→{self.probe_loss_after:.4f}"
        if self.granularity != "expert":
            expert = f" | Expert {self.expert}" if self.expert >= 0 else ""
            return (f"Event {self.event} | Layer {self.layer}{expert} | Unit {self.unit} | "
                    f"Cause {self.cause} | {probe}")
        parents = f" | Parents {self.parents}" if self.parents else ""
        return (f"Event {self.event} | Layer {self.layer} | Action {self.action} | "
                f"Expert {self.expert}{parents} | Usage {self.usage:.4f} | Thresh {self.threshold:g} | "
                f"{self.n_before}→{self.n_after} | {probe}")


# --------------------------------------------------------------------------- #
# Policy
# --------------------------------------------------------------------------- #

def plan_layer(records: list[ExpertRecord | None], usage: list[float], morph, top_k: int,
               experts_min: int, step: int, generator: torch.Generator) -> list[Action]:
    """Decide one layer's actions for this interval (pure except for `generator`).

    records: per slot, the live expert or None; usage: per slot share of
    token-choices over the interval; morph: the MorphConfig.
    """
    actions: list[Action] = []
    live = {s for s, r in enumerate(records) if r is not None}
    newborn = {s for s in live if records[s].on_probation}

    # 1. Probation review.
    for s in sorted(newborn):
        if step >= records[s].probation_until:
            kind = "graduate" if usage[s] >= morph.probation_min_usage else "failed_probation"
            actions.append(Action(kind, s, usage=usage[s], threshold=morph.probation_min_usage))
            newborn.discard(s)
            if kind == "failed_probation":
                live.discard(s)
    graduated = live - newborn
    free = [s for s in range(len(records)) if s not in live]

    # 2. Split the most-used graduated expert above the threshold.
    split = False
    if free and graduated:
        top = max(sorted(graduated), key=lambda s: usage[s])
        if usage[top] > morph.split_usage:
            child = free.pop(0)
            actions.append(Action("split", child, (top,), usage[top], morph.split_usage))
            live.add(child)
            split = True

    # 3. Crossover: fitness-proportional parents, only when nothing split.
    if not split and free and len(graduated) >= 2 and morph.crossover_prob > 0:
        if torch.rand((), generator=generator).item() < morph.crossover_prob:
            order = sorted(graduated)
            fitness = torch.tensor([records[s].usage_ema for s in order], dtype=torch.float64)
            weights = fitness + 1e-6  # a parent with no traffic yet can still be drawn
            picked = torch.multinomial(weights, 2, replacement=False, generator=generator)
            a, b = order[int(picked[0])], order[int(picked[1])]
            child = free.pop(0)
            actions.append(Action("crossover", child, (a, b),
                                  (usage[a] + usage[b]) / 2, morph.crossover_prob))
            live.add(child)

    # 4. Prune the least-used graduated expert below the threshold. Only graduated
    # experts count towards the floor, so a newborn failing later cannot breach it.
    if len(graduated) - 1 >= max(experts_min, top_k):
        low = min(sorted(graduated), key=lambda s: usage[s])
        if usage[low] < morph.prune_usage:
            actions.append(Action("prune", low, usage=usage[low], threshold=morph.prune_usage))
    return actions


# --------------------------------------------------------------------------- #
# Surgery: parameter slots and their optimizer state
# --------------------------------------------------------------------------- #

def slot_params(layer: MoELayer) -> list[torch.nn.Parameter]:
    """Every parameter of the layer that has the expert slot as its first axis."""
    e = layer.experts
    return [e.w_in, e.b_in, e.w_out, e.b_out, layer.router.weight]


def _slot_states(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-element state tensors of `p` (exp_avg, exp_avg_sq, ...).

    Scalars such as Adam's `step` are shared by all slots of a parameter and left
    alone: a newborn inherits its parent's moments, so the shared bias correction
    is consistent with them.
    """
    if optimizer is None:
        return []
    state = optimizer.state.get(p, {})
    return [t for t in state.values() if torch.is_tensor(t) and t.shape == p.shape]


@torch.no_grad()
def copy_slot(layer: MoELayer, optimizer, src: int, dst: int, mutation_std: float,
              generator: torch.Generator) -> None:
    """dst := src + noise, noise ~ N(0, (mutation_std * RMS(src tensor))^2); moments copied."""
    for p in slot_params(layer):
        p[dst] = p[src]
        if mutation_std > 0:
            scale = mutation_std * p[src].float().pow(2).mean().sqrt()
            noise = torch.randn(p[src].shape, generator=generator)  # CPU: same on every device
            p[dst] += (noise * scale.cpu()).to(p.device, p.dtype)
        for s in _slot_states(optimizer, p):
            s[dst] = s[src]


@torch.no_grad()
def blend_slots(layer: MoELayer, optimizer, a: int, b: int, dst: int, alpha: float) -> None:
    """dst := alpha * a + (1 - alpha) * b, for parameters, router rows and moments."""
    for p in slot_params(layer):
        p[dst] = alpha * p[a] + (1 - alpha) * p[b]
        for s in _slot_states(optimizer, p):
            s[dst] = alpha * s[a] + (1 - alpha) * s[b]


@torch.no_grad()
def clear_slot(layer: MoELayer, optimizer, slot: int) -> None:
    """Free a slot: no routing, zero parameters and zero moments."""
    layer.active[slot] = False
    layer.route_offset[slot] = -math.inf
    layer.usage_counts[slot] = 0
    for p in slot_params(layer):
        p[slot] = 0
        for s in _slot_states(optimizer, p):
            s[slot] = 0


def open_slot(layer: MoELayer, slot: int) -> None:
    """Make a slot live with routing weight 0 (opened later by the ramp)."""
    layer.active[slot] = True
    layer.route_offset[slot] = -math.inf
    layer.usage_counts[slot] = 0


# --------------------------------------------------------------------------- #
# The controller
# --------------------------------------------------------------------------- #

_EVENT_OF = {"split": "evolve_split", "crossover": "evolve_crossover", "prune": "evolve_prune",
             "failed_probation": "evolve_failed_probation", "graduate": "evolve_graduate"}


class MorphController:
    """Owns expert records and the decision generator; acts on a model's MoE layers."""

    def __init__(self, cfg, n_layers: int):
        """cfg: the run's Config (morph and moe sections are read)."""
        self.morph, self.moe = cfg.morph, cfg.moe
        self.ramp_steps = cfg.ramp_steps
        self.generator = torch.Generator().manual_seed(cfg.morph.seed)
        self.records: list[list[ExpertRecord | None]] = []
        self.next_id = 0
        for _ in range(n_layers):
            row = []
            for slot in range(cfg.moe.experts_max):
                row.append(self._new_record() if slot < cfg.moe.experts_init else None)
            self.records.append(row)

    def _new_record(self, **kw) -> ExpertRecord:
        record = ExpertRecord(id=self.next_id, **kw)
        self.next_id += 1
        return record

    def expert_counts(self) -> list[int]:
        return [sum(r is not None for r in row) for row in self.records]

    # -- per step ----------------------------------------------------------- #
    @torch.no_grad()
    def update_routing(self, layers: list[MoELayer], step: int) -> None:
        """Open newborns' routing weight: offset = log(progress), progress 0 -> 1."""
        for layer, row in zip(layers, self.records):
            for slot, r in enumerate(row):
                if r is not None and r.origin != "init" and step - r.birth_step <= self.ramp_steps:
                    progress = (step - r.birth_step) / self.ramp_steps
                    layer.route_offset[slot] = math.log(progress) if progress > 0 else -math.inf

    def due(self, step: int) -> bool:
        return self.morph.enabled and step > 0 and step % self.morph.interval == 0

    def evolve(self, layers: list[MoELayer], optimizer, step: int, tokens: int,
               probe_loss: Callable[[], float]) -> list[MorphEvent]:
        """Read usage, decide and operate on every layer; returns the events."""
        usage = self._read_usage(layers)
        events: list[MorphEvent] = []
        current_loss: list[float] = []   # lazily measured probe loss, reused as the next "before"

        def probe() -> float:
            if not current_loss:
                current_loss.append(probe_loss())
            return current_loss[-1]

        for li, (layer, row) in enumerate(zip(layers, self.records)):
            for slot, r in enumerate(row):
                if r is not None:
                    r.usage = usage[li][slot]
                    r.usage_ema = self.morph.usage_ema * r.usage_ema + (1 - self.morph.usage_ema) * r.usage
            actions = plan_layer(row, usage[li], self.morph, self.moe.top_k, self.moe.experts_min,
                                 step, self.generator)
            for action in actions:
                n_before = self.expert_counts()[li]
                before = probe()
                record = self._operate(layer, optimizer, row, action, step)
                if action.kind != "graduate":
                    current_loss.append(probe_loss())
                events.append(MorphEvent(
                    step=step, tokens=tokens, event=_EVENT_OF[action.kind], layer=li,
                    action=action.kind, expert=record.id,
                    parents=" ".join(str(row[p].id) for p in action.parents),
                    usage=action.usage, threshold=action.threshold, n_before=n_before,
                    n_after=self.expert_counts()[li], probe_loss_before=before,
                    probe_loss_after=current_loss[-1], unit=f"e{record.id}",
                    cause=f"usage {action.usage:.4f} vs {action.threshold:g}"))
        self.update_routing(layers, step)
        return events

    def _read_usage(self, layers: list[MoELayer]) -> list[list[float]]:
        """Usage share per slot over the interval, summed over ranks; resets the counters."""
        counts = torch.stack([layer.usage_counts for layer in layers]).double()   # (L, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        for layer in layers:
            layer.usage_counts.zero_()
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
        return (counts / totals).tolist()

    def _operate(self, layer: MoELayer, optimizer, row, action: Action, step: int) -> ExpertRecord:
        """Apply one action to parameters, optimizer state and records; returns the expert acted on."""
        m = self.morph
        if action.kind == "graduate":
            row[action.slot].probation_until = 0
            return row[action.slot]
        if action.kind in ("prune", "failed_probation"):
            record = row[action.slot]
            clear_slot(layer, optimizer, action.slot)
            row[action.slot] = None
            return record
        if action.kind == "split":
            copy_slot(layer, optimizer, action.parents[0], action.slot, m.mutation_std, self.generator)
        else:
            a, b = action.parents
            blend_slots(layer, optimizer, a, b, action.slot, m.crossover_alpha)
        open_slot(layer, action.slot)
        record = self._new_record(parents=tuple(row[p].id for p in action.parents), birth_step=step,
                                  probation_until=step + max(m.probation_steps, 1),
                                  origin=action.kind)
        row[action.slot] = record
        return record

    def remap_layers(self, sources: list[int], newborn: int, step: int) -> None:
        """Follow a layer shift (plasticity.layers): position i now holds the block that was
        at position sources[i]. The newborn's experts get new ids: copies of its parent's
        records (same slot state, so routing ramps stay in step, parents = the copied
        expert) or, for a fresh block (source -1), founders born at `step`."""
        old = self.records
        self.records = [old[src] for src in sources]
        if sources[newborn] >= 0:
            row = []
            for r in old[sources[newborn]]:
                row.append(None if r is None else dataclasses.replace(r, id=self.next_id, parents=(r.id,)))
                self.next_id += r is not None
        else:
            row = [self._new_record(birth_step=step) if slot < self.moe.experts_init else None
                   for slot in range(self.moe.experts_max)]
        self.records[newborn] = row

    # -- checkpointing --------------------------------------------------------- #
    def state_dict(self) -> dict:
        return {"next_id": self.next_id, "generator": self.generator.get_state(),
                "records": [[None if r is None else dataclasses.asdict(r) for r in row]
                            for row in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.next_id = state["next_id"]
        self.generator.set_state(state["generator"])
        self.records = [[None if r is None else ExpertRecord(**{**r, "parents": tuple(r["parents"])})
                         for r in row] for row in state["records"]]
