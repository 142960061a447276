"""Structural plasticity at every granularity, run by one container.

    experts  expert morphogenesis (plasticity.experts): split, crossover, probation, prune
    neuron   neuron apoptosis inside experts (plasticity.neuron)
    heads    attention-head prune / grow through gates (plasticity.heads)
    layers   layer senescence: blocks age, die and are reborn (plasticity.layers)

Every mechanism follows the lifecycle of `nemoe.plasticity.base.Mechanism`.
`Plasticity` holds the ones a run uses (experts always: its records name every
expert in the logs) in a fixed order and relays between them: a layer shift
reaches every other mechanism's `on_layer_shift`, and each act()'s events reach
the others' `on_events`, so records of every kind follow the structure.
"""

from __future__ import annotations

from typing import Callable

import torch

from nemoe.plasticity.base import ActContext, Event, LayerShift, Mechanism, Probe
from nemoe.plasticity.experts import ExpertMorphogenesis
from nemoe.plasticity.heads import HeadPlasticity
from nemoe.plasticity.layers import LayerSenescence
from nemoe.plasticity.neuron import NeuronPlasticity

# Section name under `plasticity:` -> mechanism, in the order they act at a shared step.
REGISTRY: dict[str, type[Mechanism]] = {"neuron": NeuronPlasticity, "heads": HeadPlasticity,
                                        "layers": LayerSenescence}


class Plasticity:
    """The run's mechanisms: expert morphogenesis first, then the enabled plasticity sections."""

    def __init__(self, cfg, model: torch.nn.Module, probe_batch: torch.Tensor):
        self.experts = ExpertMorphogenesis(cfg, model, probe_batch)
        enabled = [name for name, section in vars(cfg.plasticity).items() if name in REGISTRY and section.enabled]
        self.mechanisms: list[Mechanism] = [self.experts] + [REGISTRY[n](cfg, model, probe_batch) for n in enabled]

    def __iter__(self):
        return iter(self.mechanisms)

    # -- the step ------------------------------------------------------------------ #
    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        for m in self.mechanisms:
            m.observe(step, grad_scale)

    def after_step(self, step: int) -> None:
        for m in self.mechanisms:
            m.after_step(step)

    def act(self, optimizer: torch.optim.Optimizer, step: int, tokens: int,
            probe_loss: Callable[[], float]) -> list[Event]:
        """Every mechanism due at this optimizer-step boundary decides and operates, in order;
        the others follow each one's changes before their own turn."""
        events: list[Event] = []
        for m in self.mechanisms:
            if not m.due(step):
                continue
            new = m.act(ActContext(optimizer, step, tokens, Probe(probe_loss), self.experts.expert_id))
            others = [o for o in self.mechanisms if o is not m]
            for shift in (e.shift for e in new if e.shift is not None):
                for o in others:
                    o.on_layer_shift(shift)
            for o in others:
                o.on_events(new)
            events += new
        return events

    # -- output: every mechanism's reports, in order (see nemoe.plasticity.base) ------- #
    def log_row(self) -> dict:
        """The mechanisms' columns of a training_log.csv row (a collective under DDP)."""
        return {k: v for m in self.mechanisms for k, v in m.log_row().items()}

    def structure(self) -> str:
        return " | ".join(text for m in self.mechanisms if (text := m.structure()))

    def event_notes(self, events: list[Event]) -> list[str]:
        return [line for m in self.mechanisms for line in m.event_notes(events)]

    def distributions(self, step: int) -> dict[str, list[float]]:
        return {tag: values for m in self.mechanisms for tag, values in m.distributions(step).items()}

    def snapshot(self) -> list[dict]:
        """Rows of plasticity.csv (without step and tokens) of the mechanisms that report state."""
        return [{"granularity": m.granularity, **row} for m in self.mechanisms for row in m.snapshot()]

    # -- checkpoints ------------------------------------------------------------------ #
    def state_dict(self) -> dict:
        return {m.config_key: m.state_dict() for m in self.mechanisms}

    def load_state_dict(self, state: dict, step: int) -> list[str]:
        """Each mechanism's state (one switched on at resume starts fresh: its key is missing);
        returns the mechanisms' notes for the log."""
        for m in self.mechanisms:
            if m.config_key in state:
                m.load_state_dict(state[m.config_key])
        return [note for m in self.mechanisms for note in m.resumed(step)]


__all__ = ["ActContext", "Event", "ExpertMorphogenesis", "HeadPlasticity", "LayerSenescence", "LayerShift",
           "Mechanism", "NeuronPlasticity", "Plasticity", "Probe", "REGISTRY"]
