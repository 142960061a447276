"""Checkpoints: the file format, atomic save, keep-last-k, the newest one that loads, and when to save.

A checkpoint is written to a hidden temporary name in the same folder, flushed
to disk and renamed over its final name, so a reader sees either the whole file
or nothing. On resume the newest file that loads and looks like a nemoe
checkpoint wins; a truncated or unreadable newer one is skipped with a warning.

Off the critical path: `Checkpointer.save()` takes a snapshot at the step boundary
(every tensor copied to CPU memory of its own, `Snapshotter`) and hands it to a
background thread that writes, fsyncs and renames while training goes on; the next
save, the end of the run and a stop wait for that write (never two at once), and its
failure counts like a synchronous one. A finished checkpoint then goes to the mirror
(nemoe/mirror.py), when there is one.

The checkpoint's layout (its keys, the format, the upgrade of older files) is
nemoe/checkpoint_layout.py's; this module reads and writes the files.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from nemoe import checkpoint_layout as layout
from nemoe import distributed as dist
from nemoe.errors import UserError
from nemoe.files import fsync_dir
from nemoe.mirror import Mirror
from nemoe.schedule import every
from nemoe.schema import RunPaths, checkpoint_name, list_checkpoints


def save_checkpoint(directory: Path, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as nemo_ckpt_step<step>.pt; delete all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state["step"])
    tmp = directory / f".{final.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(layout.stamped(state), f)
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
    return layout.read(state, path)


def load_latest(directory: Path, warn: Callable[[str], None],
                reject: Callable[[dict], str | None] = lambda state: None,
                also: tuple[Path, Callable[[Path], str | None]] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and `reject` does not object to.

    also: a second folder (the mirror) and the check its files must pass first (their
    manifest); at equal steps the first folder's file wins. Each newer checkpoint passed
    over is reported through `warn`, with the reason.
    """
    candidates = [(step, 0, path) for step, path in list_checkpoints(directory)]
    if also is not None:
        candidates += [(step, 1, path) for step, path in list_checkpoints(also[0])]
    for _, side, path in sorted(candidates, key=lambda c: (-c[0], c[1])):
        problem = also[1](path) if side == 1 else None
        if problem is not None:
            warn(f"{path}: {problem}")
            continue
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


class Snapshotter:
    """Copies of the training state that training cannot change, for a background write.

    take(state) rebuilds the containers, deep-copies plain values and copies every tensor into
    CPU memory of its own (from the GPU, or from CPU tensors). Tensors that share storage (tied
    embeddings) share it in the copy too, so the file keeps its size. The CPU buffers are kept
    and refilled by the next take(): parameters and optimizer moments keep their storage for the
    whole run (expert slots never change shape; a slot's moments are allocated at its birth and
    freed at its death, nemoe/slot_optim.py, so those few buffers come and go), and copying into memory already mapped is
    several times faster than allocating it again (615 MB at t4 shapes: 0.5 s against 1.7 s on a
    loaded 2-core machine). The cost: host memory the size of the checkpoint's tensors, held from
    the first save on. Call take() only once the previous snapshot has been written."""

    def __init__(self):
        self.buffers: dict = {}   # (device, data_ptr, nbytes) of a live storage -> its CPU copy

    def take(self, state):
        used: dict = {}

        def copy_of(obj):
            if isinstance(obj, torch.Tensor):
                source = obj.untyped_storage()
                key = (obj.device, source.data_ptr(), source.nbytes())
                if key not in used:
                    used[key] = self._copy(key, source)
                return torch.empty(0, dtype=obj.dtype).set_(used[key], obj.storage_offset(), obj.size(), obj.stride())
            if isinstance(obj, dict):
                return {k: copy_of(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy_of(v) for v in obj)
            if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
                return obj
            return copy.deepcopy(obj)
        copied = copy_of(state)
        self.buffers = used   # storages gone from the state (none in a normal run) are let go
        return copied

    def _copy(self, key, source):
        buffer = self.buffers.get(key)
        if buffer is None:
            pinned = source.device.type == "cuda"   # page-locked: faster copies from the GPU
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        buffer.copy_(source)
        return buffer


def snapshot(state):
    """A one-off copy of `state` that training cannot change (see Snapshotter)."""
    return Snapshotter().take(state)


class _Write:
    """One checkpoint being written on a thread of its own (not a daemon: a normal interpreter
    exit waits for it). `error` is set if it failed."""

    def __init__(self, target, state: dict):
        self.step, self.path, self.error, self.seconds = state["step"], None, None, 0.0
        self.thread = threading.Thread(target=self._run, args=(target, state), name="nemoe-checkpoint")
        self.thread.start()

    def _run(self, target, state: dict) -> None:
        started = time.monotonic()
        try:
            self.path = target(state)
        except OSError as err:
            self.error = err
        self.seconds = time.monotonic() - started


def saved_text(saved: int, path: Path, seconds: float, background: bool, now: int) -> str:
    """The log line of a finished write. A background write is learned of at the next save (or the
    end), so the line, stamped with the step it is learned at, names the step it saved."""
    how = f"written in {seconds:.1f} s" + (" in the background" if background else "")
    later = f", done by step {now}" if now != saved else ""
    return f"Checkpoint | saved step {saved} to {path} ({how}{later})"


class Checkpointer:
    """When to save, and saving: a snapshot on the training thread, the write in the background,
    the copy to the mirror after it. A failed write keeps the previous checkpoints; too many in a
    row stop the run. Under DDP every rank calls save() and wait() (rank 0 writes) and all learn
    the outcome together."""

    def __init__(self, cfg, paths: RunPaths, info: dist.DistInfo, log):
        """cfg: the `checkpoint` section; log: the run's logger (its files are fsynced before a
        checkpoint claims their steps)."""
        self.cfg, self.directory, self.info, self.log = cfg, paths.ckpt_dir, info, log
        self.mirror = Mirror(Path(cfg.mirror_dir), paths, cfg.keep_last) if cfg.mirror_dir and info.is_main else None
        self.failures = 0
        self.last_save = self.last_success = time.monotonic()
        self.pending: _Write | None = None
        self.snapshots = Snapshotter()
        self.step = 0  # the run's step at the last save: log lines about earlier writes carry it
        self.blocked_s: list[float] = []  # per save: time the training loop waited (snapshot + previous write)

    def due(self, step: int, target: int, timed: bool) -> bool:
        """Save after this step: every checkpoint.every_steps, when `timed` (minutes_due, agreed
        over the ranks by the caller), and at the target."""
        return every(step, self.cfg.every_steps) or timed or step == target

    def minutes_due(self) -> bool:
        every = self.cfg.every_minutes
        return bool(every and (time.monotonic() - self.last_save) / 60 >= every)

    def save(self, state: dict) -> None:
        """Save `state` (the trainer's, at a step boundary): in the background unless
        checkpoint.background is off. Raises UserError after max_failures failures in a row. Under
        DDP the ranks' replicated parts are compared first: a mismatch is a bug and stops the run."""
        if self.info.enabled:
            digest = dist.replicas_digest(layout.replicated(state, self.info.rank), layout.step(state))
            self.log.line(layout.step(state), f"Ranks | {self.info.world_size} replicas identical (digest {digest})",
                          echo=False)
        started, self.step = time.perf_counter(), layout.step(state)
        self.wait()
        if self.info.is_main:
            self.log.flush_views()
            write = _Write(self._write, self.snapshots.take(state) if self.cfg.background else state)
            if not self.cfg.background:
                write.thread.join()
            self.pending = write
        self.last_save = time.monotonic()
        if not self.cfg.background:
            self.wait()
        self.blocked_s.append(time.perf_counter() - started)

    def _write(self, state: dict) -> Path:
        self.log.fsync()  # the logs reach the disk before a checkpoint claims their steps
        path = save_checkpoint(self.directory, state, self.cfg.keep_last)
        if self.mirror is not None:
            self.mirror.submit(path)
        return path

    def wait(self, collective: bool = True) -> None:
        """Wait for the write in flight and account for it. collective: under DDP all ranks call
        this together and learn rank 0's outcome (False: at close, when a rank may be gone)."""
        write, self.pending, step = self.pending, None, self.step
        if write is not None:
            write.thread.join()
        outcome = None if write is None else ("" if write.error is None else str(write.error))
        if self.info.enabled and collective:
            outcome = dist.broadcast_object(outcome)
        self.drain_mirror()
        if outcome is None:
            return
        saved = write.step if write is not None else step
        if outcome:
            self.failures += 1
            self.last_save = self.last_success  # a time-based save is due again
            self.log.warn(step, f"checkpoint at step {saved} failed ({outcome}); the previous checkpoints are "
                                f"intact ({self.failures} failures in a row)")
            if self.failures >= self.cfg.max_failures:
                raise UserError(f"stopping: {self.failures} checkpoint saves in a row failed, last: {outcome}. "
                                f"Free disk space or fix {self.directory}, then --resume") from None
            return
        self.failures = 0
        self.last_success = time.monotonic()
        if write is not None:
            self.log.line(step, saved_text(write.step, write.path, write.seconds, self.cfg.background, step))

    def drain_mirror(self) -> None:
        """The mirror's reports, into the run's log (on the training thread)."""
        while self.mirror is not None and not self.mirror.messages.empty():
            kind, text = self.mirror.messages.get()
            if kind == "warn":
                self.log.warn(self.step, text)
            else:
                self.log.line(self.step, text, echo=False)

    def close(self) -> None:
        """End of the run (or an error): wait for the write in flight and the mirror's copies. Never raises
        for a failed save (the run is over either way; it is logged)."""
        try:
            self.wait(collective=False)
        except UserError as err:
            self.log.warn(self.step, str(err))
        if self.mirror is not None:
            self.mirror.close()
            self.drain_mirror()
