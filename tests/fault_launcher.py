"""Run train_nemoe.py with a pause or a slowdown inside a background write, so a test can kill it there.

    python tests/fault_launcher.py MODE MARKER -- <train_nemoe.py arguments>

MODE:
    pause-write:STEP    the background write of checkpoint STEP writes half of its bytes to the
                        temporary file, creates MARKER, then sleeps (the test kills the process)
    pause-mirror:STEP   the mirror copy of checkpoint STEP does the same in the mirror
    slow:SECONDS        every background write and mirror copy sleeps SECONDS between two halves
                        (random kills then often land inside one)

Only test code patches nemoe here; the trainer runs unchanged otherwise.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's nemoe

import torch  # noqa: E402

from nemoe import checkpoint, mirror  # noqa: E402
from nemoe.schema import checkpoint_step  # noqa: E402
import train_nemoe  # noqa: E402


def _halves(data: bytes, write, pause) -> None:
    write(data[: len(data) // 2])
    pause()
    write(data[len(data) // 2:])


def install(mode: str, marker: Path) -> None:
    kind, _, value = mode.partition(":")
    real_save, real_copy = torch.save, mirror.copy_and_hash

    def stop_here():
        marker.write_text("paused\n")
        time.sleep(3600)

    def pause_for(step: int | None) -> float | None:
        if kind == "slow":
            return float(value)
        return None if step != int(value) else -1.0

    def save(obj, f, *args, **kwargs):
        wait = pause_for(obj.get("step")) if kind in ("pause-write", "slow") else None
        if wait is None:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        _halves(buffer.getvalue(), f.write, lambda: (f.flush(), stop_here() if wait < 0 else time.sleep(wait)))

    def copy_and_hash(source: Path, target: Path):
        wait = pause_for(checkpoint_step(source.name)) if kind in ("pause-mirror", "slow") else None
        if wait is None or checkpoint_step(source.name) is None:
            return real_copy(source, target)
        data = source.read_bytes()
        with open(target, "wb") as f:
            _halves(data, f.write, lambda: (f.flush(), stop_here() if wait < 0 else time.sleep(wait)))
        return real_copy(source, target)   # the real copy (and its digest) once the pause is over

    checkpoint.torch.save = save
    mirror.copy_and_hash = copy_and_hash


if __name__ == "__main__":
    mode, marker, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_launcher.py MODE MARKER -- ARGS"
    # The test session's torch settings (tests/conftest.py), so these steps equal in-process runs bit for bit.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    install(mode, Path(marker))
    sys.exit(train_nemoe.main(args))
