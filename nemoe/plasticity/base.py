"""The one lifecycle every structural mechanism follows, and the pieces they share.

A mechanism (experts, neurons, heads, layers) measures fitness while training
runs, decides at its interval, operates on the parameters *and* the optimizer
state (slot writes, never a rebuilt optimizer), reports each change as an
`Event` (a row of events.csv) and checkpoints its own state. `Plasticity`
(nemoe/plasticity/__init__.py) runs them; the trainer calls it at optimizer-step
boundaries only:

    observe(step, grad_scale)  after the step's gradients are final (unscaled and
                           clipped), before the optimizer applies them; skipped
                           for a step whose gradients were not finite, so the
                           statistics of a skipped step never count
    after_step(step)       right after the optimizer step (every step, skipped or
                           not), e.g. to reset per-step buffers
    due(step) / act(ctx)   after the optimizer step: decide and operate
    on_layer_shift(shift)  another mechanism moved whole blocks: records follow them
    on_events(events)      another mechanism's events of this step (e.g. a new expert)
    snapshot()             at every log step: rows of plasticity.csv
    log_row()              at every log step: its columns of the training_log.csv row
                           (over the steps since the previous row); structure(): the
                           row's text-line words for it (e.g. "Experts per layer [2, 3]")
    event_notes(events)    text-log lines after a step's events; distributions(step):
                           TensorBoard histograms at a step (e.g. shares at a decision)
    state_dict()           in every checkpoint; load_state_dict() and resumed(step) on --resume

The trainer and the logger see mechanisms only through these calls: what a mechanism
measures reaches training_log.csv, events.csv, plasticity.csv, TensorBoard and the text
log without either naming it.

Decisions must be the same on every data-parallel rank: statistics taken from
activations are summed over ranks before use (`distributed.sum_over_ranks_`;
gradients already agree through DDP), and randomness comes from the mechanism's
own seeded, checkpointed generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from nemoe.schema import EVENT_COLUMNS

@dataclass
class LayerShift:
    """One layer death + birth as a map of positions, for whoever keeps per-layer records."""

    step: int
    sources: list[int]          # per position: the position its block held before the event
    newborn: int                # the newborn's position
    parent: int                 # the newborn's parent position before the event (-1: fresh block)


@dataclass
class Event:
    """One structural event at any granularity: a row of events.csv (columns in nemoe.schema)."""

    step: int
    tokens: int
    granularity: str            # expert | neuron | head | layer
    event: str                  # split, prune, turnover, grow, death, ... (schema.EVENT_COLUMNS)
    layer: int
    unit: str = ""              # what changed: e7, n3 n17, h2, L3 id5
    expert: int = -1            # the expert's id; -1 when the unit is not inside an expert
    parents: str = ""
    value: float = 0.0          # the measurement the decision compared with `threshold`
    threshold: float = 0.0
    n_before: int = 0
    n_after: int = 0
    probe_loss_before: float = math.nan
    probe_loss_after: float = math.nan
    cause: str = ""
    # Not written: what other mechanisms need to follow the change.
    slot: int = field(default=-1, repr=False)               # expert events: the slot acted on
    # The text log's words for value and threshold, e.g. "Usage 0.6123 > split_usage 0.35".
    reading: str = field(default="", repr=False, compare=False)
    shift: LayerShift | None = field(default=None, repr=False)

    def as_row(self) -> dict:
        return {name: getattr(self, name) for name in EVENT_COLUMNS}

    def describe(self) -> str:
        """The event's part of its training_log.txt line."""
        name = f"{self.granularity}_{self.event}"   # expert_split, neuron_turnover, head_prune, ...
        probe = f"Probe {self.probe_loss_before:.4f}→{self.probe_loss_after:.4f}"
        if self.granularity != "expert":
            expert = f" | Expert {self.expert}" if self.expert >= 0 else ""
            return (f"Event {name} | Layer {self.layer}{expert} | Unit {self.unit} | "
                    f"Cause {self.cause} | {probe}")
        parents = f" | Parents {self.parents}" if self.parents else ""
        reading = self.reading or f"Value {self.value:.4g} | Threshold {self.threshold:g}"
        return (f"Event {name} | Layer {self.layer} | Action {self.event} | "
                f"Expert {self.expert}{parents} | {reading} | "
                f"Experts {self.n_before}→{self.n_after} | {probe}")


class Probe:
    """The probe loss, measured lazily: the loss after one operation is the next one's "before".

    `probe()` gives the current value (measured once), `probe.measure()` measures again
    after the model changed. One Probe per act(): values never leak across mechanisms.
    """

    def __init__(self, loss: Callable[[], float]):
        self.loss, self.value = loss, None

    def __call__(self) -> float:
        if self.value is None:
            self.value = self.loss()
        return self.value

    def measure(self) -> float:
        self.value = self.loss()
        return self.value


@dataclass
class ActContext:
    """What a mechanism's act() gets from the run."""

    optimizer: torch.optim.Optimizer
    step: int
    tokens: int
    probe: Probe
    expert_id: Callable[[int, int], int]   # (layer, slot) -> the expert id living there, -1 if none


class Mechanism:
    """Base of one structural mechanism; `section` is its config (enabled, interval, ...)."""

    granularity = ""   # expert | neuron | head | layer: the events.csv `granularity` column
    config_key = ""    # its section under `plasticity:` (experts; older files spell it `morph:`)

    def __init__(self, cfg, model: torch.nn.Module, probe_batch: torch.Tensor):
        """model: the bare NemoeLM (never a DDP or compiled wrapper); probe_batch: fixed
        held-out packed blocks (B, T+1) on CPU, for measurements such as attention entropy."""
        self.cfg, self.model, self.probe_batch = cfg, model, probe_batch
        self.section = self.config_section(cfg)

    @classmethod
    def config_section(cls, cfg):
        return getattr(cfg.plasticity, cls.config_key)

    def observe(self, step: int, grad_scale: float = 1.0) -> None:
        """Accumulate fitness from this step's gradients (and recorded activations).

        grad_scale: the loss scale this step's backward ran under (the fp16 GradScaler's;
        1.0 otherwise). Parameter gradients are already unscaled here; gradients a
        mechanism records itself (hooks on activations) are not, and are divided by it."""

    def after_step(self, step: int) -> None:
        """Called right after every optimizer step (also a skipped one), before the gradients
        are cleared."""

    def due(self, step: int) -> bool:
        return self.section.enabled and step > 0 and step % self.section.interval == 0

    def act(self, ctx: ActContext) -> list[Event]:
        """Decide and operate; returns the events (probe loss measured around each)."""
        raise NotImplementedError

    def on_layer_shift(self, shift: LayerShift) -> None:
        """Blocks moved (layer senescence): per-layer records must follow them."""

    def on_events(self, events: list[Event]) -> None:
        """Events another mechanism produced at this step."""

    def snapshot(self) -> list[dict]:
        """Per-unit state for plasticity.csv at each log step: dicts with keys
        layer, unit, name, value (e.g. {"layer": 3, "unit": "L3", "name": "vitality", "value": 0.8})."""
        return []

    # -- reports (the logger writes them; none of this changes training) ---------- #
    def log_row(self) -> dict:
        """Its columns of the training_log.csv row being written, over the steps since the previous
        row; a new window starts. Called on every rank at the same steps (it may sum over ranks)."""
        return {}

    def structure(self) -> str:
        """Its structure in a few words for the row's text line and the progress bar ("": nothing)."""
        return ""

    def event_notes(self, events: list[Event]) -> list[str]:
        """Text-log lines to write after a step's events (every mechanism's)."""
        return []

    def distributions(self, step: int) -> dict[str, list[float]]:
        """TensorBoard histograms at this step: tag -> values."""
        return {}

    # -- checkpoints ------------------------------------------------------------ #
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def resumed(self, step: int) -> list[str]:
        """After load_state_dict, resuming at `step`: notes for the run's log."""
        return []


# --------------------------------------------------------------------------- #
# Surgery helpers shared by the mechanisms
# --------------------------------------------------------------------------- #

def element_states(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-element state tensors of `p` (AdamW: exp_avg, exp_avg_sq).

    Scalars such as Adam's `step` are shared by every slice of a parameter and left
    alone by slice surgery: a newborn slice with copied moments is consistent with
    the shared bias correction, one with zero moments takes a small first step.
    An expert slot parameter under nemoe.slot_optim.SlotAdamW has per-slot entries
    instead: its moments come as `SlotMoments`, indexed like the stacked tensor (slot
    first), and writing 0 to a whole slot gives that slot's state back.
    """
    if optimizer is None:
        return []
    slot_moments = getattr(optimizer, "slot_moments", None)
    moments = slot_moments(p) if slot_moments is not None else None
    if moments is not None:
        return moments
    return [t for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t) and t.shape == p.shape]


@torch.no_grad()
def add_relative_noise_(target: torch.Tensor, reference: torch.Tensor, std: float,
                        generator: torch.Generator) -> None:
    """target += N(0, (std * RMS(reference))^2), drawn on the CPU (the same on every device)."""
    scale = std * reference.float().pow(2).mean().sqrt()
    noise = torch.randn(reference.shape, generator=generator)
    target += (noise * scale.cpu()).to(target.device, target.dtype)


def shift_rows(t: torch.Tensor, sources: list[int]) -> torch.Tensor:
    """Rows of a per-layer tensor (L, ...) after a layer shift: row i <- row sources[i]
    (a source of -1 keeps row i as it was; the caller resets the newborn's row)."""
    index = torch.tensor([s if s >= 0 else i for i, s in enumerate(sources)], device=t.device)
    return t.index_select(0, index)
