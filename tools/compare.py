#!/usr/bin/env python
"""Does evolution help? Strategies x seeds on one config, judged on held-out loss.

    python tools/compare.py --config local.yaml                        # default grid, 3 seeds
    python tools/compare.py --config local.yaml --strategies static_moe,morph --seeds 5
    python tools/compare.py --config local.yaml --protocol shift --phases prose:300,code:300,prose:300
    python tools/compare.py --config study_cycles.yaml --protocol cycles --strategies static_moe,morph --seeds 5
    python tools/compare.py --config study.yaml --strategies dense,static_moe,static_max --seeds 5 \
        --primary static_moe-dense,static_max-dense,static_max-static_moe --margin 0.02 --study studies/gate
    python tools/compare.py --plan --pilot-sd 0.03 --effect 0.02          # seeds needed (also --from DIR)

Every run is `train_nemoe.py` (`--resume` once it has a checkpoint) in a subprocess under `--out` (default
compare/<config>[-shift]), so rerunning the same command skips finished runs and
resumes interrupted ones. Seed s sets train.seed, the run seed, for every strategy;
the seeds of the data mixture, the controller and each plasticity mechanism derive
from it. The same seed gives the same data order, token budget and
evaluation batches whatever the strategy (the report checks the data order).

grid:  per strategy, the final held-out loss per source and mixed (mean +- sd over
       seeds), training FLOPs, tokens/s, parameters; the paired comparisons (mean
       difference by seed, 95% t CI, paired t-test p); structural events per run by
       type and per layer, and each evolving run's experts per layer at fifths of the run.
shift: phase after phase on one source each (the others keep a weight of 1e-9 so
       every source is still evaluated); each source's held-out loss at each phase
       end, adaptation and recovery speed, forgetting and events per phase.
cycles: many shifts: the sources (--cycle, default the config's) visited in a fixed cycle
       --cycles-repeats times, --phase-steps each, an evaluation every --eval-every steps;
       per visit the adaptation area and the loss after --k-steps, their slope per visit
       (per run with its CI; paired across seeds between arms), forgetting, and a fresh
       reference run per source and seed (tools/comparison/cycles.py). Also writes
       trends.csv (one row per run) and adaptation.png.
Writes report.md, results.csv (one row per run, or per run and phase),
summary.csv (per strategy, then one row per comparison) and curves.png into the out folder
(grid: also cost.png, held-out loss against live-expert parameter-steps and training seconds).

Declared before running (kept in declared.json, in the study or out folder; a later command
uses the recorded declaration and refuses another): --primary ARM-BASELINE,... the primary
comparisons on held-out all (Holm-adjusted within them; only they get verdict words), and
--margin M (equivalence, TOST at +-M nats) or --noninferiority M (upper 95% bound below +M).
--study DIR keeps each finished run's summary and held-out curve (DIR/runs/<run>/), skips
runs summarised there and rebuilds the report from them (--rebuild: run nothing).

The parts live in tools/comparison/: plan (strategies, seeds, phases), run (the
trainer subprocesses), results (each run's numbers from its files), committed (the study
folder's rows), declared, comparisons, stats, seeds (--plan), report.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from nemoe.errors import UserError
from tools.cli import guard
from tools.comparison import declared
from tools.comparison.cycles_report import cycles_report
from tools.comparison.plan import STRATEGIES, Plan, build_plan
from tools.comparison.report import (cost_picture, curves_picture, data_order_consistent, grid_report,
                                     shift_report)
from tools.comparison.results import add_tokens_to_target, collect, eval_curves
from tools.comparison.run import execute_all, finished
from tools.comparison.seeds import plan_lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="local.yaml", help="NAME, configs/NAME or configs/NAME.yaml")
    p.add_argument("--protocol", choices=("grid", "shift", "cycles"), default="grid")
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated, from: {', '.join(STRATEGIES)} (default: every available one)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 0,5,7 (instead of --seeds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set train.total_tokens=200000 (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: CPU cores / 2; 1 on a GPU)")
    p.add_argument("--out", default=None, help="folder of the runs and the report (default compare/<config>; with --study, "
                        "compare/<study folder's name>)")
    p.add_argument("--phases", default=None, help="shift: SOURCE:STEPS,... (default: first:300,second:300,first:300)")
    p.add_argument("--within", type=float, default=0.05,
                   help="shift: 'within x of' threshold for adaptation and recovery (default 0.05 = 5%%)")
    y = p.add_argument_group("cycles protocol (--protocol cycles)")
    y.add_argument("--cycle", default=None, metavar="SRC,SRC,...", help="the sources in visiting order "
                   "(default: the config's)")
    y.add_argument("--phase-steps", type=int, default=60, help="steps per visit (default 60)")
    y.add_argument("--cycles-repeats", type=int, default=8,
                   help="times round the cycle (default 8: 32 phases with four sources)")
    y.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (default 10)")
    y.add_argument("--k-steps", type=int, default=20, help="the loss after k steps of a visit (default 20)")
    y.add_argument("--no-fresh", action="store_true", help="no fresh reference runs")
    d = p.add_argument_group("declared before running (recorded in declared.json)")
    d.add_argument("--primary", default=None, metavar="ARM-BASE,...",
                   help="primary comparisons, arm minus baseline on held-out all (cycles: on slope_area_all, "
                        "the slope of the adaptation area per visit), e.g. static_max-static_moe")
    d.add_argument("--margin", type=float, default=None, help="equivalence margin in nats (TOST at +-M)")
    p.add_argument("--target-baseline", default=None, metavar="STRATEGY",
                   help="tokens-to-target: the first evaluation at which a run reaches this strategy's final "
                        "held-out loss (mean over its seeds); default static_max when it runs")
    d.add_argument("--noninferiority", type=float, default=None, metavar="M",
                   help="non-inferiority margin in nats: the upper 95%% bound of arm - baseline below +M")
    c = p.add_argument_group("committed rows")
    c.add_argument("--study", default=None, metavar="DIR",
                   help="keep each finished run's summary.json and eval.csv in DIR/runs/<run> (commit them); "
                        "runs summarised there are skipped; the report is also written there")
    c.add_argument("--rebuild", action="store_true", help="run nothing: the report from the finished runs (exit code 1 if some are missing)")
    s = p.add_argument_group("planning seeds (--plan: prints, runs nothing)")
    s.add_argument("--plan", action="store_true", help="seeds needed to detect --effect at 80%% power")
    s.add_argument("--effect", type=float, default=None, help="the difference to detect, nats (e.g. 0.02)")
    s.add_argument("--pilot-sd", type=float, default=None, help="a pilot's sd of the paired differences")
    s.add_argument("--from", dest="pilot", default=None, metavar="DIR",
                   help="a finished comparison folder (results.csv) to read the pilot's paired sds from")
    return p.parse_args(argv)


def write_report(plan: Plan, results: pd.DataFrame, failures: dict[str, str]) -> str:
    """Write report.md, results.csv, summary.csv and curves.png into plan.out (and plan.study);
    the report's text. The protocol's report: grid and shift (tools/comparison/report.py) or
    cycles (cycles_report.py, which builds on report.py)."""
    if plan.protocol == "cycles":
        write = cycles_report
    else:
        write = grid_report if plan.protocol == "grid" else shift_report
    curves = eval_curves(plan, [r for r in plan.runs if r.name not in failures])
    if plan.protocol == "grid":
        results = add_tokens_to_target(results, curves, plan.target_baseline)
    text, summary = write(plan, results, failures)
    phases = plan.runs[0].phases
    title = f"held-out loss, {plan.config}"
    if plan.protocol == "shift":
        title += ": " + " → ".join(p.source for p in phases)
    elif plan.protocol == "cycles":
        title += f": {len(phases)} phases cycling " + " → ".join(dict.fromkeys(p.source for p in phases))
    sources = ["all"] + plan.sources if plan.protocol == "grid" else plan.sources
    for folder in dict.fromkeys(f for f in (plan.out, plan.study) if f is not None):
        folder.mkdir(parents=True, exist_ok=True)
        results.to_csv(folder / "results.csv", index=False)
        summary.to_csv(folder / "summary.csv", index=False)
        (folder / "report.md").write_text(text, encoding="utf-8")
        curves_picture(folder / "curves.png", curves, sources, title, [p.end for p in phases[:-1]])
        if plan.protocol == "grid":
            cost_picture(folder / "cost.png", curves, title)
    return text


# --------------------------------------------------------------------------- #
# Numbers
# --------------------------------------------------------------------------- #


@guard
def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        print("\n".join(plan_lines(args.effect, args.pilot_sd, args.pilot)))
        return 0
    plan = build_plan(args, argv)
    given = declared.from_args(args, list(dict.fromkeys(r.strategy for r in plan.runs)), plan.primary_metric,
                               plan.command)
    plan.out.mkdir(parents=True, exist_ok=True)
    plan.declared = declared.settle(plan.record_folder, given, [r.name for r in plan.runs if finished(plan, r)])
    for line in plan.notes:
        print(f"note: {line}", flush=True)
    failures = execute_all(plan)
    results = collect(plan, failures)
    text = write_report(plan, results, failures)
    print(text)
    where = plan.out if plan.study is None else f"{plan.out} and {plan.study}"
    extra = (", trends.csv, adaptation.png" if plan.protocol == "cycles" else
             ", cost.png" if (plan.out / "cost.png").is_file() else "")
    print(f"wrote report.md, results.csv, summary.csv, curves.png{extra} in {where}")
    if not data_order_consistent(results):
        raise UserError("the data order differs between strategies of one seed; see report.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
