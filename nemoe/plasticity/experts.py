"""Expert morphogenesis (the `plasticity.experts` section): experts split, cross over, serve probation and die.

Two halves, kept apart so each can be read and tested alone:

* policy -- `plan_layer` looks at one layer's expert records and usage over the
  last interval and returns the actions to take, in this order:
    1. probation review: a newborn whose probation ended graduates if its usage
       reached `probation_min_usage`, else it is removed (`failed_probation`) and
       its parents cool down: none of them may split in this decision and the
       next `cooldown_intervals` - 1 (their `cooldown_until` step);
    2. split: the most-used graduated expert above `split_usage` that is not
       cooling down is cloned into a free slot (with relative mutation noise);
       under a growth schedule (plasticity.experts.grow_until, nemoe/plasticity/growth.py)
       instead: as many graduated experts as the layer lacks of the schedule's
       target, chosen by usage or gradient utility (plasticity.experts.split_by);
    3. crossover (never under a growth schedule): if nothing split and a slot is free, with probability
       `crossover_prob`, two graduated parents drawn in proportion to their
       fitness are blended into a child;
    4. prune: the least-used graduated expert below `prune_usage` is removed,
       if the layer keeps at least `experts_min` graduated experts.
  Fitness is an expert's usage share averaged across intervals (an EMA): the
  traffic the router chooses to give it, which is what the layer pays it for.
* surgery (nemoe/plasticity/expert_surgery.py) -- `copy_slot`, `blend_slots`, `clear_slot` write parameter slots and
  the matching slots of every optimizer state tensor; nothing is rebuilt, and the
  optimizer, GradScaler and LR schedule are never reset.

Newborns enter with routing weight 0 (see moe.py) that opens linearly over
`ramp_steps`, so a birth never changes the model's output.

Selection bias (moe.balance: bias / both, see moe.py): a split child copies its
parent's bias (child and parent then look alike to the router and share the
parent's traffic once the ramp opens), a crossover child gets the blend
alpha * b_a + (1 - alpha) * b_b (like its router row), a freed slot gets 0. A
newborn's bias stays as born until its ramp ends (only fully open experts are
updated); at birth its offset is -inf, so no bias can select it and the birth
still leaves the output unchanged. Usage for split / prune / probation is the
share of token-choices as before, i.e. *after* the bias: a bias that balances the
layer keeps every share near 1/n, so splits above `split_usage` (and prunes below
`prune_usage`) become rare once n * split_usage > 1 (README, Balancing). Decisions use only
usage counts summed over ranks and the mechanism's own seeded generator, so every
data-parallel rank takes the same decisions. The usage counts themselves are
per-rank statistics, checkpointed per rank: the model's training forward counts a
step's token-choices into `MoELayer.usage_counts` (a per-step buffer DDP does not
touch), `observe` adds them to this mechanism's interval counts (steps whose update
was applied only: a skipped step's traffic does not count), and `after_step`
clears the buffer on every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from nemoe.distributed import sum_over_ranks, world_size
from nemoe.moe import MoELayer
from nemoe.plasticity.base import ActContext, Event, LayerShift, Mechanism, shift_rows
from nemoe.plasticity.expert_surgery import blend_slots, clear_slot, copy_slot, open_slot
from nemoe.plasticity.growth import Growth, ParamSteps, growth_decisions, growth_target, slot_grad_sq
from nemoe.schema import TB_USAGE_TAG, layer_column


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
    cooldown_until: int = 0     # may not split before this step (a child of it failed probation)

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
    cools: tuple[int, ...] = () # failed_probation: the parent slots that cool down
    cause: str = ""             # events.csv's cause; "" = the usage rule's "usage U vs T"
    reading: str = ""           # the text log's words for usage and threshold; "" = READINGS[kind]


# What an action's usage and threshold are, in its text-log line (events.csv keeps the numbers).
READINGS = {"graduate": "Usage {u:.4f} >= probation_min_usage {t:g}",
            "failed_probation": "Usage {u:.4f} < probation_min_usage {t:g}",
            "split": "Usage {u:.4f} > split_usage {t:g}",
            "crossover": "Parents' mean usage {u:.4f} | Drawn with crossover_prob {t:g}",
            "prune": "Usage {u:.4f} < prune_usage {t:g}"}


def reading(action: Action) -> str:
    return action.reading or READINGS[action.kind].format(u=action.usage, t=action.threshold)


# --------------------------------------------------------------------------- #
# Policy
# --------------------------------------------------------------------------- #

def plan_layer(records: list[ExpertRecord | None], usage: list[float], morph, top_k: int,
               experts_min: int, step: int, generator: torch.Generator,
               growth: Growth | None = None) -> list[Action]:
    """Decide one layer's actions for this interval (pure except for `generator`).

    records: per slot, the live expert or None; usage: per slot share of
    token-choices over the interval; morph: the plasticity.experts section; growth: the schedule's
    births at this decision (None: no schedule, births by the usage rule and crossover).
    """
    actions: list[Action] = []
    live = {s for s, r in enumerate(records) if r is not None}
    newborn = {s for s in live if records[s].on_probation}

    slot_of = {records[s].id: s for s in live}
    cooling = {s for s in live if records[s].cooldown_until > step}

    # 1. Probation review; the parents of a failed newborn cool down.
    for s in sorted(newborn):
        if step >= records[s].probation_until:
            kind = "graduate" if usage[s] >= morph.probation_min_usage else "failed_probation"
            cools = ()
            if kind == "failed_probation" and morph.cooldown_intervals > 0:
                cools = tuple(slot_of[p] for p in records[s].parents if p in slot_of)
                cooling.update(cools)
            actions.append(Action(kind, s, usage=usage[s], threshold=morph.probation_min_usage, cools=cools))
            newborn.discard(s)
            if kind == "failed_probation":
                live.discard(s)
    graduated = live - newborn
    free = [s for s in range(len(records)) if s not in live]

    # 2. Split: as many as the growth schedule asks for, else the most-used graduated expert
    # above the threshold that is not cooling down.
    split = False
    if growth is not None:
        births = min(growth.target - len(live), len(free))
        candidates = sorted(graduated - cooling) or sorted(graduated)
        if births > 0 and candidates:
            n_live = len(live)
            for parent in growth.parents(candidates, births):
                child = free.pop(0)
                actions.append(Action("split", child, (parent,), growth.scores[parent], growth.target,
                                      cause=growth.cause(parent, n_live, len(candidates)),
                                      reading=growth.reading(parent)))
                live.add(child)
    elif free and graduated - cooling:
        top = max(sorted(graduated - cooling), key=lambda s: usage[s])
        if usage[top] > morph.split_usage:
            child = free.pop(0)
            actions.append(Action("split", child, (top,), usage[top], morph.split_usage))
            live.add(child)
            split = True

    # 3. Crossover: fitness-proportional parents, only when nothing split.
    if growth is None and not split and free and len(graduated) >= 2 and morph.crossover_prob > 0:
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
# The mechanism
# --------------------------------------------------------------------------- #

class ExpertMorphogenesis(Mechanism):
    """Owns the expert records and the decision generator; acts on the model's MoE layers.

    Always built (the records name every expert in the logs, also in a static-MoE
    run); acts only when `plasticity.experts.enabled`.
    """

    granularity = "expert"
    config_key = "experts"

    def __init__(self, cfg, model, probe_batch=None):
        super().__init__(cfg, model, probe_batch)
        self.morph, self.moe = cfg.plasticity.experts, cfg.moe
        self.ramp_steps = cfg.ramp_steps
        self.generator = torch.Generator().manual_seed(cfg.plasticity.experts.seed)
        self.records: list[list[ExpertRecord | None]] = []
        self.next_id = 0
        self.last_decision: tuple[int, list[list[float]]] | None = None   # for the logs, not checkpointed
        for _ in range(cfg.model.n_layers):
            self.records.append(self._founders())
        # (L, E) this rank's token-choices per slot over the applied steps since the last decision.
        self.usage_counts = torch.zeros(cfg.model.n_layers, cfg.moe.experts_max, dtype=torch.long,
                                        device=self.layers[0].usage_counts.device)
        # Growth schedule (plasticity.experts.grow_until): the run's steps (the schedule is a share of them) and,
        # for split_by: gradient, the (L, E) gradient utility since the last decision (sum over the
        # applied steps of each slot's squared expert-gradient norm; the same on every rank).
        self.total_steps = cfg.total_steps(world_size())
        # What the logs show of the pool (log_row, snapshot): this rank's token-choices per slot
        # since the previous training_log.csv row, and the live-expert parameter-steps.
        self.window_counts = torch.zeros_like(self.usage_counts)
        self.window_share: torch.Tensor | None = None   # the last row's shares, for plasticity.csv
        self.param_steps = ParamSteps(model, self.expert_counts)
        self._saved_param_steps: int | None = 0
        self.grad_utility = None
        if self.morph.grow_until is not None and self.morph.split_by == "gradient":
            self.grad_utility = torch.zeros(cfg.model.n_layers, cfg.moe.experts_max, dtype=torch.float64,
                                            device=self.usage_counts.device)

    @property
    def layers(self) -> list[MoELayer]:
        return self.model.moe_layers

    def _founders(self, birth_step: int = 0) -> list[ExpertRecord | None]:
        return [self._new_record(birth_step=birth_step) if slot < self.moe.experts_init else None
                for slot in range(self.moe.experts_max)]

    def _new_record(self, **kw) -> ExpertRecord:
        record = ExpertRecord(id=self.next_id, **kw)
        self.next_id += 1
        return record

    def expert_counts(self) -> list[int]:
        return [sum(r is not None for r in row) for row in self.records]

    def decision_usage(self, step: int) -> list[list[float]] | None:
        """Per layer, the usage share of each expert that was live when the controller decided at
        `step` (over the interval that just ended); None when it did not decide at `step`."""
        if self.last_decision is None or self.last_decision[0] != step:
            return None
        return self.last_decision[1]

    def expert_id(self, layer: int, slot: int) -> int:
        record = self.records[layer][slot]
        return -1 if record is None else record.id

    # -- per step ----------------------------------------------------------- #
    @torch.no_grad()
    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        """The step's update is applied: its routing counts join the interval's."""
        for li, layer in enumerate(self.layers):
            self.usage_counts[li] += layer.usage_counts
            if self.grad_utility is not None:
                self.grad_utility[li] += slot_grad_sq(layer)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The optimizer step `step` is done (or skipped): its routing counts join the log window
        (every step's, as the row's losses), its live experts the parameter-steps; clear the
        per-step counts and set the routing of step + 1's forward pass."""
        self.param_steps.add_step()
        for li, layer in enumerate(self.layers):
            self.window_counts[li] += layer.usage_counts
            layer.usage_counts.zero_()
        self.update_routing(step + 1)

    @torch.no_grad()
    def update_routing(self, step: int) -> None:
        """Open newborns' routing weight: offset = log(progress), progress 0 -> 1."""
        for layer, row in zip(self.layers, self.records):
            for slot, r in enumerate(row):
                if r is not None and r.origin != "init" and step - r.birth_step <= self.ramp_steps:
                    progress = (step - r.birth_step) / self.ramp_steps
                    layer.route_offset[slot] = math.log(progress) if progress > 0 else -math.inf

    # -- decisions ------------------------------------------------------------ #
    def act(self, ctx: ActContext) -> list[Event]:
        """Read usage, decide and operate on every layer; returns the events."""
        usage = self._read_usage()
        utility = self._read_utility()
        self.last_decision = (ctx.step, [[usage[li][s] for s, r in enumerate(row) if r is not None]
                                         for li, row in enumerate(self.records)])
        events: list[Event] = []
        for li, (layer, row) in enumerate(zip(self.layers, self.records)):
            for slot, r in enumerate(row):
                if r is not None:
                    r.usage = usage[li][slot]
                    r.usage_ema = self.morph.usage_ema * r.usage_ema + (1 - self.morph.usage_ema) * r.usage
            actions = plan_layer(row, usage[li], self.morph, self.moe.top_k, self.moe.experts_min,
                                 ctx.step, self.generator, self._growth(ctx.step, usage[li], utility, li))
            for action in actions:
                n_before, before = self.expert_counts()[li], ctx.probe()
                record = self._operate(layer, ctx.optimizer, row, action, ctx.step)
                after = ctx.probe() if action.kind == "graduate" else ctx.probe.measure()
                events.append(Event(
                    step=ctx.step, tokens=ctx.tokens, granularity="expert", event=action.kind, layer=li,
                    unit=f"e{record.id}", expert=record.id,
                    parents=" ".join(str(row[p].id) for p in action.parents), value=action.usage,
                    threshold=action.threshold, n_before=n_before, n_after=self.expert_counts()[li],
                    probe_loss_before=before, probe_loss_after=after,
                    cause=action.cause or f"usage {action.usage:.4f} vs {action.threshold:g}", slot=action.slot,
                    reading=reading(action)))
        self.update_routing(ctx.step)
        return events

    def _read_usage(self) -> list[list[float]]:
        """Usage share per slot over the interval, summed over ranks; resets the counters."""
        counts = sum_over_ranks(self.usage_counts.double())  # (L, E)
        self.usage_counts.zero_()
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
        return (counts / totals).tolist()

    def _read_utility(self) -> list[list[float]] | None:
        """Gradient utility per slot over the interval (split_by: gradient); resets it."""
        if self.grad_utility is None:
            return None
        utility = self.grad_utility.tolist()
        self.grad_utility.zero_()
        return utility

    def _growth(self, step: int, usage: list[float], utility: list[list[float]] | None, layer: int) -> Growth | None:
        """The schedule's births for one layer at this decision (None: no schedule)."""
        m = self.morph
        target = growth_target(step, m, self.moe.experts_init, self.moe.experts_max, self.total_steps)
        if target is None:
            return None
        scores = usage if utility is None else utility[layer]
        return Growth(target, self.moe.experts_max, growth_decisions(m, self.total_steps) * m.interval, m.split_by,
                      scores)

    def _operate(self, layer: MoELayer, optimizer, row, action: Action, step: int) -> ExpertRecord:
        """Apply one action to parameters, optimizer state and records; returns the expert acted on."""
        m = self.morph
        if action.kind == "graduate":
            row[action.slot].probation_until = 0
            return row[action.slot]
        if action.kind in ("prune", "failed_probation"):
            record = row[action.slot]
            for parent in action.cools:
                row[parent].cooldown_until = step + m.cooldown_intervals * m.interval
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
                                  probation_until=step + max(m.probation_steps, 1), origin=action.kind)
        row[action.slot] = record
        return record

    def on_layer_shift(self, shift: LayerShift) -> None:
        """Position i now holds the block that was at position sources[i]. The newborn's
        experts get new ids: copies of its parent's records (same slot state, so routing
        ramps stay in step, parents = the copied expert) or, for a fresh block, founders
        born at the shift's step."""
        old = self.records
        self.records = [old[src] for src in shift.sources]
        # Interval counts follow their blocks as the blocks' buffers do: a copy inherits its
        # parent's, a fresh block starts from none.
        self.usage_counts = shift_rows(self.usage_counts, shift.sources)
        if shift.parent < 0:
            self.usage_counts[shift.newborn] = 0
        if self.grad_utility is not None:
            self.grad_utility = shift_rows(self.grad_utility, shift.sources)
            if shift.parent < 0:
                self.grad_utility[shift.newborn] = 0
        if shift.parent >= 0:
            row = []
            for r in old[shift.parent]:
                row.append(None if r is None else dataclasses.replace(r, id=self.next_id, parents=(r.id,)))
                self.next_id += r is not None
        else:
            row = self._founders(birth_step=shift.step)
        self.records[shift.newborn] = row

    # -- reports ---------------------------------------------------------------- #
    @torch.no_grad()
    def log_row(self) -> dict:
        """Per layer: live experts, the entropy of the routing shares over the row's window and its
        max load (the largest share over the mean share of a live expert); the cumulative
        live-expert parameter-steps. Sums the window's counts over ranks (a collective)."""
        counts = sum_over_ranks(self.window_counts.double()).cpu()
        self.window_counts.zero_()
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        self.window_share = share
        row = {}
        for i, n in enumerate(self.expert_counts()):
            p = share[i][share[i] > 0]
            row[layer_column("experts", i)] = n
            row[layer_column("usage_entropy", i)] = round(float(-(p * p.log()).sum()), 6)
            row[layer_column("max_load", i)] = round(float(share[i].max() * n), 6)  # max / mean over live
        row.update(expert_param_steps=self.param_steps.total)   # training_log.csv column
        return row

    def structure(self) -> str:
        return f"Experts per layer {per_layer(self.expert_counts())}"

    def event_notes(self, events: list[Event]) -> list[str]:
        if any(e.granularity == self.granularity for e in events):
            return [f"Experts per layer | {per_layer(self.expert_counts())}"]
        return []

    def distributions(self, step: int) -> dict[str, list[float]]:
        """At a decision: each layer's usage shares over the interval that just ended (of the
        experts live when it decided)."""
        usage = self.decision_usage(step)
        return {} if usage is None else {f"{TB_USAGE_TAG}/L{li}": shares for li, shares in enumerate(usage) if shares}

    def snapshot(self) -> list[dict]:
        """plasticity.csv: each live expert's share of its layer's token-choices over the last row's window."""
        if self.window_share is None:
            return []
        return [{"layer": li, "unit": f"e{r.id}", "name": "usage", "value": round(float(self.window_share[li][slot]), 6)}
                for li, row in enumerate(self.records) for slot, r in enumerate(row) if r is not None]

    # -- checkpointing --------------------------------------------------------- #
    def state_dict(self) -> dict:
        """Records and generator (the same on every rank), this rank's usage counts since
        the last decision (summed over ranks only when the next decision reads them) and, with
        split_by: gradient, the gradient utility since the last decision; for the logs, this
        rank's counts since the last row and the live-expert parameter-steps."""
        state = {"next_id": self.next_id, "generator": self.generator.get_state(),
                 "records": [[None if r is None else dataclasses.asdict(r) for r in row] for row in self.records],
                 "usage_counts": [row.cpu() for row in self.usage_counts],
                 "window_counts": [row.cpu() for row in self.window_counts],
                 "param_steps": self.param_steps.total}
        if self.grad_utility is not None:
            state["grad_utility"] = self.grad_utility.cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_id = state["next_id"]
        self.generator.set_state(state["generator"])
        self.records = [[None if r is None else ExpertRecord(**{**r, "parents": tuple(r["parents"])})
                         for r in row] for row in state["records"]]
        for row, counts in zip(self.usage_counts, state.get("usage_counts", [])):
            row.copy_(counts)
        self.window_counts.zero_()
        for row, counts in zip(self.window_counts, state.get("window_counts", [])):
            row.copy_(counts)
        self._saved_param_steps = state.get("param_steps")   # None: a checkpoint written before the count
        if self.grad_utility is not None:
            # Absent: a checkpoint of a run without it (split_by changed on resume): from zero.
            self.grad_utility.zero_()
            if "grad_utility" in state:
                self.grad_utility.copy_(state["grad_utility"])
        for layer in self.layers:
            # Zero at every step boundary; a checkpoint written before the interval counts
            # moved here holds them in the model's buffers too (they would count twice).
            layer.usage_counts.zero_()

    def resumed(self, step: int) -> list[str]:
        return self.param_steps.restore(self._saved_param_steps, step)


def per_layer(counts) -> str:
    """Experts per layer as the logs show them: [5, 6] (layer 0 has 5, layer 1 has 6)."""
    return "[" + ", ".join(str(int(n)) for n in counts) + "]"
