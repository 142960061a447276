"""Run train_nemoe.py with a pause or a slowdown inside a background write, so a test can kill it there.

    python tests/fault_launcher.py MODE MARKER -- <train_nemoe.py arguments>

MODE:
    pause-write:STEP    the background write of checkpoint STEP writes half of its bytes to the
                        temporary file, creates MARKER, then sleeps (the test kills the process)
    pause-mirror:STEP   the mirror copy of checkpoint STEP does the same in the mirror
    slow:SECONDS        every background write and mirror copy sleeps SECONDS between two halves
                        (random kills then often land inside one)
    fail-fast           no pause; read faults reach nemoe's own retries at once (see fail_fast), and
                        no host but the loopback can be looked up (see loopback_only)

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


def fail_fast() -> None:
    """Read faults reach nemoe's retries at once and sources are read in small steps (the Hub
    stand-in tests, tests/test_hub.py): one read attempt and no sleeps in `datasets`, short
    back-offs in huggingface_hub's retries (their number unchanged) and in nemoe's."""
    import datasets
    from huggingface_hub.utils import _http

    from nemoe import data, sources
    for name, value in (("STREAMING_READ_MAX_RETRIES", 1), ("STREAMING_READ_RETRY_INTERVAL", 0),
                        ("STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL", 0),
                        ("STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL", 0),
                        ("STREAMING_OPEN_MAX_RETRIES", 1), ("STREAMING_OPEN_RETRY_INTERVAL", 0),
                        ("SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)):
        setattr(datasets.config, name, value)
    for function in (_http.http_backoff, _http.http_stream_backoff.__wrapped__):
        function.__kwdefaults__.update(base_wait_time=0.05, max_wait_time=0.2)
    data.RETRY_FIRST_DELAY_S, sources.HUB_BACKOFF_S = 0.05, 0.05
    # Small formatting calls: the sources are read all along the run, not in one go at its start.
    sources.MAP_BATCH_ROWS, sources.WIKITEXT_BATCH_ROWS = 4, 16


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def loopback_only() -> None:
    """No name outside the loopback is looked up (so nothing can be reached outside 127.0.0.1):
    each refused lookup fails as an unknown host would and is reported on stderr."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            print(f"fault_launcher: blocked a lookup of {name}", file=sys.stderr, flush=True)
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: only the loopback is reachable in tests")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def install(mode: str, marker: Path) -> None:
    kind, _, value = mode.partition(":")
    if kind == "fail-fast":
        loopback_only()
        return fail_fast()
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
