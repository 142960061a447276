#!/usr/bin/env python
"""The expert family tree of a run: who split from whom, crossover parents, deaths.

    python tools/lineage.py logs/<run-name>                 # every layer
    python tools/lineage.py logs/<run-name> --layer 0 -o lineage.png

Prints an indented tree per layer (a crossover child sits under its first parent
and names both) and writes a picture: one lifeline per expert from birth to death
or the end of the log, probation drawn light, births linked to their parents.

Reads events.csv, config.yaml (experts at the start) and training_log.csv (the
last step) from the run's log folder. Expert ids are one counter over the whole
model: the founders of layer i are i*experts_init ... i*experts_init+experts_init-1
(the controller numbers layer by layer at start), newborns take the next id.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import guard, note
from tools.csvlogs import latest_step, parent_ids, read_eval, read_events, read_training_log
from tools.plotting import EVENT_STYLE, pyplot, save_figure
from tools.runfiles import find_log_dir, read_run_config

DEATHS = {"prune": "pruned", "failed_probation": "failed probation"}
ORIGIN_COLOR = {"founder": "tab:blue", "split": "tab:green", "crossover": "tab:purple"}


@dataclass
class Expert:
    id: int
    layer: int
    origin: str = "founder"          # founder | split | crossover
    parents: list[int] = field(default_factory=list)
    born: int = 0                    # step
    graduated: int | None = None     # step its probation review passed
    died: int | None = None          # step
    cause: str | None = None         # prune | failed_probation
    death_value: float | None = None   # the usage share the prune compared with its threshold
    death_threshold: float | None = None
    children: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.died is None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run's log folder (logs/<run-name>)")
    p.add_argument("--layer", type=int, default=None, metavar="L", help="only this layer (default: all)")
    p.add_argument("-o", "--output", default="lineage.png", help="PNG to write (default: lineage.png)")
    p.add_argument("--no-picture", action="store_true", help="print the tree only, write no PNG")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- #
# Building the tree from events.csv
# --------------------------------------------------------------------------- #

def founders_from_config(config: dict | None) -> dict[int, list[int]] | None:
    """{layer: founder ids} from the run's config, or None when it does not say."""
    try:
        n_layers = int(config["model"]["n_layers"])
        n_init = int(config["moe"]["experts_init"])
    except (TypeError, KeyError, ValueError):
        return None
    return {layer: list(range(layer * n_init, (layer + 1) * n_init)) for layer in range(n_layers)}


def build_lineage(events, founders: dict[int, list[int]] | None) -> dict[int, dict[int, Expert]]:
    """{layer: {id: Expert}} from the events (in step order) and the founders per layer.

    With `founders` None (no config), founders are the ids that appear in events
    without a birth; founders that never appear in any event are then unknown.
    """
    layers: dict[int, dict[int, Expert]] = {}
    for layer, ids in (founders or {}).items():
        layers[layer] = {i: Expert(i, layer) for i in ids}

    def get(layer: int, expert_id: int) -> Expert:
        experts = layers.setdefault(layer, {})
        if expert_id not in experts:   # never born in the log: alive from the start
            experts[expert_id] = Expert(expert_id, layer)
        return experts[expert_id]

    for row in events.itertuples(index=False):
        layer, expert_id, event = int(row.layer), int(row.expert), row.event
        if event in ("split", "crossover"):
            parents = parent_ids(row.parents)
            for p in parents:
                get(layer, p).children.append(expert_id)
            child = get(layer, expert_id)
            child.origin, child.parents, child.born = event, parents, int(row.step)
        elif event in DEATHS:
            e = get(layer, expert_id)
            e.died, e.cause = int(row.step), event
            e.death_value, e.death_threshold = float(row.value), float(row.threshold)
        elif event == "graduate":
            get(layer, expert_id).graduated = int(row.step)
    return layers


def roots_and_order(experts: dict[int, Expert]) -> list[tuple[int, int]]:
    """(depth, id) in tree order: each founder, then its descendants depth first.

    A crossover child is listed under its first parent only.
    """
    order: list[tuple[int, int]] = []
    placed: set[int] = set()

    def visit(expert_id: int, depth: int) -> None:
        placed.add(expert_id)
        order.append((depth, expert_id))
        for child in experts[expert_id].children:
            if child not in placed and experts[child].parents[:1] == [expert_id]:
                visit(child, depth + 1)

    for e in sorted(experts.values(), key=lambda e: e.id):
        if e.origin == "founder" and e.id not in placed:
            visit(e.id, 0)
    for e in sorted(experts.values(), key=lambda e: e.id):   # parents unknown to this log
        if e.id not in placed:
            visit(e.id, 0)
    return order


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #

def describe(e: Expert) -> str:
    """One line about one expert, e.g. '7  crossover of 2 × 5 @ step 300 · graduated @ 500 · alive'."""
    if e.origin == "founder":
        parts = [f"[bold]{e.id}[/]  founder"]
    elif e.origin == "split":
        parts = [f"[bold]{e.id}[/]  split from {e.parents[0]} @ step {e.born}"]
    else:
        parts = [f"[bold]{e.id}[/]  crossover of {' × '.join(map(str, e.parents))} @ step {e.born}"]
    if e.graduated is not None:
        parts.append(f"graduated @ {e.graduated}")
    if e.died is not None:
        why = ""
        if e.death_value is not None:
            why = f" (usage {e.death_value:.3f} < {e.death_threshold:g})"
        parts.append(f"[red]{DEATHS[e.cause]} @ {e.died}{why}[/]")
    elif e.origin != "founder" and e.graduated is None:
        parts.append("[green]alive[/] (on probation)")
    else:
        parts.append("[green]alive[/]")
    return " · ".join(parts)


def print_tree(layers: dict[int, dict[int, Expert]], end_step: int, console=None) -> None:
    """The tree on stdout, or on `console` (a rich Console: tools/report.py records one)."""
    from rich.console import Console
    from rich.tree import Tree

    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    for layer in sorted(layers):
        experts = layers[layer]
        births = sum(e.origin != "founder" for e in experts.values())
        deaths = sum(not e.alive for e in experts.values())
        alive = sorted(e.id for e in experts.values() if e.alive)
        tree = Tree(f"[bold]layer {layer}[/] — {len(experts) - births} founders, {births} births, "
                    f"{deaths} deaths; alive at step {end_step}: {', '.join(map(str, alive)) or 'none'}")
        nodes = {}
        for depth, expert_id in roots_and_order(experts):
            e = experts[expert_id]
            parent_node = nodes[e.parents[0]] if depth > 0 else tree
            nodes[expert_id] = parent_node.add(describe(e))
        console.print(tree)


# --------------------------------------------------------------------------- #
# Picture
# --------------------------------------------------------------------------- #

def plot(layers: dict[int, dict[int, Expert]], end_step: int, run_name: str):
    plt = pyplot()
    lanes = {layer: roots_and_order(experts) for layer, experts in layers.items()}
    heights = [max(len(order), 1) for order in lanes.values()]
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 1.6 + 0.34 * sum(heights) + 0.5 * len(layers)),
                             height_ratios=[h + 1.5 for h in heights], squeeze=False, layout="constrained")
    for ax, layer in zip(axes[:, 0], sorted(layers)):
        experts, order = layers[layer], lanes[layer]
        y_of = {expert_id: -i for i, (_, expert_id) in enumerate(order)}
        for expert_id, y in y_of.items():
            e = experts[expert_id]
            color = ORIGIN_COLOR[e.origin]
            end = e.died if e.died is not None else end_step
            review = e.graduated if e.graduated is not None else (e.died if e.origin != "founder" else None)
            if e.origin != "founder" and review is None:
                review = end           # still on probation
            if review is not None and e.origin != "founder":
                ax.plot([e.born, review], [y, y], color=color, lw=5, alpha=0.35, solid_capstyle="butt")
                ax.plot([review, end], [y, y], color=color, lw=5, solid_capstyle="butt")
            else:
                ax.plot([e.born, end], [y, y], color=color, lw=5, solid_capstyle="butt")
            for p in e.parents:       # birth link from each parent's lifeline
                if p in y_of:
                    ax.plot([e.born, e.born], [y_of[p], y], color=color, lw=1.2, ls=":")
            if e.origin in EVENT_STYLE:
                style = EVENT_STYLE[e.origin]
                ax.scatter([e.born], [y], marker=style["marker"], s=110 if style["marker"] == "*" else 70,
                           facecolor=style["color"], edgecolor="black", linewidth=0.6, zorder=4)
            if e.died is not None:
                style = EVENT_STYLE[e.cause]
                ax.scatter([e.died], [y], marker=style["marker"], s=70, facecolor=style["color"],
                           edgecolor="black", linewidth=0.6, zorder=3)
            else:
                ax.scatter([end], [y], marker="o", s=40, facecolor="white", edgecolor="black", zorder=2)
        ax.set_yticks(list(y_of.values()), [f"#{i}" for i in y_of])
        ax.set_ylim(min(y_of.values(), default=0) - 0.8, 0.8)
        ax.set_xlim(-0.02 * max(end_step, 1), end_step * 1.03 + 1)
        ax.set_ylabel(f"layer {layer}\nexpert id")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")

    handles = [plt.Line2D([], [], color=c, lw=5, label=f"{o} lifeline") for o, c in ORIGIN_COLOR.items()]
    handles.append(plt.Line2D([], [], color="gray", lw=5, alpha=0.35, label="on probation"))
    for style in EVENT_STYLE.values():
        handles.append(plt.Line2D([], [], ls="", marker=style["marker"], markersize=9,
                                  markerfacecolor=style["color"], markeredgecolor="black", label=style["label"]))
    handles.append(plt.Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="black",
                              label=f"alive at step {end_step}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=5, frameon=False, fontsize=9)
    fig.suptitle(f"{run_name}: expert lineage")
    return fig


# --------------------------------------------------------------------------- #

def load(arg: str, layer: int | None):
    """(lineage per layer, last step, run name)."""
    log_dir = find_log_dir(arg)
    events = read_events(log_dir / schema.EVENTS_CSV, required=True)
    founders = founders_from_config(read_run_config(log_dir, required=False))
    if founders is None:
        note("no usable config.yaml: founders are inferred from the events "
             "(founders never named in an event are not shown)")
    others = [read_eval(log_dir / schema.EVAL_CSV)]
    if (log_dir / schema.TRAIN_CSV).is_file():
        others.append(read_training_log(log_dir / schema.TRAIN_CSV))
    end_step = latest_step(events, *others)[0]
    layers = build_lineage(events, founders)
    if layer is not None:
        if layer not in layers:
            raise UserError(f"--layer {layer}: this run has layers {', '.join(map(str, sorted(layers)))}")
        layers = {layer: layers[layer]}
    if not layers:
        raise UserError(f"{log_dir}: no experts to show (no events and no config.yaml)")
    return layers, end_step, log_dir.name


@guard
def main(argv=None):
    args = parse_args(argv)
    layers, end_step, run_name = load(args.run, args.layer)
    print_tree(layers, end_step)
    if not args.no_picture:
        save_figure(plot(layers, end_step, run_name), args.output)


if __name__ == "__main__":
    sys.exit(main())
