"""Attention-head plasticity: per-head gates; heads are pruned and reborn (plasticity.heads).

Each attention layer has a gate buffer g (n_heads,) and computes
y = proj(concat_h(g_h * attn_h)) (model.CausalSelfAttention). Parameter shapes never
change: a head is pruned by setting its gate to 0, and reborn by reinitialising its
q/k/v rows and proj columns (and their optimizer-state slices) while its gate is 0,
then opening the gate linearly over `warmup_steps`.

* Prune (which live heads die; `prune_fraction` of the live heads, all layers ranked
  together, never below `min_heads` in a layer):
    entropy     mean attention entropy on the held-out probe batch, each position's
                entropy divided by its maximum ln(t+1) (1 = uniform). The most diffuse
                heads die: Voita et al. 2019 found the heads that matter "confident"
                (sharp), and the diffuse ones prunable with little loss.
    magnitude   the smallest L2 norm of the head's q/k/v rows and proj columns.
    importance  the smallest I_h = mean over the interval's steps of |dL/dg_h|
                (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"), each
                step's vector normalised per layer by its L2 norm over the live heads, as
                Michel et al. do; the normalisation also removes an fp16 loss scale.
    random      uniform draws from the mechanism's own generator.
* Grow (which dead heads are reborn; `grow_fraction` of the dead ones):
    gradient_sensitivity  every dead head is first reinitialised, then |dL/dg_h| at
                g_h = 0 is measured on the probe batch: how fast the loss would fall
                if this newborn's gate opened. The largest are reborn.
    entropy_gap the layers whose live heads attend most diffusely (the largest gap
                to sharp attention, by the entropy above) get heads back first.
    balanced    the layer with the fewest live heads first.
    random      uniform draws.
* Function preserved at birth: a newborn's gate is 0 at its birth step, so the
  model's output is bit-identical right after the event (and a pruned head's output
  is exactly zero, as if its proj columns were zero).
* New-head learning rate: AdamW is invariant to gradient scaling, so a gradient
  hook cannot change a head's step size, and per-head parameter groups would need
  per-head parameters. Instead, while a newborn warms up, its slices get an exact
  post-step correction p = p_old + m * (p_after - p_old): torch's AdamW moves a
  parameter by -lr * (wd * p_old + m_hat / (sqrt(v_hat) + eps)) and its moments do
  not depend on lr, so scaling the move by m is AdamW at lr * m for those elements
  (decoupled weight decay included). The snapshot is taken in observe() (before the
  optimizer step) and the correction applied in after_step(), right after it.
* Gate gradients (importance) come from the gate buffers themselves: with
  prune=importance they require grad, so backward() accumulates dL/dg into
  `head_gate.grad` (not a parameter: no optimizer, no clipping, never trained);
  observe() reads and clears it every step. Under data parallelism these are
  local gradients, so the interval sums are all-reduced before a decision.
* Modes: continuous (every `interval` steps: regrow heads pruned at an earlier
  event, then prune) and cycle (`cycles` times: train `interval` steps -> prune ->
  train `recover_steps` with the heads pruned -> grow -> learn, the next cycle's
  train phase; a `head_measure` event with the probe loss before and after each
  phase change, and one at the end of the last learn phase). The cycle position is a
  function of the step, so a resume lands in the same phase.
"""

from __future__ import annotations

import math

import torch

from nemoe.distributed import sum_over_ranks_
from nemoe.model import split_block
from nemoe.plasticity.base import ActContext, Event, LayerShift, Mechanism, element_states, shift_rows


def count_of(fraction: float, n: int) -> int:
    """round(fraction * n), half up, at least 1 while n > 0."""
    return max(1, math.floor(fraction * n + 0.5)) if n > 0 else 0


def head_slices(attn, h: int) -> list[tuple[torch.nn.Parameter, tuple]]:
    """(parameter, index) of every slice that belongs to head h alone.

    qkv.weight (3C, C) holds q, k, v rows one after another, each block of C rows
    split into heads of hs rows; proj.weight (C, C) reads head h from columns
    h*hs:(h+1)*hs. proj.bias is shared by all heads.
    """
    C = attn.proj.weight.size(0)
    hs = C // attn.n_heads
    rows = torch.cat([torch.arange(part * C + h * hs, part * C + (h + 1) * hs) for part in range(3)])
    rows = rows.to(attn.qkv.weight.device)
    cols = slice(h * hs, (h + 1) * hs)
    return [(attn.qkv.weight, (rows,)), (attn.qkv.bias, (rows,)), (attn.proj.weight, (slice(None), cols))]


@torch.no_grad()
def attention_entropy(model, probe_batch: torch.Tensor) -> torch.Tensor:
    """(L, nh) mean normalised attention entropy of every head on the probe batch (eval mode).

    H_t = -sum_j p_tj ln p_tj over the t+1 visible keys, divided by ln(t+1), its value
    for uniform attention; position 0 (one key, H = 0 by force) is left out.
    """
    attns = [block.attn for block in model.blocks]
    inputs, _ = split_block(probe_batch.to(attns[0].proj.weight.device))
    captured: dict[int, torch.Tensor] = {}
    hooks = [a.register_forward_pre_hook(lambda _m, args, i=i: captured.__setitem__(i, args[0]))
             for i, a in enumerate(attns)]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    T = inputs.size(1)
    max_entropy = torch.arange(2, T + 1, device=inputs.device).float().log()       # (T-1,)
    rows = []
    for i, a in enumerate(attns):
        p = a.attention_probs(captured[i])                                          # (B, nh, T, T)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)                           # (B, nh, T)
        rows.append((entropy[..., 1:] / max_entropy).mean(dim=(0, 2)))              # (nh,)
    return torch.stack(rows).double().cpu()


def probe_gate_grads(model, probe_batch: torch.Tensor) -> torch.Tensor:
    """(L, nh) |dL/dg| on the probe batch at the current gates (eval mode; no .grad is written)."""
    attns = [block.attn for block in model.blocks]
    gates = [a.head_gate for a in attns]
    wanted = [g.requires_grad for g in gates]
    was_training = model.training
    model.eval()
    try:
        for g in gates:
            g.requires_grad_(True)
        with torch.enable_grad():
            loss = model(*split_block(probe_batch.to(gates[0].device))).loss_ce
            grads = torch.autograd.grad(loss, gates)
    finally:
        for g, w in zip(gates, wanted):
            g.requires_grad_(w)
        model.train(was_training)
    return torch.stack(grads).abs().double().cpu()


class HeadPlasticity(Mechanism):
    granularity = "head"
    config_key = "heads"

    def __init__(self, cfg, model, probe_batch):
        super().__init__(cfg, model, probe_batch)
        h = self.section
        self.n_layers, self.n_heads = cfg.model.n_layers, cfg.model.n_heads
        # GPT-2 initialisation, as NemoeLM uses: N(0, 0.02), residual projections / sqrt(2L).
        self.std_in, self.std_out = 0.02, 0.02 / (2 * cfg.model.n_layers) ** 0.5
        self.generator = torch.Generator().manual_seed(h.seed)
        shape = (self.n_layers, self.n_heads)
        self.born = torch.full(shape, -1, dtype=torch.long)       # birth step of a newborn; -1: founder
        self.pruned_at = torch.full(shape, -1, dtype=torch.long)  # step it died; -1: alive
        device = self.attns[0].proj.weight.device
        self.gate_grad_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.gate_grad_steps = 0
        self.last_observed = -1
        self._lr_snapshot: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
        self.track_gate_grad = h.prune == "importance"
        for a in self.attns:
            a.head_gate.requires_grad_(self.track_gate_grad)

    @property
    def attns(self):
        return [block.attn for block in self.model.blocks]

    @property
    def alive(self) -> torch.Tensor:
        return self.pruned_at < 0                                     # (L, nh) bool

    # -- every step ------------------------------------------------------------ #
    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        if self.track_gate_grad:
            self._accumulate_gate_grads(step)
        self.last_observed = step
        if self.section.new_head_lr_mult != 1.0:
            self._snapshot_newborns(step)
        self._set_gates(step + 1)

    def after_step(self, step: int) -> None:
        self._correct_newborn_steps()

    def due(self, step: int) -> bool:
        h = self.section
        if h.mode == "cycle":
            return step in self.cycle_schedule()
        return step > 0 and step % h.interval == 0

    def gate_value(self, layer: int, head: int, step: int) -> float:
        """The gate at the forward pass of optimizer step `step`: 0 dead, 1 founder,
        (step - birth) / warmup_steps for a newborn (0 at its birth step), capped at 1."""
        if self.pruned_at[layer, head] >= 0:
            return 0.0
        born = int(self.born[layer, head])
        if born < 0:
            return 1.0
        if step <= born:
            return 0.0
        warmup = self.section.warmup_steps
        return 1.0 if warmup == 0 else min(1.0, (step - born) / warmup)

    @torch.no_grad()
    def _set_gates(self, step: int) -> None:
        """Write the gates of every layer that has a newborn still warming up."""
        warming = (self.born >= 0) & (step - self.born <= max(self.section.warmup_steps, 1))
        for layer in warming.any(dim=1).nonzero().flatten().tolist():
            self._write_layer_gates(layer, step)

    @torch.no_grad()
    def _write_layer_gates(self, layer: int, step: int) -> None:
        values = [self.gate_value(layer, h, step) for h in range(self.n_heads)]
        self.attns[layer].head_gate.copy_(torch.tensor(values))

    def _accumulate_gate_grads(self, step: int) -> None:
        """Add this step's per-layer-normalised |dL/dg| (live heads) to the interval sum."""
        grads = [a.head_gate.grad for a in self.attns]
        for a in self.attns:
            a.head_gate.grad = None
        # A step skipped for non-finite gradients got no observe(): its gate gradients
        # are mixed into this .grad, so this one is dropped too.
        if step != self.last_observed + 1 or any(g is None for g in grads):
            return
        g = torch.stack(grads).detach().double().abs()                       # (L, nh)
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        g = g * self.alive.to(g.device)
        self.gate_grad_sum += g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.gate_grad_steps += 1

    # -- new-head learning rate -------------------------------------------------- #
    def _warming_heads(self, step: int) -> list[tuple[int, int]]:
        age = step - self.born
        mask = self.alive & (self.born >= 0) & (age >= 0) & (age < max(self.section.warmup_steps, 1))
        return [tuple(x) for x in mask.nonzero().tolist()]

    @torch.no_grad()
    def _snapshot_newborns(self, step: int) -> None:
        """Before the optimizer step: newborn slices as they are (the step's p_old)."""
        self._lr_snapshot = [(p, index, p[index].clone())
                             for layer, head in self._warming_heads(step)
                             for p, index in head_slices(self.attns[layer], head)]

    @torch.no_grad()
    def _correct_newborn_steps(self) -> None:
        """After the optimizer step: p = p_old + m * (p - p_old) on the newborn slices."""
        m = self.section.new_head_lr_mult
        for p, index, old in self._lr_snapshot:
            p[index] = old + m * (p[index] - old)
        self._lr_snapshot = []

    # -- decisions ------------------------------------------------------------- #
    def cycle_schedule(self) -> dict[int, tuple[str, int]]:
        """Cycle mode: step -> (operation, cycle number 1..N) of every phase boundary."""
        h = self.section
        period = h.interval + h.recover_steps
        schedule = {}
        for c in range(h.cycles):
            schedule[c * period + h.interval] = ("prune", c + 1)
            schedule[c * period + h.interval + h.recover_steps] = ("grow", c + 1)
        schedule[h.cycles * period + h.interval] = ("learn", h.cycles)
        return schedule

    def act(self, ctx: ActContext) -> list[Event]:
        if self.track_gate_grad:   # local gradients on each data-parallel rank: sum them
            sum_over_ranks_(self.gate_grad_sum)
        optimizer, step, tokens, probe = ctx.optimizer, ctx.step, ctx.tokens, ctx.probe
        if self.section.mode == "continuous":
            events = self._grow(optimizer, step, tokens, probe) + self._prune(optimizer, step, tokens, probe)
        else:
            events = self._cycle_step(optimizer, step, tokens, probe)
        self.gate_grad_sum.zero_()
        self.gate_grad_steps = 0
        return events

    def _cycle_step(self, optimizer, step, tokens, probe) -> list[Event]:
        operation, cycle = self.cycle_schedule()[step]
        before, n_before = probe(), int(self.alive.sum())
        if operation == "prune":
            events = self._prune(optimizer, step, tokens, probe)
            what = f"end of train phase, then prune {len(events)} head(s)"
        elif operation == "grow":
            events = self._grow(optimizer, step, tokens, probe)
            what = f"end of pruned phase, then grow {len(events)} head(s)"
        else:
            events, what = [], "end of the last learn phase"
        measure = self._event(step, tokens, "measure", -1, f"cycle{cycle} {operation}",
                              f"cycle {cycle}/{self.section.cycles}: {what}", 0.0, 0.0, n_before,
                              int(self.alive.sum()), before, probe())
        return events + [measure]

    def prune_scores(self) -> tuple[torch.Tensor, str, bool]:
        """(values (L, nh), what they are, True when the highest value prunes first)."""
        rule = self.section.prune
        if rule == "entropy":
            return attention_entropy(self.model, self.probe_batch), "entropy", True
        if rule == "magnitude":
            norms = [[sum(float(p.detach()[index].float().pow(2).sum()) for p, index in head_slices(a, h)
                          if p.dim() == 2) ** 0.5 for h in range(self.n_heads)] for a in self.attns]
            return torch.tensor(norms, dtype=torch.float64), "magnitude", False
        if rule == "importance":
            steps = max(self.gate_grad_steps, 1)
            return (self.gate_grad_sum / steps).cpu(), "importance", False
        return torch.rand(self.n_layers, self.n_heads, generator=self.generator, dtype=torch.float64), \
            "random draw", True

    def _prune(self, optimizer, step, tokens, probe) -> list[Event]:
        values, what, high_first = self.prune_scores()
        alive = self.alive
        protect = max(self.section.interval, self.section.warmup_steps)
        eligible = alive & ~((self.born >= 0) & (step - self.born < protect))   # newborns get time
        rank = values if high_first else -values
        order = sorted(eligible.nonzero().tolist(), key=lambda lh: (-float(rank[lh[0], lh[1]]), lh[0], lh[1]))
        live_per_layer = alive.sum(dim=1).tolist()
        n_prune = count_of(self.section.prune_fraction, int(alive.sum()))
        chosen = []
        for layer, head in order:
            if len(chosen) == n_prune:
                break
            if live_per_layer[layer] > self.section.min_heads:
                chosen.append((layer, head))
                live_per_layer[layer] -= 1
        kept = [float(values[lh[0], lh[1]]) for lh in order if tuple(lh) not in chosen]
        cut = (max(kept) if high_first else min(kept)) if kept else float("nan")
        events = []
        for layer, head in chosen:
            value, n_before, before = float(values[layer, head]), int(self.alive[layer].sum()), probe()
            self.prune_head(optimizer, layer, head, step)
            cause = f"{what} {value:.4g} {'>=' if high_first else '<='} kept {cut:.4g}"
            events.append(self._event(step, tokens, "prune", layer, f"h{head}", cause, value,
                                      cut, n_before, int(self.alive[layer].sum()), before, probe.measure()))
        return events

    def _grow(self, optimizer, step, tokens, probe) -> list[Event]:
        dead = [tuple(x) for x in ((self.pruned_at >= 0) & (self.pruned_at < step)).nonzero().tolist()]
        n_grow = count_of(self.section.grow_fraction, len(dead))
        if not n_grow:
            return []
        rule = self.section.grow
        fresh = set()
        if rule == "gradient_sensitivity":
            for layer, head in dead:   # measure each candidate as it would be born
                self.reinit_head(optimizer, layer, head)
            fresh = set(dead)
            values = probe_gate_grads(self.model, self.probe_batch)
        elif rule == "entropy_gap":
            entropy = attention_entropy(self.model, self.probe_batch)
            alive = self.alive
            layer_mean = [float(entropy[i][alive[i]].mean()) for i in range(self.n_layers)]
            values = torch.tensor(layer_mean, dtype=torch.float64)[:, None].expand(-1, self.n_heads)
        elif rule == "random":
            values = torch.rand(self.n_layers, self.n_heads, generator=self.generator, dtype=torch.float64)
        else:
            values = None
        chosen = self._pick_growth(dead, n_grow, values)
        events = []
        for layer, head in chosen:
            n_before, before = int(self.alive[layer].sum()), probe()
            if (layer, head) not in fresh:
                self.reinit_head(optimizer, layer, head)
            self.pruned_at[layer, head] = -1
            self.born[layer, head] = step
            self._write_layer_gates(layer, step)      # 0 at birth: the output is unchanged
            cause = {"gradient_sensitivity": "|dL/dgate| at gate 0: {:.4g}",
                     "entropy_gap": "layer live-head entropy {:.4g}",
                     "balanced": "layer had {:.0f} live heads",
                     "random": "random draw {:.4g}"}[rule].format(
                n_before if values is None else float(values[layer, head]))
            events.append(self._event(step, tokens, "grow", layer, f"h{head}", cause,
                                      n_before if values is None else float(values[layer, head]), 0.0,
                                      n_before, int(self.alive[layer].sum()), before, probe.measure()))
        return events

    def _pick_growth(self, dead, n_grow, values) -> list[tuple[int, int]]:
        """The n_grow dead heads to rebirth: highest value first, or (balanced, values None)
        repeatedly the dead head of the layer with the fewest live heads."""
        if values is not None:
            return sorted(dead, key=lambda lh: (-float(values[lh]), lh))[:n_grow]
        live = self.alive.sum(dim=1).tolist()
        remaining, chosen = sorted(dead), []
        for _ in range(n_grow):
            pick = min(remaining, key=lambda lh: (live[lh[0]], lh))
            remaining.remove(pick)
            live[pick[0]] += 1
            chosen.append(pick)
        return chosen

    # -- surgery ---------------------------------------------------------------- #
    @torch.no_grad()
    def prune_head(self, optimizer, layer: int, head: int, step: int) -> None:
        """Gate 0 and zero moments: the head adds nothing and no leftover momentum moves it."""
        attn = self.attns[layer]
        attn.head_gate[head] = 0.0
        self.pruned_at[layer, head] = step
        self.born[layer, head] = -1
        for p, index in head_slices(attn, head):
            for s in element_states(optimizer, p):
                s[index] = 0

    @torch.no_grad()
    def reinit_head(self, optimizer, layer: int, head: int) -> None:
        """Fresh q/k/v rows and proj columns (GPT-2 init, own generator), zero biases and moments."""
        for p, index in head_slices(self.attns[layer], head):
            if p.dim() == 1:
                p[index] = 0
            else:
                std = self.std_in if p is self.attns[layer].qkv.weight else self.std_out
                shape = p[index].shape
                p[index] = (torch.randn(shape, generator=self.generator) * std).to(p.device, p.dtype)
            for s in element_states(optimizer, p):
                s[index] = 0

    # -- output ----------------------------------------------------------------- #
    def _event(self, step, tokens, event, layer, unit, cause, value, threshold, n_before, n_after,
               before, after) -> Event:
        return Event(step=step, tokens=tokens, granularity="head", event=event, layer=layer, unit=unit,
                     value=value, threshold=threshold, n_before=n_before, n_after=n_after,
                     probe_loss_before=before, probe_loss_after=after, cause=cause)

    # -- following layer shifts ------------------------------------------------ #
    def on_layer_shift(self, shift: LayerShift) -> None:
        """Head records move with their blocks (whose gates moved with the block's buffers). A
        copied newborn carries its parent's heads, records included; a fresh one has all heads open."""
        self.born = shift_rows(self.born, shift.sources)
        self.pruned_at = shift_rows(self.pruned_at, shift.sources)
        self.gate_grad_sum.copy_(shift_rows(self.gate_grad_sum, shift.sources))
        if shift.parent < 0:   # (a copy's row already came from sources[newborn] == parent)
            self.born[shift.newborn] = -1
            self.pruned_at[shift.newborn] = -1
            self.gate_grad_sum[shift.newborn] = 0
            with torch.no_grad():
                self.attns[shift.newborn].head_gate.fill_(1.0)

    def snapshot(self) -> list[dict]:
        """Per head: gate, and attention entropy on the probe batch (plasticity.csv)."""
        entropy = attention_entropy(self.model, self.probe_batch)
        rows = []
        for layer, attn in enumerate(self.attns):
            gates = attn.head_gate.detach().cpu().tolist()
            for head in range(self.n_heads):
                rows.append({"layer": layer, "unit": f"h{head}", "name": "gate", "value": gates[head]})
                rows.append({"layer": layer, "unit": f"h{head}", "name": "entropy",
                             "value": round(float(entropy[layer, head]), 6)})
        return rows

    # -- checkpoint --------------------------------------------------------------- #
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "born": self.born.clone(),
                "pruned_at": self.pruned_at.clone(), "gate_grad_sum": self.gate_grad_sum.cpu(),
                "gate_grad_steps": self.gate_grad_steps, "last_observed": self.last_observed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.born.copy_(state["born"])
        self.pruned_at.copy_(state["pruned_at"])
        self.gate_grad_sum.copy_(state["gate_grad_sum"])
        self.gate_grad_steps = state["gate_grad_steps"]
        self.last_observed = state["last_observed"]
