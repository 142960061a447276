"""tools/: plots, lineage, generate, evaluate, summary -- on hand-written logs and a tiny real run.

The hand-written logs (fast) pin the reading rules: a resumed run reads as one
timeline, a partial last line is skipped, bad input gives one message and no
traceback. The real run (slow: a module fixture trains a tiny model with two
resumes) checks every tool end to end on files the trainer wrote.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nemoe import checkpoint_layout as layout
from nemoe.schema import EVAL_COLUMNS, EVENT_COLUMNS, LEGACY_EVENT_RENAMES, train_columns
from tools import evaluate, generate, lineage, plot_experts, plot_training, summary
from tools.csvlogs import read_events, read_training_log
from tools.plotting import EVENT_STYLE

slow = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- #
# Reading back what a plot drew (matplotlib artists, not pixels)
# --------------------------------------------------------------------------- #

def colour_key(rgba) -> tuple:
    return tuple(round(float(c), 3) for c in rgba)


def marker_kind(rgba) -> str:
    """The event type a marker's face colour stands for (EVENT_STYLE), or 'alive' (white)."""
    from matplotlib.colors import to_rgba
    kinds = {colour_key(to_rgba(s["color"])): action for action, s in EVENT_STYLE.items()}
    kinds[colour_key(to_rgba("white"))] = "alive"
    return kinds[colour_key(rgba)]


def markers(ax) -> list[tuple[float, float, str]]:
    """(x, y, event type) of every scatter marker on an axis."""
    return [(float(x), float(y), marker_kind(face))
            for c in ax.collections for (x, y), face in zip(c.get_offsets(), c.get_facecolor())]


def assert_plotted(ax, x, y) -> None:
    """Some line on `ax` draws exactly the points (x, y), in order."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    drawn = [(np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))
             for line in ax.lines]
    assert any(lx.shape == x.shape and np.array_equal(lx, x) and np.array_equal(ly, y, equal_nan=True)
               for lx, ly in drawn), f"no line with x={x.tolist()} y={y.tolist()} on {ax.get_title()!r}"


def layer_lines(ax) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """plot_experts: {layer: (x, y)} of the lines labelled 'layer <i>'."""
    return {int(line.get_label().split()[1]): (np.asarray(line.get_xdata(), dtype=float),
                                                np.asarray(line.get_ydata(), dtype=float))
            for line in ax.lines if line.get_label().startswith("layer ")}


def event_rules(ax) -> set[tuple[float, str]]:
    """plot_training: (step, event type) of the dashed vertical line at each expert event."""
    from matplotlib.colors import to_rgba
    kinds = {colour_key(to_rgba(s["color"])): action for action, s in EVENT_STYLE.items()}
    rules = set()
    for line in ax.lines:
        x = list(map(float, line.get_xdata()))
        if line.get_linestyle() == "--" and len(x) == 2 and x[0] == x[1]:
            rules.add((x[0], kinds[colour_key(to_rgba(line.get_color()))]))
    return rules


def lineage_picture(ax) -> dict[int, dict]:
    """lineage: per expert id on one layer's axis, what its lifeline shows -- `span`
    (first, last step drawn), `probation` (the light part), `parents` (where its dotted
    birth links start) and `markers` {(step, event type or 'alive')}."""
    y_of = {int(t.get_text().lstrip("#")): round(float(y)) for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    id_at = {y: i for i, y in y_of.items()}
    out = {i: {"span": None, "probation": None, "parents": set(), "markers": set()} for i in y_of}

    def widen(span, lo, hi):
        return (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))

    for line in ax.lines:
        x = [float(v) for v in line.get_xdata()]
        y = [round(float(v)) for v in line.get_ydata()]
        if line.get_linestyle() == ":":          # birth link: parent's lifeline -> child's
            out[id_at[y[1]]]["parents"].add(id_at[y[0]])
            continue
        expert = out[id_at[y[0]]]
        expert["span"] = widen(expert["span"], min(x), max(x))
        if line.get_alpha() is not None and line.get_alpha() < 1:
            expert["probation"] = widen(expert["probation"], min(x), max(x))
    for x, y, kind in markers(ax):
        out[id_at[round(y)]]["markers"].add((x, kind))
    return out


def lineage_axes(fig) -> dict[int, object]:
    """lineage: {layer: its axis}, from the 'layer <i>' y labels."""
    return {int(ax.get_ylabel().split()[1]): ax for ax in fig.axes if ax.get_ylabel().startswith("layer ")}


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run tools/<name>.py as a user would, from the repo root."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_one_error(rc: int, err: str, *words: str) -> None:
    """Non-zero exit, one 'error:' message on stderr, no traceback."""
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in err, err


# --------------------------------------------------------------------------- #
# Hand-written logs
# --------------------------------------------------------------------------- #

def csv_text(rows: list[dict], columns: list[str]) -> str:
    """Rows as the trainer writes them: a header, then one line per row."""
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def train_row(step: int, counts: list[int], loss: float | None = None) -> dict:
    loss = 8.0 - 0.1 * step if loss is None else loss
    # Every plotted column varies with the step, so a panel showing the wrong column fails.
    row = {"step": step, "tokens": 64 * step, "loss": loss, "loss_ce": loss, "loss_lb": 1.0 + 0.01 * step,
           "loss_z": 0.4 - 0.01 * step, "loss_lb_scaled": 0.0105, "loss_z_scaled": 0.0004,
           "lr": 1e-3 * min(step, 4) / 4, "grad_norm": 0.9, "grad_scale": 1.0, "skipped_steps": 0,
           "tokens_per_s": 900.0 + step, "elapsed_s": 0.07 * step, "balance": 1.0 + 0.005 * step,
           "rss_mb": 400.0 + step, "expert_param_steps": 1000 * step, "optim_state_bytes": 4096}
    for i, n in enumerate(counts):
        row |= {f"experts_L{i}": n, f"usage_entropy_L{i}": 0.6, f"max_load_L{i}": 1.3}
    return row


def event(step, layer, name, expert, parents="", n_before=2, n_after=3, value=0.5, threshold=0.3):
    return {"step": step, "tokens": 64 * step, "granularity": "expert", "event": name, "layer": layer,
            "unit": f"e{expert}", "expert": expert, "parents": parents, "value": value, "threshold": threshold,
            "n_before": n_before, "n_after": n_after, "probe_loss_before": 7.0, "probe_loss_after": 7.0,
            "cause": f"usage {value} vs {threshold}"}


# events.csv as runs wrote it before the columns were renamed (schema.LEGACY_EVENT_RENAMES):
# `event` held e.g. evolve_split, `action` today's event, `usage` today's value.
LEGACY_EVENT_COLUMNS = ["step", "tokens", "event", "layer", "action", "expert", "parents", "usage",
                        "threshold", "n_before", "n_after", "probe_loss_before", "probe_loss_after",
                        "granularity", "unit", "cause"]


def legacy_event(row: dict) -> dict:
    """An event row in the legacy columns."""
    old = {new: old for old, new in LEGACY_EVENT_RENAMES.items()}
    return {**{old.get(k, k): v for k, v in row.items()}, "event": f"evolve_{row['event']}"}


def trainer_events(path) -> pd.DataFrame:
    """events.csv as the trainer wrote it, in today's columns whichever it wrote."""
    events = pd.read_csv(path, dtype={"parents": str}, keep_default_na=False)
    if "action" in events:
        events = events.drop(columns="event").rename(columns=LEGACY_EVENT_RENAMES)
    return events


# Two layers, two founders each (ids 0 1 | 2 3); ids 4.. are born in events.
EVENTS = [
    event(4, 0, "split", 4, "0"),
    event(4, 1, "split", 5, "3"),
    event(8, 0, "graduate", 4, n_before=3, n_after=3),
    event(8, 1, "failed_probation", 5, n_before=3, n_after=2, value=0.01, threshold=0.2),
    event(8, 1, "crossover", 6, "2 3", n_before=2, n_after=3),
    event(12, 0, "prune", 1, n_before=3, n_after=2, value=0.0, threshold=0.2),
]
COUNTS = {4: [3, 3], 8: [3, 3], 12: [2, 3]}


def counts_at(step: int) -> list[int]:
    done = [s for s in COUNTS if s <= step]
    return COUNTS[max(done)] if done else [2, 2]


def write_logs(log_dir, train_rows=None, events=EVENTS, config=True):
    """A log folder in the trainer's formats (nemoe.logs), 16 steps unless told."""
    log_dir.mkdir(parents=True, exist_ok=True)
    train_rows = train_rows or [train_row(s, counts_at(s)) for s in range(1, 17)]
    (log_dir / "training_log.csv").write_text(csv_text(train_rows, train_columns(2)))
    (log_dir / "events.csv").write_text(csv_text(events, EVENT_COLUMNS))
    evals = [{"step": s, "tokens": 64 * s, "source": src, "loss": 8.0 - 0.1 * s - d, "ppl": 1.0}
             for s in (0, 8, 16) for src, d in (("prose", 0.0), ("code", 0.5), ("all", 0.2))]
    (log_dir / "eval.csv").write_text(csv_text(evals, EVAL_COLUMNS))
    if config:
        (log_dir / "config.yaml").write_text(
            "model: {n_layers: 2, seq_len: 16}\nmoe: {experts_init: 2}\n"
            "train: {batch_size: 4, grad_accum: 1, total_tokens: 2048}\n")
    return log_dir


@pytest.fixture
def hand_run(tmp_path):
    return write_logs(tmp_path / "logs" / "hand")


@pytest.mark.parametrize("tool", [plot_experts, plot_training, lineage, generate, evaluate, summary])
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_run_resumed_twice_reads_as_one_timeline(tmp_path):
    # Rows 1..10, a restart from 6 that wrote 6..12, then one from 11 that wrote 11..14,
    # all appended (as if nothing truncated the log): the last timeline wins, each step once.
    rows = ([train_row(s, [2, 2], loss=1.0) for s in range(1, 11)]
            + [train_row(s, [2, 2], loss=2.0) for s in range(6, 13)]
            + [train_row(s, [2, 2], loss=3.0) for s in range(11, 15)])
    log_dir = write_logs(tmp_path / "logs" / "resumed", train_rows=rows)
    train = read_training_log(log_dir / "training_log.csv")
    assert train["step"].tolist() == list(range(1, 15))
    assert train["loss_ce"].tolist() == [1.0] * 5 + [2.0] * 5 + [3.0] * 4
    train, events, _ = plot_experts.load(str(log_dir))
    assert train["step"].is_monotonic_increasing and train["step"].is_unique
    fig = plot_experts.plot(train, events, "resumed", layout="panels")
    for i, ax in enumerate(fig.axes):       # panels: no offsets; a step-0 row, then steps 1..14 once each
        x, y = layer_lines(ax)[i]
        assert x.tolist() == list(range(0, 15)) and y.tolist() == [2] * 15


def test_events_of_other_granularities_stay_out_of_expert_tools(tmp_path):
    rows = [event(4, 0, "split", 4, "0"),
            event(4, 0, "turnover", 0) | {"granularity": "neuron", "unit": "n3 n9"},
            event(4, 0, "turnover", 0) | {"granularity": "neuron", "unit": "n5"}]
    path = tmp_path / "events.csv"
    path.write_text(csv_text(rows, EVENT_COLUMNS))
    assert read_events(path)["event"].tolist() == ["split"]
    every = read_events(path, granularity=None)
    assert sorted(every["unit"]) == ["e4", "n3 n9", "n5"]   # same step/layer/expert, both kept
    old = [{k: v for k, v in legacy_event(r).items() if k not in ("granularity", "unit", "cause")} for r in rows[:1]]
    path.write_text(csv_text(old, LEGACY_EVENT_COLUMNS[:-3]))   # a log from before the column existed
    assert read_events(path)["granularity"].tolist() == ["expert"]


def test_legacy_event_columns_read_as_todays(tmp_path, capsys):
    """A log in the columns before the rename: `action` -> `event`, `usage` -> `value`, old `event` dropped."""
    path = tmp_path / "events.csv"
    path.write_text(csv_text([legacy_event(r) for r in EVENTS], LEGACY_EVENT_COLUMNS))
    old = read_events(path, granularity=None)
    path.write_text(csv_text(EVENTS, EVENT_COLUMNS))
    new = read_events(path, granularity=None)
    assert old["event"].tolist() == new["event"].tolist() == [e["event"] for e in EVENTS]
    assert old["value"].tolist() == new["value"].tolist() == [e["value"] for e in EVENTS]
    assert "action" not in old and "usage" not in old
    assert sorted(old.columns) == sorted(new.columns) == sorted(EVENT_COLUMNS)
    log_dir = write_logs(tmp_path / "logs" / "legacy", events=[])
    (log_dir / "events.csv").write_text(csv_text([legacy_event(r) for r in EVENTS], LEGACY_EVENT_COLUMNS))
    assert lineage.main([str(log_dir), "--no-picture"]) == 0
    assert "5  split from 3 @ step 4 · failed probation @ 8 (usage 0.010 < 0.2)" in capsys.readouterr().out


# The hand run's event markers on plot_experts: (layer, step, count after the step, type).
# Layer 1 has two events at step 8 (a failed probation and a crossover); a graduation
# is not a birth or a death and has no marker.
HAND_MARKERS = [(0, 4, 3, "split"), (0, 12, 2, "prune"),
                (1, 4, 3, "split"), (1, 8, 3, "failed_probation"), (1, 8, 3, "crossover")]


@pytest.mark.parametrize("x", ["steps", "tokens"])
def test_plot_experts_draws_the_csv_counts_and_marks_events_on_their_line(x, hand_run, tmp_path,
                                                                        saved_figures):
    out = tmp_path / "experts.png"
    assert plot_experts.main([str(hand_run / "training_log.csv"), "-o", str(out), "--x", x]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    (fig,) = saved_figures
    ax = fig.axes[0]                                      # two layers: overlaid on one axis
    csv = pd.read_csv(hand_run / "training_log.csv")
    scale = 1 if x == "steps" else 64                     # tokens per step in the hand log
    lines = layer_lines(ax)
    assert sorted(lines) == [0, 1]
    offsets = {}
    for layer, (xs, ys) in lines.items():
        # A step-0 point at the starting count (2), then one point per CSV row.
        assert xs.tolist() == [0] + csv["tokens" if x == "tokens" else "step"].tolist()
        shift = ys - np.array([2] + csv[f"experts_L{layer}"].tolist())
        assert np.allclose(shift, shift[0]) and abs(shift[0]) < 0.5, "a layer is offset by a constant only"
        offsets[layer] = shift[0]
    assert offsets[0] != offsets[1], "overlapping layers are told apart"
    drawn = sorted(markers(ax))
    assert len(drawn) == len(HAND_MARKERS)
    for layer, step, count, kind in HAND_MARKERS:
        match = [(mx, my) for mx, my, k in drawn if k == kind and abs(mx - step * scale) <= 0.02 * 16 * scale
                 and my == pytest.approx(count + offsets[layer])]
        assert len(match) == 1, (layer, step, kind, drawn)
    same_step = [mx for mx, _, k in drawn if k in ("failed_probation", "crossover")]
    assert len(set(same_step)) == 2, "two events at one step are spread sideways"


def assert_training_panels(fig, log_dir) -> None:
    """Every panel of plot_training draws its CSV series, and every panel has a dashed
    line at each expert birth or death of events.csv."""
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    train = pd.read_csv(log_dir / "training_log.csv")
    evals = pd.read_csv(log_dir / "eval.csv")
    events = trainer_events(log_dir / "events.csv")
    steps = train["step"]
    for title, column in (("load-balance loss (unscaled)", "loss_lb"), ("router z-loss (unscaled)", "loss_z"),
                          ("learning rate", "lr"), ("throughput", "tokens_per_s"),
                          ("load-balance loss (unscaled)", "balance")):
        assert_plotted(panels[title], steps, train[column])
    mixed = evals[evals["source"] == "all"]
    assert_plotted(panels["cross-entropy loss"], mixed["step"], mixed["loss"])
    for source in evals["source"].unique():
        rows = evals[evals["source"] == source]
        assert_plotted(panels["held-out loss per source"], rows["step"], rows["loss"])
    expert = events[events["event"].isin(list(EVENT_STYLE))]
    rules = {(float(e.step), e.event) for e in expert.itertuples()}
    assert rules, "the log has births or deaths to mark"
    for ax in panels.values():
        assert event_rules(ax) == rules


def test_plot_training(hand_run, tmp_path, saved_figures):
    out = tmp_path / "training.png"
    assert plot_training.main([str(hand_run), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    (fig,) = saved_figures
    assert len([ax for ax in fig.axes if ax.get_title()]) == 6
    assert_training_panels(fig, hand_run)
    # 16 rows: a smoothing window of 1, so the train loss is drawn once, as logged.
    train = pd.read_csv(hand_run / "training_log.csv")
    assert_plotted(fig.axes[0], train["step"], train["loss_ce"])
    # smooth=4: the raw curve stays, with its 4-row mean over it.
    loss_ax = plot_training.plot(*plot_training.load(str(hand_run))[:3], "hand", smooth=4).axes[0]
    assert_plotted(loss_ax, train["step"], train["loss_ce"])
    labels = [line.get_label() for line in loss_ax.lines]
    assert "train (raw)" in labels and "train (mean of 4 rows)" in labels


def test_both_plots_count_the_same_expert_events(hand_run):
    import matplotlib.pyplot as plt
    experts = plot_experts.plot(*plot_experts.load(str(hand_run)))
    training = plot_training.plot(*plot_training.load(str(hand_run)))
    # Six expert events; the graduation has no marker on the experts plot, and says so.
    assert len(EVENTS) == 6 and sum(e["event"] == "graduate" for e in EVENTS) == 1
    assert experts.get_suptitle().endswith("6 expert events: 5 births/removals marked, 1 graduate)")
    assert "expert events (6)" in [t.get_text() for legend in training.legends for t in legend.get_texts()]
    plt.close(experts)
    plt.close(training)


def test_lineage_from_hand_written_events(hand_run, tmp_path, capsys, saved_figures):
    out = tmp_path / "lineage.png"
    assert lineage.main([str(hand_run), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4  split from 0 @ step 4 · graduated @ 8 · alive" in text
    assert "5  split from 3 @ step 4 · failed probation @ 8 (usage 0.010 < 0.2)" in text
    assert "6  crossover of 2 × 3 @ step 8 · alive (on probation)" in text
    assert "1  founder · pruned @ 12" in text
    assert "alive at step 16: 0, 4" in text and "alive at step 16: 2, 3, 6" in text
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    (fig,) = saved_figures
    axes = lineage_axes(fig)
    assert sorted(axes) == [0, 1]
    # Tree order (a child under its first parent): the y tick labels name every expert.
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["#0", "#4", "#1"]
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["#2", "#6", "#3", "#5"]
    alive = {(16.0, "alive")}
    assert lineage_picture(axes[0]) == {
        0: {"span": (0, 16), "probation": None, "parents": set(), "markers": alive},
        4: {"span": (4, 16), "probation": (4, 8), "parents": {0}, "markers": {(4.0, "split")} | alive},
        1: {"span": (0, 12), "probation": None, "parents": set(), "markers": {(12.0, "prune")}},
    }
    assert lineage_picture(axes[1]) == {
        2: {"span": (0, 16), "probation": None, "parents": set(), "markers": alive},
        6: {"span": (8, 16), "probation": (8, 16), "parents": {2, 3}, "markers": {(8.0, "crossover")} | alive},
        3: {"span": (0, 16), "probation": None, "parents": set(), "markers": alive},
        5: {"span": (4, 8), "probation": (4, 8), "parents": {3},
            "markers": {(4.0, "split"), (8.0, "failed_probation")}},
    }
    assert lineage.main([str(hand_run), "--layer", "1", "--no-picture"]) == 0
    text = capsys.readouterr().out
    assert "layer 1" in text and "layer 0" not in text


def test_lineage_without_config_infers_founders(tmp_path, capsys):
    log_dir = write_logs(tmp_path / "logs" / "nocfg", config=False)
    assert lineage.main([str(log_dir), "--no-picture"]) == 0
    captured = capsys.readouterr()
    assert "inferred" in captured.err
    assert "0  founder" in captured.out and "6  crossover of 2 × 3" in captured.out


def test_summary_of_hand_written_logs(hand_run, capsys):
    assert summary.main([str(hand_run)]) == 0
    text = capsys.readouterr().out
    for expected in ("16 / 32 (50%)", "split 2", "crossover 1", "prune 1", "failed probation 1",
                     "graduate 1", "2 / 3", "mixed 6.2000", "none in"):
        assert expected in text, expected
    assert "neuron events" not in text and "head events" not in text   # none in this run


def test_summary_counts_events_of_every_granularity(hand_run, capsys):
    with open(hand_run / "events.csv", "a") as f:
        for step, granularity, event, layer in ((17, "head", "prune", 0), (17, "head", "prune", 1),
                                                (17, "neuron", "turnover", 1), (18, "layer", "death", 1)):
            f.write(f"{step},{64 * step},{granularity},{event},{layer},u,-1,,0.1,0.2,3,3,5.0,5.0,test\n")
    assert summary.main([str(hand_run)]) == 0
    text = capsys.readouterr().out
    for expected in ("head events", "prune 2", "neuron events", "turnover 1", "layer events", "death 1"):
        assert expected in text, expected
    assert "2 / 3" in text   # experts per layer: the expert events only


def test_final_step_after_the_last_training_row_counts(hand_run, capsys):
    # A run whose last step is not a multiple of log.every_steps: its final evaluation
    # (and events) come after the last training-log row.
    with open(hand_run / "eval.csv", "a") as f:
        f.write("18,1152,all,6.0,403.4\n")
    assert summary.main([str(hand_run)]) == 0
    text = capsys.readouterr().out
    assert "18 / 32 (56%)" in text and "1,152 / 2,048" in text
    assert lineage.main([str(hand_run), "--no-picture"]) == 0
    assert "alive at step 18" in capsys.readouterr().out


def test_partial_last_line_is_skipped_with_a_note(hand_run, tmp_path, capsys):
    csv = hand_run / "training_log.csv"
    csv.write_text(csv.read_text() + "17,1088,6.3,6.3,1.0")      # a row being written
    assert plot_experts.main([str(hand_run), "-o", str(tmp_path / "e.png")]) == 0
    err = capsys.readouterr().err
    assert "partial last line" in err and "Traceback" not in err
    assert read_training_log(csv)["step"].max() == 16


@pytest.mark.parametrize("tool", ["plot_experts", "plot_training", "lineage", "summary"])
def test_log_errors_one_message(tool, tmp_path, capsys):
    main = {"plot_experts": plot_experts, "plot_training": plot_training, "lineage": lineage,
            "summary": summary}[tool].main
    out = ["-o", str(tmp_path / "x.png")] if tool != "summary" else []
    name = "events.csv" if tool == "lineage" else "training_log.csv"
    log_dir = write_logs(tmp_path / "logs" / "bad")

    cases = {
        "missing folder": (tmp_path / "nope", "no such file"),
        "empty file": ("", "empty file"),
        "header only": (None, "no complete rows") if tool != "lineage" else None,
        "only a partial row": ("PARTIAL", "no complete rows") if tool != "lineage" else None,
        "not a nemoe log": ("a,b\n1,2\n", "not a nemoe log"),
    }
    header = (log_dir / name).read_text().splitlines()[0] + "\n"
    for case, spec in cases.items():
        if spec is None:
            continue
        content, words = spec
        if case != "missing folder":
            text = {None: header, "PARTIAL": header + "1,64,7.9"}.get(content, content)
            (log_dir / name).write_text(text)
        target = content if case == "missing folder" else log_dir
        assert main([str(target), *out]) != 0, case
        assert_one_error(2, capsys.readouterr().err, words)


def test_errors_from_a_subprocess_have_no_traceback(tmp_path):
    result = run_script("plot_training", tmp_path / "no_such_run")
    assert_one_error(result.returncode, result.stderr, "no such file or folder")
    fake = tmp_path / "nemo_ckpt_step1.pt"
    torch.save({"step": 1, "model": {}}, fake)
    result = run_script("generate", fake, "--prompt", "hi")
    assert_one_error(result.returncode, result.stderr, "not a nemoe checkpoint")


@pytest.mark.parametrize("content", ["foreign", "random", "truncated"])
def test_checkpoint_errors_one_message(content, tmp_path, capsys):
    path = tmp_path / "model.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content == "random":
        path.write_bytes(os.urandom(512))
    else:
        torch.save({"weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    for tool in (generate, evaluate):
        assert tool.main([str(path), "--device", "cpu"]) != 0
        err = capsys.readouterr().err
        assert_one_error(2, err, str(path))
        assert "not a nemoe checkpoint" in err or "unreadable checkpoint" in err
    assert generate.main([str(tmp_path / "missing.pt")]) != 0
    assert_one_error(2, capsys.readouterr().err, "no such file")


# --------------------------------------------------------------------------- #
# A tiny real run, resumed twice
# --------------------------------------------------------------------------- #

@pytest.fixture
def real_run(resumed_tiny):
    """<run-dir>/logs/tiny of conftest.py's resumed_tiny (checkpoints in <run-dir>/checkpoints/tiny):
    24 steps, the step-13 checkpoint lost (the logs roll back to 10 on resume), then --resume to
    20 and to 24."""
    log_dir = resumed_tiny / "logs" / "tiny"
    assert (log_dir / "training_log.txt").read_text().count("resumed from") == 2
    return log_dir


def checkpoint_of(log_dir, step=24):
    return log_dir.parent.parent / "checkpoints" / "tiny" / f"nemo_ckpt_step{step}.pt"


@slow
def test_real_run_plots(real_run, tmp_path, saved_figures):
    train, events, _ = plot_experts.load(str(real_run))
    assert train["step"].tolist() == list(range(1, 25)), "one continuous curve across both resumes"
    assert len(events) > 0
    csv = pd.read_csv(real_run / "training_log.csv")
    assert csv["step"].tolist() == list(range(1, 25)), "the resumes rolled the CSV back: each step once"
    expert_events = trainer_events(real_run / "events.csv")
    expert_events = expert_events[expert_events["event"].isin(list(EVENT_STYLE))]
    assert len(expert_events) > 0
    args = [str(real_run / "training_log.csv"), "--x", "tokens", "--layout", "panels"]
    assert plot_experts.main(args + ["-o", str(tmp_path / "experts_panels.png")]) == 0
    (fig,) = saved_figures
    span = float(csv["tokens"].max())
    for layer, ax in enumerate(fig.axes):
        x, y = layer_lines(ax)[layer]
        assert x[1:].tolist() == csv["tokens"].tolist() and y[1:].tolist() == csv[f"experts_L{layer}"].tolist()
        mine = expert_events[expert_events["layer"] == layer]
        drawn = markers(ax)
        assert sorted(k for *_, k in drawn) == sorted(mine["event"])
        for e in mine.itertuples():        # each event's marker at its tokens, on the line
            assert any(k == e.event and abs(mx - e.tokens) <= 0.02 * span for mx, _, k in drawn), e
            after = csv[csv["step"] >= e.step][f"experts_L{layer}"]
            assert any(k == e.event and my == after.iloc[0] for _, my, k in drawn), e
    assert plot_training.main([str(real_run), "-o", str(tmp_path / "training.png")]) == 0
    assert_training_panels(saved_figures[-1], real_run)


@slow
def test_real_run_lineage(real_run, tmp_path, capsys, saved_figures):
    assert lineage.main([str(real_run), "-o", str(tmp_path / "lineage.png")]) == 0
    text = capsys.readouterr().out
    events = trainer_events(real_run / "events.csv")
    births = events[events["event"].isin(["split", "crossover"])]
    assert len(births) > 0
    for e in births.itertuples():
        parents = " × ".join(str(e.parents).split())
        expected = f"{e.expert}  split from {parents}" if e.event == "split" else \
            f"{e.expert}  crossover of {parents}"
        assert f"{expected} @ step {e.step}" in text, expected
    for e in events[events["event"].isin(["prune", "failed_probation"])].itertuples():
        assert f"{e.event.replace('_', ' ').replace('prune', 'pruned')} @ {e.step}" in text
    # The picture: each newborn's lifeline starts at its birth, linked to its parents,
    # with the birth's marker; each death ends a lifeline with the death's marker.
    (fig,) = saved_figures
    pictures = {layer: lineage_picture(ax) for layer, ax in lineage_axes(fig).items()}
    assert sorted(pictures) == [0, 1]
    for e in births.itertuples():
        expert = pictures[e.layer][e.expert]
        assert expert["span"][0] == e.step and (e.step, e.event) in expert["markers"]
        assert expert["parents"] == {int(p) for p in str(e.parents).split()}
    for e in events[events["event"].isin(["prune", "failed_probation"])].itertuples():
        expert = pictures[e.layer][e.expert]
        assert expert["span"][1] == e.step and (e.step, e.event) in expert["markers"]


@slow
def test_real_run_generate(real_run, capsys):
    from nemoe.tokenizer import get_tokenizer

    n = 12
    assert generate.main([str(checkpoint_of(real_run)), "--prompt", "The quick brown fox",
                          "--max-new-tokens", str(n), "--seed", "3", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 24 and len(out["tokens"]) == 1 and len(out["tokens"][0]) == n
    tokenizer = get_tokenizer("gpt2")
    assert out["prompt_tokens"] == tokenizer.encode("The quick brown fox")
    assert out["completions"][0] == tokenizer.decode(out["tokens"][0]) and out["completions"][0]
    # The run's checkpoint folder works too (its newest checkpoint); plain text output.
    assert generate.main([str(real_run.parent.parent / "checkpoints" / "tiny"), "--prompt", "def f(",
                          "--max-new-tokens", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(") and "nemo_ckpt_step24.pt" in captured.err


@slow
def test_real_run_evaluate(real_run, capsys):
    assert evaluate.main([str(checkpoint_of(real_run)), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"checkpoint", "step", "tokens_trained", "batches", "batch_size", "seq_len", "sources",
            "usage"} <= set(result)
    assert set(result["sources"]) == {"prose", "code", "all"}
    for r in result["sources"].values():
        assert set(r) == {"loss", "ppl", "tokens"} and r["tokens"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["ppl"]) and r["loss"] > 0
    # Same held-out batches and weights as the trainer's own evaluation at step 24.
    evals = pd.read_csv(real_run / "eval.csv")
    logged = evals[(evals["step"] == 24) & (evals["source"] == "all")]["loss"].item()
    assert result["sources"]["all"]["loss"] == pytest.approx(logged, rel=1e-5)
    state = torch.load(checkpoint_of(real_run), map_location="cpu", weights_only=True)
    train = pd.read_csv(real_run / "training_log.csv")
    assert len(result["usage"]) == 2
    for u in result["usage"]:
        live = sorted(r["id"] for r in layout.expert_records(state)[u["layer"]] if r is not None)
        assert sorted(e["id"] for e in u["experts"]) == live
        assert len(live) == train[f"experts_L{u['layer']}"].iloc[-1]
        assert sum(e["share"] for e in u["experts"]) == pytest.approx(1.0)
        assert math.isfinite(u["entropy"]) and math.isfinite(u["max_load"])
    assert evaluate.main([str(checkpoint_of(real_run)), "--device", "cpu", "--batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "mixed" in text and "expert usage" in text


@slow
def test_real_run_summary(real_run):
    # TINY: 4 sequences of 16 tokens a step, 1,920 tokens in all: 30 steps.
    result = run_script("summary", real_run)      # as a user runs it, from the repo root
    assert result.returncode == 0, result.stderr
    for expected in ("24 / 30 (80%)", "1,536 / 1,920", "finished", "nemo_ckpt_step24.pt",
                     "held-out loss, best", "experts per layer now"):
        assert expected in result.stdout, expected


def test_soak_slope_is_mb_per_1000_steps():
    from tools.soak import slope_per_1000
    assert slope_per_1000([(0, 100.0), (500, 101.0), (1000, 102.0)]) == pytest.approx(2.0)
    assert slope_per_1000([(200, 900.0), (400, 900.0)]) == 0.0
    assert math.isnan(slope_per_1000([(10, 1.0)]))
