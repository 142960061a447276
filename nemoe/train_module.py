"""The optimizer step: model (+ DDP, compile), AdamW, GradScaler, LR schedule.

`TrainModule.train_batch(batches, step, hooks)` turns one optimizer step's
micro-batches into one update and returns a `StepResult`; the structural
mechanisms see the step through two hooks (`observe` with the final gradients,
`after_step` right after the update). Nothing here knows about logs, files or
evaluation.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from nemoe.distributed import sum_over_ranks
from nemoe.model import NemoeLM, split_block
from nemoe.runtime import Runtime


def lr_at(step: int, train_cfg, total_steps: int) -> float:
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at the token target."""
    t = train_cfg
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
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
        self.model = NemoeLM(cfg).to(runtime.device)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
            # fused: one kernel over all parameters, on CUDA and CPU alike; on CPU it measured
            # 5x faster than the default per-parameter loop (t4 shapes, one thread).
            fused=True)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.uses_scaler)
        self.forward = self.ddp = self.model
        self.bad_steps = 0   # updates skipped in a row (non-finite gradients)

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
                self.scaler.scale(loss / len(batches)).backward()
            micro.append(MicroBatchStats(out.loss_ce.detach(), out.loss_lb.detach(), out.loss_z.detach(),
                                         torch.stack(out.counts), out.balance.detach()))
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # One host sync per step: a non-finite gradient must not reach the weights.
        finite = bool(torch.isfinite(grad_norm))
        if finite and hooks is not None:
            hooks.observe(step)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the GradScaler skips non-finite steps itself
        if finite and cfg.moe.uses_bias:
            self.update_select_bias(micro)
        if hooks is not None:
            hooks.after_step(step)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0 if finite else self.bad_steps + 1
        return StepResult(micro, grad_norm.detach(), finite, lr)

    def update_select_bias(self, micro: list[MicroBatchStats]) -> None:
        """balance: bias / both, after an applied update: move every layer's selection bias against
        the step's load (nemoe.moe.MoELayer.update_select_bias). The counts are summed over the
        micro-batches and over ranks (a collective: `finite` agrees on every rank, since the
        gradient norm is taken after DDP's all-reduce), so every rank applies the same update."""
        counts = sum_over_ranks(torch.stack([m.counts for m in micro]).sum(dim=0).double())  # (L, E)
        for layer, layer_counts in zip(self.model.moe_layers, counts):
            layer.update_select_bias(layer_counts, self.cfg.moe.bias_rate)

    @property
    def diverged(self) -> bool:
        """train.max_bad_steps updates in a row were skipped."""
        return self.bad_steps >= self.cfg.train.max_bad_steps

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.bad_steps = state["bad_steps"]
