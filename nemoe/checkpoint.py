"""Checkpoints: the file format, atomic save, keep-last-k, the newest one that loads, and when to save.

A checkpoint is written to a hidden temporary name in the same folder, flushed
to disk and renamed over its final name, so a reader sees either the whole file
or nothing. On resume the newest file that loads and looks like a nemoe
checkpoint wins; a truncated or unreadable newer one is skipped with a warning.

Format v2 (schema.CHECKPOINT_FORMAT): the components' states by name, plus the
run's progress.

    step, tokens, elapsed   progress (elapsed: training seconds over every resume)
    world_size              data-parallel processes that wrote it
    config                  the resolved config
    train_module            model, optimizer, scaler, bad_steps
    ranks                   per rank: rng, data (stream position), metrics (the open
                            log window), plasticity (each mechanism's state, with this
                            rank's statistics since the last decision)

v1 files (one flat dict, written before the components existed) load through
`upgrade_v1`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from nemoe import distributed as dist
from nemoe.errors import UserError
from nemoe.files import fsync_dir
from nemoe.schema import CHECKPOINT_FORMAT, checkpoint_name, list_checkpoints

_REQUIRED = ("step", "tokens", "elapsed", "world_size", "config", "train_module", "ranks")
_REQUIRED_V1 = ("step", "model", "optimizer", "controller", "trainer", "data", "config", "rng")


def save_checkpoint(directory: Path, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as nemo_ckpt_step<step>.pt; delete all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state["step"])
    tmp = directory / f".{final.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    for _, old in list_checkpoints(directory)[keep_last:]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Load one checkpoint on CPU (v1 upgraded to v2); UserError if unreadable or not nemoe's."""
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings, lists,
        # dicts), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickle errors, ...
        # The first line only: torch's advice about weights_only does not apply here.
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first_line})") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == "nemoe-checkpoint-v1" and all(k in state for k in _REQUIRED_V1):
        return upgrade_v1(state)
    if fmt != CHECKPOINT_FORMAT or any(k not in state for k in _REQUIRED):
        raise UserError(f"{path}: not a nemoe checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def upgrade_v1(old: dict) -> dict:
    """A v1 checkpoint as v2: the same state, regrouped by component."""
    t = old["trainer"]
    config = dict(old["config"])
    world_size = config.pop("world_size", 1)
    ranks = old.get("ranks") or [{"rng": old["rng"], "data": old["data"], "window": t["window"],
                                  "plasticity": old.get("plasticity", {})}]
    return {"format": CHECKPOINT_FORMAT, "step": old["step"], "tokens": t["tokens"], "elapsed": t["elapsed"],
            "world_size": world_size, "config": config,
            "train_module": {"model": old["model"], "optimizer": old["optimizer"], "scaler": old["scaler"],
                             "bad_steps": t["bad_steps"]},
            "ranks": [{"rng": r["rng"], "data": r["data"], "metrics": r["window"],
                       "plasticity": {**r.get("plasticity", {}),
                                      # single-process v1 kept the usage counts in the model buffers only
                                      "experts": {**old["controller"], **({"usage_counts": r["usage_counts"]}
                                                                         if "usage_counts" in r else {})}}}
                      for r in ranks]}


def replicated(state: dict, rank: int) -> dict:
    """The part of a checkpoint every data-parallel replica must hold identically: weights and
    buffers, optimizer state and expert records (not the per-rank usage counts, data positions,
    RNG or statistics since the last decision)."""
    train, experts = state["train_module"], state["ranks"][rank]["plasticity"]["experts"]
    return {"model": {k: v for k, v in train["model"].items() if not k.endswith("usage_counts")},
            "optimizer": train["optimizer"], "experts": {k: v for k, v in experts.items() if k != "usage_counts"}}


def load_latest(directory: Path, warn: Callable[[str], None],
                reject: Callable[[dict], str | None] = lambda state: None) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and `reject` does not object to.

    Each newer one passed over is reported through `warn`, with the reason.
    """
    for _, path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path)
        except UserError as err:
            warn(str(err))
            continue
        reason = reject(state)
        if reason is None:
            return path, state
        warn(f"{path}: {reason}")
    return None


class Checkpointer:
    """When to save, and saving: a failed write keeps the previous checkpoints; too many in a
    row stop the run. Under DDP every rank calls save() (rank 0 writes) and all learn the outcome."""

    def __init__(self, cfg, directory: Path, info: dist.DistInfo, log):
        """cfg: the `checkpoint` section; log: the run's logger (synced before a save)."""
        self.cfg, self.directory, self.info, self.log = cfg, directory, info, log
        self.failures = 0
        self.last_save = time.monotonic()

    def minutes_due(self) -> bool:
        every = self.cfg.every_minutes
        return bool(every and (time.monotonic() - self.last_save) / 60 >= every)

    def save(self, state: dict) -> None:
        step, path, err = state["step"], None, None
        if self.info.is_main:
            try:
                self.log.sync()   # the logs reach the disk before a checkpoint claims their steps
                path = save_checkpoint(self.directory, state, self.cfg.keep_last)
            except OSError as error:
                err = error
        if self.info.enabled:
            err = dist.broadcast_object(None if err is None else str(err))
        if err is not None:
            self.failures += 1
            self.log.warn(step, f"checkpoint at step {step} failed ({err}); the previous checkpoints are "
                                f"intact ({self.failures} failures in a row)")
            if self.failures >= self.cfg.max_failures:
                raise UserError(f"stopping: {self.failures} checkpoint saves in a row failed, last: {err}. "
                                f"Free disk space or fix {self.directory}, then --resume") from None
            return
        self.failures = 0
        self.last_save = time.monotonic()
        self.log.line(step, f"Checkpoint | {path}", echo=False)
