#!/usr/bin/env python
"""Head-gate map: every attention head's gate (rows = layer.head) over a run's steps.

    python tools/plot_heads.py logs/<run-name> -o heads.png
    python tools/plot_heads.py logs/<run-name>/plasticity.csv --metric entropy

Reads plasticity.csv (rows granularity=head, name=gate or entropy, written by
plasticity.heads at every log step) and, next to it, events.csv: head events
prune (red down-triangle) and grow (green up-triangle) are marked on their head's row.
"""

from __future__ import annotations

import argparse
import sys

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import guard, note
from tools.csvlogs import one_timeline, read_events, read_state
from tools.plotting import human, pyplot, save_figure
from tools.runfiles import run_csv

# events.csv `event` of granularity head: (marker, colour, label)
HEAD_EVENTS = {"prune": ("v", "tab:red", "prune"), "grow": ("^", "tab:green", "grow")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CSV", help="a run's log folder (logs/<run-name>) or its plasticity.csv")
    p.add_argument("-o", "--output", default="heads.png", help="PNG to write (default: heads.png)")
    p.add_argument("--metric", choices=("gate", "entropy"), default="gate",
                   help="what the colour shows: the gate (0 dead .. 1 open) or the head's normalised "
                        "attention entropy on the probe batch (default: gate)")
    return p.parse_args(argv)


def load(arg: str, metric: str):
    """(head rows of plasticity.csv for `metric`, head events, run name)."""
    csv_path, log_dir = run_csv(arg, schema.STATE_CSV)
    if not csv_path.is_file():
        raise UserError(f"{log_dir}: no {schema.STATE_CSV}; was the run trained with "
                        f"plasticity.heads.enabled=true?")
    frame = one_timeline(read_state(csv_path), ["step", "granularity", "layer", "unit", "name"])
    heads = frame[(frame["granularity"] == "head") & (frame["name"] == metric)]
    if heads.empty:
        raise UserError(f"{csv_path}: no head rows named {metric!r} (is plasticity.heads enabled in this run?)")
    if not (log_dir / schema.EVENTS_CSV).is_file():
        note(f"no {schema.EVENTS_CSV} next to {csv_path.name}: plotting without event markers")
    events = read_events(log_dir / schema.EVENTS_CSV, granularity="head")
    return heads, events, log_dir.name


def head_number(unit: str) -> int:
    return int(unit.lstrip("h")) if unit.lstrip("h").isdigit() else -1


def plot(heads, events, run_name: str, metric: str = "gate"):
    """One heatmap: a row per head (layer 0 on top), x = optimizer step; events as markers."""
    import numpy as np
    plt = pyplot()
    heads = heads.assign(head=heads["unit"].map(head_number))
    rows = sorted({(int(r.layer), int(r.head)) for r in heads.itertuples()})
    row_of = {lh: i for i, lh in enumerate(rows)}
    steps = sorted(heads["step"].unique())
    grid = np.full((len(rows), len(steps)), np.nan)
    col_of = {s: j for j, s in enumerate(steps)}
    for r in heads.itertuples():
        grid[row_of[(int(r.layer), int(r.head))], col_of[r.step]] = r.value
    # A row at step s is the state after step s: its cell runs from s to the next log step.
    last_gap = steps[-1] - steps[-2] if len(steps) > 1 else 1
    edges = np.array(list(steps) + [steps[-1] + last_gap], dtype=float)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(rows)), layout="constrained")
    vmax = 1.0 if metric == "gate" else max(1.0, float(np.nanmax(grid)))
    mesh = ax.pcolormesh(edges, np.arange(len(rows) + 1), grid, cmap="viridis", vmin=0.0, vmax=vmax,
                         shading="flat")
    fig.colorbar(mesh, ax=ax, label="gate (0 pruned, 1 open)" if metric == "gate" else
                 "attention entropy / max")
    for layer in sorted({lh[0] for lh in rows})[1:]:        # a line between layers
        ax.axhline(min(i for lh, i in row_of.items() if lh[0] == layer), color="white", lw=1.5)
    counts = {}
    for kind, (marker, color, label) in HEAD_EVENTS.items():
        sel = events[events["event"] == kind] if len(events) else events
        points = [(float(e.step), row_of[(int(e.layer), head_number(e.unit))] + 0.5) for e in sel.itertuples()
                  if (int(e.layer), head_number(e.unit)) in row_of]
        counts[label] = len(points)
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, marker=marker, s=55, facecolor=color, edgecolor="black", linewidth=0.6,
                       zorder=3, label=f"{label} ({len(points)})")
    if any(counts.values()):
        ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False)
    ax.set_yticks(np.arange(len(rows)) + 0.5, [f"L{lh[0]}.h{lh[1]}" for lh in rows])
    ax.set_ylim(len(rows), 0)                                 # layer 0 at the top
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer.head")
    tokens = int(heads["tokens"].max()) if "tokens" in heads and heads["tokens"].notna().any() else 0
    fig.suptitle(f"{run_name}: attention-head {metric}s (step {int(steps[-1]):,}, {human(tokens)} tokens, "
                 f"prune {counts.get('prune', 0)}, grow {counts.get('grow', 0)})")
    return fig


@guard
def main(argv=None):
    args = parse_args(argv)
    heads, events, run_name = load(args.run, args.metric)
    save_figure(plot(heads, events, run_name, args.metric), args.output)


if __name__ == "__main__":
    sys.exit(main())
