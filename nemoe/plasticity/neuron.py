"""Neuron apoptosis inside experts (`plasticity.neuron`): the least fit die and are reborn.

`method` picks the rule: functional (below, the default), or one of the recyclers of the
literature, redo / cbp / shrink_perturb (nemoe/plasticity/recyclers.py). They share the
records, the events, the re-kill rate and the optimizer surgery here.

Neuron j of expert e is column j of w_in[e], entry j of b_in[e] and row j of
w_out[e]:  h = gelu(x @ w_in[e] + b_in[e])  (n, H);  out = h @ w_out[e] + b_out[e].
Every `interval` steps, in each live expert that received tokens, the
int(prune_rate * H) eligible neurons of lowest fitness die and are reborn in place.

Fitness, accumulated over the whole interval (not one batch):
  grad_activation  sum over steps and tokens of |h_j * dL/dh_j|: the first-order
                   Taylor estimate of the loss change if h_j were zeroed
                   (Molchanov et al. 2017, "Pruning Convolutional Neural Networks
                   for Resource Efficient Inference", eq. 7, taken per token)
  gradient         sum over steps of ||dL/dtheta_j||, theta_j = the neuron's weights
  weight           ||theta_j|| at the event
  composite        sum_m c_m * F_m / mean_j(F_m): the three, each divided by its
                   mean over the expert's neurons (scale-free), weighted by composite_*
Regrowth:
  random      fresh incoming weights ~ N(0, 0.02^2) and bias 0 (the pool's init)
  clone       the i-th newborn copies the incoming weights of the i-th fittest survivor
  mutation    a survivor drawn in proportion to fitness, plus noise of std
              mutation_std * RMS(parent's incoming weights) (bias: RMS of the biases)
  functional  before the deaths, the survivors' outgoing rows and b_out are refit by
              least squares on activations recorded over the interval's last
              `record_steps` steps so that they re-express the dead neurons' output;
              the newborns get fresh incoming weights (as `random`)
Every newborn starts with zero outgoing weights, so at the event an expert loses
only its dead neurons' contribution, and under `functional` the survivors take it
over as far as a linear map of their activations can.

Maturity: zero outgoing weights also make a newborn's fitness near zero until it
has learned (its dL/dh is w_out_j . dL/dout), so without protection the next event
kills it again. A neuron reborn by turnover sits out the next `maturity_intervals`
events (continual backprop's maturity threshold, Dohare et al. 2024); `min_age`
(steps, every neuron) applies on top. Each event measures the re-kill rate per
layer: the share of its deaths that hit neurons reborn at the previous event
(plasticity.csv `rekill_rate`).

Optimizer state: a newborn's slices (w_in column, b_in entry, w_out row) get zero
moments. Adam's step count is shared by the whole tensor and left alone, so the
newborn's first update is bias-corrected like everyone's and about
(1 - beta1) / sqrt(1 - beta2) of a full step. Refit survivor rows and b_out keep
their moments: the refit moves them a little, their gradient statistics stay valid.

Records per (layer, slot, neuron), checkpointed: birth step, parent neuron (-1:
none), generation (parent's + 1 for clone/mutation; 0 starts a fresh line) and the
number of deaths at that position (> 0: the neuron there was reborn by turnover at
its birth step). When expert morphogenesis puts a new expert in
a slot (a split or crossover event), that slot's records restart (born then, no
parent, generation 0, fitness reset): an expert's neurons are judged from its own
birth, not its parent's history. When layer senescence moves blocks, the records
move with them, and a newborn block's records start fresh.

Activation checkpointing: h is seen through a tensor hook that fires once per
backward pass; the recomputed forward's graph is never backpropagated, so nothing
counts twice (tested). With fp16 + GradScaler the hook sees gradients times the
loss scale, which weights the steps of an interval by the scale in force (the
scale changes rarely); rankings inside one expert are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemoe.distributed import sum_over_ranks_
from nemoe.dormancy import activity_scores
from nemoe.moe import ExpertPool
from nemoe.plasticity import recyclers
from nemoe.plasticity.base import ActContext, Event, LayerShift, Mechanism, element_states, shift_rows
from nemoe.plasticity.neuron_rules import composite_fitness, neuron_norms, refit_outgoing, select_dead
from nemoe.plasticity.recyclers import INIT_STD


class HiddenCapture:
    """Installed as one ExpertPool's `capture`: fitness statistics of its hidden layer.

    Only passes that run backward count (eval and probe passes have no grad). The
    statistics wait here until `NeuronPlasticity.observe` accepts them for a step
    with finite gradients; a step the trainer skipped leaves them behind, and the
    next step's first forward (gradients just set to None) drops them.
    """

    def __init__(self, pool: ExpertPool, record_gram: bool, record_activity: bool = False):
        n_slots, _, width = pool.w_in.shape
        kw = {"dtype": torch.float64, "device": pool.w_in.device}
        self.pool = pool
        self.taylor = torch.zeros(n_slots, width, **kw)          # (E, H) sum |h * dL/dh|
        self.tokens = torch.zeros(n_slots, **kw)                  # (E,) tokens seen
        # redo / cbp: (E, H) sums of |h| and of h over the tokens
        self.abs_sum = torch.zeros(n_slots, width, **kw) if record_activity else None
        self.h_sum = torch.zeros(n_slots, width, **kw) if record_activity else None
        # (E, H+1, H+1) sum of a a^T with a = [h, 1]: all the refit needs.
        self.gram = torch.zeros(n_slots, width + 1, width + 1, **kw) if record_gram else None
        self.recording = False   # record the Gram matrix in this step (the refit window)
        self.dirty = False

    def clear(self) -> None:
        for t in (self.taylor, self.tokens, self.gram, self.abs_sum, self.h_sum):
            if t is not None:
                t.zero_()
        self.dirty = False

    def __call__(self, slot: int, h: torch.Tensor) -> torch.Tensor:
        if not h.requires_grad:
            return h
        if self.dirty and self.pool.w_in.grad is None:
            self.clear()   # left by a skipped (non-finite) step
        seen, record = h.detach(), self.recording and self.gram is not None

        def on_grad(grad: torch.Tensor) -> None:
            self.dirty = True
            hf = seen.float()                                        # (n, H)
            self.taylor[slot] += (hf * grad.float()).abs().sum(0)
            self.tokens[slot] += hf.shape[0]
            if self.abs_sum is not None:
                self.abs_sum[slot] += hf.abs().sum(0)
                self.h_sum[slot] += hf.sum(0)
            if record:
                a = F.pad(hf, (0, 1), value=1.0)                     # (n, H+1)
                self.gram[slot] += a.T @ a

        h.register_hook(on_grad)
        return h


# --------------------------------------------------------------------------- #
# The mechanism
# --------------------------------------------------------------------------- #

class NeuronPlasticity(Mechanism):
    granularity = "neuron"
    config_key = "neuron"

    def __init__(self, cfg, model: torch.nn.Module, probe_batch: torch.Tensor):
        super().__init__(cfg, model, probe_batch)
        s = self.section
        self.method = s.method
        # redo and cbp regrow as `random` does: fresh incoming weights, outgoing zero.
        self.regrowth = s.regrowth if self.method == "functional" else "random"
        self.layers = model.moe_layers
        n_slots, _, self.width = self.layers[0].experts.w_in.shape
        self.n_deaths = int(s.prune_rate * self.width)
        # w_out's init std (NemoeLM: GPT-2's residual scaling), for shrink_perturb's fresh draw
        self.out_std = INIT_STD / (2 * cfg.model.n_layers) ** 0.5
        device = self.layers[0].experts.w_in.device
        shape = (len(self.layers), n_slots, self.width)
        long = {"dtype": torch.long, "device": device}
        real = {"dtype": torch.float64, "device": device}
        self.generator = torch.Generator().manual_seed(s.seed)
        self.birth_step = torch.zeros(shape, **long)       # (L, E, H)
        self.parent = torch.full(shape, -1, **long)        # parent neuron index, -1: none
        self.generation = torch.zeros(shape, **long)
        self.deaths = torch.zeros(shape, **long)           # deaths at this position so far
        self.taylor = torch.zeros(shape, **real)           # interval accumulators ...
        self.grad_norm = torch.zeros(shape, **real)
        self.tokens = torch.zeros(shape[:2], **real)       # (L, E)
        functional = self.regrowth == "functional"
        self.gram = torch.zeros(*shape[:2], self.width + 1, self.width + 1, **real) if functional else None
        redo, cbp = self.method == "redo", self.method == "cbp"
        self.activity = torch.zeros(shape, **real) if redo else None         # redo: interval sum of |h|
        self.util = torch.zeros(shape, **real) if cbp else None             # cbp: running averages ...
        self.mean_act = torch.zeros(shape, **real) if cbp else None
        self.updates = torch.zeros(shape, **long) if cbp else None          # ... and their update counts
        self.pending = torch.zeros(shape[:2], **real) if cbp else None      # cbp: replacements due (L, E)
        self.last_fitness = torch.zeros(shape, **real)     # ... and the last event's fitness
        self.rekills = torch.zeros(shape[0], **long)       # (L,) last event: deaths of the previous
        self.event_deaths = torch.zeros(shape[0], **long)  # event's newborns, of all its deaths
        self.last_event = -1                               # step of the last event (-1: none yet)
        self.step = 0
        self.captures = [HiddenCapture(layer.experts, functional, redo or cbp) for layer in self.layers]
        for layer, capture in zip(self.layers, self.captures):
            layer.experts.capture = capture
        self._set_recording(0)

    # -- measuring ------------------------------------------------------------- #
    def _set_recording(self, step: int) -> None:
        """Record activations for the refit when train step `step` lies in the last
        record_steps of its interval (it completes step count step + 1)."""
        interval = self.section.interval
        window = min(self.section.record_steps or interval, interval)
        done = step + 1
        next_event = -(-done // interval) * interval
        for capture in self.captures:
            capture.recording = done > next_event - window

    @torch.no_grad()
    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        uses_gradient = self.section.metric in ("gradient", "composite")
        for li, (layer, capture) in enumerate(zip(self.layers, self.captures)):
            # dL/dh reached the hook scaled by the fp16 loss scale, which changes over a run.
            self.taylor[li] += capture.taylor if grad_scale == 1.0 else capture.taylor / grad_scale
            self.tokens[li] += capture.tokens
            if self.gram is not None and capture.recording:
                self.gram[li] += capture.gram
            if self.activity is not None:
                self.activity[li] += capture.abs_sum
            if self.util is not None:
                self._cbp_step(li, capture, step + 1)
            capture.clear()
            if uses_gradient:
                pool = layer.experts
                grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                         for p in (pool.w_in, pool.b_in, pool.w_out)]
                self.grad_norm[li] += neuron_norms(*grads)
        self._set_recording(step + 1)
        self.step = step + 1

    def _cbp_step(self, li: int, capture: HiddenCapture, done: int) -> None:
        """Continual backprop after applied step `done`: the running averages (summed over ranks:
        every rank decides alike) and the replacements due in each live expert."""
        for t in (capture.abs_sum, capture.h_sum, capture.tokens):
            sum_over_ranks_(t)
        layer = self.layers[li]
        recyclers.cbp_update_(self.util[li], self.mean_act[li], self.updates[li], capture.abs_sum,
                              capture.h_sum, capture.tokens, layer.experts.w_out, self.section.cbp_decay)
        mature = torch.stack([self.eligible(li, slot, done) for slot in range(self.pending.shape[1])])
        live = layer.active.to(mature.device)
        due = recyclers.cbp_due(self.pending[li], mature.sum(-1), self.section.cbp_replacement_rate)
        self.pending[li] = torch.where(live, due, self.pending[li])

    # -- following the other mechanisms ------------------------------------------ #
    _PER_LAYER = ("birth_step", "parent", "generation", "deaths", "taylor", "grad_norm", "tokens", "gram",
                  "last_fitness", "rekills", "event_deaths", "activity", "util", "mean_act", "updates", "pending")

    def on_events(self, events: list[Event]) -> None:
        """A new expert in a slot (split or crossover): its neurons' records restart."""
        for e in events:
            if e.granularity == "expert" and e.event in ("split", "crossover"):
                self._restart(e.layer, e.slot, e.step)

    @torch.no_grad()
    def on_layer_shift(self, shift: LayerShift) -> None:
        """Records move with their blocks; the newborn block's neurons all start fresh."""
        for name in self._PER_LAYER:
            t = getattr(self, name)
            if t is not None:
                t.copy_(shift_rows(t, shift.sources))
        for slot in range(self.tokens.shape[1]):
            self._restart(shift.newborn, slot, shift.step)
        for t in (self.last_fitness, self.rekills, self.event_deaths):
            t[shift.newborn] = 0

    @torch.no_grad()
    def _restart(self, li: int, slot: int, step: int) -> None:
        """Fresh records for every neuron of one slot: born at `step`, no parent, no history."""
        self.birth_step[li, slot] = step
        self.parent[li, slot] = -1
        for t in (self.generation, self.deaths, self.taylor, self.grad_norm, self.tokens, self.gram,
                  self.activity, self.util, self.mean_act, self.updates, self.pending):
            if t is not None:
                t[li, slot] = 0

    @torch.no_grad()
    def _fitness(self, li: int) -> torch.Tensor:
        """(E, H) fitness of layer li's neurons under the configured metric."""
        s, pool = self.section, self.layers[li].experts
        if self.method == "redo":       # ReDo's score: mean |h| / the expert's mean over neurons
            return activity_scores(self.activity[li], self.tokens[li])
        if self.method == "cbp":        # the bias-corrected contribution utility
            return recyclers.corrected(self.util[li], self.updates[li], s.cbp_decay)
        parts = {"grad_activation": self.taylor[li], "gradient": self.grad_norm[li],
                 "weight": neuron_norms(pool.w_in, pool.b_in, pool.w_out).to(self.taylor.device)}
        if s.metric != "composite":
            return parts[s.metric]
        return composite_fitness(parts, {"grad_activation": s.composite_taylor,
                                         "gradient": s.composite_gradient, "weight": s.composite_weight})

    # -- acting ---------------------------------------------------------------- #
    def eligible(self, li: int, slot: int, step: int) -> torch.Tensor:
        """(H,) which neurons of (li, slot) may die at `step`: at least `min_age` steps old, and
        (functional) not reborn by turnover within the last `maturity_intervals` intervals, or
        (cbp) older than cbp_maturity steps; redo protects no one."""
        s = self.section
        age = step - self.birth_step[li, slot]
        if self.method == "redo":       # ReDo protects no one: a newborn is active by construction
            return age >= s.min_age
        if self.method == "cbp":        # continual backprop's maturity threshold, in steps
            return (age >= s.min_age) & (age > s.cbp_maturity)
        newborn = (self.deaths[li, slot] > 0) & (age <= s.maturity_intervals * s.interval)
        return (age >= s.min_age) & ~newborn

    def act(self, ctx: ActContext) -> list[Event]:
        self.step = step = ctx.step
        # Activation statistics differ per data-parallel rank: sum them (gradients already agree).
        for t in (self.taylor, self.tokens, self.gram, self.activity):
            if t is not None:
                sum_over_ranks_(t)
        events: list[Event] = []
        self.rekills.zero_()
        self.event_deaths.zero_()
        for li, layer in enumerate(self.layers):
            if self.method == "shrink_perturb":
                events += self._shrink_perturb(ctx, li)
                continue
            fitness = self._fitness(li)                                      # (E, H)
            self.last_fitness[li] = fitness
            live, traffic = layer.active.tolist(), self.tokens[li].tolist()
            for slot in range(len(live)):
                if not live[slot] or traffic[slot] == 0:
                    continue   # a free slot, or no tokens this interval: no evidence
                dead = self._select(li, slot, fitness[slot], step)
                if len(dead) == 0:
                    continue
                # Reborn by turnover (deaths > 0) at the previous event: a re-kill.
                rekilled = (self.deaths[li, slot, dead] > 0) & (self.birth_step[li, slot, dead] == self.last_event)
                self.rekills[li] += int(rekilled.sum())
                self.event_deaths[li] += len(dead)
                before = ctx.probe()
                parents, residual = self._turn_over(ctx.optimizer, li, slot, dead, fitness[slot], step)
                events.append(self._event(ctx, li, slot, dead, parents, fitness[slot], residual, before,
                                          ctx.probe.measure()))
        for t in (self.taylor, self.grad_norm, self.tokens, self.gram, self.activity):
            if t is not None:
                t.zero_()
        self.last_event = step
        return events

    def _select(self, li: int, slot: int, fitness: torch.Tensor, step: int) -> torch.Tensor:
        """The neurons of (li, slot) that die at `step`, worst first, by the method's rule."""
        eligible = self.eligible(li, slot, step)
        if self.method == "redo":
            return recyclers.redo_candidates(fitness, self.section.redo_tau, eligible)
        if self.method == "cbp":
            dead = select_dead(fitness, int(self.pending[li, slot]), eligible)
            self.pending[li, slot] -= len(dead)
            return dead
        return select_dead(fitness, self.n_deaths, eligible)

    def _shrink_perturb(self, ctx: ActContext, li: int) -> list[Event]:
        """Shrink & Perturb on the live experts of layer li: one event (probe loss around it)."""
        s, layer = self.section, self.layers[li]
        slots = layer.active.nonzero().squeeze(1)
        if len(slots) == 0:
            return []
        before = ctx.probe()
        recyclers.shrink_perturb_(layer.experts, slots, s.sp_shrink, s.sp_perturb, self.out_std, self.generator)
        unit = " ".join(f"e{ctx.expert_id(li, slot)}" for slot in slots.tolist())
        return [Event(step=ctx.step, tokens=ctx.tokens, granularity="neuron", event="shrink_perturb", layer=li,
                      unit=unit, value=s.sp_shrink, threshold=s.sp_perturb, n_before=self.width,
                      n_after=self.width, probe_loss_before=before, probe_loss_after=ctx.probe.measure(),
                      cause=f"theta <- {s.sp_shrink:g} theta + {s.sp_perturb:g} fresh init, "
                            f"{len(slots)} live experts")]

    def _parents(self, fitness: torch.Tensor, dead: torch.Tensor) -> list[int]:
        """Parent neuron of each newborn (-1 for none), by the regrowth rule."""
        rule, k = self.regrowth, len(dead)
        if rule in ("random", "functional"):
            return [-1] * k
        alive = torch.ones_like(fitness, dtype=torch.bool)
        alive[dead] = False
        survivors = alive.nonzero().squeeze(1).cpu()
        fit = fitness.cpu()[survivors].clamp_min(0)
        if rule == "clone":   # fittest first, cycling when more die than survive
            ranked = survivors[torch.sort(-fit, stable=True).indices]
            return [int(ranked[i % len(ranked)]) for i in range(k)]
        weights = fit if fit.sum() > 0 else torch.ones_like(fit)
        picked = torch.multinomial(weights, k, replacement=True, generator=self.generator)
        return survivors[picked].tolist()

    @torch.no_grad()
    def _turn_over(self, optimizer, li: int, slot: int, dead: torch.Tensor, fitness: torch.Tensor,
                   step: int) -> tuple[list[int], float | None]:
        """Kill `dead` in (li, slot) and write the newborns; returns (parents, refit residual)."""
        pool = self.layers[li].experts
        dead = dead.to(pool.w_in.device)
        residual = None
        if self.method == "cbp":
            self._cbp_handover(li, slot, dead)
        if self.regrowth == "functional" and self.gram[li, slot, -1, -1] > 0:
            rows, shift, residual = refit_outgoing(self.gram[li, slot], pool.w_out[slot], dead)
            alive = torch.ones(self.width, dtype=torch.bool, device=dead.device)
            alive[dead] = False
            pool.w_out[slot, alive] = rows.to(pool.w_out.dtype)
            pool.b_out[slot] += shift.to(pool.b_out.dtype)
        parents = self._parents(fitness, dead)
        self._write_incoming(pool, slot, dead, parents)
        pool.w_out[slot, dead] = 0
        for p, index in ((pool.w_in, (slot, slice(None), dead)), (pool.b_in, (slot, dead)),
                         (pool.w_out, (slot, dead))):
            for state in element_states(optimizer, p):
                state[index] = 0
        src = torch.tensor(parents, device=dead.device)
        has_parent = src >= 0
        self.generation[li, slot, dead] = torch.where(
            has_parent, self.generation[li, slot, src.clamp_min(0)] + 1, 0)
        self.parent[li, slot, dead] = src
        self.birth_step[li, slot, dead] = step
        self.deaths[li, slot, dead] += 1
        return parents, residual

    def _cbp_handover(self, li: int, slot: int, dead: torch.Tensor) -> None:
        """Continual backprop: b_out takes the dead neurons' mean contribution (bias-corrected mean
        activation times their outgoing rows), and their running averages restart."""
        pool, decay = self.layers[li].experts, self.section.cbp_decay
        mean = recyclers.corrected(self.mean_act[li, slot, dead], self.updates[li, slot, dead], decay)
        shift = (mean.unsqueeze(1) * pool.w_out[slot, dead].double()).sum(0)        # (C,)
        pool.b_out[slot] += shift.to(pool.b_out.dtype)
        for t in (self.util, self.mean_act, self.updates):
            t[li, slot, dead] = 0

    def _write_incoming(self, pool: ExpertPool, slot: int, dead: torch.Tensor, parents: list[int]) -> None:
        rule, k = self.regrowth, len(dead)
        w_in, b_in = pool.w_in[slot], pool.b_in[slot]            # (C, H), (H,) views
        if rule in ("random", "functional"):
            noise = torch.randn(w_in.shape[0], k, generator=self.generator)   # CPU: same on every device
            w_in[:, dead] = (noise * INIT_STD).to(w_in.device, w_in.dtype)
            b_in[dead] = 0
            return
        src = torch.tensor(parents, device=dead.device)
        new_w, new_b = w_in[:, src].clone(), b_in[src].clone()               # (C, k), (k,)
        if rule == "mutation" and self.section.mutation_std > 0:
            std = self.section.mutation_std
            col_rms = new_w.float().pow(2).mean(0).sqrt().cpu()              # (k,)
            bias_rms = b_in.float().pow(2).mean().sqrt().cpu()
            new_w += (torch.randn(new_w.shape, generator=self.generator) * std * col_rms).to(new_w)
            new_b += (torch.randn(k, generator=self.generator) * std * bias_rms).to(new_b)
        w_in[:, dead] = new_w
        b_in[dead] = new_b

    def _event(self, ctx, li, slot, dead, parents, fitness, residual, before, after) -> Event:
        s = self.section
        dead_fitness = fitness[dead.to(fitness.device)]
        cutoff = float(dead_fitness.max())
        cause = {"redo": f"redo score <= {cutoff:.4g} (tau {s.redo_tau:g}); fresh incoming, outgoing 0",
                 "cbp": f"cbp utility <= {cutoff:.4g}; fresh incoming, outgoing 0, b_out takes the mean"
                 }.get(self.method, f"{s.metric} <= {cutoff:.4g}; {s.regrowth}")
        if self.regrowth == "functional":
            cause += f" refit residual {residual:.4g}" if residual is not None else " (no recorded tokens)"
        return Event(
            step=ctx.step, tokens=ctx.tokens, granularity="neuron", event="turnover", layer=li,
            unit=" ".join(f"n{j}" for j in dead.tolist()), expert=ctx.expert_id(li, slot),
            parents=" ".join(f"n{p}" for p in parents if p >= 0), value=float(dead_fitness.mean()),
            threshold=cutoff, n_before=self.width, n_after=self.width, probe_loss_before=before,
            probe_loss_after=after, cause=cause, slot=slot)

    # -- reporting and checkpoints ------------------------------------------------ #
    def snapshot(self) -> list[dict]:
        """Per layer, over live experts: mean neuron age, share of positions reborn at least
        once, deaths so far, deepest generation, last event's fitness mean and minimum and,
        once the layer had deaths at an event, that event's re-kill rate."""
        rows = []
        for li, layer in enumerate(self.layers):
            live = layer.active.to(self.birth_step.device)
            if not bool(live.any()):
                continue
            fitness = self.last_fitness[li][live]
            values = {"mean_age": float((self.step - self.birth_step[li][live]).double().mean()),
                      "reborn_fraction": float((self.deaths[li][live] > 0).double().mean()),
                      "deaths": int(self.deaths[li][live].sum()),
                      "max_generation": int(self.generation[li][live].max()),
                      "fitness_mean": float(fitness.mean()), "fitness_min": float(fitness.min())}
            if self.event_deaths[li] > 0:
                values["rekill_rate"] = float(self.rekills[li] / self.event_deaths[li])
            rows += [{"layer": li, "unit": "", "name": k, "value": v} for k, v in values.items()]
        return rows

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).cpu() for name in self._PER_LAYER if getattr(self, name) is not None}
        return state | {"generator": self.generator.get_state(), "step": self.step,
                        "recording": self.captures[0].recording, "last_event": self.last_event}

    def load_state_dict(self, state: dict) -> None:
        for name in self._PER_LAYER:
            mine = getattr(self, name)
            if mine is not None and name in state and state[name].shape == mine.shape:
                mine.copy_(state[name])
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        # A checkpoint from before the re-kill count: the last event is the newest turnover birth
        # (its re-kill rate is reported again from the next event on).
        reborn = self.birth_step[self.deaths > 0]
        self.last_event = state.get("last_event", int(reborn.max()) if len(reborn) else -1)
        for capture in self.captures:
            capture.recording = state["recording"]
            capture.clear()

