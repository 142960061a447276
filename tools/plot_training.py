#!/usr/bin/env python
"""Plot a run's training curves: losses, held-out loss per source, LR, throughput.

    python tools/plot_training.py logs/<run-name> -o training.png

Six panels over optimizer steps -- train loss (raw and smoothed) with the mixed
held-out loss, held-out loss per source, load-balance loss, router z-loss,
learning rate and tokens/s -- each with a vertical mark at every expert birth or
death, and a row of markers along its top edge for the events of each granularity
(expert, neuron, head, layer: one marker style each, one row each).
Reads training_log.csv, eval.csv and events.csv of the run's log folder.
"""

from __future__ import annotations

import argparse
import sys

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import guard
from tools.csvlogs import latest_step, read_eval, read_events, read_training_log
from tools.plotting import EVENT_STYLE, human, pyplot, save_figure
from tools.runfiles import find_log_dir


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run's log folder (logs/<run-name>)")
    p.add_argument("-o", "--output", default="training.png", help="PNG to write (default: training.png)")
    p.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="rows in the train-loss moving average (default: about 1/20 of the rows)")
    return p.parse_args(argv)


# Marker row of each event granularity (events.csv `granularity`), top row first.
GRANULARITY_STYLE = {
    "expert": {"marker": "D", "color": "black", "label": "expert"},
    "neuron": {"marker": "o", "color": "tab:cyan", "label": "neuron"},
    "head": {"marker": "s", "color": "tab:olive", "label": "attention head"},
    "layer": {"marker": "P", "color": "tab:pink", "label": "layer"},
}
OTHER_GRANULARITY = {"marker": "x", "color": "tab:gray"}


def load(arg: str):
    log_dir = find_log_dir(arg)
    return (read_training_log(log_dir / schema.TRAIN_CSV), read_eval(log_dir / schema.EVAL_CSV),
            read_events(log_dir / schema.EVENTS_CSV, granularity=None), log_dir.name)


def granularities(events) -> list[str]:
    """Granularities present, known ones in GRANULARITY_STYLE order, then any others."""
    present = list(dict.fromkeys(events["granularity"])) if len(events) else []
    return [g for g in GRANULARITY_STYLE if g in present] + [g for g in present if g not in GRANULARITY_STYLE]


def granularity_style(name: str) -> dict:
    return GRANULARITY_STYLE.get(name, {**OTHER_GRANULARITY, "label": name})


def _mark_events(ax, events) -> None:
    """A thin vertical line per (step, expert event type), births and deaths only; then one
    row of markers per granularity along the top edge, at the steps with such events."""
    if not len(events):
        return
    experts = events[events["granularity"] == "expert"]
    for event, style in EVENT_STYLE.items():
        for step in sorted(set(experts.loc[experts["event"] == event, "step"])):
            ax.axvline(step, color=style["color"], lw=0.8, alpha=0.45, ls="--", zorder=0)
    top = ax.get_xaxis_transform()   # x in data, y in axes fraction
    for row, name in enumerate(granularities(events)):
        steps = sorted(set(events.loc[events["granularity"] == name, "step"]))
        style = granularity_style(name)
        ax.plot(steps, [0.97 - 0.05 * row] * len(steps), ls="none", marker=style["marker"],
                color=style["color"], ms=4, alpha=0.8, transform=top, clip_on=False,
                gid=f"events-{name}")


# The four single-series panels: (row, column, CSV column, title, y label, colour).
SERIES_PANELS = [(1, 0, "loss_lb", "load-balance loss (unscaled)", "loss_lb", "tab:green"),
                 (1, 1, "loss_z", "router z-loss (unscaled)", "loss_z", "tab:brown"),
                 (2, 0, "lr", "learning rate", "lr", "tab:red"),
                 (2, 1, "tokens_per_s", "throughput", "tokens / s", "tab:gray")]


def plot(train, evals, events, run_name: str, smooth: int = 0):
    import numpy as np
    plt = pyplot()
    # A skipped non-finite step logs inf/nan; leave a gap rather than break the axis.
    train = train.replace([np.inf, -np.inf], np.nan)
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True, layout="constrained")
    _loss_panel(axes[0, 0], train, evals, smooth or max(1, round(len(train) / 20)))
    _heldout_panel(axes[0, 1], evals)
    for row, col, column, title, ylabel, color in SERIES_PANELS:
        ax = axes[row, col]
        ax.plot(train["step"], train[column], color=color, lw=1.2)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    if "balance" in train and train["balance"].notna().any():
        # loss_lb as trained counts a ramping newborn as a full expert (reads ~1.5 at even routing
        # right after a birth); `balance` counts the experts that can take traffic, so 1 = even.
        axes[1, 0].lines[0].set_label("as trained (newborns count fully)")
        axes[1, 0].plot(train["step"], train["balance"], color="tab:brown", lw=1.0, ls="-.",
                        label="over routable experts")
    axes[1, 0].axhline(1.0, color="gray", lw=0.8, ls=":", label="perfect balance = 1")
    axes[1, 0].legend(fontsize=9)
    axes[2, 0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[2, 1].yaxis.set_major_formatter(lambda v, _pos: human(v))
    for ax in axes.flat:
        _mark_events(ax, events)
        ax.grid(True, alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_tick_params(labelbottom=True)
    _event_legend(fig, events)
    step, tokens = latest_step(train, evals, events)
    fig.suptitle(f"{run_name}: step {step:,}, {human(tokens)} tokens")
    return fig


def _loss_panel(ax, train, evals, window: int) -> None:
    """Train cross-entropy (raw and a moving mean of `window` rows) with the mixed held-out loss."""
    steps = train["step"]
    if window > 1:
        ax.plot(steps, train["loss_ce"], color="tab:blue", lw=0.8, alpha=0.35, label="train (raw)")
    ax.plot(steps, train["loss_ce"].rolling(window, min_periods=1).mean(), color="tab:blue", lw=1.8,
            label=f"train (mean of {window} rows)" if window > 1 else "train")
    mixed = evals[evals["source"] == "all"] if len(evals) else evals
    if len(mixed):
        ax.plot(mixed["step"], mixed["loss"], "o-", color="black", ms=4, lw=1.2, label="held-out (mixed)")
    ax.set_title("cross-entropy loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=9)


def _heldout_panel(ax, evals) -> None:
    sources = [s for s in dict.fromkeys(evals["source"])] if len(evals) else []
    for source in sources:
        rows = evals[evals["source"] == source]
        style = {"color": "black", "lw": 2.0} if source == "all" else {"lw": 1.4}
        ax.plot(rows["step"], rows["loss"], marker="o", ms=4, label="mixed" if source == "all" else source,
                **style)
    if sources:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no held-out evaluation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("held-out loss per source")
    ax.set_ylabel("loss (nats/token)")


def _event_legend(fig, events) -> None:
    """One legend entry per expert event type drawn, and per granularity with its count."""
    plt = pyplot()
    experts = events[events["granularity"] == "expert"] if len(events) else events
    seen = set(experts["event"]) if len(experts) else set()
    handles = [plt.Line2D([], [], color=s["color"], ls="--", lw=1.2, label=f"{s['label']} event")
               for e, s in EVENT_STYLE.items() if e in seen]
    for name in granularities(events):
        style, count = granularity_style(name), int((events["granularity"] == name).sum())
        handles.append(plt.Line2D([], [], ls="none", marker=style["marker"], color=style["color"],
                                  label=f"{style['label']} events ({count})"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)


@guard
def main(argv=None):
    args = parse_args(argv)
    if args.smooth < 0:
        raise UserError("--smooth must be >= 0")
    train, evals, events, run_name = load(args.run)
    save_figure(plot(train, evals, events, run_name, args.smooth), args.output)


if __name__ == "__main__":
    sys.exit(main())
