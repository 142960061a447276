#!/usr/bin/env python
"""Does evolution help? Strategies x seeds on one config, judged on held-out loss.

    python tools/compare.py --config local.yaml                        # default grid, 3 seeds
    python tools/compare.py --config local.yaml --strategies static_moe,morph --seeds 5
    python tools/compare.py --config local.yaml --protocol shift --phases prose:300,code:300,prose:300

Every run is `train_nemoe.py --resume` in a subprocess under `--out` (default
compare/<config>[-shift]), so rerunning the same command skips finished runs and
resumes interrupted ones. Seed s sets train.seed, the run seed, for every strategy;
the seeds of the data mixture, the controller and each plasticity mechanism derive
from it. The same seed gives the same data order, token budget and evaluation
batches whatever the strategy (the report checks the data order).

grid:  per strategy, the final held-out loss per source and mixed (mean +- sd over
       seeds), the paired difference to static_moe with a 95% confidence interval
       (Student t, paired by seed), tokens/s, parameters and events.
shift: phase after phase on one source each (the others keep a weight of 1e-9 so
       every source is still evaluated); adaptation and recovery speed, forgetting
       and events per phase.
Writes report.md, results.csv (one row per run, or per run and phase),
summary.csv (per strategy) and curves.png into the out folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python tools/x.py`

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from nemoe.config import Config, config_changes, config_from_dict, load_config  # noqa: E402
from nemoe.errors import UserError  # noqa: E402
from tools._common import (EVAL_CSV, EVENTS_CSV, TRAIN_CSV, guard, layer_columns,  # noqa: E402
                           list_checkpoints, pyplot, read_eval, read_events, read_run_config,
                           read_training_log, save_figure)

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "train_nemoe.py"
BASELINE = "static_moe"
OFF_PHASE_WEIGHT = 1e-9  # a source outside its phase: kept (so it is evaluated), never drawn in practice
FINGERPRINT_STEPS = 20   # optimizer steps of training batches hashed for the data-order check


# --------------------------------------------------------------------------- #
# Strategies: named sets of --set overrides (the one place they are defined)
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Strategy:
    name: str
    about: str
    overrides: Callable[[Config], list[str]]
    mechanism: str | None = None  # the plasticity mechanism it needs (nemoe.plasticity.REGISTRY)


MECHANISMS = ("neuron", "heads", "layers")


def _only_mechanism(name: str | None) -> list[str]:
    """Every plasticity mechanism off except `name`, so a strategy measures one thing at a time."""
    return [f"plasticity.{m}.enabled={str(m == name).lower()}" for m in MECHANISMS]


def _dense(cfg: Config) -> list[str]:
    # One slot of width top_k * d_expert: the FLOPs and active parameters per token of
    # the top-k MoE, as a plain FFN (a one-slot MoELayer is exactly a dense FFN).
    return ["moe.experts_init=1", "moe.experts_min=1", "moe.experts_max=1", "moe.top_k=1",
            "morph.enabled=false", f"model.d_expert={cfg.moe.top_k * cfg.d_expert}", *_only_mechanism(None)]


STRATEGIES = {s.name: s for s in [
    Strategy("dense", "one FFN, same active parameters per token as the MoE", _dense),
    Strategy("static_moe", "the MoE with its initial experts, no morphogenesis",
             lambda cfg: ["morph.enabled=false", *_only_mechanism(None)]),
    Strategy("morph", "expert morphogenesis: split, prune, crossover, probation",
             lambda cfg: ["morph.enabled=true", *_only_mechanism(None)]),
    *[Strategy(m, f"plasticity.{m} alone (static experts)",
               (lambda cfg, m=m: ["morph.enabled=false", *_only_mechanism(m)]), mechanism=m)
      for m in MECHANISMS],
]}


def available(strategy: Strategy) -> bool:
    from nemoe.plasticity import REGISTRY
    return strategy.mechanism is None or strategy.mechanism in REGISTRY


def choose_strategies(text: str | None) -> tuple[list[str], list[str]]:
    """(strategies to run, notes). Default: every available one; an unavailable one named is an error."""
    if text is None:
        names = list(STRATEGIES)
        skipped = [n for n in names if not available(STRATEGIES[n])]
        notes = [f"strategy {n} skipped: plasticity.{STRATEGIES[n].mechanism} is not available in this "
                 f"version" for n in skipped]
        return [n for n in names if n not in skipped], notes
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise UserError(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise UserError("--strategies: a strategy is named twice")
    for n in names:
        if not available(STRATEGIES[n]):
            raise UserError(f"--strategies: {n} needs plasticity.{STRATEGIES[n].mechanism}, "
                            f"which is not available in this version")
    return names, []


def seed_overrides(seed: int) -> list[str]:
    """The run seed; morph, data and plasticity.* seeds derive from it (unless the config sets them)."""
    return [f"train.seed={seed}"]


# --------------------------------------------------------------------------- #
# Statistics (no scipy: the t quantile by bisection on a numerically integrated CDF)
# --------------------------------------------------------------------------- #

def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom, for 0.5 <= p < 1."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 2000) -> float:  # symmetric density: 1/2 + Simpson's rule on [0, x]
        h = x / n
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values) -> tuple[float, float]:
    values = [float(v) for v in values if not math.isnan(float(v))]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Paired:
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return f"no CI possible (n={self.n})"
        if self.low == self.high == 0:
            return "identical in every seed"
        if self.low <= 0 <= self.high:
            return "not significant"
        return "significantly lower" if self.high < 0 else "significantly higher"


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """a - b paired by seed: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over the seeds both have."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s]))]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return Paired(len(diffs), mean, math.nan, math.nan)
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half)


# --------------------------------------------------------------------------- #
# Runs: planning, launching, resuming
# --------------------------------------------------------------------------- #

@dataclass
class Phase:
    end: int                       # the run's step at the end of this phase
    overrides: list[str] = field(default_factory=list)
    source: str | None = None      # shift protocol: the source trained on


@dataclass
class Run:
    strategy: str
    seed: int
    overrides: list[str]           # --set items common to every phase
    phases: list[Phase]

    @property
    def name(self) -> str:
        return f"{self.strategy}-s{self.seed}"


@dataclass
class Plan:
    config: str                    # --config as given
    out: Path
    protocol: str
    runs: list[Run]
    base: Config                   # the config with the user's --set items (before strategies)
    notes: list[str]
    jobs: int
    threads: int
    command: str
    within: float = 0.05           # shift: the 'within x of' threshold


def newest_step(out: Path, run: Run) -> int:
    found = list_checkpoints(out / "checkpoints" / run.name)
    return found[0][0] if found else 0


def expected_config(plan: Plan, run: Run) -> Config:
    """The resolved config of the run's last phase (raises UserError for a bad --set)."""
    return load_config(plan.config, run.overrides + run.phases[-1].overrides)


def check_settings(plan: Plan, run: Run) -> None:
    """A run already in the out folder must have been made with this command's settings."""
    saved = read_run_config(plan.out / "logs" / run.name, required=False)
    if saved is None:
        return
    ignore = {"data.sources"} if plan.protocol == "shift" else set()  # changes phase by phase
    changes = [c for c in config_changes(saved, expected_config(plan, run).to_dict()) if c[0] not in ignore]
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:5])
        raise UserError(f"{plan.out / 'logs' / run.name} was made with other settings ({listed}); "
                        f"use another --out, or delete that run to redo it")


def trainer_command(plan: Plan, run: Run, phase: Phase) -> list[str]:
    cmd = [sys.executable, str(TRAINER), "--config", plan.config, "--run-dir", str(plan.out),
           "--run-name", run.name, "--resume"]
    if plan.protocol == "shift":
        cmd += ["--allow-config-change", "--max-steps", str(phase.end)]
    for item in run.overrides + phase.overrides:
        cmd += ["--set", item]
    return cmd


def execute(plan: Plan, run: Run) -> str | None:
    """Bring one run to its end, phase by phase; None when done, else why not."""
    console = plan.out / "console" / f"{run.name}.txt"
    console.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
    for phase in run.phases:
        if newest_step(plan.out, run) >= phase.end:
            continue  # finished earlier: not repeated
        with open(console, "a", encoding="utf-8") as sink:
            done = subprocess.run(trainer_command(plan, run, phase), stdout=sink, stderr=subprocess.STDOUT,
                                  env=env, cwd=os.getcwd())
        reached = newest_step(plan.out, run)
        if done.returncode != 0 or reached < phase.end:
            last = console.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
            return f"exit code {done.returncode} at step {reached} of {phase.end}: {last[0]} (see {console})"
    return None


def execute_all(plan: Plan) -> dict[str, str]:
    """Run what is not finished, `plan.jobs` at a time; {run name: failure} for those that did not finish."""
    for run in plan.runs:
        check_settings(plan, run)
    todo = [r for r in plan.runs if newest_step(plan.out, r) < r.phases[-1].end]
    print(f"{len(plan.runs)} runs, {len(plan.runs) - len(todo)} finished earlier, {len(todo)} to run "
          f"({plan.jobs} at a time, {plan.threads} threads each) under {plan.out}", flush=True)
    started = time.monotonic()

    def one(run: Run) -> tuple[str, str | None]:
        print(f"  start {run.name}", flush=True)
        failure = execute(plan, run)
        status = f"FAILED: {failure}" if failure else "done"
        print(f"  {status:>6} {run.name} ({time.monotonic() - started:.0f} s)", flush=True)
        return run.name, failure

    pool = ThreadPoolExecutor(max_workers=plan.jobs)
    try:
        results = list(pool.map(one, todo))
    except KeyboardInterrupt:
        # Ctrl-C reached the running trainers too (one process group): they save and stop.
        # Queued runs must not start; the same command resumes everything later.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return {name: failure for name, failure in results if failure}


# --------------------------------------------------------------------------- #
# Reading a run's files
# --------------------------------------------------------------------------- #

def param_counts(cfg: Config, live_experts: float) -> dict[str, float]:
    """Parameters: allocated (every slot), active per token (top-k experts), live at the end."""
    import torch
    from nemoe.model import NemoeLM
    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = NemoeLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_slot = sum(p[0].numel() for p in model.blocks[0].moe.experts.parameters())
    shared = total - per_slot * cfg.moe.experts_max * cfg.model.n_layers
    return {"params_total": total, "params_active": shared + per_slot * cfg.moe.top_k * cfg.model.n_layers,
            "params_live": shared + per_slot * live_experts}


def run_results(out: Path, run: Run) -> dict:
    """One run's final numbers, read from its own eval.csv, training_log.csv, events.csv, config.yaml."""
    log_dir = out / "logs" / run.name
    evals = read_eval(log_dir / EVAL_CSV)
    final_step = int(evals["step"].max()) if len(evals) else -1
    if final_step != run.phases[-1].end:
        raise UserError(f"{log_dir / EVAL_CSV}: last evaluation at step {final_step}, "
                        f"expected {run.phases[-1].end}")
    final = evals[evals["step"] == final_step]
    train_log = read_training_log(log_dir / TRAIN_CSV)
    train = train_log.iloc[-1]
    events = read_events(log_dir / EVENTS_CSV, granularity=None)
    cfg = config_from_dict(read_run_config(log_dir))
    row = {"strategy": run.strategy, "seed": run.seed, "run": run.name, "step": final_step,
           "tokens": int(final["tokens"].iloc[0])}
    row.update({f"loss_{r.source}": float(r.loss) for r in final.itertuples()})
    row["tokens_per_s"] = float(train["tokens"] / train["elapsed_s"])
    row.update(param_counts(cfg, sum(train[c] for c in layer_columns(train_log))))
    row["events"] = len(events)
    for kind, count in events["granularity"].value_counts().items():
        row[f"events_{kind}"] = int(count)
    row["data_fingerprint"] = data_fingerprint(cfg)
    return row


_fingerprints: dict[str, str] = {}


def data_fingerprint(cfg: Config, steps: int = FINGERPRINT_STEPS) -> str:
    """SHA-256 (16 hex digits) of the first `steps` optimizer steps of training batches this config reads.

    The stream is a function of the data section, seq_len, batch size and accumulation
    only, so equal keys share one computation.
    """
    key = json.dumps([dataclasses.asdict(cfg.data), cfg.model.seq_len, cfg.train.batch_size,
                      cfg.train.grad_accum, steps], sort_keys=True)
    if key not in _fingerprints:
        from nemoe.data import TokenStream
        from nemoe.tokenizer import get_tokenizer
        stream = TokenStream(cfg.data, get_tokenizer("gpt2"), cfg.model.seq_len)
        digest = hashlib.sha256()
        for _ in range(steps * cfg.train.grad_accum):
            digest.update(stream.next_batch(cfg.train.batch_size).numpy().tobytes())
        stream.close()
        _fingerprints[key] = digest.hexdigest()[:16]
    return _fingerprints[key]


def eval_curves(out: Path, runs: list[Run]) -> pd.DataFrame:
    """Every run's held-out losses: strategy, seed, step, source, loss."""
    frames = []
    for run in runs:
        evals = read_eval(out / "logs" / run.name / EVAL_CSV)
        frames.append(evals.assign(strategy=run.strategy, seed=run.seed)[["strategy", "seed", "step",
                                                                            "source", "loss"]])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- #
# Summaries and the report
# --------------------------------------------------------------------------- #

def fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def fmt_ms(mean: float, sd: float, digits: int = 4) -> str:
    return fmt(mean, digits) if math.isnan(sd) else f"{fmt(mean, digits)} ± {fmt(sd, digits)}"


def fmt_ci(p: Paired, digits: int = 4) -> str:
    if math.isnan(p.mean):
        return "—"
    ci = "" if p.n < 2 else f" [{p.low:+.{digits}f}, {p.high:+.{digits}f}]"
    return f"{p.mean:+.{digits}f}{ci}"


def summarize(results: pd.DataFrame, metrics: list[str], group: list[str]) -> pd.DataFrame:
    """Per group (strategy, ...) and metric: n, mean, sd and the paired difference to static_moe."""
    rows = []
    for keys, frame in results.groupby(group, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        where = dict(zip(group, keys))
        base = results[results["strategy"] == BASELINE]
        for other, value in where.items():
            if other != "strategy":
                base = base[base[other] == value]
        for metric in metrics:
            if metric not in frame or frame[metric].isna().all():
                continue
            mean, sd = mean_sd(frame[metric])
            row = {**where, "metric": metric, "n": int(frame[metric].notna().sum()), "mean": mean, "sd": sd}
            if where["strategy"] != BASELINE and len(base) and metric in base:
                p = paired_difference(dict(zip(frame["seed"], frame[metric])), dict(zip(base["seed"], base[metric])))
                row.update({"diff": p.mean, "ci_low": p.low, "ci_high": p.high, "n_pairs": p.n,
                            "verdict": p.verdict})
            rows.append(row)
    return pd.DataFrame(rows)


def difference_lines(summary: pd.DataFrame, what: Callable[[pd.Series], str], digits: int = 4) -> list[str]:
    """One sentence per paired comparison, saying plainly whether it is significant."""
    lines = []
    if "verdict" not in summary:
        return lines
    for _, r in summary.dropna(subset=["verdict"]).iterrows():
        p = Paired(int(r["n_pairs"]), r["diff"], r["ci_low"], r["ci_high"])
        lines.append(f"- {r['strategy']} vs {BASELINE}, {what(r)}: {fmt_ci(p, digits)} — **{p.verdict}**")
    return lines


def report_header(plan: Plan, title: str) -> list[str]:
    b = plan.base
    seeds = sorted({r.seed for r in plan.runs})
    return [f"# {title}", "", f"Reproduce: `{plan.command}`", "",
            f"Config `{plan.config}` · seeds {', '.join(map(str, seeds))} (seed s sets train.seed; the data, "
            f"morph and plasticity seeds derive from it) · {b.tokens_per_step():,} tokens/step · held-out: "
            f"{b.eval.batches} fixed batches × {b.eval.batch_size} sequences per source, the same for every run.", "",
            "Strategies:", *[f"- `{n}`: {STRATEGIES[n].about}" for n in dict.fromkeys(r.strategy for r in plan.runs)],
            *[f"- {n}" for n in plan.notes], ""]


def data_order_lines(results: pd.DataFrame) -> list[str]:
    """Same seed -> same data order across strategies, checked on the runs' resolved configs."""
    lines = ["## Data order", "",
             f"SHA-256 of the first {FINGERPRINT_STEPS} steps of training batches, rebuilt from each run's "
             "own config.yaml (shift protocol: its last phase's):", ""]
    runs = results.drop_duplicates("run")
    for seed, frame in runs.groupby("seed"):
        prints = dict(zip(frame["strategy"], frame["data_fingerprint"]))
        same = len(set(prints.values())) == 1
        lines.append(f"- seed {seed}: {', '.join(f'{s} `{h}`' for s, h in prints.items())} — "
                     + ("identical across strategies" if same else "**DIFFERENT: the comparison is not fair**"))
    return lines + [""]


def data_order_consistent(results: pd.DataFrame) -> bool:
    runs = results.drop_duplicates("run")
    return all(f["data_fingerprint"].nunique() == 1 for _, f in runs.groupby("seed"))


def grid_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> tuple[str, pd.DataFrame]:
    sources = [c[len("loss_"):] for c in results.columns if c.startswith("loss_") and c != "loss_all"]
    metrics = ["loss_all", *[f"loss_{s}" for s in sources], "tokens_per_s", "params_total",
               "params_active", "params_live", "events"]
    summary = summarize(results, metrics, ["strategy"])
    lines = report_header(plan, f"Comparison on `{plan.config}`: {plan.base.total_steps():,} steps, "
                                f"{plan.base.total_steps() * plan.base.tokens_per_step():,} tokens per run")
    head = ["strategy", "n", "held-out all", *sources, f"Δ all vs {BASELINE} [95% CI]", "verdict",
            "tokens/s", "params total", "active/token", "live at end", "events"]
    lines += ["## Final held-out loss (mean ± sd over seeds)", "", "| " + " | ".join(head) + " |",
              "|" + " --- |" * len(head)]
    for strategy, rows in summary.groupby("strategy", sort=False):
        r = rows.set_index("metric")
        cell = lambda m, d=4: fmt_ms(r.loc[m, "mean"], r.loc[m, "sd"], d) if m in r.index else "—"  # noqa: E731
        paired = r.loc["loss_all"] if "diff" in r and not pd.isna(r.loc["loss_all"].get("diff")) else None
        ci = fmt_ci(Paired(int(paired["n_pairs"]), paired["diff"], paired["ci_low"], paired["ci_high"])) \
            if paired is not None else "(baseline)" if strategy == BASELINE else "—"
        lines.append("| " + " | ".join([
            strategy, str(int(r.loc["loss_all", "n"])), cell("loss_all"), *[cell(f"loss_{s}") for s in sources],
            ci, paired["verdict"] if paired is not None else "", cell("tokens_per_s", 0),
            f"{r.loc['params_total', 'mean']:,.0f}", f"{r.loc['params_active', 'mean']:,.0f}",
            f"{r.loc['params_live', 'mean']:,.0f}", cell("events", 1)]) + " |")
    if BASELINE not in set(results["strategy"]):
        lines += ["", f"No `{BASELINE}` runs in this grid, so no paired differences."]
    loss_rows = summary[summary["metric"].str.startswith("loss_")]
    lines += ["", "## Paired differences to static_moe (per seed, then mean with a 95% Student-t CI)", "",
              *difference_lines(loss_rows, lambda r: f"held-out {r['metric'][5:]} loss"), "",
              "A difference whose interval contains 0 is not significant at 95%; several comparisons "
              "are made without correction, so one 'significant' line among many is weak evidence. "
              f"Tokens/s were measured with {plan.jobs} runs in parallel ({plan.threads} threads each) "
              "and depend on what else the machine did.", ""]
    lines += data_order_lines(results)
    lines += failure_lines(failures)
    return "\n".join(lines) + "\n", summary


def failure_lines(failures: dict[str, str]) -> list[str]:
    if not failures:
        return []
    return ["## Runs that did not finish (left out above)", "",
            *[f"- {name}: {why}" for name, why in failures.items()], ""]


def band_plot(ax, curves: pd.DataFrame, source: str) -> None:
    """Mean line and min-max band over seeds, one colour per strategy."""
    for strategy, frame in curves[curves["source"] == source].groupby("strategy", sort=False):
        wide = frame.pivot_table(index="step", columns="seed", values="loss").dropna()
        line, = ax.plot(wide.index, wide.mean(axis=1), label=f"{strategy} (n={wide.shape[1]})")
        ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss ({source})")
    ax.grid(alpha=0.3)


def curves_picture(path: Path, curves: pd.DataFrame, sources: list[str], title: str,
                   boundaries: list[int] = ()) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4.2), squeeze=False)
    for ax, source in zip(axes[0], sources):
        band_plot(ax, curves, source)
        for step in boundaries:
            ax.axvline(step, color="gray", linestyle="--", linewidth=0.8)
        # The step-0 evaluation (random init, ~ln V) would flatten the interesting part.
        later = curves[(curves["source"] == source) & (curves["step"] > 0)]
        if later["step"].nunique() >= 2:
            later = later["loss"]
            pad = 0.05 * (later.max() - later.min()) or 0.01
            ax.set_ylim(later.min() - pad, later.max() + pad)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title + " — mean over seeds, band = min..max")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- #
# Domain-shift protocol
# --------------------------------------------------------------------------- #

def parse_phases(text: str, cfg: Config) -> list[tuple[str, int]]:
    sources = [s.name for s in cfg.data.sources]
    phases = []
    for item in text.split(","):
        name, sep, steps = item.strip().partition(":")
        if not sep or not steps.strip().isdigit() or int(steps) < 1:
            raise UserError(f"--phases {item!r}: expected SOURCE:STEPS, e.g. prose:300")
        if name not in sources:
            raise UserError(f"--phases: {name!r} is not a source of this config (its sources: {', '.join(sources)})")
        phases.append((name, int(steps)))
    if len(phases) < 2:
        raise UserError("--phases: give at least two phases, e.g. prose:300,code:300,prose:300")
    return phases


def phase_sources_override(cfg: Config, source: str) -> str:
    """data.sources with all weight on `source`; the others stay (for evaluation) at a negligible weight."""
    items = [dict(dataclasses.asdict(s), weight=1.0 if s.name == source else OFF_PHASE_WEIGHT)
             for s in cfg.data.sources]
    return "data.sources=" + yaml.safe_dump(items, default_flow_style=True, width=10**9).strip()


def first_within(curve: pd.Series, target: float, start: int) -> float:
    """Steps after `start` until the curve first gets to or below `target` (NaN: not in this phase)."""
    hits = curve[curve <= target]
    return float(hits.index[0] - start) if len(hits) else math.nan


def shift_metrics(evals: pd.DataFrame, events: pd.DataFrame, phases: list[tuple[str, int, int]],
                  within: float) -> list[dict]:
    """Per phase: adaptation, recovery, forgetting (relative), events. phases: (source, start, end)."""
    loss = {s: f.set_index("step")["loss"] for s, f in evals.groupby("source")}
    rows, trained_until = [], {}
    for i, (source, start, end) in enumerate(phases, 1):
        curve = loss[source][(loss[source].index > start) & (loss[source].index <= end)]
        row = {"phase": i, "source": source, "start": start, "end": end,
               "adapt_steps": first_within(curve, (1 + within) * loss[source][end], start),
               "events": int(((events["step"] > start) & (events["step"] <= end)).sum())}
        if source in trained_until and phases[i - 2][0] != source:
            before = loss[source][trained_until[source]]
            row["recover_steps"] = first_within(curve, (1 + within) * before, start)
        for other, until in trained_until.items():
            if other != source:
                row[f"forget_{other}"] = loss[other][end] / loss[other][until] - 1
        trained_until[source] = end
        rows.append(row)
    return rows


def shift_results(plan: Plan, run: Run) -> list[dict]:
    log_dir = plan.out / "logs" / run.name
    evals = read_eval(log_dir / EVAL_CSV)
    events = read_events(log_dir / EVENTS_CSV, granularity=None)
    bounds, start = [], 0
    for phase in run.phases:
        bounds.append((phase.source, start, phase.end))
        start = phase.end
    missing = [end for _, _, end in bounds if end not in set(evals["step"])]
    if missing:
        raise UserError(f"{log_dir / EVAL_CSV}: no evaluation at phase end(s) {missing}")
    base = run_results(plan.out, run)
    keep = {k: base[k] for k in ("strategy", "seed", "run", "tokens_per_s", "data_fingerprint")}
    return [{**keep, **row} for row in shift_metrics(evals, events, bounds, plan.within)]


def shift_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> tuple[str, pd.DataFrame]:
    metrics = ["adapt_steps", "recover_steps", *sorted(c for c in results if c.startswith("forget_")), "events"]
    summary = summarize(results, metrics, ["strategy", "phase"])
    phases = results.drop_duplicates("phase")[["phase", "source", "start", "end"]]
    pct = f"{plan.within:.0%}"
    lines = report_header(plan, f"Domain shift on `{plan.config}`: " + " → ".join(
        f"{r.source} ({r.end - r.start} steps)" for r in phases.itertuples()))
    lines += [f"- adaptation: steps into a phase until its source's held-out loss is within {pct} of its "
              "value at the phase end", f"- recovery: on returning to a source, steps until its held-out "
              f"loss is within {pct} of its value at the end of its previous phase (— : not within the phase)",
              "- forgetting: a source's held-out loss at the phase end relative to the end of its last "
              "phase (+0.10 = 10% worse)", f"- resolution: evaluations every {plan.base.eval.every_steps} "
              "steps. Each phase restarts the data stream (new source weights), so a source's second phase "
              "reads its opening documents again; with one source per phase, data.seed changes little and "
              "seeds differ mainly in initialisation and the controller's draws", ""]
    head = ["strategy", "phase", "metric", "n", "mean ± sd", f"Δ vs {BASELINE} [95% CI]", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary.itertuples():
        digits = 3 if r.metric.startswith("forget_") else 1
        paired = Paired(int(r.n_pairs), r.diff, r.ci_low, r.ci_high) if "diff" in summary and not pd.isna(r.diff) else None
        lines.append("| " + " | ".join([r.strategy, f"{r.phase} ({phases.set_index('phase').loc[r.phase, 'source']})",
                                        r.metric, str(r.n), fmt_ms(r.mean, r.sd, digits),
                                        fmt_ci(paired, digits) if paired else "", paired.verdict if paired else ""]) + " |")
    lines += ["", "Recovery and adaptation counts average only the seeds that got there (n says how many).", ""]
    lines += data_order_lines(results) + failure_lines(failures)
    return "\n".join(lines) + "\n", summary


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="local.yaml", help="NAME, configs/NAME or configs/NAME.yaml")
    p.add_argument("--protocol", choices=("grid", "shift"), default="grid")
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated, from: {', '.join(STRATEGIES)} (default: every available one)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 0,5,7 (instead of --seeds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set train.total_tokens=200000 (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: CPU cores / 2; 1 on a GPU)")
    p.add_argument("--out", default=None, help="folder of the runs and the report (default compare/<config>)")
    p.add_argument("--phases", default=None, help="shift: SOURCE:STEPS,... (default: first:300,second:300,first:300)")
    p.add_argument("--within", type=float, default=0.05,
                   help="shift: 'within x of' threshold for adaptation and recovery (default 0.05 = 5%%)")
    return p.parse_args(argv)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_plan(args, argv) -> Plan:
    base = load_config(args.config, args.overrides)  # a bad config or --set fails here, before any run
    strategies, notes = choose_strategies(args.strategies)
    seeds = parse_seeds(args)
    name = Path(args.config).stem
    out = Path(args.out) if args.out else Path("compare") / (name + ("-shift" if args.protocol == "shift" else ""))
    phase_plan = shift_phases(args, base) if args.protocol == "shift" else None
    if phase_plan is not None:  # the settings every shift run shares, for the report
        base = load_config(args.config, phase_plan[0] + list(args.overrides))
    runs = []
    for strategy in strategies:
        for seed in seeds:
            common = list(args.overrides) + STRATEGIES[strategy].overrides(base) + seed_overrides(seed)
            if phase_plan is None:
                runs.append(Run(strategy, seed, common, [Phase(base.total_steps())]))
            else:
                extra, phases = phase_plan
                runs.append(Run(strategy, seed, extra + common, phases))
    gpu = base.train.device != "cpu" and _cuda_visible()
    jobs = args.jobs or (1 if gpu else max(1, min(len(runs), cpu_count() // 2)))
    if jobs < 1 or (args.within is not None and not 0 < args.within < 1):
        raise UserError("--jobs must be >= 1 and --within in (0, 1)")
    command = "python tools/compare.py " + " ".join(_quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return Plan(args.config, out, args.protocol, runs, base, notes, jobs, max(1, cpu_count() // jobs), command,
                args.within)


def shift_phases(args, base: Config) -> tuple[list[str], list[Phase]]:
    """(--set items for every phase, the phases) of the shift protocol."""
    sources = [s.name for s in base.data.sources]
    if args.phases is None and len(sources) < 2:
        raise UserError("--protocol shift needs two data sources (or --phases)")
    text = args.phases or f"{sources[0]}:300,{sources[1]}:300,{sources[0]}:300"
    phases, end = [], 0
    for source, steps in parse_phases(text, base):
        end += steps
        phases.append(Phase(end, [phase_sources_override(base, source)], source))
    # One LR schedule over all phases; frequent evaluations so speeds can be read off eval.csv.
    every = max(1, min(p.end - q for p, q in zip(phases, [0] + [p.end for p in phases])) // 15)
    # Before the user's --set items, which therefore win.
    return [f"train.total_tokens={end * base.tokens_per_step()}", f"eval.every_steps={every}"], phases


def parse_seeds(args) -> list[int]:
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seed-list {args.seed_list!r}: expected integers, e.g. 0,1,2") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError("--seed-list: give distinct seeds")
        return seeds
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    return list(range(args.seeds))


def _cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def collect(plan: Plan, failures: dict[str, str]) -> pd.DataFrame:
    rows = []
    for run in plan.runs:
        if run.name in failures:
            continue
        rows += shift_results(plan, run) if plan.protocol == "shift" else [run_results(plan.out, run)]
    if not rows:
        raise UserError("no run finished; see " + ", ".join(f"{n}: {w}" for n, w in failures.items()))
    return pd.DataFrame(rows)


@guard
def main(argv=None):
    args = parse_args(argv)
    plan = build_plan(args, argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    for line in plan.notes:
        print(f"note: {line}", flush=True)
    failures = execute_all(plan)
    results = collect(plan, failures)
    write = grid_report if plan.protocol == "grid" else shift_report
    text, summary = write(plan, results, failures)
    results.to_csv(plan.out / "results.csv", index=False)
    summary.to_csv(plan.out / "summary.csv", index=False)
    (plan.out / "report.md").write_text(text, encoding="utf-8")
    sources = [s.name for s in plan.base.data.sources]
    curves = eval_curves(plan.out, [r for r in plan.runs if r.name not in failures])
    phases = plan.runs[0].phases
    title = f"held-out loss, {plan.config}"
    if plan.protocol == "shift":
        title += ": " + " → ".join(p.source for p in phases)
    curves_picture(plan.out / "curves.png", curves, ["all"] + sources if plan.protocol == "grid" else sources,
                   title, [p.end for p in phases[:-1]])
    print(text)
    print(f"wrote {plan.out / 'report.md'}, results.csv, summary.csv, curves.png")
    if not data_order_consistent(results):
        raise UserError("the data order differs between strategies of one seed; see report.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
