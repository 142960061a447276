"""Where and how one process computes: device, precision, autocast, random state.

`Runtime` is built once per process from the `train` section and the process's
place in a data-parallel group. Everything that runs the model (training step,
evaluation, probes, samples) takes its autocast context from here, so one
setting decides the precision of every forward pass.
"""

from __future__ import annotations

import contextlib
import random
import signal

import numpy as np
import torch

from nemoe import distributed as dist
from nemoe.errors import UserError

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCALER_NOTE = {"fp16": " + GradScaler"}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when present. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.launched_by_torchrun():
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA GPU is visible; use train.device=auto or cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """(precision, why). auto: fp32 on CPU; on CUDA bf16 only with native support (sm >= 8.0),
    else fp16 + GradScaler. An explicit fp16 or bf16 also runs on CPU, through CPU autocast
    (and the GradScaler for fp16): the T4 path, testable without a GPU.

    torch.cuda.is_bf16_supported() says True on a T4 (sm 7.5) because it counts
    emulation, so the compute capability decides.
    """
    if device.type != "cuda":
        if name == "auto":
            return "fp32", "CPU"
        if name in HALF:
            # Most CPUs have no native half-precision matmul: correct, but far slower than fp32.
            return name, f"train.precision; CPU autocast{SCALER_NOTE.get(name, '')}, for testing (slow on CPU)"
        return "fp32", "train.precision"
    major, minor = torch.cuda.get_device_capability(device)
    native_bf16 = major >= 8
    if name == "auto":
        return ("bf16", f"native bf16 on sm {major}.{minor}") if native_bf16 else \
            ("fp16", f"no native bf16 on sm {major}.{minor}: fp16 + GradScaler")
    if name == "bf16" and not native_bf16:
        raise UserError("train.precision=bf16 needs a GPU with compute capability >= 8.0; use fp16")
    return name, f"train.precision{SCALER_NOTE.get(name, '')}"


@contextlib.contextmanager
def on_stop_signal(handler):
    """While inside: SIGINT and SIGTERM call handler(signum) instead of ending the process."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: handler(signum))
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            pass
    try:
        yield
    finally:
        for sig, handler_before in old.items():
            signal.signal(sig, handler_before)


class Runtime:
    """Device, precision and random state of this process."""

    def __init__(self, train_cfg, info: dist.DistInfo = dist.DistInfo()):
        self.dist = info
        self.device = resolve_device(train_cfg.device, info.local_rank)
        self.precision, self.precision_reason = resolve_precision(train_cfg.precision, self.device)
        self.autocast_dtype = HALF.get(self.precision)

    @property
    def uses_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 and fp32 have fp32's exponent range."""
        return self.precision == "fp16"

    def autocast(self):
        """The forward pass's precision context (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- random state ------------------------------------------------------------ #
    @staticmethod
    def seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @staticmethod
    def rng_state() -> dict:
        """Python, numpy, torch CPU and CUDA generators (tensors and plain values only)."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 # As a tensor, so the checkpoint loads with torch.load(weights_only=True).
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                           "has_gauss": has_gauss, "gauss": gauss}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def set_rng_state(state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
