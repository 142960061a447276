"""The harness of the tools that train: build nemoe's Trainer for a config, run steps, time them.

Most tools read a run's files (tools/runfiles.py, tools/csvlogs.py); tools/bench.py (with bench_t4.py and
bench_unattended.py) and tools/gpu_check.py train, in this process, with the Trainer that
train_nemoe.py drives. They build, run and close it through these functions, and time
device work with `timed`, so the trainer's own code path is what they measure.
"""

from __future__ import annotations

import contextlib
import io
import platform
import time
from pathlib import Path

import torch

from nemoe import schema
from nemoe.config import config_from_dict
from nemoe.trainer import Trainer


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #

def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn() takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_matmul_flops(device: torch.device, n: int, dtype=torch.float32, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an (n, n) @ (n, n) matmul: 2 n^3 FLOPs each."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, cuBLAS handles
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


# --------------------------------------------------------------------------- #
# The Trainer
# --------------------------------------------------------------------------- #

def open_trainer(raw: dict, run_dir: Path, name: str, resume: bool = False, max_steps: int | None = None,
                 quiet: bool = False) -> Trainer:
    """A Trainer for the config `raw` (nested dicts, validated here), its run folder run_dir/name;
    quiet: its console lines (the run's text log keeps them) are kept out of the tool's output."""
    cfg = config_from_dict(raw)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return Trainer(cfg, schema.RunPaths.of(run_dir, name), resume=resume, max_steps=max_steps)


def close_trainer(trainer: Trainer) -> None:
    """Stop its data stream's threads, wait for its writes, close its logs."""
    trainer.stream.close()
    trainer.close()


def fit(trainer: Trainer, quiet: bool = False) -> None:
    """Train to the end of its run (max_steps, else the token target), as train_nemoe.py does."""
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        trainer.fit()


def run_steps(trainer: Trainer, n: int) -> list[float]:
    """`n` training steps; each step's training loss (cross-entropy, read back from the device)."""
    return [trainer.train_step().loss_ce.item() for _ in range(n)]
