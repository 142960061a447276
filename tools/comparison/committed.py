"""Committed rows: a study's finished runs kept as small files in the repository, so a grid can
span sittings (and machines) and its report can be rebuilt without the run folders.

    studies/<name>/declared.json           what the study declared before it ran
    studies/<name>/runs/<run>/summary.json its results row(s), its resolved config, provenance
    studies/<name>/runs/<run>/eval.csv     its held-out curve (the run's eval.csv)
    studies/<name>/runs/<run>/costs.csv    what it had spent at each log row: step, training
                                           seconds, live-expert parameter-steps (COST_COLUMNS)

No checkpoints. A run with a summary here is not run again; the report reads its rows from here.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd

from nemoe import schema
from nemoe.config import config_changes
from nemoe.errors import UserError
from tools.csvlogs import read_eval
from tools.runfiles import read_run_config
from tools.comparison.plan import PHASED, Plan, Run, expected_config

SUMMARY_JSON = "summary.json"
COSTS_CSV = "costs.csv"
COST_COLUMNS = ["step", "elapsed_s", "expert_param_steps"]   # of training_log.csv
FORMAT = 1


def run_folder(study: Path, run: Run) -> Path:
    return study / "runs" / run.name


def has_summary(study: Path | None, run: Run) -> bool:
    return study is not None and (run_folder(study, run) / SUMMARY_JSON).is_file()


def _plain(value):
    """numpy and pandas scalars -> Python's, for json."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _commit() -> str:
    here = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def write_summary(plan: Plan, run: Run, rows: list[dict], costs: pd.DataFrame | None = None) -> None:
    """Keep a finished run's results rows, config, held-out curve and costs (results.cost_log) under plan.study."""
    folder = run_folder(plan.study, run)
    folder.mkdir(parents=True, exist_ok=True)
    log_dir = run.paths(plan.out).log_dir
    record = {"format": FORMAT, "run": run.name, "strategy": run.strategy, "seed": run.seed,
              "protocol": plan.protocol, "config_name": plan.config,
              "summarised_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "commit_at_summary": _commit(), "rows": rows, "config": read_run_config(log_dir)}
    shutil.copyfile(log_dir / schema.EVAL_CSV, folder / schema.EVAL_CSV)
    if costs is not None:
        costs[COST_COLUMNS].to_csv(folder / COSTS_CSV, index=False)
    tmp = folder / (SUMMARY_JSON + ".tmp")   # the summary last: its presence means the run is complete
    tmp.write_text(json.dumps(record, indent=1, default=_plain, allow_nan=True) + "\n", encoding="utf-8")
    tmp.replace(folder / SUMMARY_JSON)


def committed_costs(study: Path, run: Run) -> pd.DataFrame | None:
    """A committed run's costs.csv (None: summarised before the file was kept)."""
    path = run_folder(study, run) / COSTS_CSV
    return pd.read_csv(path) if path.is_file() else None


def read_summary(study: Path, run: Run) -> dict:
    path = run_folder(study, run) / SUMMARY_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    if record.get("format") != FORMAT or not record.get("rows"):
        raise UserError(f"{path}: not a run summary this version reads")
    return record


def read_rows(study: Path, run: Run) -> list[dict]:
    """The committed results rows of a run (NaN restored where JSON kept it; a run summarised before
    its log had expert_param_steps gets the count its costs.csv holds, when it has one)."""
    record = read_summary(study, run)
    rows = [{k: (math.nan if v is None else v) for k, v in row.items()} for row in record["rows"]]
    costs = committed_costs(study, run) if record["protocol"] == "grid" else None
    for row in rows:
        if costs is not None and math.isnan(row.get("expert_param_steps", math.nan)):
            row["expert_param_steps"] = float(costs["expert_param_steps"].iloc[-1])
    return rows


def inert(config: dict) -> set[str]:
    """Settings that do nothing in a run of this config: a committed run that differs from the
    command's only there is the same run (the bias step of a run balanced by the loss alone)."""
    return {"moe.bias_rate"} if config.get("moe", {}).get("balance", "aux_loss") == "aux_loss" else set()


# Settings that only observe training: when the held-out sets are evaluated (the evaluator never
# touches the training RNG and its passes count no expert usage, so a run trains the same way
# whatever eval.every_steps says; its held-out curve is sampled at other steps, and the final
# evaluation at the target is there in every run). A study can evaluate new arms more often
# than the committed runs it reuses (tests/test_compare.py checks the training is unchanged).
OBSERVING = {"eval.every_steps"}


def check_committed(plan: Plan, run: Run) -> None:
    """A committed run must have been made with this command's settings (as run.check_settings)."""
    record = read_summary(plan.study, run)
    if record["protocol"] != plan.protocol:
        raise UserError(f"{run_folder(plan.study, run)}: a {record['protocol']} run, this is a {plan.protocol}")
    expected = expected_config(plan, run).to_dict()
    ignore = (({"data.sources"} if plan.protocol in PHASED else set()) | (inert(record["config"]) & inert(expected))
              | OBSERVING)
    changes = [c for c in config_changes(record["config"], expected) if c[0] not in ignore]
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:5])
        raise UserError(f"{run_folder(plan.study, run)} was made with other settings ({listed}); "
                        f"use another --study, or delete that run's folder to redo it")


def committed_eval(study: Path, run: Run) -> pd.DataFrame:
    return read_eval(run_folder(study, run) / schema.EVAL_CSV)
