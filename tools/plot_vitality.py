#!/usr/bin/env python
"""Heatmap of layer vitality over a run (layers x steps), with layer deaths and births marked.

    python tools/plot_vitality.py logs/<run-name> -o vitality.png
    python tools/plot_vitality.py logs/<run-name>/plasticity.csv --value lr_scale

Reads plasticity.csv (the `layer` rows written by plasticity.layers at each log
step) and, next to it, events.csv (layer events: death X, birth ^ markers) and
config.yaml (the birth and death zones, drawn as dashed lines).
"""

from __future__ import annotations

import argparse
import sys

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import guard
from tools.csvlogs import one_timeline, read_events, read_state
from tools.plotting import pyplot, save_figure
from tools.runfiles import read_run_config, run_csv

VALUES = ("vitality", "importance", "influence", "temperature", "dropout", "lr_scale", "age")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CSV", help="a run's log folder (logs/<run-name>) or its plasticity.csv")
    p.add_argument("-o", "--output", default="vitality.png", help="PNG to write (default: vitality.png)")
    p.add_argument("--value", choices=VALUES, default="vitality",
                   help="the per-layer quantity to colour (default: vitality)")
    return p.parse_args(argv)


def load(arg: str, value: str):
    """(layers x steps table of `value`, layer events, run config or None, run name)."""
    csv_path, log_dir = run_csv(arg, schema.STATE_CSV)
    frame = read_state(csv_path)
    frame = frame[(frame["granularity"] == "layer") & (frame["name"] == value)]
    if frame.empty:
        raise UserError(f"{csv_path}: no layer {value} rows; was the run trained with "
                        f"plasticity.layers.enabled=true?")
    frame = one_timeline(frame, ["step", "layer"])
    table = frame.pivot(index="layer", columns="step", values="value").sort_index()
    events = read_events(log_dir / schema.EVENTS_CSV, granularity="layer")
    return table, events, read_run_config(log_dir, required=False), log_dir.name


def plot(table, events, config, value: str, title: str):
    plt = pyplot()
    n_layers = len(table.index)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * n_layers))
    mesh = ax.pcolormesh(table.columns, table.index, table.to_numpy(), shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=value)
    for event, marker, colour, label in (("death", "X", "tab:red", "death"),
                                         ("birth", "^", "white", "birth")):
        rows = events[events["event"] == event]
        if len(rows):
            ax.scatter(rows["step"], rows["layer"], marker=marker, s=70, c=colour, edgecolors="black",
                       linewidths=0.8, label=f"{label} ({len(rows)})", zorder=3)
    layers_cfg = ((config or {}).get("plasticity") or {}).get("layers") or {}
    if layers_cfg.get("enabled"):
        ax.axhline(layers_cfg["birth_zone"] - 0.5, ls="--", c="white", lw=1)
        ax.axhline(n_layers - layers_cfg["death_zone"] - 0.5, ls="--", c="tab:red", lw=1)
    ax.set_yticks(list(table.index))
    ax.set_ylabel("layer (0 = input)")
    ax.set_xlabel("step")
    ax.set_title(f"{title}: layer {value}")
    if len(events):
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig


@guard
def main(argv=None):
    args = parse_args(argv)
    table, events, config, name = load(args.run, args.value)
    save_figure(plot(table, events, config, args.value, name), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
