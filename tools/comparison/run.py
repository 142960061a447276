"""Running a plan: each run is `train_nemoe.py` in a subprocess, phase by phase (with --resume
once the run has a checkpoint).

Rerunning the same command skips finished runs and resumes interrupted ones; a run
already in the out folder must have been made with the same settings. With a study folder
(--study) each run's summary is committed there as it finishes, and a run summarised
there is not run again (its run folder may be gone).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nemoe.config import config_changes
from nemoe.errors import UserError
from nemoe.schema import list_checkpoints
from tools.runfiles import read_run_config
from tools.comparison.committed import check_committed, has_summary, write_summary
from tools.comparison.plan import PHASED, Phase, Plan, Run, expected_config
from tools.comparison.results import rows_of

TRAINER = Path(__file__).resolve().parents[2] / "train_nemoe.py"


def newest_step(out: Path, run: Run) -> int:
    """The step of the run's newest checkpoint (0: none yet)."""
    found = list_checkpoints(run.paths(out).ckpt_dir)
    return found[0][0] if found else 0


def check_settings(plan: Plan, run: Run) -> None:
    """A run already in the out folder must have been made with this command's settings."""
    log_dir = run.paths(plan.out).log_dir
    saved = read_run_config(log_dir, required=False)
    if saved is None:
        return
    ignore = {"data.sources"} if plan.protocol in PHASED else set()  # changes phase by phase
    changes = [c for c in config_changes(saved, expected_config(plan, run).to_dict()) if c[0] not in ignore]
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:5])
        raise UserError(f"{log_dir} was made with other settings ({listed}); "
                        f"use another --out, or delete that run to redo it")


def trainer_command(plan: Plan, run: Run, phase: Phase, resume: bool = False) -> list[str]:
    """resume: the run has a checkpoint to continue from (--resume with none refuses to start a run
    beside the plan's other runs: it would look like a mistyped name)."""
    cmd = [sys.executable, str(TRAINER), "--config", plan.config, "--run-dir", str(plan.out),
           "--run-name", run.name] + (["--resume"] if resume else [])
    if plan.protocol in PHASED:
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
        started = newest_step(plan.out, run)
        if started >= phase.end:
            continue  # finished earlier: not repeated
        with open(console, "a", encoding="utf-8") as sink:
            done = subprocess.run(trainer_command(plan, run, phase, resume=started > 0), stdout=sink,
                                  stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        reached = newest_step(plan.out, run)
        if done.returncode != 0 or reached < phase.end:
            last = console.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
            return f"exit code {done.returncode} at step {reached} of {phase.end}: {last[0]} (see {console})"
    return None


def finished(plan: Plan, run: Run) -> bool:
    """Summarised in the study folder, or at its last step in the out folder."""
    return has_summary(plan.study, run) or newest_step(plan.out, run) >= run.phases[-1].end


def commit_finished(plan: Plan, run: Run) -> None:
    """Keep a finished run's summary in the study folder (once)."""
    if plan.study is not None and not has_summary(plan.study, run):
        write_summary(plan, run, rows_of(plan, run))


def execute_all(plan: Plan) -> dict[str, str]:
    """Run what is not finished, `plan.jobs` at a time; {run name: failure} for those that did not
    finish (with --rebuild nothing runs: those not finished are 'not run'). The cycles protocol's
    fresh reference runs come after the arms'."""
    runs = plan.runs + plan.references
    for run in runs:
        if has_summary(plan.study, run):
            check_committed(plan, run)
        else:
            check_settings(plan, run)
    todo = [r for r in runs if not finished(plan, r)]
    if plan.rebuild:
        print(f"{len(runs)} runs, {len(runs) - len(todo)} finished; rebuilding the report only",
              flush=True)
        return {r.name: "not run (--rebuild runs nothing)" for r in todo}
    where = f" (summaries kept in {plan.study})" if plan.study is not None else ""
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished earlier, {len(todo)} to run "
          f"({plan.jobs} at a time, {plan.threads} threads each) under {plan.out}{where}", flush=True)
    started = time.monotonic()

    def one(run: Run) -> tuple[str, str | None]:
        print(f"  start {run.name}", flush=True)
        began = time.monotonic()
        failure = execute(plan, run)
        if failure is None:
            commit_finished(plan, run)
        status = f"FAILED: {failure}" if failure else "done"
        now = time.monotonic()
        print(f"  {status:>6} {run.name} ({now - began:.0f} s; {now - started:.0f} s since the first start)",
              flush=True)
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
