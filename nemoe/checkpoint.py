"""Checkpoints: atomic save, keep-last-k, find the newest one that loads.

A checkpoint is written to a hidden temporary name in the same folder, flushed
to disk and renamed over its final name, so a reader sees either the whole file
or nothing. On resume the newest file that loads and looks like a nemoe
checkpoint wins; a truncated or unreadable newer one is skipped with a warning.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from nemoe.errors import UserError
from nemoe.files import fsync_dir

FORMAT = "nemoe-checkpoint-v1"
_NAME = re.compile(r"^nemo_ckpt_step(\d+)\.pt$")
_REQUIRED = ("format", "step", "model", "optimizer", "controller", "trainer", "data", "config", "rng")


def checkpoint_name(step: int) -> str:
    return f"nemo_ckpt_step{step}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(directory: Path, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as nemo_ckpt_step<step>.pt; delete all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state["step"])
    tmp = directory / f".{final.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
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
    """Load one checkpoint on CPU; UserError if it is unreadable or not a nemoe checkpoint."""
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings, lists,
        # dicts), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickle errors, ...
        # The first line only: torch's advice about weights_only does not apply here.
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _REQUIRED):
        raise UserError(f"{path}: not a nemoe checkpoint (expected format {FORMAT})")
    return state


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
