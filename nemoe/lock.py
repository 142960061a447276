"""One run, one writer: a lock file in the run's log folder.

The lock holds the writer's host name and PID and is touched while the run
lives. A second trainer on the same run folder is refused while the holder is
alive: on the same host that is checked with the PID; from another host (a
shared Drive folder) a lock untouched for `STALE_AFTER_S` counts as abandoned.
A killed process therefore never leaves a run stuck for longer than that.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from nemoe.errors import UserError
from nemoe.files import atomic_write

STALE_AFTER_S = 120.0
HEARTBEAT_S = 20.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._last_touch = 0.0
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = self._holder()
        if holder is not None and holder != self.me and self._alive(holder):
            raise UserError(
                f"{self.path.parent} is in use by another trainer (host {holder.get('host')}, pid "
                f"{holder.get('pid')}); one run folder takes one writer. If that process is gone, "
                f"wait {STALE_AFTER_S:.0f} s or delete {self.path}")
        atomic_write(self.path, json.dumps(self.me))
        self.held = True
        self._last_touch = time.monotonic()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no lock, or a half-written one from a killed process

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") == self.me["host"]:
            return isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"])
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        return age < STALE_AFTER_S

    def heartbeat(self) -> None:
        """Touch the lock now and then so other hosts can tell it is alive."""
        if self.held and time.monotonic() - self._last_touch > HEARTBEAT_S:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._last_touch = time.monotonic()

    def release(self) -> None:
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False
