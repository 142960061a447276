"""Layer senescence: blocks age, lose vitality, die near the output and are reborn near the input.

Zones (positions 0 .. L-1, input to output):

    0 .. birth_zone-1            birth zone: a newborn enters at position birth_zone-1
    birth_zone .. L-death_zone-1 stable core: never dies
    L-death_zone .. L-1          death zone: a block here may die

Vitality, measured every `interval` steps on the fixed probe batch:

    delta_i    = loss(probe | influence_i = 0) - loss(probe)        ablation importance
    share_i    = max(delta_i, 0) / mean_j max(delta_j, 0)           1.0 = an average block
    ema_i     <- beta * ema_i + (1 - beta) * share_i                beta = importance_ema
    vitality_i = ema_i * exp(-age_i / lifespan)                     senescence

The ablation is the direct form of the layer-importance measures of Michel et al.
2019 (heads) and Men et al. 2024 "ShortGPT" / Gromov et al. 2024 (whole layers:
deep layers can often be removed at little cost); the exponential age factor is a
Gompertz-free, one-parameter senescence: every block's vitality halves every
lifespan * ln 2 steps unless it keeps earning its place. A newborn is not judged
while its influence warms up (vitality stays 1).

Vitality h = clamp(vitality, 0, 1) drives, per block:
    attention temperature  1 + (max_temperature - 1) * (1 - h)      softer attention
    residual dropout       model.dropout + (max_dropout - model.dropout) * (1 - h)
    learning-rate scale    min_lr_scale + (1 - min_lr_scale) * h    (param group lr_scale)
so a fading block is trained to matter less (LayerDrop, Fan et al. 2019: dropping a
layer during training makes its later removal cheap) before it is removed.

Death and birth with fixed shapes: when the weakest death-zone block (age >=
min_age) has vitality < trigger, the blocks between the birth position b and the
dead position d move one position toward the output -- parameters, buffers and
every optimizer state tensor (exp_avg, exp_avg_sq, step) -- and position b receives
the newborn at influence `newborn_influence` (0: the block is the identity, the
model's output is unchanged), rising linearly to 1 over `warmup_steps`:
    copy   parameters of the most vital other block + relative noise, its buffers and
           optimizer moments (the same state a split expert gets in evolution.py);
    fresh  a new random init (GPT-2 style, as NemoeLM), zero moments and step 0.
Each shift rides on its birth event (`Event.shift`): the other mechanisms
(expert records, neuron records, head records) move their per-layer state with
the blocks through `on_layer_shift`.

Decisions read only the probe loss, which is the same on every data-parallel rank
(same parameters, same probe batch); noise comes from the mechanism's own seeded,
checkpointed generator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from nemoe.plasticity.base import ActContext, Event, LayerShift, Mechanism, add_relative_noise_


@dataclass
class LayerRecord:
    """The life of the block at one position (its age at step s is s - birth_step)."""

    id: int
    birth_step: int = 0
    parent: int = -1            # id of the block it was copied from (-1: founder or fresh)
    generation: int = 0         # parent's generation + 1 (founders and fresh blocks: 0 / 1)
    origin: str = "init"        # init | copy | fresh
    importance: float = 0.0     # share at the last review (1.0 = an average block)
    importance_ema: float = 1.0
    vitality: float = 1.0


class LayerSenescence(Mechanism):
    granularity = "layer"
    config_key = "layers"

    def __init__(self, cfg, model, probe_batch):
        super().__init__(cfg, model, probe_batch)
        n = len(model.blocks)
        self.records = [LayerRecord(id=i) for i in range(n)]
        self.next_id = n
        self.step = 0
        self.base_dropout = cfg.model.dropout
        self.generator = torch.Generator().manual_seed(cfg.plasticity.layers.seed)
        self.apply_drives()

    # -- zones ---------------------------------------------------------------- #
    @property
    def birth_position(self) -> int:
        return self.section.birth_zone - 1

    def death_positions(self) -> range:
        n = len(self.records)
        return range(n - self.section.death_zone, n)

    def age(self, i: int) -> int:
        return self.step - self.records[i].birth_step

    def warming_up(self, i: int) -> bool:
        return self.records[i].origin != "init" and self.age(i) < self.section.warmup_steps

    # -- per step: newborn influence warm-up ------------------------------------ #
    @torch.no_grad()
    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        """Set each newborn's influence for the next step's forward: linear 0 -> 1 ramp."""
        self.step = step + 1
        for i, block in enumerate(self.model.blocks):
            if self.records[i].origin != "init":
                block.influence.fill_(self.influence_at(self.age(i)))

    def influence_at(self, age: int) -> float:
        s0, warmup = self.section.newborn_influence, self.section.warmup_steps
        return 1.0 if age >= warmup else s0 + (1.0 - s0) * age / warmup

    # -- the review ------------------------------------------------------------- #
    def act(self, ctx: ActContext) -> list[Event]:
        optimizer, step, tokens, probe_loss = ctx.optimizer, ctx.step, ctx.tokens, ctx.probe.measure
        self.step = step
        self.measure(probe_loss(), probe_loss)
        self.apply_drives(optimizer)   # new vitality -> temperature, dropout, lr_scale
        dead = self.choose_death()
        if dead is None:
            return []
        # "before" is measured under the new drives, so the event shows only the death.
        return self.replace(dead, optimizer, step, tokens, probe_loss(), probe_loss)

    @torch.no_grad()
    def measure(self, base: float, probe_loss: Callable[[], float]) -> None:
        """Ablation importance of every block, its EMA, and vitality (module docstring)."""
        deltas = []
        for block in self.model.blocks:
            kept = block.influence.clone()
            block.influence.zero_()
            deltas.append(max(probe_loss() - base, 0.0))
            block.influence.copy_(kept)
        mean = sum(deltas) / len(deltas)
        beta, lifespan = self.section.importance_ema, self.section.lifespan
        for i, (r, delta) in enumerate(zip(self.records, deltas)):
            r.importance = delta / mean if mean > 0 else 1.0
            if self.warming_up(i):
                continue  # not judged while its influence is still rising
            r.importance_ema = beta * r.importance_ema + (1 - beta) * r.importance
            senescence = math.exp(-self.age(i) / lifespan) if lifespan > 0 else 1.0
            r.vitality = r.importance_ema * senescence

    def choose_death(self) -> int | None:
        """The least vital death-zone block that is old enough and below the trigger."""
        candidates = [i for i in self.death_positions()
                      if self.age(i) >= self.section.min_age and not self.warming_up(i)
                      and self.records[i].vitality < self.section.trigger]
        return min(candidates, key=lambda i: self.records[i].vitality) if candidates else None

    def choose_parent(self, dead: int) -> int:
        """The most vital block other than the dying one (newborns still warming up only as a last resort)."""
        others = [i for i in range(len(self.records)) if i != dead]
        grown = [i for i in others if not self.warming_up(i)] or others
        return max(grown, key=lambda i: (self.records[i].vitality, -i))

    # -- death and birth ---------------------------------------------------------- #
    @torch.no_grad()
    def replace(self, dead: int, optimizer, step: int, tokens: int, base: float,
                probe_loss: Callable[[], float]) -> list[Event]:
        s, blocks, b = self.section, self.model.blocks, self.birth_position
        n = len(blocks)
        corpse = self.records[dead]
        death = self._event(step, tokens, "death", dead, corpse,
                            cause=f"vitality {corpse.vitality:.4f} < {s.trigger:g} at age {self.age(dead)}",
                            value=corpse.vitality, threshold=s.trigger, before=base)
        parent = self.choose_parent(dead) if s.newborn == "copy" else -1
        parent_state = block_state(blocks[parent], optimizer) if parent >= 0 else None
        parent_record = self.records[parent] if parent >= 0 else None
        # Shift b .. dead-1 one position toward the output, deepest first (nothing is
        # overwritten before it is read); position b is then a stale duplicate.
        for pos in range(dead, b, -1):
            load_block_state(blocks[pos], optimizer, block_state(blocks[pos - 1], optimizer))
            self.records[pos] = self.records[pos - 1]
        blocks[b].influence.zero_()            # the model without the dead block
        death.probe_loss_after = probe_loss()

        if parent_state is not None:
            load_block_state(blocks[b], optimizer, parent_state)
            mutate_(blocks[b], s.mutation_std, self.generator)
            record = LayerRecord(id=self.next_id, birth_step=step, parent=parent_record.id,
                                 generation=parent_record.generation + 1, origin="copy")
            cause = f"copy of id {parent_record.id} (vitality {parent_record.vitality:.4f})"
        else:
            fresh_init_(blocks[b], optimizer, n, self.cfg.moe.experts_init, self.generator)
            record = LayerRecord(id=self.next_id, birth_step=step, generation=1, origin="fresh")
            cause = "fresh init"
        self.next_id += 1
        self.records[b] = record
        blocks[b].influence.fill_(s.newborn_influence)
        self.apply_drives(optimizer)
        birth = self._event(step, tokens, "birth", b, record, cause=cause,
                            value=s.newborn_influence, threshold=0.0,
                            before=death.probe_loss_after, parents="" if parent < 0 else str(parent_record.id))
        birth.probe_loss_after = probe_loss()
        sources = [pos - 1 if b < pos <= dead else pos for pos in range(n)]
        sources[b] = parent
        birth.shift = LayerShift(step=step, sources=sources, newborn=b, parent=parent)
        return [death, birth]

    def _event(self, step, tokens, event, layer, record, cause, value, threshold, before, parents="") -> Event:
        n = len(self.records)
        return Event(step=step, tokens=tokens, granularity="layer", event=event, layer=layer,
                     unit=f"L{layer} id{record.id}", parents=parents, value=value, threshold=threshold,
                     n_before=n, n_after=n, probe_loss_before=before, probe_loss_after=before, cause=cause)

    # -- what vitality drives ---------------------------------------------------- #
    def drives(self, i: int) -> dict[str, float]:
        s = self.section
        fading = 1.0 - min(max(self.records[i].vitality, 0.0), 1.0)
        return {"temperature": 1.0 + (s.max_temperature - 1.0) * fading,
                "dropout": self.base_dropout + (s.max_dropout - self.base_dropout) * fading,
                "lr_scale": s.min_lr_scale + (1.0 - s.min_lr_scale) * (1.0 - fading)}

    @torch.no_grad()
    def apply_drives(self, optimizer=None) -> None:
        """Write temperature and dropout into each block, lr_scale into its param groups."""
        scales = {}
        for i, block in enumerate(self.model.blocks):
            d = self.drives(i)
            block.attn.temperature.fill_(d["temperature"])
            block.attn.resid_drop.p = block.moe_drop.p = d["dropout"]
            scales[f"block{i}"] = d["lr_scale"]
        for group in optimizer.param_groups if optimizer is not None else []:
            owner = group.get("name", "").split(".")[0]
            if owner in scales:
                group["lr_scale"] = scales[owner]

    # -- logs and checkpoints ------------------------------------------------------- #
    def snapshot(self) -> list[dict]:
        rows = []
        for i, (r, block) in enumerate(zip(self.records, self.model.blocks)):
            values = {"id": r.id, "vitality": r.vitality, "importance": r.importance,
                      "influence": float(block.influence), "age": self.age(i), **self.drives(i)}
            rows += [{"layer": i, "unit": f"L{i}", "name": k, "value": v} for k, v in values.items()]
        return rows

    def state_dict(self) -> dict:
        return {"records": [dataclasses.asdict(r) for r in self.records], "next_id": self.next_id,
                "step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.records = [LayerRecord(**r) for r in state["records"]]
        self.next_id, self.step = state["next_id"], state["step"]
        self.generator.set_state(state["generator"])
        self.apply_drives()  # dropout rates are attributes, not in the model's state_dict


# --------------------------------------------------------------------------- #
# Surgery on whole blocks: parameters, buffers and optimizer state
# --------------------------------------------------------------------------- #

def clone_state(value):
    """A deep copy of optimizer state: tensors cloned, dicts (SlotAdamW's per-slot entries) copied."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    return value


def block_state(block: torch.nn.Module, optimizer) -> dict:
    """Copies of a block's parameters, buffers and per-parameter optimizer state, in module order."""
    return {"params": [p.detach().clone() for p in block.parameters()],
            "buffers": [b.clone() for b in block.buffers()],
            "optim": [clone_state(optimizer.state[p])
                      if optimizer is not None and p in optimizer.state else None
                      for p in block.parameters()]}


@torch.no_grad()
def load_block_state(block: torch.nn.Module, optimizer, state: dict) -> None:
    """Write `block_state` output into a block of the same structure (values only, same tensors)."""
    for p, value in zip(block.parameters(), state["params"]):
        p.copy_(value)
    for buf, value in zip(block.buffers(), state["buffers"]):
        buf.copy_(value)
    if optimizer is None:
        return
    for p, moments in zip(block.parameters(), state["optim"]):
        if moments is None:
            optimizer.state.pop(p, None)
        elif p in optimizer.state and optimizer.state[p].keys() == moments.keys():
            for k, v in moments.items():   # in place: the optimizer keeps its own tensors
                if torch.is_tensor(v):
                    optimizer.state[p][k].copy_(v)
                else:
                    optimizer.state[p][k] = clone_state(v)
        else:
            optimizer.state[p] = clone_state(moments)


@torch.no_grad()
def mutate_(block: torch.nn.Module, mutation_std: float, generator: torch.Generator) -> None:
    """p += N(0, (mutation_std * RMS(p))^2) per parameter tensor (as a split expert's copy)."""
    if mutation_std <= 0:
        return
    for p in block.parameters():
        add_relative_noise_(p, p, mutation_std, generator)


@torch.no_grad()
def fresh_init_(block: torch.nn.Module, optimizer, n_layers: int, experts_init: int,
                generator: torch.Generator) -> None:
    """A new block as NemoeLM initialises one; zero optimizer moments and step 0."""
    out_std = 0.02 / (2 * n_layers) ** 0.5  # GPT-2 residual projection scaling
    for name, p in block.named_parameters():
        if name.endswith(("attn.proj.weight", "experts.w_out")):
            value = torch.randn(p.shape, generator=generator) * out_std
        elif p.dim() >= 2 or name.endswith(("experts.w_in",)):
            value = torch.randn(p.shape, generator=generator) * 0.02
        elif name.startswith("ln_") and name.endswith("weight"):
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)   # biases
        p.copy_(value.to(p.device, p.dtype))
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for v in state.values():
            if torch.is_tensor(v):
                v.zero_()
            elif isinstance(v, dict):
                v.clear()   # SlotAdamW's per-slot entries: live slots restart at zero moments, step 0
    moe = block.moe
    moe.active.zero_()
    moe.active[:experts_init] = True
    moe.route_offset.copy_(torch.where(moe.active, 0.0, -math.inf))
    moe.usage_counts.zero_()
    if moe.select_bias is not None:
        moe.select_bias.zero_()
    block.attn.temperature.fill_(1.0)

