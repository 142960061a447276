"""Planning a study's seeds before it runs (`tools/compare.py --plan`): how many seeds a two-sided
paired t-test at alpha 0.05 needs to detect a stated effect with 80% power (noncentral t), from
a pilot's sd of the paired differences, given (--pilot-sd) or read from a finished comparison
folder's results.csv (--from).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from nemoe.errors import UserError
from tools.comparison import declared as declared_mod
from tools.comparison.comparisons import pairs_to_compare
from tools.comparison.stats import ALPHA, POWER, paired_difference, power, sd_upper, seeds_needed

SHOWN_SEEDS = (3, 5, 8, 10)
LIMIT = 10_000


def plan_line(effect: float, sd: float) -> str:
    n = seeds_needed(effect, sd, limit=LIMIT)
    needed = f"{n} seeds" if n is not None else f"more than {LIMIT:,} seeds"
    shown = ", ".join(f"{k}: {power(effect, sd, k):.2f}" for k in SHOWN_SEEDS)
    return f"{needed} (power at {shown})"


def pilot_pairs(folder: Path) -> tuple[str, list[tuple[str, str, int, float]]]:
    """(metric, [(arm, baseline, n, sd of the paired differences)]) of a finished comparison: its
    declared primaries if it declared any, else every pair the report compares, on held-out all
    (cycles: on the slope of the adaptation area per visit, from trends.csv)."""
    path = folder / "results.csv"
    if not path.is_file():
        raise UserError(f"--from {folder}: no results.csv there (a finished tools/compare.py out or study folder)")
    results = pd.read_csv(path)
    if (folder / "trends.csv").is_file():   # the cycles protocol: its primary metric is per run
        results, metric = pd.read_csv(folder / "trends.csv"), "slope_area_all"
    elif "loss_all" in results:
        metric = "loss_all"
    elif "end_loss_all" in results:
        metric = "end_loss_all"
        results = results[results["phase"] == results["phase"].max()]
    else:
        raise UserError(f"{path}: no loss_all or end_loss_all column")
    recorded = declared_mod.load(folder) or declared_mod.Declaration()
    present = list(dict.fromkeys(results["strategy"]))
    pairs = recorded.primaries or pairs_to_compare(present, recorded)
    found = []
    for a, b in pairs:
        fa, fb = results[results["strategy"] == a], results[results["strategy"] == b]
        p = paired_difference(dict(zip(fa["seed"], fa[metric])), dict(zip(fb["seed"], fb[metric])))
        if p.n >= 2:
            found.append((a, b, p.n, p.sd))
    if not found:
        raise UserError(f"{path}: no pair of strategies with two or more common seeds")
    return metric, found


def plan_lines(effect: float, pilot_sd: float | None, folder: str | None) -> list[str]:
    if effect is None or not (math.isfinite(effect) and effect > 0):
        raise UserError("--plan needs --effect, the smallest difference worth detecting in nats, e.g. 0.02")
    if (pilot_sd is None) == (folder is None):
        raise UserError("--plan needs one of --pilot-sd SD (the paired differences' sd) or --from DIR")
    lines = [f"Seeds for a two-sided paired t-test at alpha {ALPHA:g} to detect a true mean difference of "
             f"{effect:g} nats with {POWER:.0%} power (noncentral t):"]
    if pilot_sd is not None:
        if not (math.isfinite(pilot_sd) and pilot_sd > 0):
            raise UserError("--pilot-sd must be a positive number (nats)")
        return lines + [f"  pilot sd {pilot_sd:g}: {plan_line(effect, pilot_sd)}"]
    metric, found = pilot_pairs(Path(folder))
    lines.append(f"  pilot: {folder}, held-out {metric}; the sd of a few seeds is itself uncertain, so each line "
                 f"also gives the seeds if the true sd is at the observed one's one-sided 80% upper bound")
    worst = 0
    for a, b, n, sd in found:
        if sd == 0:
            lines.append(f"  {a} − {b}: sd 0 over {n} seeds (identical differences): no estimate")
            continue
        upper = sd_upper(sd, n)
        at_upper = seeds_needed(effect, upper, limit=LIMIT)
        worst = max(worst, seeds_needed(effect, sd, limit=LIMIT) or LIMIT + 1)
        lines.append(f"  {a} − {b}: sd {sd:.4f} over {n} seeds -> {plan_line(effect, sd)}; "
                     f"at sd {upper:.4f} (80% upper bound): "
                     + (f"{at_upper} seeds" if at_upper else f"more than {LIMIT:,} seeds"))
    if worst:
        lines.append("  the largest, at the observed sds: "
                     + (f"{worst} seeds" if worst <= LIMIT else f"more than {LIMIT:,} seeds"))
    return lines
