"""The many-shift protocol (`tools/compare.py --protocol cycles`): its plasticity metrics (its phases
and fresh reference runs are planned in tools/comparison/plan.py, its rows read in results.py).

K sources are visited in a fixed cycle R times, one phase of --phase-steps steps each (the
shift protocol's phases: the source of the phase gets all the weight, the others keep
plan.OFF_PHASE_WEIGHT so they are still evaluated), with an evaluation every --eval-every steps.

Per visit (phase), from the run's eval.csv:
- area: the adaptation area, the mean held-out loss of the phase's source over its evaluations
  in (start, end] (the evaluation at the start belongs to the phase before);
- loss_k: its held-out loss k steps into the phase (--k-steps);
- forget_<s>: for every other source s visited before, s's held-out loss at this phase's end
  minus at the end of s's own last visit (nats; positive = forgotten).
Per run (trends): the slope per visit of area and loss_k, per source (against its visit number)
and overall (the cycle's mean over the K sources against the cycle number, complete cycles
only), from scipy.stats.linregress, with a 95% CI of slope ± t(0.975, n − 2) · stderr; the mean
forgetting; and the gap to the fresh reference (the same seed's BASELINE model trained from
initialisation on that source alone for one phase: one extra run per source and seed).
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats as scistats

from nemoe.errors import UserError
from tools.comparison.plan import FRESH
from tools.comparison.stats import ALPHA, t_quantile

TREND_VALUES = ("area", "loss_k")   # per-visit values whose slope per visit is a trend


# --------------------------------------------------------------------------- #
# Per visit
# --------------------------------------------------------------------------- #

def visit_rows(evals: pd.DataFrame, events: pd.DataFrame, phases: list[tuple[str, int, int]],
               k: int) -> list[dict]:
    """One row per phase: phase, cycle, visit, source, start, end, area, loss_k, end_loss_<s>,
    forget_<s>, events. phases: (source, start, end); evals: eval.csv (step, source, loss)."""
    loss = {s: f.set_index("step")["loss"] for s, f in evals.groupby("source")}
    order = list(dict.fromkeys(source for source, _, _ in phases))
    rows, last_end, visits = [], {}, {}
    for i, (source, start, end) in enumerate(phases, 1):
        curve = loss[source][(loss[source].index > start) & (loss[source].index <= end)]
        if end not in curve.index or start + k not in curve.index:
            raise UserError(f"eval.csv: no evaluation of {source} at step {start + k} or {end} (phase {i})")
        visits[source] = visits.get(source, 0) + 1
        row = {"phase": i, "cycle": (i - 1) // len(order) + 1, "visit": visits[source], "source": source,
               "start": start, "end": end, "area": float(curve.mean()), "loss_k": float(curve[start + k]),
               "events": int(((events["step"] > start) & (events["step"] <= end)).sum()),
               **{f"end_loss_{s}": float(c[end]) for s, c in loss.items()}}
        for other, until in last_end.items():
            if other != source:
                row[f"forget_{other}"] = float(loss[other][end] - loss[other][until])
        last_end[source] = end
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- #
# Per run: trends, forgetting, the gap to fresh
# --------------------------------------------------------------------------- #

def slope(x, y) -> dict:
    """Least-squares slope of y on x with its 95% CI (slope ± t(0.975, n − 2) · stderr; NaN below 3 points)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if not (math.isnan(float(a)) or math.isnan(float(b)))]
    out = {"slope": math.nan, "low": math.nan, "high": math.nan, "stderr": math.nan, "n": len(pairs)}
    if len(pairs) < 2 or len({a for a, _ in pairs}) < 2:
        return out
    fit = scistats.linregress([a for a, _ in pairs], [b for _, b in pairs])
    out["slope"] = float(fit.slope)
    if len(pairs) >= 3:
        half = t_quantile(1 - ALPHA / 2, len(pairs) - 2) * float(fit.stderr)
        out.update(low=out["slope"] - half, high=out["slope"] + half, stderr=float(fit.stderr))
    return out


def slope_columns(prefix: str, fit: dict) -> dict:
    return {prefix: fit["slope"], f"{prefix}_low": fit["low"], f"{prefix}_high": fit["high"],
            f"{prefix}_stderr": fit["stderr"], f"{prefix}_n": fit["n"]}


def run_trend(visits: pd.DataFrame, fresh: pd.DataFrame | None = None) -> dict:
    """One run's trends from its visit rows (visit_rows): slope_<value>_<source> (against the visit
    number) and slope_<value>_all (the mean over a complete cycle's sources against the cycle
    number), each with _low/_high/_stderr/_n; forget_mean_<source> and forget_mean_all (the mean
    of forget_<s> over the phases that have it); first and last cycle's mean area and loss_k;
    with `fresh` (that seed's fresh rows: source, area, loss_k) the last cycle's gap to it."""
    row, sources = {}, list(dict.fromkeys(visits["source"]))
    complete = visits.groupby("cycle").filter(lambda f: f["source"].nunique() == len(sources))
    per_cycle = complete.groupby("cycle")[list(TREND_VALUES)].mean()
    for value in TREND_VALUES:
        for source in sources:
            mine = visits[visits["source"] == source]
            row.update(slope_columns(f"slope_{value}_{source}", slope(mine["visit"], mine[value])))
        row.update(slope_columns(f"slope_{value}_all", slope(per_cycle.index, per_cycle[value])))
        if len(per_cycle):
            row[f"{value}_first"], row[f"{value}_last"] = float(per_cycle[value].iloc[0]), float(per_cycle[value].iloc[-1])
    cells = []
    for source in sources:
        column = visits[f"forget_{source}"] if f"forget_{source}" in visits else pd.Series(dtype=float)
        row[f"forget_mean_{source}"] = float(column.mean()) if column.notna().any() else math.nan
        cells += list(column.dropna())
    row["forget_mean_all"] = sum(cells) / len(cells) if cells else math.nan
    if fresh is not None and len(fresh) and len(complete):
        last = complete[complete["cycle"] == complete["cycle"].max()].set_index("source")
        ref = fresh.set_index("source")
        for value in TREND_VALUES:
            gaps = [last.loc[s, value] - ref.loc[s, value] for s in sources if s in ref.index]
            row[f"{value}_last_vs_fresh"] = float(sum(gaps) / len(gaps)) if len(gaps) == len(sources) else math.nan
    return row


def trends(results: pd.DataFrame) -> pd.DataFrame:
    """One row per arm run (strategy, seed, run, run_trend's columns); FRESH rows are the reference."""
    arms, fresh = results[results["strategy"] != FRESH], results[results["strategy"] == FRESH]
    rows = []
    for (strategy, seed, run), visits in arms.groupby(["strategy", "seed", "run"], sort=False):
        mine = fresh[fresh["seed"] == seed]
        rows.append({"strategy": strategy, "seed": seed, "run": run,
                     **run_trend(visits.sort_values("phase"), mine if len(mine) else None)})
    return pd.DataFrame(rows)
