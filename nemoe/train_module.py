"""The optimizer step: model (+ DDP, compile), AdamW, GradScaler, LR schedule.

`TrainModule.train_batch(batches, step, hooks)` turns one optimizer step's
micro-batches into one update and returns a `StepResult`; the structural
mechanisms see the step through two hooks (`observe` with the final gradients,
`after_step` right after the update). Nothing here knows about logs, files or
evaluation.

Overflow policy. A step whose gradients are not finite is skipped: the optimizer
never sees it (weights and AdamW moments stay bit-identical), `observe` is not
called (its statistics do not count: usage counts, neuron and head fitness), and
`after_step` still is (schedules such as routing ramps follow the step count, as
the LR does). Under fp16 the GradScaler halves its scale at such a step and grows
it again after 2000 clean ones; a few skipped steps at the start are its normal
back-off from the initial 2^16. `divergence` tells that apart from a run that is
really lost: `train.max_bad_steps` skipped steps in a row, or (fp16) the scale
backed off below LOSS_SCALE_FLOOR, where gradients overflow even unscaled.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from nemoe import memory
from nemoe.distributed import sum_over_ranks
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity.expert_surgery import slot_params
from nemoe.pretrained import import_weights
from nemoe.runtime import Runtime
from nemoe.slot_optim import SlotAdamW

# fp16: a step that overflows after the GradScaler backed off below this scale overflows
# even unscaled (fp16's largest value is 65504): real divergence, not the early back-off.
LOSS_SCALE_FLOOR = 1.0
ADVICE = "; the checkpoint holds the last finite weights. Lower train.lr or check the data."


def lr_at(step: int, train_cfg, total_steps: int) -> float:
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at the token target
    (train.schedule constant: train.lr to the end)."""
    t = train_cfg
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class MicroBatchStats:
    """What one micro-batch's forward pass reports (device tensors, detached)."""

    loss_ce: torch.Tensor
    loss_lb: torch.Tensor
    loss_z: torch.Tensor
    counts: torch.Tensor        # (L, E) token-choices routed to each slot
    balance: torch.Tensor | None = None  # () reported load balance (1.0 = even over routable experts)


@dataclass
class StepResult:
    micro: list[MicroBatchStats]
    grad_norm: torch.Tensor     # () before clipping, on the device
    finite: bool                # False: the update was skipped
    lr: float
    skip_note: str = ""         # why the update was skipped (a text-log line), "" when applied

    @property
    def loss_ce(self) -> torch.Tensor:
        """Mean cross-entropy over the step's micro-batches (on the device)."""
        total = torch.zeros_like(self.micro[0].loss_ce)
        for m in self.micro:
            total += m.loss_ce
        return total / len(self.micro)


class TrainModule:
    """Owns the model, optimizer and GradScaler; `state_dict` holds all three."""

    def __init__(self, cfg, runtime: Runtime, total_steps: int):
        self.cfg, self.runtime, self.total_steps = cfg, runtime, total_steps
        # CUDA: a step that cannot fit ends here (UserError), before the model takes the device's
        # memory and before any file is written; the plan's figures go to the Start line.
        self.memory_note = memory.guard(cfg, runtime)
        self.model = NemoeLM(cfg).to(runtime.device)
        t = cfg.train
        # SlotAdamW: torch's AdamW on the live expert slots only (free slots cost no time, no state).
        self.optimizer = SlotAdamW(
            self.model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
            slotted=[(layer, slot_params(layer)) for layer in self.model.moe_layers],
            # fused: one kernel over all parameters, on CUDA and CPU alike; on CPU it measured
            # 5x faster than the default per-parameter loop (t4 shapes, one thread).
            fused=True)
        self.scaler = torch.amp.GradScaler(runtime.device.type, init_scale=t.loss_scale_init,
                                           growth_interval=t.loss_scale_growth_interval,
                                           enabled=runtime.uses_scaler)
        self.forward = self.ddp = self.model
        self.bad_steps = 0   # updates skipped in a row (non-finite gradients)
        # Test seam: step -> factor on that step's loss before backward (e.g. inf forces an
        # overflow at one step). None: the loss as computed.
        self.loss_multiplier: Callable[[int], float] | None = None

    def start_fresh(self) -> list[str]:
        """A new run (never a resume): the weights of model.init_from, when set; notes for the log."""
        if not self.cfg.model.init_from:
            return []
        return import_weights(self.model, self.cfg)

    def wrap(self) -> None:
        """DDP under torchrun, torch.compile when asked (after a restore: DDP broadcasts weights).

        broadcast_buffers=False: the buffers are expert usage counts (per-rank statistics
        summed when a decision reads them, so rank 0's must not overwrite the others') and
        routing state every rank updates identically.
        """
        if self.runtime.dist.enabled:
            device = self.runtime.device
            with warnings.catch_warnings():
                # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, whose
                # False still syncs buffers at init; its own advice for rank-local buffers is to
                # keep broadcast_buffers=False for now.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.ddp = DistributedDataParallel(
                    self.model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False)
        self.forward = self.ddp
        if self.cfg.train.compile and self.runtime.device.type == "cuda":
            self.forward = torch.compile(self.ddp)

    def train_batch(self, batches: list[torch.Tensor], step: int, hooks=None) -> StepResult:
        """One optimizer step over the micro-batches `batches` (each (B, T+1) on the CPU).

        hooks: `observe(step)` runs on final (unscaled, clipped) finite gradients before the
        update, `after_step(step)` right after it (nemoe.plasticity.Plasticity; None: no hooks).
        """
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(step, cfg.train, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: set by layer senescence
        micro = []
        for i, batch in enumerate(batches):
            inputs, targets = split_block(batch.to(self.runtime.device, non_blocking=True))
            # Under DDP gradients are all-reduced in the last micro-batch's backward only.
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not self.runtime.dist.enabled else self.ddp.no_sync()
            with sync:
                with self.runtime.autocast():
                    out = self.forward(inputs, targets)
                loss = out.loss_ce + cfg.moe.aux_coef * out.loss_lb + cfg.moe.z_coef * out.loss_z
                if self.loss_multiplier is not None:
                    loss = loss * self.loss_multiplier(step)
                self.scaler.scale(loss / len(batches)).backward()
            micro.append(MicroBatchStats(out.loss_ce.detach(), out.loss_lb.detach(), out.loss_z.detach(),
                                         torch.stack(out.counts), out.balance.detach()))
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # One host sync per step: a non-finite gradient must not reach the weights.
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            if hooks is not None:
                hooks.observe(step, self.loss_scale)
            self.scaler.step(self.optimizer)
            if cfg.moe.uses_bias:
                self.update_select_bias(micro)
        scale_used = self.loss_scale if not finite else None   # before update() lowers it
        if hooks is not None:
            hooks.after_step(step)
        self.scaler.update()   # fp16: back off after an overflow (unscale_ recorded it), else grow
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0 if finite else self.bad_steps + 1
        note = "" if finite else self._skip_note(micro, scale_used)
        return StepResult(micro, grad_norm.detach(), finite, lr, note)

    def _skip_note(self, micro: list[MicroBatchStats], scale_used: float) -> str:
        """The text-log line of a skipped step (host syncs here only happen on skipped steps)."""
        loss_finite = all(bool(torch.isfinite(m.loss_ce)) for m in micro)
        what = "gradient overflow" if loss_finite else "non-finite loss"
        if self.scaler.is_enabled():
            return (f"{what} at fp16 loss scale {scale_used:g}: update skipped, scale lowered to "
                    f"{self.loss_scale:g} ({self.bad_steps} in a row)")
        return f"{what}: update skipped ({self.bad_steps} in a row)"

    def update_select_bias(self, micro: list[MicroBatchStats]) -> None:
        """balance: bias / both, after an applied update: move every layer's selection bias against
        the step's load (nemoe.moe.MoELayer.update_select_bias). The counts are summed over the
        micro-batches and over ranks (a collective: `finite` agrees on every rank, since the
        gradient norm is taken after DDP's all-reduce), so every rank applies the same update."""
        counts = sum_over_ranks(torch.stack([m.counts for m in micro]).sum(dim=0).double())  # (L, E)
        for layer, layer_counts in zip(self.model.moe_layers, counts):
            layer.update_select_bias(layer_counts, self.cfg.moe.bias_rate)

    @property
    def divergence(self) -> str | None:
        """Why the run must stop, None while it may go on (see the module docstring)."""
        if self.bad_steps == 0:
            return None
        limit = self.cfg.train.max_bad_steps
        if self.scaler.is_enabled():
            scale = self.loss_scale
            if scale < LOSS_SCALE_FLOOR:
                return (f"the fp16 loss scale backed off to {scale:g}, below its floor {LOSS_SCALE_FLOOR:g}, "
                        f"and the gradients still overflow ({self.bad_steps} steps in a row skipped): "
                        f"real divergence, not the GradScaler's early back-off{ADVICE}")
            if self.bad_steps >= limit:
                return (f"{self.bad_steps} steps in a row overflowed in fp16 (train.max_bad_steps={limit}) "
                        f"while the loss scale backed off to {scale:g}: more than the GradScaler's early "
                        f"back-off, the run diverged{ADVICE}")
            return None
        if self.bad_steps >= limit:
            return (f"{self.bad_steps} steps in a row had a non-finite loss or gradient "
                    f"(train.max_bad_steps={limit}){ADVICE}")
        return None

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
            if state["scaler"]:   # the scale and its clean-step count resume; the interval is the config's
                self.scaler.load_state_dict({**self.scaler.state_dict(),
                                             "growth_interval": self.cfg.train.loss_scale_growth_interval})
        # else: a checkpoint of an fp32 or bf16 run resumed in fp16: the scaler starts fresh
        self.bad_steps = state["bad_steps"]
