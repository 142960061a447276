#!/usr/bin/env python
"""One self-contained HTML page about a run, finished or still running.

    python tools/report.py logs/<run-name> -o report.html

The page holds the summary table (tools/summary.py), the held-out loss of every
evaluation, every plot the per-run tools draw (experts, training, lineage, and head
gates / entropies and layer vitality when the run has them) as embedded PNGs, the
event table, the lineage as text, and the config. Nothing is linked: no external
files, scripts, fonts or network, so the file can be mailed or opened from Drive.
Reads the run's files only, like every tool.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
import time
from pathlib import Path

from nemoe import schema
from nemoe.errors import UserError
from tools import lineage, plot_experts, plot_heads, plot_training, plot_vitality, summary
from tools.cli import guard
from tools.csvlogs import read_eval, read_events, read_state
from tools.runfiles import find_log_dir

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430;
       margin: 0; background: #f4f5f7; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 34px 0 10px;
     border-bottom: 1px solid #dde1e6; padding-bottom: 4px; }
.sub { color: #5b6573; margin: 0 0 18px; }
nav a { margin-right: 14px; color: #2457a6; text-decoration: none; white-space: nowrap; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { border: 1px solid #dde1e6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } tr:nth-child(even) td { background: #fafbfc; }
table.summary th { width: 190px; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { display: inline-block; max-width: 100%; max-height: 560px; overflow: auto; border: 1px solid #dde1e6; }
.scroll table { border: none; } .scroll th { position: sticky; top: 0; }
table.events { font-size: 12.5px; } table.events td { white-space: nowrap; }
figure { margin: 18px 0 26px; } figure img { max-width: 100%; border: 1px solid #e3e6ea; }
figcaption { color: #5b6573; font-size: 13.5px; margin-top: 4px; }
pre { background: #f6f8fa; border: 1px solid #dde1e6; padding: 10px 12px; overflow: auto; font-size: 12.5px;
      line-height: 1.35; }
.note { color: #5b6573; font-style: italic; }
pre.config { columns: 2 340px; column-gap: 28px; }
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run's log folder (logs/<run-name>)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- #
# Pieces of the page
# --------------------------------------------------------------------------- #

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table(header: list[str], rows: list[list], numeric: set[str] = frozenset(), css: str = "") -> str:
    # Long column names may break after an underscore (probe_loss_<wbr>before).
    names = [esc(h).replace("_", "_<wbr>") for h in header]
    head = "".join(f'<th class="num">{n}</th>' if h in numeric else f"<th>{n}</th>" for h, n in zip(header, names))
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(v)}</td>' if h in numeric else f"<td>{esc(v)}</td>"
                                    for h, v in zip(header, row)) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def summary_table(log_dir: Path) -> str:
    """tools/summary.py's table: a label and a value per row."""
    rows = "".join(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>" for label, value in summary.rows(log_dir))
    return f'<table class="summary"><tbody>{rows}</tbody></table>'


def number(value) -> str:
    """A CSV number as the page shows it: integers as integers, others to 6 significant digits."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if f != f:
        return ""
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.6g}"


def png(fig) -> str:
    """A matplotlib figure as a data: URI (the figure is closed)."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figures(log_dir: Path) -> list[tuple[str, str, str | None]]:
    """(title, caption, data URI or None when the run has nothing to draw) of every per-run plot."""
    out = []

    def add(title: str, caption: str, draw) -> None:
        try:
            out.append((title, caption, png(draw())))
        except UserError as err:
            out.append((title, str(err), None))

    run = str(log_dir)
    add("Experts per layer", "Live experts per layer over the steps; markers: split ▲, crossover ★, prune ▼, "
        "failed probation ✖ (tools/plot_experts.py).", lambda: plot_experts.plot(*plot_experts.load(run)))
    add("Training", "Train cross-entropy (raw and smoothed) with held-out loss, held-out loss per source, "
        "balance and z losses, learning rate, tokens/s; dashed lines mark events (tools/plot_training.py).",
        lambda: plot_training.plot(*plot_training.load(run)))
    add("Lineage", "One lifeline per expert from birth to death, light while on probation, dotted links to "
        "parents (tools/lineage.py).", lambda: lineage.plot(*lineage.load(run, None)))
    state = log_dir / schema.STATE_CSV
    kinds = set(read_state(state)["granularity"]) if state.is_file() else set()
    if "head" in kinds:      # plasticity.heads was on
        for metric in ("gate", "entropy"):
            add(f"Attention heads: {metric}", f"Every head's {metric} over the steps; prune and grow events "
                f"marked (tools/plot_heads.py --metric {metric}).",
                lambda metric=metric: plot_heads.plot(*plot_heads.load(run, metric), metric))
    if "layer" in kinds:     # plasticity.layers was on
        add("Layer vitality", "Each layer's vitality over the steps; deaths and births marked "
            "(tools/plot_vitality.py).", lambda: vitality_figure(run))
    return out


def vitality_figure(run: str):
    values, events, config, name = plot_vitality.load(run, "vitality")
    return plot_vitality.plot(values, events, config, "vitality", name)


def lineage_text(log_dir: Path) -> str:
    """The lineage tree as tools/lineage.py prints it, coloured, as inline-styled HTML."""
    from rich.console import Console
    layers, end_step, _ = lineage.load(str(log_dir), None)
    console = Console(record=True, width=120, file=io.StringIO(), highlight=False, color_system="truecolor",
                      force_jupyter=False)   # in a notebook, rich would display it as well
    lineage.print_tree(layers, end_step, console=console)
    return console.export_html(inline_styles=True, code_format="<pre>{code}</pre>")


def eval_table(log_dir: Path) -> str:
    evals = read_eval(log_dir / schema.EVAL_CSV)
    if not len(evals):
        return '<p class="note">No evaluation yet.</p>'
    sources = list(dict.fromkeys(evals["source"]))
    order = [s for s in sources if s != "all"] + (["all"] if "all" in sources else [])
    header = ["step", "tokens"] + [f"{'mixed (all)' if s == 'all' else s} loss" for s in order]
    rows = []
    for step, group in evals.groupby("step", sort=True):
        loss = dict(zip(group["source"], group["loss"]))
        rows.append([number(step), number(group["tokens"].iloc[0])]
                    + [f"{v:.4f}" if (v := loss.get(s)) is not None and v == v else "" for s in order])  # as Eval lines
    return f'<div class="scroll">{table(header, rows, numeric=set(header), css="eval")}</div>'


def event_table(log_dir: Path) -> str:
    events = read_events(log_dir / schema.EVENTS_CSV, granularity=None)
    if not len(events):
        return '<p class="note">No structural events yet.</p>'
    numeric = set(schema.EVENT_NUMERIC)
    rows = [[number(r[c]) if c in numeric else r[c] for c in schema.EVENT_COLUMNS]
            for r in events.to_dict("records")]
    counts = events.groupby(["granularity", "event"]).size()
    kinds = ", ".join(f"{g} {e} {n}" for (g, e), n in counts.items())
    return (f"<p>{len(events)} events: {esc(kinds)}.</p>"
            f'<div class="scroll">{table(schema.EVENT_COLUMNS, rows, numeric, css="events")}</div>')


def config_text(log_dir: Path) -> str:
    path = log_dir / schema.CONFIG_YAML
    if not path.is_file():
        return f'<p class="note">No {schema.CONFIG_YAML} in the log folder.</p>'
    return f"<pre class=\"config\">{esc(path.read_text(encoding='utf-8', errors='replace'))}</pre>"


def tensorboard_line(log_dir: Path) -> str:
    tb = log_dir / schema.TENSORBOARD_DIR
    files = [p for p in tb.iterdir() if "tfevents" in p.name] if tb.is_dir() else []
    if not files:
        return "no TensorBoard event files"
    return f"TensorBoard: <code>tensorboard --logdir {esc(log_dir.parent)}</code> ({len(files)} event files)"


def render(log_dir: Path) -> str:
    """The whole page."""
    log_dir = find_log_dir(log_dir)
    sections = [("summary", "Summary", summary_table(log_dir)),
                ("heldout", "Held-out loss", eval_table(log_dir))]
    for i, (title, caption, uri) in enumerate(figures(log_dir)):
        body = (f'<figure><img alt="{esc(title)}" src="{uri}"><figcaption>{esc(caption)}</figcaption></figure>'
                if uri else f'<p class="note">{esc(caption)}</p>')
        sections.append((f"plot{i}", title, body))
    sections.append(("events", "Events", event_table(log_dir)))
    try:
        tree = lineage_text(log_dir)
    except UserError as err:
        tree = f'<p class="note">{esc(err)}</p>'
    sections.append(("lineage", "Lineage (text)", tree))
    sections.append(("config", "Config", config_text(log_dir)))
    nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
    body = "\n".join(f'<section id="{key}"><h2>{esc(title)}</h2>\n{content}</section>'
                     for key, title, content in sections)
    made = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>nemoe run {esc(log_dir.name)}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>nemoe run {esc(log_dir.name)}</h1>"
            f'<p class="sub">{esc(log_dir.resolve())} · made {made} from the run\'s files · '
            f"{tensorboard_line(log_dir)}</p><nav>{nav}</nav>\n{body}\n</main></body></html>\n")


@guard
def main(argv=None):
    args = parse_args(argv)
    page = render(Path(args.run).expanduser())
    out = Path(args.output).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err}") from None
    print(f"wrote {out} ({len(page.encode()) / 1024:.0f} KiB)")


if __name__ == "__main__":
    sys.exit(main())
