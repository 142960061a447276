#!/usr/bin/env python
"""Plot live experts per layer over a run, with its morph events marked.

    python tools/plot_experts.py logs/<run-name> -o experts.png
    python tools/plot_experts.py logs/<run-name>/training_log.csv --x tokens

Reads training_log.csv (one `experts_L<i>` column per layer) and, next to it,
events.csv (split, crossover, prune and failed-probation markers).
"""

from __future__ import annotations

import argparse
import sys

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import guard, note
from tools.csvlogs import latest_step, layer_columns, read_events, read_training_log
from tools.plotting import EVENT_STYLE, human, pyplot, save_figure, steps_to_tokens
from tools.runfiles import run_csv


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CSV",
                   help="a run's log folder (logs/<run-name>) or its training_log.csv")
    p.add_argument("-o", "--output", default="experts.png", help="PNG to write (default: experts.png)")
    p.add_argument("--x", choices=("steps", "tokens"), default="steps",
                   help="x axis: optimizer steps (tokens on a second axis) or tokens (default: steps)")
    p.add_argument("--layout", choices=("auto", "overlay", "panels"), default="auto",
                   help="all layers on one axis, or one panel per layer (default auto: panels above 4 layers)")
    return p.parse_args(argv)


def load(arg: str):
    """(training log, events, run name) for a log folder or a training_log.csv path."""
    csv_path, log_dir = run_csv(arg, schema.TRAIN_CSV)
    train = read_training_log(csv_path)
    if not layer_columns(train):
        raise UserError(f"{csv_path}: no experts_L<i> columns; is this a nemoe training log?")
    if not (log_dir / schema.EVENTS_CSV).is_file():
        note(f"no {schema.EVENTS_CSV} next to {csv_path.name}: plotting without event markers")
    events = read_events(log_dir / schema.EVENTS_CSV)
    return train, events, log_dir.name


def event_markers(events, layer: int, xcol: str, span: float) -> list[tuple[float, float, str]]:
    """(x, y, event) of one layer's event markers.

    Each sits on the layer's line: at the count after all of that step's events
    (what the training log shows). Several events at one step (a failed probation
    and a split, say) are spread sideways by a small fraction of the x range.
    """
    if not len(events):
        return []
    rows = events[(events["layer"] == layer) & events["event"].isin(list(EVENT_STYLE))]
    markers = []
    for _, group in rows.groupby("step", sort=True):
        x_at, final = float(group[xcol].iloc[0]), float(group["n_after"].iloc[-1])
        gap = 0.012 * span
        for k, event in enumerate(group["event"]):
            markers.append((x_at + (k - (len(group) - 1) / 2) * gap, final, event))
    return markers


def with_start(train, events):
    """The training log with a step-0 row prepended: the counts every layer started with.

    The first CSV row comes after `log.every_steps` steps; a layer's starting count
    is its first event's `n_before` when that event is not later than the first
    row, else the first row's count.
    """
    import pandas as pd
    first = train.iloc[0]
    if first["step"] <= 0:
        return train
    start = {"step": 0, "tokens": 0}
    for i, column in enumerate(layer_columns(train)):
        start[column] = first[column]
        early = events[(events["layer"] == i) & (events["step"] <= first["step"])] if len(events) else events
        if len(early):
            start[column] = early["n_before"].iloc[0]
    return pd.concat([pd.DataFrame([start]), train[["step", "tokens", *layer_columns(train)]]],
                     ignore_index=True)


def plot(train, events, run_name: str, x: str = "steps", layout: str = "auto"):
    """One line per layer: overlaid on one axis, or one panel per layer (auto: > 4 layers)."""
    plt = pyplot()
    train = with_start(train, events)
    columns = layer_columns(train)
    n_layers = len(columns)
    xcol = "step" if x == "steps" else "tokens"
    panels = layout == "panels" or (layout == "auto" and n_layers > 4)
    fig, axes, offsets = _axes(plt, n_layers, panels)
    colors = plt.get_cmap("tab10" if n_layers <= 10 else "viridis")
    span = float(train[xcol].max() - min(train[xcol].min(), 0)) or 1.0
    for i, (column, ax) in enumerate(zip(columns, axes)):
        color = colors(i % 10) if n_layers <= 10 else colors(i / max(n_layers - 1, 1))
        ax.plot(train[xcol], train[column] + offsets[i], drawstyle="steps-post", lw=1.8,
                color=color, label=f"layer {i}")
        for x_pos, y, event in event_markers(events, i, xcol, span):
            style = EVENT_STYLE[event]
            ax.scatter([x_pos], [y + offsets[i]], marker=style["marker"], s=90 if style["marker"] == "*" else 60,
                       facecolor=style["color"], edgecolor="black", linewidth=0.6, zorder=3)
    _legend(plt, axes, events, panels)
    _label_axes(fig, axes, train, columns, x, panels)
    step, tokens = latest_step(train, events)
    fig.suptitle(f"{run_name}: experts per layer (step {step:,}, {human(tokens)} tokens, {events_text(events)})")
    return fig


def events_text(events) -> str:
    """The expert events, counted as plot_training's legend counts them (every row), and which are marked:
    '6 expert events: 5 births/removals marked, 1 graduate'."""
    if not len(events):
        return "0 expert events"
    marked = events["event"].isin(list(EVENT_STYLE))
    others = "".join(f", {n} {kind}" for kind, n in events[~marked]["event"].value_counts().items())
    return f"{len(events)} expert events: {int(marked.sum())} births/removals marked{others}"


def _axes(plt, n_layers: int, panels: bool):
    """(figure, the axis of each layer, each layer's vertical offset)."""
    if panels:
        fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.5 + 1.15 * n_layers), sharex=True,
                                 sharey=True, layout="constrained")
        return fig, (list(axes) if n_layers > 1 else [axes]), [0.0] * n_layers
    # Counts are small integers shared by many layers: offset each layer a little
    # so overlapping lines stay visible; y ticks stay on the integers.
    spread = min(0.3, 0.08 * (n_layers - 1))
    offsets = [(i / (n_layers - 1) - 0.5) * spread if n_layers > 1 else 0.0 for i in range(n_layers)]
    fig, ax = plt.subplots(figsize=(10, 5.2), layout="constrained")
    return fig, [ax] * n_layers, offsets


def _legend(plt, axes, events, panels: bool) -> None:
    """The layers' line colours (overlay only) and each event type seen (marker)."""
    handles, labels = ([], []) if panels else axes[0].get_legend_handles_labels()
    seen = set(events["event"]) if len(events) else set()
    for event, style in EVENT_STYLE.items():
        if event in seen:
            handles.append(plt.Line2D([], [], ls="", marker=style["marker"], markersize=9 if event ==
                                      "crossover" else 8, markerfacecolor=style["color"],
                                      markeredgecolor="black", markeredgewidth=0.6))
            labels.append(style["label"])
    if handles:
        axes[0].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _label_axes(fig, axes, train, columns, x: str, panels: bool) -> None:
    counts = train[columns].to_numpy()
    low, high = int(counts.min()), int(counts.max())
    for i, ax in enumerate(dict.fromkeys(axes)):      # each distinct axis once
        ax.set_yticks(range(low, high + 1))
        ax.set_ylim(low - 0.5, high + 0.5)
        ax.grid(True, alpha=0.3)
        if panels:
            ax.set_ylabel(f"layer {i}")
    if panels:
        fig.supylabel("live experts")
    else:
        axes[0].set_ylabel("live experts" + (" (layers offset slightly)" if len(columns) > 1 else ""))
    if x == "steps":
        axes[-1].set_xlabel("optimizer step")
        forward, inverse = steps_to_tokens(train)
        top = axes[0].secondary_xaxis("top", functions=(forward, inverse))
        top.set_xlabel("tokens trained")
        top.xaxis.set_major_formatter(lambda v, _pos: human(v))
    else:
        axes[-1].set_xlabel("tokens trained")
        axes[-1].xaxis.set_major_formatter(lambda v, _pos: human(v))


@guard
def main(argv=None):
    args = parse_args(argv)
    train, events, run_name = load(args.run)
    fig = plot(train, events, run_name, args.x, args.layout)
    save_figure(fig, args.output)


if __name__ == "__main__":
    sys.exit(main())
