"""When a periodic job of the training loop is due: every N optimizer steps, 0 meaning never.

Each component answers for its own job (Evaluator.due, Evaluator.sample_due, RunLogger.row_due,
Checkpointer.due, a plasticity Mechanism's due), so the Trainer's loop reads "step, then
whatever is due".
"""

from __future__ import annotations


def every(step: int, n: int) -> bool:
    """True at the steps that are multiples of `n` (n > 0); never when n is 0."""
    return n > 0 and step % n == 0
