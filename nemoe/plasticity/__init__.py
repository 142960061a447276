"""Structural plasticity beside expert morphogenesis: neurons, attention heads, layers.

Every mechanism follows one lifecycle, the same as the expert controller's:
measure fitness while training runs, decide at its interval, operate on the
parameters *and* the optimizer state (slot writes, never a rebuilt optimizer),
report each change as a `MorphEvent` (events.csv), and checkpoint its own state.

The trainer drives a mechanism through four calls, all at optimizer-step
boundaries:

    observe(step)         after the step's gradients are final (unscaled and
                          clipped), before the optimizer applies them; skipped
                          for a step whose gradients were not finite
    after_step(step)      right after the optimizer step (e.g. to rescale the
                          update of some parameter slices)
    due(step) / act(...)  after the optimizer step, beside the expert controller
    snapshot()            at every log step: rows of plasticity.csv (vitality, gates, ...)
    state_dict()          in every checkpoint; load_state_dict() on --resume

Decisions must be the same on every data-parallel rank: statistics taken from
activations are all-reduced before use (gradients already are, by DDP), and any
randomness comes from the mechanism's own seeded generator.
"""

from __future__ import annotations

from typing import Callable

import torch

from nemoe.errors import UserError
from nemoe.evolution import MorphEvent


class Mechanism:
    """Base of one plasticity mechanism; `section` is its config (enabled, interval, ...)."""

    granularity = ""   # neuron | head | layer: the events.csv `granularity` column
    config_key = ""    # its section under `plasticity:` in the config
    # Blocks moved by the last act() (layer senescence only): the trainer moves the
    # expert controller's per-layer records along (MorphController.remap_layers).
    layer_shifts: tuple = ()

    def __init__(self, cfg, model: torch.nn.Module, probe_batch: torch.Tensor):
        """model: the bare NemoeLM (never a DDP or compiled wrapper); probe_batch: fixed
        held-out packed blocks (B, T+1) on CPU, for measurements such as attention entropy."""
        self.cfg, self.model, self.probe_batch = cfg, model, probe_batch
        self.section = getattr(cfg.plasticity, self.config_key)

    def observe(self, step: int) -> None:
        """Accumulate fitness from this step's gradients (and recorded activations)."""

    def after_step(self, step: int) -> None:
        """Called right after every optimizer step, before the gradients are cleared."""

    def due(self, step: int) -> bool:
        return self.section.enabled and step > 0 and step % self.section.interval == 0

    def act(self, optimizer: torch.optim.Optimizer, step: int, tokens: int,
            probe_loss: Callable[[], float]) -> list[MorphEvent]:
        """Decide and operate; returns the events (probe loss measured around each)."""
        raise NotImplementedError

    def snapshot(self) -> list[dict]:
        """Per-unit state for plasticity.csv at each log step: dicts with keys
        layer, unit, name, value (e.g. {"layer": 3, "unit": "", "name": "vitality", "value": 0.8})."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# name in the config -> class; each mechanism module registers itself below.
REGISTRY: dict[str, type[Mechanism]] = {}


def build_mechanisms(cfg, model: torch.nn.Module, probe_batch: torch.Tensor) -> list[Mechanism]:
    """The enabled mechanisms, in a fixed order (neuron, heads, layers)."""
    enabled = [name for name, section in vars(cfg.plasticity).items() if section.enabled]
    missing = [name for name in enabled if name not in REGISTRY]
    if missing:
        raise UserError(f"plasticity.{missing[0]}: this mechanism is not available in this version")
    return [REGISTRY[name](cfg, model, probe_batch) for name in enabled]


# Each mechanism module registers its class in REGISTRY when imported.
from nemoe.plasticity import heads, layers, neuron  # noqa: E402

__all__ = ["Mechanism", "REGISTRY", "build_mechanisms", "heads", "layers", "neuron"]
