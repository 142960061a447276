"""What every tool's command line shares: notes on stderr, the --device argument, and `guard`:
a problem the user can fix raises `UserError`, which `guard` turns into one line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from nemoe.errors import UserError


def note(text: str) -> None:
    """A one-line remark on stderr (stdout stays the tool's output)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def guard(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a tool's main: UserError -> 'error: ...' on stderr and its exit code."""
    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return err.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `tool | head`: the reader went away
            return 0
    return wrapped



def resolve_device(name: str):
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`, `mps`."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device

