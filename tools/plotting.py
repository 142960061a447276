"""What the plotting tools share: matplotlib without a display, saving a figure, the expert
events' colours and markers, a step <-> tokens axis and short numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from nemoe.errors import UserError

# Colours and markers of expert events (events.csv `event` of granularity expert),
# shared by every plot so they read the same.
EVENT_STYLE = {
    "split": {"marker": "^", "color": "tab:green", "label": "split"},
    "crossover": {"marker": "*", "color": "tab:purple", "label": "crossover"},
    "prune": {"marker": "v", "color": "tab:red", "label": "prune"},
    "failed_probation": {"marker": "X", "color": "tab:orange", "label": "failed probation"},
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; works without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str | Path) -> Path:
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {out}: {err}") from None
    print(f"wrote {out}")
    return out


def steps_to_tokens(train: pd.DataFrame):
    """(step -> tokens, tokens -> step) from the training log, for a second x axis.

    Piecewise linear through the logged (step, tokens) pairs and through (0, 0), so
    a run whose batch size changed on resume still maps right; extended linearly
    past the last row (matplotlib asks for values outside the data range).
    """
    import numpy as np
    rows = train[train["step"] > 0]
    steps = np.concatenate([[0.0], rows["step"].to_numpy(dtype=float)])
    tokens = np.concatenate([[0.0], rows["tokens"].to_numpy(dtype=float)])
    ratio = tokens[-1] / steps[-1] if steps[-1] > 0 else 1.0

    def forward(s):
        s = np.asarray(s, dtype=float)
        return np.where(s > steps[-1], tokens[-1] + (s - steps[-1]) * ratio,
                        np.where(s < 0, s * ratio, np.interp(s, steps, tokens)))

    def inverse(t):
        t = np.asarray(t, dtype=float)
        return np.where(t > tokens[-1], steps[-1] + (t - tokens[-1]) / ratio,
                        np.where(t < 0, t / ratio, np.interp(t, tokens, steps)))
    return forward, inverse


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"
