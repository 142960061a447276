"""The mirror: a second copy of a run's checkpoints and logs on fragile storage (Google Drive).

The run writes to its local run folder (fast disk); each checkpoint, once written there,
is copied to `<mirror_dir>/checkpoints/<run>/` by a background thread, together with
the logs of that moment (`<mirror_dir>/logs/<run>/`, TensorBoard's event files in its
`tensorboard/`). A copy is written to a temporary
name, fsynced, read back and compared with what was read from the local file (size and
SHA-256); only then is it renamed into place and its manifest written beside it:

    nemo_ckpt_step<step>.pt          the copy
    nemo_ckpt_step<step>.pt.json     {"file", "step", "size", "sha256"}: the copy was verified

A copy that fails (an I/O error, a mismatch) is retried and reported, and never gets a
manifest, so a resume never trusts it. On `--resume` (rundir.py) the newest checkpoint
that loads and verifies wins, local or mirrored: a fresh VM with an empty disk resumes
from the mirror, a mirror that lags behind resumes from local.

TensorBoard's event files are appended to while the run goes on (by the writer's own
thread), so the mirror takes whole records only (a record half-written when the file is
read stays for the next copy): its files are always readable to their end, each a prefix
of the local one. A file the mirror has already copied in this process gets only the new
records appended (what TensorBoard watching Drive expects of a growing file), read back
and compared; any other file is copied whole (temporary name, read back, rename). Event
files gone from the run folder (cut back by a resume) are removed from the mirror too, so
the mirror shows one timeline, as the run folder does.

When copies cannot keep up, the newest checkpoint waiting is copied next and older ones
waiting are skipped (training never waits for the mirror). The mirror keeps the last
`checkpoint.keep_last` checkpoints, like the run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path

from nemoe.files import fsync_dir
from nemoe.schema import (CONFIG_YAML, CSV_LOGS, TENSORBOARD_DIR, TEXT_LOG, RunPaths, checkpoint_step,
                          list_checkpoints, manifest_name)
from nemoe.tensorboard_log import event_files, whole_records_size

MIRROR_ATTEMPTS = 3           # tries per checkpoint before the mirror gives it up (the next one comes)
MIRROR_RETRY_S = 5.0          # pause before a retry, times the attempt number
CLOSE_TIMEOUT_S = 900.0       # at the end of a run, how long to wait for the copy in flight
CHUNK = 4 << 20
LOG_FILES = CSV_LOGS + (TEXT_LOG, CONFIG_YAML)
# A copy's temporary name in a TensorBoard folder: without "tfevents", which TensorBoard would read.
TB_TMP = f".mirror.tmp{os.getpid()}"


class MirrorMismatch(OSError):
    """The copy read back differs from what was read from the local file."""


def sha256_of(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex digest) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def copy_and_hash(source: Path, target: Path) -> tuple[int, str]:
    """Copy `source` to `target` (fsynced); (size, SHA-256) of the bytes read from `source`."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as fi, open(target, "wb") as fo:
        while chunk := fi.read(CHUNK):
            digest.update(chunk)
            fo.write(chunk)
            size += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return size, digest.hexdigest()


def verify(path: Path) -> str | None:
    """Why the mirrored checkpoint at `path` cannot be trusted (None: its manifest matches it)."""
    manifest = path.with_name(manifest_name(path.name))
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no manifest (its copy never finished or was not verified)"
    try:
        size, digest = sha256_of(path)
    except OSError as err:
        return f"unreadable ({err})"
    if (size, digest) != (expected.get("size"), expected.get("sha256")):
        return (f"checksum mismatch: {size:,} bytes, sha256 {digest[:12]}..., manifest says "
                f"{expected.get('size')} bytes, sha256 {str(expected.get('sha256'))[:12]}...")
    return None


def restore_logs(mirror: RunPaths, local: RunPaths) -> list[str]:
    """Copy the mirror's logs into a local log folder that lacks them (a fresh disk); names copied."""
    local.log_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in LOG_FILES:
        source, target = mirror.log_dir / name, local.log_dir / name
        if source.is_file() and not target.exists():
            _copy_atomic(source, target)
            copied.append(name)
    # TensorBoard's history: the resume cuts it back to the checkpoint's step (a torn last record too).
    local_tb = local.log_dir / TENSORBOARD_DIR
    if not event_files(local_tb):
        for source in event_files(mirror.log_dir / TENSORBOARD_DIR):
            local_tb.mkdir(parents=True, exist_ok=True)
            _copy_atomic(source, local_tb / source.name, tmp_name=TB_TMP)
            copied.append(f"{TENSORBOARD_DIR}/{source.name}")
    return copied


def _copy_atomic(source: Path, target: Path, tmp_name: str | None = None) -> None:
    tmp = target.with_name(tmp_name or f".{target.name}.tmp{os.getpid()}")
    try:
        copy_and_hash(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class Mirror:
    """Copies finished checkpoints and the logs to the mirror on a background thread.

    `submit()` may be called from any thread; `messages` holds ("line" | "warn", text) for the
    run's log, read on the training thread (Checkpointer.drain_mirror)."""

    def __init__(self, root: Path, local: RunPaths, keep_last: int):
        self.paths, self.local, self.keep_last = RunPaths.of(root, local.name), local, keep_last
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._next: Path | None = None   # the newest checkpoint waiting for its copy
        self._thread: threading.Thread | None = None
        self._tb_copied: dict[str, int] = {}   # event file -> bytes of it in the mirror, copied by this process

    def submit(self, checkpoint: Path) -> None:
        """Copy this checkpoint (and the logs) next; one waiting but not started is skipped."""
        with self._lock:
            self._next = checkpoint
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nemoe-mirror", daemon=True)
                self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait for the copies in flight and waiting; False if they did not finish in time."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self.messages.put(("warn", f"mirror: the copy to {self.paths.ckpt_dir} did not finish within "
                                           f"{timeout:.0f} s; the mirror may lag behind the run folder"))
                return False
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                checkpoint, self._next = self._next, None
                if checkpoint is None:
                    self._thread = None
                    return
            self._mirror(checkpoint)

    def _mirror(self, checkpoint: Path) -> None:
        started = time.monotonic()
        self._copy_logs()
        for attempt in range(1, MIRROR_ATTEMPTS + 1):
            try:
                size, digest = self._copy_checkpoint(checkpoint)
            except FileNotFoundError as err:
                if not checkpoint.exists():  # keep_last removed it locally: a newer one is on its way
                    self.messages.put(("line", f"Mirror | {checkpoint.name} skipped: gone from the run folder"))
                    return
                failure = err
            except OSError as err:
                failure = err
            else:
                self.messages.put(("line", f"Mirror | {checkpoint.name} copied to {self.paths.ckpt_dir} and "
                                           f"verified ({size:,} bytes, sha256 {digest[:12]}, "
                                           f"{time.monotonic() - started:.1f} s)"))
                self._prune()
                return
            more = attempt < MIRROR_ATTEMPTS
            self.messages.put(("warn", f"mirror: copying {checkpoint.name} failed ({type(failure).__name__}: "
                                       f"{failure}); " + (f"retrying ({attempt}/{MIRROR_ATTEMPTS})" if more else
                                                          "giving up on it, the mirror keeps its older checkpoints")))
            if more:
                time.sleep(MIRROR_RETRY_S * attempt)

    def _copy_checkpoint(self, checkpoint: Path) -> tuple[int, str]:
        """Copy, fsync, read back and compare, rename, then write the manifest (the copy's seal)."""
        folder = self.paths.ckpt_dir
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / checkpoint.name
        tmp = folder / f".{checkpoint.name}.tmp{os.getpid()}"
        try:
            size, digest = copy_and_hash(checkpoint, tmp)
            copied = sha256_of(tmp)
            if copied != (size, digest):
                raise MirrorMismatch(f"the copy read back differs: {copied[0]:,} bytes, sha256 {copied[1][:12]} "
                                     f"instead of {size:,} bytes, sha256 {digest[:12]}")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        manifest = {"file": final.name, "step": checkpoint_step(final.name), "size": size, "sha256": digest}
        _write_text_atomic(folder / manifest_name(final.name), json.dumps(manifest, indent=1) + "\n")
        fsync_dir(folder)
        return size, digest

    def _copy_logs(self) -> None:
        try:
            self.paths.log_dir.mkdir(parents=True, exist_ok=True)
            for name in LOG_FILES:
                if (self.local.log_dir / name).is_file():
                    _copy_atomic(self.local.log_dir / name, self.paths.log_dir / name)
            self._copy_tensorboard()
        except OSError as err:
            self.messages.put(("warn", f"mirror: copying the logs to {self.paths.log_dir} failed ({err})"))

    def _copy_tensorboard(self) -> None:
        """The event files as whole records: new records appended to a copy made earlier by this
        process, any other file copied whole; files the run folder no longer has removed."""
        source_dir, target_dir = self.local.log_dir / TENSORBOARD_DIR, self.paths.log_dir / TENSORBOARD_DIR
        files = event_files(source_dir)
        if files:
            target_dir.mkdir(parents=True, exist_ok=True)
        for source in files:
            target, done = target_dir / source.name, self._tb_copied.pop(source.name, None)
            with open(source, "rb") as f:
                if done is not None and _size(target) == done:
                    f.seek(done)
                    new = f.read()
                    new = new[:whole_records_size(new)]
                    if new:
                        _append_verified(target, done, new)
                    self._tb_copied[source.name] = done + len(new)
                else:
                    data = f.read()
                    data = data[:whole_records_size(data)]
                    _write_verified(target, data)
                    self._tb_copied[source.name] = len(data)
        names = {p.name for p in files}
        for stale in event_files(target_dir):
            if stale.name not in names:
                stale.unlink()

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints in the mirror (with their manifests)."""
        folder = self.paths.ckpt_dir
        try:
            for _, old in list_checkpoints(folder)[self.keep_last:]:
                old.unlink(missing_ok=True)
                old.with_name(manifest_name(old.name)).unlink(missing_ok=True)
        except OSError as err:
            self.messages.put(("warn", f"mirror: removing old checkpoints from {folder} failed ({err})"))


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_back(path: Path, offset: int, expected: bytes) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        back = f.read()
    if back != expected:
        raise MirrorMismatch(f"{path.name}: the copy read back differs ({len(back):,} bytes from offset {offset:,} "
                             f"instead of {len(expected):,})")


def _write_verified(target: Path, data: bytes) -> None:
    """`data` as the event file `target`: temporary name, fsync, read back and compared, rename."""
    tmp = target.with_name(TB_TMP)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _read_back(tmp, 0, data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _append_verified(target: Path, offset: int, data: bytes) -> None:
    """`data` appended to `target` (which holds `offset` bytes), fsynced, read back and compared.
    A failure leaves at worst a cut-off last record, which readers skip and the next full copy replaces."""
    with open(target, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _read_back(target, offset, data)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
