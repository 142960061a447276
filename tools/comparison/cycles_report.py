"""The cycles protocol's report: plasticity trends per arm (slope of the adaptation area and of the
loss after k steps per visit), each run's slopes with their CIs, per source, forgetting, the fresh
reference, the paired comparisons of slopes (Holm within the declared primary family), and
trends.csv and adaptation.png beside report.md (tools/comparison/cycles.py has the metrics).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tools.plotting import pyplot, save_figure
from tools.comparison.comparisons import compare, comparison_lines, fmt_diff
from tools.comparison.cycles import TREND_VALUES, trends
from tools.comparison.declared import declared_lines
from tools.comparison.plan import FRESH, Plan
from tools.comparison.report import (band_plot, data_order_lines, failure_lines, fmt, fmt_ms, planning_note,
                                     report_header, strategy_order, summarize)
from tools.comparison.stats import mean_sd, paired_difference

VALUE_LABEL = {"area": "adaptation area", "loss_k": "loss after k steps"}


def trend_metrics(frame: pd.DataFrame, sources: list[str]) -> list[str]:
    """The per-run metrics compared between arms: slopes overall then per source, forgetting, gaps."""
    names = [f"slope_{v}_all" for v in TREND_VALUES] + ["forget_mean_all"]
    names += [f"{v}_last_vs_fresh" for v in TREND_VALUES]
    names += [f"slope_{v}_{s}" for v in TREND_VALUES for s in sources] + [f"forget_mean_{s}" for s in sources]
    return [n for n in names if n in frame]


def over_seeds(values: dict[int, float]) -> str:
    """The mean over seeds with its 95% t CI ('+0.0123 [−0.0100, +0.0346]'; the mean alone for one seed)."""
    p = paired_difference(values, {s: 0.0 for s in values})
    row = {"diff": p.mean, "n_pairs": p.n, "ci_low": p.low, "ci_high": p.high}
    return fmt_diff(row) if p.n else "—"


def seed_values(frame: pd.DataFrame, metric: str) -> dict[int, float]:
    return dict(zip(frame["seed"], frame[metric])) if metric in frame else {}


def fmt_slope(r: pd.Series, prefix: str) -> str:
    if math.isnan(r[prefix]):
        return "—"
    ci = "" if math.isnan(r[f"{prefix}_low"]) else f" [{r[f'{prefix}_low']:+.4f}, {r[f'{prefix}_high']:+.4f}]"
    return f"{r[prefix]:+.4f}{ci}"


def cycles_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> tuple[str, pd.DataFrame]:
    arms, fresh = results[results["strategy"] != FRESH], results[results["strategy"] == FRESH]
    sources = list(dict.fromkeys(arms["source"]))
    per_run = trends(results)
    metrics = trend_metrics(per_run, sources)
    phases = plan.runs[0].phases
    steps = phases[0].end
    lines = report_header(plan, f"Many shifts on `{plan.config}`: {len(phases)} phases of {steps} steps, "
                                f"{len(sources)} sources in a cycle ({' → '.join(sources)}) × "
                                f"{len(phases) // len(sources)}")
    k = plan.k_steps
    lines += [f"- schedule: train.schedule {plan.base.train.schedule} (lr {plan.base.train.lr:g}, warm-up "
              f"{plan.base.train.warmup_steps} steps); evaluations every {plan.base.eval.every_steps} steps on "
              "every source, the phase's and the others",
              f"- adaptation area: a visit's (phase's) mean held-out loss of its source over its evaluations "
              f"after its start, up to and including its end; loss@{k}: that loss {k} steps into the visit",
              "- slope per visit: least squares (scipy.stats.linregress) per run, per source against its visit "
              "number, overall ('all') the mean over a cycle's sources against the cycle number; 95% CI "
              "slope ± t(0.975, n − 2)·stderr. Positive: the model adapts worse visit after visit (plasticity lost)",
              "- forgetting: a source's held-out loss at the end of a visit to another source minus at the end "
              "of its own last visit (nats), averaged over the visits that have it",
              f"- fresh: the reference, `{FRESH}-<source>-s<seed>`: the baseline's model trained from "
              f"initialisation on one source for one phase ({steps} steps; one extra run per source and seed), "
              "with the arms' settings; 'vs fresh' is the last cycle's value minus the fresh one (same seed, "
              "mean over sources)", ""]
    lines += declared_lines(plan.declared)
    lines += trend_table(per_run, fresh, plan, k)
    lines += seed_table(per_run)
    lines += source_table(per_run, fresh, sources, k)
    lines += visit_table(arms, fresh, strategy_order(plan))
    comparisons = compare(per_run, metrics, plan.declared, strategy_order(plan))
    lines += comparison_lines(comparisons, plan.declared, lambda r: r["metric"], lambda m: 4)
    lines += planning_note()
    lines += data_order_lines(results) + failure_lines(failures)
    summary = summarize(per_run, metrics, ["strategy"])
    for folder in dict.fromkeys(f for f in (plan.out, plan.study) if f is not None):
        folder.mkdir(parents=True, exist_ok=True)
        per_run.to_csv(folder / "trends.csv", index=False)
        adaptation_picture(folder / "adaptation.png", arms, fresh, plan, k)
    return "\n".join(lines) + "\n", pd.concat([summary, comparisons], ignore_index=True)


def trend_table(per_run: pd.DataFrame, fresh: pd.DataFrame, plan: Plan, k: int) -> list[str]:
    head = ["strategy", "n", "slope area/visit [95% CI over seeds]", f"slope loss@{k}/visit [95% CI]",
            "forgetting [95% CI]", "area: first → last cycle", f"loss@{k}: first → last cycle",
            "area last − fresh", f"loss@{k} last − fresh"]
    lines = ["## Plasticity trends (per arm, over seeds)", "", "| " + " | ".join(head) + " |",
             "|" + " --- |" * len(head)]
    for strategy in strategy_order(plan):
        r = per_run[per_run["strategy"] == strategy]
        if not len(r):
            continue

        def ms(metric: str) -> str:
            return fmt_ms(*mean_sd_of(r, metric))

        lines.append("| " + " | ".join([
            strategy, str(len(r)), over_seeds(seed_values(r, "slope_area_all")),
            over_seeds(seed_values(r, "slope_loss_k_all")), over_seeds(seed_values(r, "forget_mean_all")),
            f"{ms('area_first')} → {ms('area_last')}", f"{ms('loss_k_first')} → {ms('loss_k_last')}",
            over_seeds(seed_values(r, "area_last_vs_fresh")), over_seeds(seed_values(r, "loss_k_last_vs_fresh"))])
            + " |")
    if not len(fresh):
        lines += ["", "(no fresh reference runs: --no-fresh)"]
    return lines + ["", "first/last: the mean over a complete cycle's sources, mean ± sd over seeds.", ""]


def mean_sd_of(frame: pd.DataFrame, metric: str) -> tuple[float, float]:
    return mean_sd(frame[metric]) if metric in frame else (math.nan, math.nan)


def seed_table(per_run: pd.DataFrame) -> list[str]:
    """Each run's own slopes with their regression CIs."""
    lines = ["## Slopes per run (95% CI of the regression)", "",
             "| run | slope area/visit | slope loss@k/visit | forgetting |", "| --- | --- | --- | --- |"]
    for _, r in per_run.iterrows():
        lines.append(f"| {r['run']} | {fmt_slope(r, 'slope_area_all')} | {fmt_slope(r, 'slope_loss_k_all')} | "
                     f"{fmt(r['forget_mean_all'])} |")
    return lines + [""]


def source_table(per_run: pd.DataFrame, fresh: pd.DataFrame, sources: list[str], k: int) -> list[str]:
    head = ["strategy", "source", "slope area/visit [95% CI over seeds]", f"slope loss@{k}/visit [95% CI]",
            "its forgetting", "fresh area", f"fresh loss@{k}"]
    lines = ["## Per source", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ref = fresh.groupby("source")[list(TREND_VALUES)].agg(["mean", "std"]) if len(fresh) else None
    for strategy, r in per_run.groupby("strategy", sort=False):
        for s in sources:
            cells = [over_seeds(seed_values(r, f"slope_{v}_{s}")) for v in TREND_VALUES]
            cells.append(over_seeds(seed_values(r, f"forget_mean_{s}")))
            for v in TREND_VALUES:
                have = ref is not None and s in ref.index
                cells.append(fmt_ms(ref.loc[s, (v, "mean")], ref.loc[s, (v, "std")]) if have else "—")
            lines.append(f"| {strategy} | {s} | " + " | ".join(cells) + " |")
    return lines + [""]


def visit_table(arms: pd.DataFrame, fresh: pd.DataFrame, order: list[str]) -> list[str]:
    """The adaptation area per visit, mean over seeds, one column per arm (and the fresh reference)."""
    wide = arms.pivot_table(index=["phase", "source"], columns="strategy", values="area", aggfunc="mean")
    wide = wide[[s for s in order if s in wide.columns]]
    ref = fresh.groupby("source")["area"].mean() if len(fresh) else pd.Series(dtype=float)
    lines = ["## Adaptation area per visit (mean over seeds)", "",
             "| phase | source | " + " | ".join(wide.columns) + " | fresh |", "|" + " --- |" * (len(wide.columns) + 3)]
    for (phase, source), r in wide.iterrows():
        lines.append(f"| {phase} | {source} | " + " | ".join(fmt(x) for x in r) + f" | {fmt(ref.get(source, math.nan))} |")
    return lines + [""]


def adaptation_picture(path: Path, arms: pd.DataFrame, fresh: pd.DataFrame, plan: Plan, k: int) -> None:
    """Adaptation area and loss@k per visit, every arm (mean line, min..max band over seeds; band_plot),
    the fresh reference of each phase's source dotted."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), squeeze=False)
    for ax, value in zip(axes[0], TREND_VALUES):
        band_plot(ax, arms.assign(step=arms["phase"], loss=arms[value], source=value), value)
        if len(fresh):
            ref = fresh.groupby("source")[value].mean()
            phases = arms.drop_duplicates("phase").sort_values("phase")
            ax.plot(phases["phase"], [ref.get(s, math.nan) for s in phases["source"]], ":", color="gray",
                    label="fresh (the phase's source)")
        ax.set_xlabel("visit (phase)")
        ax.set_ylabel(VALUE_LABEL[value] + (f" (k={k})" if value == "loss_k" else ""))
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{plan.config}: per visit, mean over seeds, band = min..max")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
