"""The log window: what the steps since the last training_log.csv row add up to.

Sums stay on the device (no host sync per step); `row()` turns them into one CSV
row of means, summed over data-parallel ranks. The window is checkpointed per
rank, so a resumed run's first row covers the same steps as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from nemoe import distributed as dist
from nemoe.train_module import StepResult


def resident_mb() -> float:
    """This process's resident set size now, in MB (10^6 bytes), from /proc/self/statm (one read of
    a few bytes); NaN where there is no /proc (macOS: getrusage has only the peak, not the size now)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return round(pages * _PAGE / 1e6, 1)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_memory() -> None:
    """Return the memory glibc's malloc keeps after frees to the OS (malloc_trim(0); nothing off glibc).

    A CPU step allocates and frees tensors of tens to hundreds of MB (the logits and their
    gradients); glibc keeps freed blocks in its arenas for reuse, so the resident size of a
    small run rose from ~600 MB to ~1.4 GB in its first few hundred steps, all of it free
    memory (tools/soak.py --trace: malloc's bytes in use stayed ~400 MB). Trimming at each
    log row keeps it at ~600 MB (docs/reliability.md)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, Windows, musl)
        return None


_malloc_trim = _find_malloc_trim()


@dataclass
class MetricsWindow:
    loss_ce: torch.Tensor       # () sum over micro-batches
    loss_lb: torch.Tensor
    loss_z: torch.Tensor
    grad_norm: torch.Tensor     # () sum over the applied steps
    wall_start: float           # the run's training time when the window opened
    steps: int = 0
    micro: int = 0
    lr: float = 0.0
    skipped: int = 0            # steps whose update was skipped (non-finite gradients)
    balance: torch.Tensor | None = None  # () sum over micro-batches of the reported balance

    def __post_init__(self):
        if self.balance is None:  # a window checkpointed before the column existed
            self.balance = torch.zeros((), device=self.loss_ce.device)

    @classmethod
    def empty(cls, device, wall_start: float) -> "MetricsWindow":
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        return cls(zero(), zero(), zero(), zero(), wall_start)

    def add(self, result: StepResult) -> None:
        for m in result.micro:
            self.micro += 1
            self.loss_ce += m.loss_ce
            self.loss_lb += m.loss_lb
            self.loss_z += m.loss_z
            if m.balance is not None:
                self.balance += m.balance
        self.steps += 1
        if result.finite:   # a skipped step's norm is inf or nan: it is counted, not averaged
            self.grad_norm += result.grad_norm.float()
        else:
            self.skipped += 1
        self.lr = result.lr

    def row(self, step: int, tokens: int, elapsed: float, tokens_per_step: int, world_size: int,
            moe_cfg, loss_scale: float) -> dict:
        """A training_log.csv row of means over the window (a collective under DDP); the
        plasticity mechanisms add their own columns (Plasticity.log_row: experts per layer, ...)."""
        micro, steps, applied = max(self.micro, 1), max(self.steps, 1), self.steps - self.skipped
        # Means over every rank's micro-batches (equal sizes), and every rank's routing counts.
        losses = dist.sum_over_ranks(torch.stack([self.loss_ce, self.loss_lb, self.loss_z, self.balance]).double())
        loss_ce, loss_lb, loss_z, balance = (losses / (micro * world_size)).tolist()
        tokens_per_s = steps * tokens_per_step / max(elapsed - self.wall_start, 1e-9)
        # loss_lb is measured under every balance mode; it enters `loss` with the weight the
        # optimizer gave it (moe.aux_coef: 0 under balance: bias).
        row = {"step": step, "tokens": tokens, "loss_ce": loss_ce, "loss_lb": loss_lb,
               "loss_z": loss_z, "loss_lb_scaled": moe_cfg.aux_coef * loss_lb,
               "loss_z_scaled": moe_cfg.z_coef * loss_z,
               "loss": loss_ce + moe_cfg.aux_coef * loss_lb + moe_cfg.z_coef * loss_z, "balance": balance,
               "lr": self.lr, "grad_norm": (self.grad_norm / applied).item() if applied else math.nan,
               "grad_scale": loss_scale, "skipped_steps": self.skipped,
               "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed, 3), "rss_mb": resident_mb(),
               "window_steps": self.steps}   # for the text line only: not a training_log.csv column
        return row

    def state_dict(self) -> dict:
        return {f.name: (v.cpu() if torch.is_tensor(v := getattr(self, f.name)) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict, device) -> "MetricsWindow":
        # (an older window's routing counts were moved to the expert mechanism by checkpoint_layout.read)
        return cls(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()})
