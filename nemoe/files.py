"""Small file-system helpers shared by checkpoints, logs and the run lock."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader (or a kill) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete leftovers of atomic writes cut off by a kill (call with the run lock held)."""
    found = sorted(directory.glob(".*.tmp*")) if directory.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
