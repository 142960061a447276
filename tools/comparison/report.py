"""The comparison's report: what was declared, per-strategy summaries, the paired comparisons
(tools/comparison/comparisons.py), the grid and shift reports and the curves picture, which
tools/compare.py's write_report writes with results.csv and summary.csv into the out folder (and
the study folder, when there is one); the cycles report (cycles_report.py) builds on these pieces.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tools.plotting import pyplot, save_figure
from tools.comparison.comparisons import compare, comparison_lines, fmt_diff, fmt_p, of
from tools.comparison.declared import declared_lines
from tools.comparison.plan import BASELINE, FRESH, STRATEGIES, Plan
from tools.comparison.results import FINGERPRINT_STEPS, heldout_sizes
from tools.comparison.stats import mean_sd


def fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def fmt_ms(mean: float, sd: float, digits: int = 4) -> str:
    return fmt(mean, digits) if math.isnan(sd) else f"{fmt(mean, digits)} ± {fmt(sd, digits)}"


def fmt_si(x: float) -> str:
    """1.23e15 -> '1.23 P' (FLOPs, parameters)."""
    if x is None or math.isnan(x):
        return "—"
    for factor, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {unit}"
    return f"{x:.3g}"


def summarize(results: pd.DataFrame, metrics: list[str], group: list[str]) -> pd.DataFrame:
    """Per group (strategy, ...) and metric: n, mean and sd over seeds."""
    rows = []
    for keys, frame in results.groupby(group, sort=False):
        where = dict(zip(group, keys if isinstance(keys, tuple) else (keys,)))
        for metric in metrics:
            if metric not in frame or frame[metric].isna().all():
                continue
            mean, sd = mean_sd(frame[metric])
            rows.append({**where, "metric": metric, "n": int(frame[metric].notna().sum()), "mean": mean, "sd": sd})
    return pd.DataFrame(rows)


def strategy_order(plan: Plan) -> list[str]:
    return list(dict.fromkeys(r.strategy for r in plan.runs))


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #

def report_header(plan: Plan, title: str) -> list[str]:
    b = plan.base
    seeds = sorted({r.seed for r in plan.runs})
    # A rebuild reproduces the report only: the runs come from the command the study declared with.
    recorded = plan.declared.command if plan.rebuild and plan.declared is not None else ""
    reproduce = f"Reproduce: `{recorded}` (this report rebuilt by `{plan.command}`)" if recorded \
        else f"Reproduce: `{plan.command}`"
    return [f"# {title}", "", reproduce, "",
            f"Config `{plan.config}` · seeds {', '.join(map(str, seeds))} (seed s sets train.seed; the data, "
            f"morph and plasticity seeds derive from it) · {b.tokens_per_step():,} tokens/step · held-out: {b.eval.batches} fixed batches × "
            f"{b.eval.batch_size} sequences per source, the same for every run ({heldout_sizes(b)}).", "",
            "Strategies:", *[f"- `{n}`: {STRATEGIES[n].about}" for n in dict.fromkeys(r.strategy for r in plan.runs)],
            *[f"- {n}" for n in plan.notes], ""]


def data_order_lines(results: pd.DataFrame) -> list[str]:
    """Same seed -> same data order across strategies, checked on the runs' resolved configs."""
    lines = ["## Data order", "",
             f"SHA-256 of the first {FINGERPRINT_STEPS} steps of training batches, rebuilt from each run's "
             "own config.yaml (shift and cycles protocols: its last phase's; cycles' fresh reference runs "
             "read one source and are left out):", ""]
    runs = results[results["strategy"] != FRESH].drop_duplicates("run")
    for seed, frame in runs.groupby("seed"):
        prints = dict(zip(frame["strategy"], frame["data_fingerprint"]))
        same = len(set(prints.values())) == 1
        lines.append(f"- seed {seed}: {', '.join(f'{s} `{h}`' for s, h in prints.items())} — "
                     + ("identical across strategies" if same else "**DIFFERENT: the comparison is not fair**"))
    return lines + [""]


def data_order_consistent(results: pd.DataFrame) -> bool:
    runs = results[results["strategy"] != FRESH].drop_duplicates("run")
    return all(f["data_fingerprint"].nunique() == 1 for _, f in runs.groupby("seed"))


def failure_lines(failures: dict[str, str]) -> list[str]:
    if not failures:
        return []
    return ["## Runs that did not finish (left out above)", "",
            *[f"- {name}: {why}" for name, why in failures.items()], ""]


def loss_label(row: pd.Series) -> str:
    return f"held-out {row['metric'][len('loss_'):]} loss"


def grid_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> tuple[str, pd.DataFrame]:
    sources = [c[len("loss_"):] for c in results.columns if c.startswith("loss_") and c != "loss_all"]
    losses = ["loss_all", *[f"loss_{s}" for s in sources]]
    events = event_columns(results)
    metrics = [*losses, "flops", "flops_per_token", "wall_s", "tokens_per_s", "params_total",
               "params_active", "params_live", *COST_METRICS, "events", *events]
    summary = summarize(results, metrics, ["strategy"])
    comparisons = compare(results, losses, plan.declared, strategy_order(plan))
    lines = report_header(plan, f"Comparison on `{plan.config}`: {plan.base.total_steps():,} steps, "
                                f"{plan.base.total_steps() * plan.base.tokens_per_step():,} tokens per run")
    lines += declared_lines(plan.declared)
    lines += grid_table(summary, sources, comparisons)
    lines += ["", "Compute: training FLOPs = Σ over log intervals of tokens × (6·N + 12·L·T·d), N the "
              "parameters a token multiplies by with the experts live in that interval (training_log.csv's "
              "experts_L columns; nemoe/flops.py); evaluation excluded. Train s: training time "
              "(training_log.csv elapsed_s, evaluation and checkpoints excluded); tokens/s = tokens / train s. "
              f"Tokens/s were measured with {plan.jobs} runs in parallel ({plan.threads} threads each) "
              "and depend on what else the machine did.", ""]
    lines += cost_lines(plan, summary, results)
    if BASELINE not in set(results["strategy"]):
        lines += [f"No `{BASELINE}` runs in this grid, so no default pairs to it.", ""]
    lines += comparison_lines(comparisons, plan.declared, loss_label)
    lines += planning_note()
    lines += structure_lines(summary, results, events)
    lines += data_order_lines(results)
    lines += failure_lines(failures)
    return "\n".join(lines) + "\n", pd.concat([summary, comparisons], ignore_index=True)


def planning_note() -> list[str]:
    return ["How many seeds a stated effect needs is planned before a study, not read off its own sd: "
            "`python tools/compare.py --plan --from <this folder> --effect 0.02` (paired t-test, "
            "noncentral t).", ""]


def grid_table(summary: pd.DataFrame, sources: list[str], comparisons: pd.DataFrame) -> list[str]:
    """The final held-out loss table: one row per strategy, with its compute."""
    head = ["strategy", "n", "held-out all", *sources, f"Δ all vs {BASELINE} [95% CI]", "p (unadjusted)",
            "train FLOPs", "FLOPs/token", "train s", "tokens/s", "params total", "active/token", "live at end",
            "events"]
    lines = ["## Final held-out loss (mean ± sd over seeds)", "", "| " + " | ".join(head) + " |",
             "|" + " --- |" * len(head)]
    for strategy, rows in summary.groupby("strategy", sort=False):
        r = rows.set_index("metric")

        def cell(metric: str, digits: int = 4) -> str:
            return fmt_ms(r.loc[metric, "mean"], r.loc[metric, "sd"], digits) if metric in r.index else "—"

        def mean(metric: str, fmt=fmt_si) -> str:
            return fmt(r.loc[metric, "mean"]) if metric in r.index else "—"

        paired = of(comparisons, strategy, BASELINE, "loss_all")
        ci = fmt_diff(paired) if paired is not None else "(baseline)" if strategy == BASELINE else "—"
        lines.append("| " + " | ".join([
            strategy, str(int(r.loc["loss_all", "n"])), cell("loss_all"), *[cell(f"loss_{s}") for s in sources],
            ci, fmt_p(paired["p"]) if paired is not None else "", mean("flops"),
            mean("flops_per_token"), cell("wall_s", 0), cell("tokens_per_s", 0),
            f"{r.loc['params_total', 'mean']:,.0f}", f"{r.loc['params_active', 'mean']:,.0f}",
            f"{r.loc['params_live', 'mean']:,.0f}", cell("events", 1)]) + " |")
    return lines


COST_METRICS = ("expert_param_steps", "optim_state_peak_bytes", "rss_peak_mb", "tokens_to_target")


def cost_lines(plan: Plan, summary: pd.DataFrame, results: pd.DataFrame, to_target: bool = True) -> list[str]:
    """What each strategy's expert pool cost and (to_target) when it reached the target: one table (—
    where a run's files predate a column, e.g. committed rows written before it). Ratios are to
    plan.target_baseline."""
    baseline = plan.target_baseline
    means = {(r["strategy"], r["metric"]): (r["mean"], r["sd"]) for _, r in summary.iterrows()}

    def cell(strategy: str, metric: str, show) -> str:
        mean, sd = means.get((strategy, metric), (math.nan, math.nan))
        return "—" if math.isnan(mean) else show(mean) if math.isnan(sd) else f"{show(mean)} ± {show(sd)}"

    def ratio(strategy: str, metric: str) -> str:
        mine = means.get((strategy, metric), (math.nan,))[0]
        base = means.get((baseline, metric), (math.nan,))[0] if baseline else math.nan
        return "—" if math.isnan(mine) or math.isnan(base) or base == 0 else f"{mine / base:.2f}"

    target = results["target_loss"].iloc[0] if "target_loss" in results else math.nan
    reached = results.groupby("strategy")["tokens_to_target"].apply(lambda v: int(v.notna().sum())) \
        if "tokens_to_target" in results else {}
    n_runs = results.groupby("strategy").size()
    vs = f"× {baseline}" if baseline else "× baseline"
    head = ["strategy", "n", "live-expert param·steps", vs, "train s", vs, "optimizer state peak", "peak RSS",
            "tokens to target", "reached"]
    target_text, every = "", plan.base.eval.every_steps
    if to_target:
        target_text = (f"Tokens to target: tokens trained at the first evaluation whose held-out loss (all) is at "
                       f"or below `{baseline}`'s final one, mean over its seeds ({fmt(target)}); evaluations every "
                       f"{every} steps ({every * plan.base.tokens_per_step():,} tokens) resolve it (runs reused from the study "
                       f"folder keep the schedule they ran with: their eval.csv); the mean is "
                       f"over the runs that reached it (`reached`)." if baseline
                       else "Tokens to target: no target baseline in this grid (--target-baseline).")
    lines = ["## What the expert pool cost", "",
             "Live-expert param·steps: Σ over steps of the parameters of the experts live in the step (their "
             "MLP weights; training_log.csv expert_param_steps; a log that predates that column: counted from its "
             "experts per layer at each log row, exact for a pool that does not change). Optimizer state peak: "
             "the largest size of the "
             "optimizer's state tensors at any log row (optim_state_bytes). Peak RSS: the largest rss_mb of a "
             "log row. " + target_text, "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for strategy in strategy_order(plan):
        if strategy not in n_runs:
            continue
        lines.append("| " + " | ".join([
            strategy, str(int(n_runs[strategy])), cell(strategy, "expert_param_steps", fmt_si),
            ratio(strategy, "expert_param_steps"), cell(strategy, "wall_s", lambda x: f"{x:.0f}"),
            ratio(strategy, "wall_s"), cell(strategy, "optim_state_peak_bytes", lambda x: fmt_si(x) + "B"),
            cell(strategy, "rss_peak_mb", lambda x: f"{x:,.0f} MB"),
            cell(strategy, "tokens_to_target", fmt_si),
            f"{reached.get(strategy, 0)}/{int(n_runs[strategy])}" if baseline and to_target else "—"]) + " |")
    return lines + [""]


EXPERT_EVENTS = ("split", "crossover", "graduate", "failed_probation", "prune")   # the controller's order


def event_columns(results: pd.DataFrame) -> list[str]:
    """results.csv's per-type event counts (event_<granularity>_<event>): expert events first, in
    the controller's order, then the other granularities'."""
    def key(column: str) -> tuple:
        kind, name = column[len("event_"):].split("_", 1)
        return (kind != "expert", EXPERT_EVENTS.index(name) if name in EXPERT_EVENTS else len(EXPERT_EVENTS),
                kind, name)
    return sorted((c for c in results if c.startswith("event_")), key=key)


def structure_lines(summary: pd.DataFrame, results: pd.DataFrame, events: list[str]) -> list[str]:
    """Events per run by type (mean ± sd over seeds) for the strategies that had any, and the
    experts per layer of each run whose experts evolved, at fifths of the run."""
    if not events:
        return []
    rows = summary[summary["metric"].isin(events)]
    changing = [s for s, f in rows.groupby("strategy", sort=False) if (f["mean"] > 0).any()]
    if not changing:
        return []
    label = {c: c[len("event_expert_"):] if c.startswith("event_expert_") else c[len("event_"):].replace("_", " ", 1)
             for c in events}
    lines = ["## Structural events and expert counts", "",
             "Events per run by type (mean ± sd over seeds), from each run's events.csv:", "",
             "| strategy | n | " + " | ".join(label[c] for c in events) + " |", "|" + " --- |" * (len(events) + 2)]
    for strategy in changing:
        r = rows[rows["strategy"] == strategy].set_index("metric")
        lines.append(f"| {strategy} | {int(r['n'].max())} | "
                     + " | ".join(fmt_ms(r.loc[c, "mean"], r.loc[c, "sd"], 1) for c in events) + " |")
    expert = [c for c in events if c.startswith("event_expert_")]
    evolving = results[results[expert].sum(axis=1) > 0] if expert else results.iloc[:0]
    if len(evolving):
        marks = [dict(m.split(": ") for m in str(t).split("; ") if ": " in m) for t in evolving["experts_trajectory"]]
        steps = list(dict.fromkeys(step for m in marks for step in m))
        lines += ["", "Live experts per layer (L0/L1/...) at fifths of the run, from each run's training_log.csv "
                  "experts_L columns (the last log row at or before the step):", "",
                  "| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + " --- |" * (len(steps) + 1)]
        for run, m in zip(evolving["run"], marks):
            lines.append(f"| {run} | " + " | ".join(m.get(s, "—") for s in steps) + " |")
        lines += layer_event_lines(evolving, [c[len("event_expert_"):] for c in expert])
    return lines + [""]


def layer_event_lines(runs: pd.DataFrame, names: list[str]) -> list[str]:
    """Expert events per layer, summed over each strategy's runs (results.csv expert_events_by_layer)."""
    totals: dict[str, dict[str, list[int]]] = {}
    for strategy, text in zip(runs["strategy"], runs["expert_events_by_layer"]):
        for item in str(text).split("; "):
            if " " in item:
                name, counts = item.split(" ")
                have = totals.setdefault(strategy, {}).setdefault(name, [0] * len(counts.split("/")))
                totals[strategy][name] = [a + int(b) for a, b in zip(have, counts.split("/"))]
    if not totals:
        return []
    n_layers = max(len(c) for t in totals.values() for c in t.values())
    lines = ["", "Expert events per layer, summed over each strategy's seeds:", "",
             "| strategy | event | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
             "|" + " --- |" * (n_layers + 2)]
    for strategy, counts in totals.items():
        for name in names:
            lines.append(f"| {strategy} | {name} | " + " | ".join(map(str, counts.get(name, [0] * n_layers))) + " |")
    return lines


def shift_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> tuple[str, pd.DataFrame]:
    metrics = [*sorted(c for c in results if c.startswith("end_loss_")), "adapt_steps", "recover_steps",
               *sorted(c for c in results if c.startswith("forget_")), "events"]
    summary = summarize(results, metrics, ["strategy", "phase"])
    phases = results.drop_duplicates("phase")[["phase", "source", "start", "end"]]
    source_of = phases.set_index("phase")["source"]
    pct = f"{plan.within:.0%}"
    lines = report_header(plan, f"Domain shift on `{plan.config}`: " + " → ".join(
        f"{r.source} ({r.end - r.start} steps)" for r in phases.itertuples()))
    lines += ["- end_loss_<source>: a source's held-out loss at the phase end (all: the mixed held-out set)",
              f"- adaptation: steps into a phase until its source's held-out loss is within {pct} of its "
              "value at the phase end", f"- recovery: on returning to a source, steps until its held-out "
              f"loss is within {pct} of its value at the end of its previous phase (— : not within the phase)",
              "- forgetting: a source's held-out loss at the phase end relative to the end of its last "
              "phase (+0.10 = 10% worse)", f"- resolution: evaluations every {plan.base.eval.every_steps} "
              "steps. Each phase restarts the data stream (new source weights), so a source's second phase "
              "reads its opening documents again; with one source per phase, data.seed changes little and "
              "seeds differ mainly in initialisation and the controller's draws", ""]
    lines += declared_lines(plan.declared)
    runs = results.drop_duplicates("run")   # the cost columns are the run's, repeated on each phase's row
    lines += cost_lines(plan, summarize(runs, ["wall_s", *COST_METRICS], ["strategy"]), runs, to_target=False)
    head = ["strategy", "phase", "metric", "n", "mean ± sd"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, r in summary.iterrows():
        lines.append("| " + " | ".join([r["strategy"], f"{r['phase']} ({source_of[r['phase']]})", r["metric"],
                                        str(r["n"]), fmt_ms(r["mean"], r["sd"], shift_digits(r["metric"]))]) + " |")
    last = int(phases["phase"].max())
    comparisons = compare(results, metrics, plan.declared, strategy_order(plan), by=("phase",),
                          primary_where={"phase": last})
    lines += ["", "Recovery and adaptation counts average only the seeds that got there (n says how many).", ""]
    lines += comparison_lines(comparisons, plan.declared,
                              lambda r: f"phase {r['phase']} ({source_of[r['phase']]}) {r['metric']}", shift_digits)
    lines += planning_note()
    lines += data_order_lines(results) + failure_lines(failures)
    return "\n".join(lines) + "\n", pd.concat([summary, comparisons], ignore_index=True)


def shift_digits(metric: str) -> int:
    return 4 if metric.startswith("end_loss_") else 3 if metric.startswith("forget_") else 1


# --------------------------------------------------------------------------- #
# Curves
# --------------------------------------------------------------------------- #

def band_plot(ax, curves: pd.DataFrame, source: str) -> None:
    """Mean line and min-max band over seeds, one colour per strategy."""
    for strategy, frame in curves[curves["source"] == source].groupby("strategy", sort=False):
        wide = frame.pivot_table(index="step", columns="seed", values="loss").dropna()
        line, = ax.plot(wide.index, wide.mean(axis=1), label=f"{strategy} (n={wide.shape[1]})")
        ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss ({source})")
    ax.grid(alpha=0.3)


def cost_picture(path: Path, curves: pd.DataFrame, title: str) -> bool:
    """Held-out loss (all) against what each arm had spent by then: live-expert parameter-steps and
    training seconds (mean over seeds at each evaluation, min..max band of the loss). False (and no
    file) when no run's costs are known."""
    mixed = curves[(curves["source"] == "all") & (curves["step"] > 0)]
    if mixed[["expert_param_steps", "wall_s"]].isna().all().all():
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, (x, label) in zip(axes, (("expert_param_steps", "live-expert parameter-steps"),
                                      ("wall_s", "training seconds (evaluation and checkpoints excluded)"))):
        for strategy, frame in mixed.groupby("strategy", sort=False):
            at = frame.groupby("step").agg(x=(x, "mean"), loss=("loss", "mean"), lo=("loss", "min"),
                                           hi=("loss", "max")).dropna()
            if at.empty:
                continue
            line, = ax.plot(at["x"], at["loss"], label=strategy, linewidth=1.5)
            ax.fill_between(at["x"], at["lo"], at["hi"], color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (all sources)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " — what each arm had spent at each evaluation (mean over seeds, band = min..max)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


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
