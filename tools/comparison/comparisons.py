"""The paired comparisons of a study: which pairs, their statistics, the primary family's Holm
adjustment and verdicts, and the report's table of them.

Pairs: the declared primaries (arm − baseline), then every strategy against plan.BASELINE and
the plan.EXTRA_PAIRS that ran (a default pair that is a primary reversed is left out). A
comparison is primary only on the declared metric (the shift protocol: at its last phase);
every other one is secondary: reported with its own, unadjusted p and no verdict word.
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd

from tools.comparison.declared import Declaration
from tools.comparison.plan import BASELINE, EXTRA_PAIRS
from tools.comparison.stats import Paired, difference_verdict, equivalence, holm, noninferiority, \
    paired_difference, tost_p

SECONDARY = "secondary, unadjusted"


def pairs_to_compare(present: list[str], declared: Declaration) -> list[tuple[str, str]]:
    pairs = list(declared.primaries)
    defaults = [(s, BASELINE) for s in present if s != BASELINE and BASELINE in present]
    defaults += [p for p in EXTRA_PAIRS if set(p) <= set(present)]
    for a, b in defaults:
        if (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    return pairs


def paired_columns(p: Paired) -> dict:
    return {"n_pairs": p.n, "diff": p.mean, "sd_diff": p.sd, "ci_low": p.low, "ci_high": p.high, "p": p.p}


def margin_test(p: Paired, d: Declaration) -> tuple[str, float]:
    """(verdict, p) of the declared margin's test for one primary comparison ('' if none declared)."""
    if d.margin is not None:
        return equivalence(p, d.margin), tost_p(p, d.margin)
    if d.noninferiority is not None:
        return noninferiority(p, d.noninferiority), p.one_sided_p(d.noninferiority, "less")
    return "", math.nan


def compare(results: pd.DataFrame, metrics: list[str], declared: Declaration, order: list[str],
            by: tuple[str, ...] = (), primary_where: dict | None = None) -> pd.DataFrame:
    """One row per pair, metric and value of the `by` columns (the shift protocol's phase):
    strategy (the arm), versus, metric, family, n_pairs, diff, sd_diff, ci_low, ci_high, p,
    and for primaries p_holm, verdict and the margin test (margin_verdict, margin_p)."""
    present = [s for s in order if s in set(results["strategy"])]
    rows = []
    groups = results.groupby(list(by), sort=True) if by else [((), results)]
    for keys, frame in groups:
        where = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        is_primary_group = where == (primary_where or {})
        for a, b in pairs_to_compare(present, declared):
            fa, fb = frame[frame["strategy"] == a], frame[frame["strategy"] == b]
            for metric in metrics:
                primary = is_primary_group and (a, b) in declared.primaries and metric == declared.metric
                if metric not in frame or (frame[metric].isna().all() and not primary):
                    continue
                p = paired_difference(dict(zip(fa["seed"], fa[metric])), dict(zip(fb["seed"], fb[metric])))
                row = {"strategy": a, **where, "versus": b, "metric": metric,
                       "family": "primary" if primary else SECONDARY, **paired_columns(p)}
                if primary:
                    row["margin_verdict"], row["margin_p"] = margin_test(p, declared)
                rows.append(row)
    # A declared primary whose runs are missing stays in the family (n 0, no p): Holm counts it.
    done = {(r["strategy"], r["versus"]) for r in rows if r["family"] == "primary"}
    for a, b in declared.primaries:
        if (a, b) not in done:
            rows.append({"strategy": a, **(primary_where or {}), "versus": b, "metric": declared.metric,
                         "family": "primary", **paired_columns(Paired(0, math.nan)),
                         "margin_verdict": "not run", "margin_p": math.nan})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    primary = frame["family"] == "primary"
    frame["p_holm"] = math.nan
    frame["verdict"] = SECONDARY
    if primary.any():
        frame.loc[primary, "p_holm"] = holm(list(frame.loc[primary, "p"]))
        frame.loc[primary, "verdict"] = [difference_verdict(d, q) if n else "not run" for d, q, n in
                                         zip(frame.loc[primary, "diff"], frame.loc[primary, "p_holm"],
                                             frame.loc[primary, "n_pairs"])]
    return frame.sort_values("family", kind="stable", key=lambda f: f != "primary").reset_index(drop=True)


def of(comparisons: pd.DataFrame, strategy: str, versus: str, metric: str, **where) -> pd.Series | None:
    """The comparison row of one pair and metric (None if not compared)."""
    if comparisons.empty:
        return None
    hit = comparisons[(comparisons["strategy"] == strategy) & (comparisons["versus"] == versus)
                      & (comparisons["metric"] == metric)]
    for column, value in where.items():
        hit = hit[hit[column] == value]
    return hit.iloc[0] if len(hit) else None


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #

def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_diff(row: pd.Series, digits: int = 4) -> str:
    """'+0.0123 [−0.0100, +0.0346]' (mean and 95% CI; mean alone for one seed)."""
    if row is None or math.isnan(row["diff"]):
        return "—"
    ci = "" if row["n_pairs"] < 2 else f" [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"
    return f"{row['diff']:+.{digits}f}{ci}"


def comparison_lines(comparisons: pd.DataFrame, declared: Declaration, what: Callable[[pd.Series], str],
                     digits: Callable[[str], int] = lambda metric: 4) -> list[str]:
    """The report's 'Paired comparisons' section: primaries first, then the secondary ones."""
    lines = ["## Paired comparisons (arm − baseline, paired by seed)", "",
             "Δ: mean of the per-seed differences with its 95% Student-t CI; p: two-sided paired t-test "
             "(H0: Δ = 0). Primary rows (declared before running) carry the Holm-adjusted p over the "
             "primary family and the only verdict words: better/worse at Holm p < 0.05, and the declared "
             "margin's test. Secondary rows are unadjusted and carry no verdict: a small p among many "
             "secondary comparisons is weak evidence.", ""]
    if comparisons.empty:
        return lines + ["(no pairs to compare)", ""]
    margin = ("equivalence ±" + f"{declared.margin:g}" if declared.margin is not None else
              "non-inferiority +" + f"{declared.noninferiority:g}" if declared.noninferiority is not None else None)
    head = ["comparison", "family", "n", "Δ [95% CI]", "p", "Holm p", "verdict"]
    if margin:
        head += [f"{margin} (its p)"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, r in comparisons.iterrows():
        cells = [f"{r['strategy']} − {r['versus']}, {what(r)}", r["family"], str(int(r["n_pairs"])),
                 fmt_diff(r, digits(r["metric"])), fmt_p(r["p"]), fmt_p(r["p_holm"]),
                 f"**{r['verdict']}**" if r["family"] == "primary" else "—"]
        if margin:
            cells.append(f"{r['margin_verdict']} (p {fmt_p(r['margin_p'])})" if r["family"] == "primary" else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
