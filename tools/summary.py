#!/usr/bin/env python
"""One table about a run: progress, speed, held-out loss, events, experts, checkpoint.

    python tools/summary.py logs/<run-name>

Reads the run's log folder (training_log.csv, eval.csv, events.csv, config.yaml,
training_log.txt) and lists <run-dir>/checkpoints/<run-name>/ by name only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from nemoe import schema
from tools.cli import guard
from tools.csvlogs import latest_step, layer_columns, read_eval, read_events, read_training_log
from tools.runfiles import find_log_dir, read_run_config

EVENT_ORDER = ["split", "crossover", "prune", "failed_probation", "graduate"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run's log folder (logs/<run-name>)")
    return p.parse_args(argv)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def targets(config: dict | None) -> tuple[int | None, int | None]:
    """(total steps, total tokens) the run aims for, from its config."""
    try:
        t, m = config["train"], config["model"]
        per_step = int(t["batch_size"]) * int(t.get("grad_accum", 1)) * int(m["seq_len"])
        total = int(t["total_tokens"])
        return max(1, math.ceil(total / per_step)), total
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None, None


def run_state(log_dir: Path) -> str:
    """What the text log's last line says: finished, stopped by a signal, or neither."""
    path = log_dir / schema.TEXT_LOG
    if not path.is_file():
        return f"unknown (no {schema.TEXT_LOG})"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    if "| Done |" in last:
        return "finished"
    if "stopped by signal" in last:
        return "stopped by a signal (resume with --resume)"
    if "nothing to do" in last:
        return "finished (a later --resume found nothing to do)"
    age = time.time() - path.stat().st_mtime
    return f"running or interrupted (log last written {duration(age)} ago)"


def current_counts(train, events) -> list[int]:
    """Live experts per layer now: the last training-log row, then any later events."""
    last = train.iloc[-1]
    counts = [int(last[c]) for c in layer_columns(train)]
    later = events[events["step"] > last["step"]] if len(events) else events
    for row in later.itertuples():
        if 0 <= int(row.layer) < len(counts):
            counts[int(row.layer)] = int(row.n_after)
    return counts


def rows(log_dir: Path) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table."""
    train = read_training_log(log_dir / schema.TRAIN_CSV)
    evals = read_eval(log_dir / schema.EVAL_CSV)
    every_event = read_events(log_dir / schema.EVENTS_CSV, granularity=None)
    events = every_event[every_event["granularity"] == "expert"]
    config = read_run_config(log_dir, required=False)
    step, tokens = latest_step(train, evals, events)
    out = [("run", f"{log_dir.name}  ({log_dir})"), ("state", run_state(log_dir))]
    out += progress_rows(train, step, tokens, config)
    out += heldout_rows(evals)
    out += event_rows(train, events, step)
    out += plasticity_event_rows(every_event)
    out += checkpoint_rows(log_dir)
    if config is None:
        out.append(("config", f"no {schema.CONFIG_YAML} in the log folder"))
    return out


def progress_rows(train, step: int, tokens: int, config: dict | None) -> list[tuple[str, str]]:
    """Steps and tokens against the run's targets, training time, speed, train loss."""
    last = train.iloc[-1]
    elapsed = float(last.get("elapsed_s", math.nan))
    total_steps, total_tokens = targets(config)
    out = [("steps", f"{step:,}" + (f" / {total_steps:,} ({100 * step / total_steps:.0f}%)"
                                   if total_steps else "")),
           ("tokens", f"{tokens:,}" + (f" / {total_tokens:,}" if total_tokens else ""))]
    if math.isfinite(elapsed):
        out.append(("training time", duration(elapsed) + "  (steps only; evaluation and checkpoints excluded)"))
        if elapsed > 0:
            mean = float(last["tokens"]) / elapsed    # both as of the last training-log row
            out.append(("tokens/s", f"{mean:,.0f} mean, {float(last['tokens_per_s']):,.0f} "
                                    f"last interval"))
    recent = train["loss_ce"].tail(min(len(train), max(5, len(train) // 10)))
    out.append(("train loss (CE)", f"{float(last['loss_ce']):.4f} last, {recent.mean():.4f} mean of the "
                                   f"last {len(recent)} rows"))
    return out


def heldout_rows(evals) -> list[tuple[str, str]]:
    """The last held-out loss per source and the best mixed one."""
    if not len(evals):
        return [("held-out loss", "no evaluation yet")]
    last_step = int(evals["step"].max())
    now = evals[evals["step"] == last_step]
    per_source = " · ".join(f"{'mixed' if r.source == 'all' else r.source} {r.loss:.4f}"
                            for r in now.itertuples())
    out = [("held-out loss, last", f"{per_source}  (step {last_step:,})")]
    mixed = evals[evals["source"] == "all"].dropna(subset=["loss"])
    if len(mixed):
        best = mixed.loc[mixed["loss"].idxmin()]
        ppl = math.exp(min(best["loss"], 50))
        out.append(("held-out loss, best", f"mixed {best['loss']:.4f} (ppl {ppl:.1f}) "
                                           f"at step {int(best['step']):,}"))
    return out


def event_rows(train, events, step: int) -> list[tuple[str, str]]:
    """Expert events by kind, and live experts per layer now."""
    if len(events):
        counts = events["event"].value_counts()
        kinds = EVENT_ORDER + sorted(set(counts.index) - set(EVENT_ORDER))
        out = [("expert events", " · ".join(f"{k.replace('_', ' ')} {int(counts[k])}" for k in kinds if k in counts))]
    else:
        out = [("expert events", "none yet")]
    columns = layer_columns(train)
    if columns:
        out.append(("experts per layer now", " / ".join(map(str, current_counts(train, events)))
                    + f"  (layers 0..{len(columns) - 1}, step {step:,})"))
    return out


def plasticity_event_rows(events) -> list[tuple[str, str]]:
    """Neuron, head and layer events by kind, one row per granularity that has any."""
    out = []
    for granularity in ("neuron", "head", "layer"):
        counts = events[events["granularity"] == granularity]["event"].value_counts()
        if len(counts):
            out.append((f"{granularity} events", " · ".join(f"{k.replace('_', ' ')} {int(n)}"
                                                            for k, n in sorted(counts.items()))))
    return out


def checkpoint_rows(log_dir: Path) -> list[tuple[str, str]]:
    """The newest checkpoint in the run's checkpoint folder (by name; nothing is loaded)."""
    ckpt_dir = schema.RunPaths.from_log_dir(log_dir).ckpt_dir
    saved = schema.list_checkpoints(ckpt_dir)
    if not saved:
        return [("last checkpoint", f"none in {ckpt_dir}")]
    ckpt_step, path = saved[0]
    info = path.stat()
    age = duration(time.time() - info.st_mtime)
    return [("last checkpoint", f"{path}  (step {ckpt_step:,}, {info.st_size / 2**20:.1f} MiB, "
                                f"written {age} ago; {len(saved)} kept)")]


@guard
def main(argv=None):
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    log_dir = find_log_dir(args.run)
    table = Table(title=f"nemoe run {log_dir.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows(log_dir):
        table.add_row(label, value)
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(table)


if __name__ == "__main__":
    sys.exit(main())
