#!/usr/bin/env python
"""Does evolution help? Strategies x seeds on one config, judged on held-out loss.

    python tools/compare.py --config local.yaml                        # default grid, 3 seeds
    python tools/compare.py --config local.yaml --strategies static_moe,morph --seeds 5
    python tools/compare.py --config local.yaml --protocol shift --phases prose:300,code:300,prose:300

Every run is `train_nemoe.py --resume` in a subprocess under `--out` (default
compare/<config>[-shift]), so rerunning the same command skips finished runs and
resumes interrupted ones. Seed s sets train.seed, the run seed, for every strategy;
the seeds of the data mixture, the controller and each plasticity mechanism derive
from it. The same seed gives the same data order, token budget and
evaluation batches whatever the strategy (the report checks the data order).

grid:  per strategy, the final held-out loss per source and mixed (mean +- sd over
       seeds), the paired difference to static_moe with a 95% confidence interval
       (Student t, paired by seed) and the smallest difference the design could detect,
       training FLOPs, tokens/s, parameters; structural events per run by type and
       per layer, and each evolving run's experts per layer at fifths of the run.
shift: phase after phase on one source each (the others keep a weight of 1e-9 so
       every source is still evaluated); each source's held-out loss at each phase
       end, adaptation and recovery speed, forgetting and events per phase.
Writes report.md, results.csv (one row per run, or per run and phase),
summary.csv (per strategy) and curves.png into the out folder.

The parts live in tools/comparison/: plan (strategies, seeds, phases), run (the
trainer subprocesses), results (each run's numbers from its files), stats, report.
"""

from __future__ import annotations

import argparse
import sys

from nemoe.errors import UserError
from tools._common import guard
from tools.comparison.plan import STRATEGIES, build_plan
from tools.comparison.report import data_order_consistent, write_report
from tools.comparison.results import collect
from tools.comparison.run import execute_all


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


@guard
def main(argv=None):
    args = parse_args(argv)
    plan = build_plan(args, argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    for line in plan.notes:
        print(f"note: {line}", flush=True)
    failures = execute_all(plan)
    results = collect(plan, failures)
    text = write_report(plan, results, failures)
    print(text)
    print(f"wrote {plan.out / 'report.md'}, results.csv, summary.csv, curves.png")
    if not data_order_consistent(results):
        raise UserError("the data order differs between strategies of one seed; see report.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
