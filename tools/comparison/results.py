"""Each run's numbers, read from the files it wrote (eval.csv, training_log.csv, events.csv,
config.yaml): final held-out losses, compute (training FLOPs, time, tokens/s), parameters, events, the data-order fingerprint,
and per phase of the shift protocol adaptation, recovery and forgetting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nemoe import schema
from nemoe.config import Config, config_from_dict
from nemoe.errors import UserError
from nemoe.flops import training_flops
from tools.csvlogs import layer_columns, read_eval, read_events, read_training_log
from tools.runfiles import read_run_config
from tools.comparison.committed import committed_costs, committed_eval, has_summary, read_rows, write_summary
from tools.comparison.cycles import visit_rows
from tools.comparison.plan import Plan, Run

FINGERPRINT_STEPS = 20   # optimizer steps of training batches hashed for the data-order check


def meta_model(cfg: Config):
    """The run's NemoeLM on the meta device: shapes only, no memory, no init cost."""
    import torch
    from nemoe.model import NemoeLM   # torch: only for a model's shapes; reading results needs none
    with torch.device("meta"):
        return NemoeLM(cfg)


def expert_size(cfg: Config) -> int:
    """Parameters of one expert of the run's model."""
    from nemoe.plasticity.growth import params_per_expert   # torch, as meta_model
    return params_per_expert(meta_model(cfg))


def param_counts(model, live_experts: float) -> dict[str, float]:
    """Parameters: allocated (every slot), active per token (top-k experts), live at the end
    (`live_experts` over all layers), as NemoeLM.count_params counts them."""
    counts = model.count_params(live_experts=round(live_experts))
    return {"params_total": counts["total"], "params_active": counts["active_per_token"],
            "params_live": counts["live"]}


def compute(model, cfg: Config, train_log: pd.DataFrame) -> dict[str, float]:
    """Training compute from the run's own training_log.csv: FLOPs (nemoe.flops: 6 N + 12 L T d per
    token, the experts live in each log interval from its experts_L columns), training time and
    tokens/s (elapsed_s: training only, evaluation and checkpoints excluded, summed over resumes)."""
    experts = layer_columns(train_log)
    rows = [(int(r["tokens"]), [int(r[c]) for c in experts]) for _, r in train_log.iterrows()]
    flops = training_flops(model, cfg.model.seq_len, rows, [cfg.moe.experts_init] * len(experts))
    last = train_log.iloc[-1]
    return {"flops": flops, "flops_per_token": flops / last["tokens"], "wall_s": float(last["elapsed_s"]),
            "tokens_per_s": float(last["tokens"] / last["elapsed_s"])}


def size_costs(train_log: pd.DataFrame) -> dict[str, float]:
    """What the run's expert pool cost, from training_log.csv: live-expert parameter-steps (the
    cumulative expert_param_steps of the last row), the optimizer-state peak (the largest
    optim_state_bytes of any row) and the peak resident memory (the largest rss_mb). NaN where
    the log predates the column."""
    def largest(column: str) -> float:
        return float(train_log[column].max()) if column in train_log and train_log[column].notna().any() \
            else math.nan
    return {"expert_param_steps": largest("expert_param_steps"),
            "optim_state_peak_bytes": largest("optim_state_bytes"), "rss_peak_mb": largest("rss_mb")}


def cost_log(cfg: Config, train_log: pd.DataFrame) -> pd.DataFrame:
    """step, elapsed_s and expert_param_steps at each log row. A log written before the
    expert_param_steps column gets it counted from each row's experts per layer over the steps
    since the previous row: exact for a pool that does not change (a static arm's); an evolving
    pool's changes inside an interval count at the row's end."""
    frame = train_log[["step", "elapsed_s"]].copy()
    if "expert_param_steps" in train_log and train_log["expert_param_steps"].notna().all():
        frame["expert_param_steps"] = train_log["expert_param_steps"].astype(float)
    else:
        live = train_log[layer_columns(train_log)].sum(axis=1)
        steps = train_log["step"].diff().fillna(train_log["step"])
        frame["expert_param_steps"] = (steps * live * expert_size(cfg)).cumsum().astype(float)
    return frame


def run_costs(out: Path, run: Run) -> pd.DataFrame:
    log_dir = run.paths(out).log_dir
    return cost_log(config_from_dict(read_run_config(log_dir)), read_training_log(log_dir / schema.TRAIN_CSV))


def run_results(out: Path, run: Run) -> dict:
    """One run's final numbers, read from its own eval.csv, training_log.csv, events.csv, config.yaml."""
    log_dir = run.paths(out).log_dir
    evals = read_eval(log_dir / schema.EVAL_CSV)
    final_step = int(evals["step"].max()) if len(evals) else -1
    if final_step != run.phases[-1].end:
        raise UserError(f"{log_dir / schema.EVAL_CSV}: last evaluation at step {final_step}, "
                        f"expected {run.phases[-1].end}")
    final = evals[evals["step"] == final_step]
    train_log = read_training_log(log_dir / schema.TRAIN_CSV)
    train = train_log.iloc[-1]
    events = read_events(log_dir / schema.EVENTS_CSV, granularity=None)
    cfg = config_from_dict(read_run_config(log_dir))
    row = {"strategy": run.strategy, "seed": run.seed, "run": run.name, "step": final_step,
           "tokens": int(final["tokens"].iloc[0])}
    row.update({f"loss_{r.source}": float(r.loss) for r in final.itertuples()})
    model = meta_model(cfg)
    row.update(compute(model, cfg, train_log))
    row.update(size_costs(train_log))
    row["expert_param_steps"] = float(cost_log(cfg, train_log)["expert_param_steps"].iloc[-1])
    row.update(param_counts(model, sum(train[c] for c in layer_columns(train_log))))
    row["events"] = len(events)
    for kind, count in events["granularity"].value_counts().items():
        row[f"events_{kind}"] = int(count)
    for (kind, name), count in events.groupby(["granularity", "event"]).size().items():
        row[event_column(kind, name)] = int(count)
    row["experts_trajectory"] = expert_trajectory(train_log, final_step)
    row["expert_events_by_layer"] = events_by_layer(events, len(layer_columns(train_log)))
    row["data_fingerprint"] = data_fingerprint(cfg)
    return row


def event_column(granularity: str, event: str) -> str:
    """results.csv's count of one event type in a run, e.g. `event_expert_split`."""
    return f"event_{granularity}_{event}"


TRAJECTORY_POINTS = 5    # experts per layer at each fifth of the run


def expert_trajectory(train_log: pd.DataFrame, total_steps: int, points: int = TRAJECTORY_POINTS) -> str:
    """Live experts per layer at `points` evenly spaced steps of the run, from training_log.csv's
    experts_L columns (the last logged row at or before each mark): "200: 4/4/4/4; 400: ..."."""
    layers = layer_columns(train_log)
    marks = {}
    for i in range(1, points + 1):
        logged = train_log[train_log["step"] <= total_steps * i // points]
        if len(logged) and layers:
            r = logged.iloc[-1]
            marks[int(r["step"])] = "/".join(str(int(r[c])) for c in layers)
    return "; ".join(f"{step}: {counts}" for step, counts in marks.items())


def events_by_layer(events: pd.DataFrame, n_layers: int) -> str:
    """Each expert event type's count per layer: "split 6/5/5/6; prune 1/0/0/2"."""
    expert = events[events["granularity"] == "expert"]
    return "; ".join(f"{name} " + "/".join(str(int((frame["layer"] == i).sum())) for i in range(n_layers))
                     for name, frame in expert.groupby("event", sort=False))


def heldout_sizes(cfg: Config) -> str:
    """Each source's evaluation set as a run builds it: "prose 76 documents, 32,896 tokens; ..."."""
    from nemoe.heldout import describe_heldout, heldout_sets   # torch, datasets: only for the report's sizes
    from nemoe.tokenizer import get_tokenizer
    return describe_heldout(heldout_sets(cfg.data, get_tokenizer(cfg.data.tokenizer), cfg.model.seq_len,
                                         cfg.eval.batches, cfg.eval.batch_size))


_fingerprints: dict[str, str] = {}


def data_fingerprint(cfg: Config, steps: int = FINGERPRINT_STEPS) -> str:
    """SHA-256 (16 hex digits) of the first `steps` optimizer steps of training batches this config reads.

    The stream is a function of the data section, seq_len, batch size and accumulation
    only, so equal keys share one computation.
    """
    key = json.dumps([dataclasses.asdict(cfg.data), cfg.model.seq_len, cfg.train.batch_size,
                      cfg.train.grad_accum, steps], sort_keys=True)
    if key not in _fingerprints:
        from nemoe.data import TokenStream   # torch, datasets: only when a fingerprint is computed
        from nemoe.tokenizer import get_tokenizer
        stream = TokenStream(cfg.data, get_tokenizer(cfg.data.tokenizer), cfg.model.seq_len)
        digest = hashlib.sha256()
        for _ in range(steps * cfg.train.grad_accum):
            digest.update(stream.next_batch(cfg.train.batch_size).numpy().tobytes())
        stream.close()
        _fingerprints[key] = digest.hexdigest()[:16]
    return _fingerprints[key]


def eval_curves(plan: Plan, runs: list[Run]) -> pd.DataFrame:
    """Every run's held-out losses: strategy, seed, step, tokens, source, loss, and what the run had
    spent by then, wall_s (training seconds) and expert_param_steps (committed ones from the study
    folder; NaN where the run's costs are not kept)."""
    frames = []
    for run in runs:
        if has_summary(plan.study, run):
            evals, costs = committed_eval(plan.study, run), committed_costs(plan.study, run)
        else:
            evals, costs = read_eval(run.paths(plan.out).log_dir / schema.EVAL_CSV), run_costs(plan.out, run)
        evals = evals.assign(strategy=run.strategy, seed=run.seed, **spent_at(evals["step"], costs))
        frames.append(evals[["strategy", "seed", "step", "tokens", "source", "loss", "wall_s", "expert_param_steps"]])
    return pd.concat(frames, ignore_index=True)


def spent_at(steps: pd.Series, costs: pd.DataFrame | None) -> dict[str, list[float]]:
    """Training seconds and live-expert parameter-steps at each of `steps`, interpolated between
    the log rows (both are cumulative and 0 at step 0; a log row every log.every_steps)."""
    spent = {}
    for name, column in (("wall_s", "elapsed_s"), ("expert_param_steps", "expert_param_steps")):
        if costs is None or column not in costs or costs[column].isna().all():
            spent[name] = [math.nan] * len(steps)
            continue
        known = costs[["step", column]].dropna().sort_values("step")
        spent[name] = np.interp(steps.to_numpy(float), [0.0, *known["step"]], [0.0, *known[column]]).tolist()
    return spent


def target_loss(results: pd.DataFrame, baseline: str | None) -> float:
    """The baseline's final held-out loss (all), mean over its seeds; NaN without such runs."""
    if baseline is None or "loss_all" not in results:
        return math.nan
    return float(results.loc[results["strategy"] == baseline, "loss_all"].mean())


def tokens_to_target(curves: pd.DataFrame, target: float) -> dict[tuple[str, int], float]:
    """(strategy, seed) -> tokens trained at the first evaluation whose held-out loss (all) is at or
    below `target` (NaN: never reached)."""
    mixed = curves[curves["source"] == "all"].sort_values("step")
    found = {}
    for (strategy, seed), frame in mixed.groupby(["strategy", "seed"], sort=False):
        hits = frame[frame["loss"] <= target]
        found[(strategy, int(seed))] = float(hits["tokens"].iloc[0]) if len(hits) else math.nan
    return found


def add_tokens_to_target(results: pd.DataFrame, curves: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """results with `tokens_to_target` (and `target_loss`, the loss it is measured against) per run."""
    target = target_loss(results, baseline)
    if math.isnan(target):
        return results
    found = tokens_to_target(curves, target)
    return results.assign(target_loss=target, tokens_to_target=[
        found.get((s, int(seed)), math.nan) for s, seed in zip(results["strategy"], results["seed"])])


# --------------------------------------------------------------------------- #
# Domain shift: per phase
# --------------------------------------------------------------------------- #

def first_within(curve: pd.Series, target: float, start: int) -> float:
    """Steps after `start` until the curve first gets to or below `target` (NaN: not in this phase)."""
    hits = curve[curve <= target]
    return float(hits.index[0] - start) if len(hits) else math.nan


def shift_metrics(evals: pd.DataFrame, events: pd.DataFrame, phases: list[tuple[str, int, int]],
                  within: float) -> list[dict]:
    """Per phase: held-out loss per source at the phase end (`end_loss_<source>`), adaptation,
    recovery, forgetting (relative), events. phases: (source, start, end)."""
    loss = {s: f.set_index("step")["loss"] for s, f in evals.groupby("source")}
    rows, trained_until = [], {}
    for i, (source, start, end) in enumerate(phases, 1):
        curve = loss[source][(loss[source].index > start) & (loss[source].index <= end)]
        row = {"phase": i, "source": source, "start": start, "end": end,
               "adapt_steps": first_within(curve, (1 + within) * loss[source][end], start),
               "events": int(((events["step"] > start) & (events["step"] <= end)).sum()),
               **{f"end_loss_{s}": curve_of[end] for s, curve_of in loss.items()}}
        if source in trained_until and phases[i - 2][0] != source:
            before = loss[source][trained_until[source]]
            row["recover_steps"] = first_within(curve, (1 + within) * before, start)
        for other, until in trained_until.items():
            if other != source:
                row[f"forget_{other}"] = loss[other][end] / loss[other][until] - 1
        trained_until[source] = end
        rows.append(row)
    return rows


def phase_logs(plan: Plan, run: Run) -> tuple[Path, pd.DataFrame, pd.DataFrame, list[tuple[str, int, int]]]:
    """A phased run's log folder, held-out evaluations, events of every granularity and
    (source, start step, end step) per phase."""
    log_dir = run.paths(plan.out).log_dir
    bounds, start = [], 0
    for phase in run.phases:
        bounds.append((phase.source, start, phase.end))
        start = phase.end
    return (log_dir, read_eval(log_dir / schema.EVAL_CSV),
            read_events(log_dir / schema.EVENTS_CSV, granularity=None), bounds)


def shift_results(plan: Plan, run: Run) -> list[dict]:
    """One row per phase of a shift run, with the run's own columns (strategy, seed, speed, ...)."""
    log_dir, evals, events, bounds = phase_logs(plan, run)
    missing = [end for _, _, end in bounds if end not in set(evals["step"])]
    if missing:
        raise UserError(f"{log_dir / schema.EVAL_CSV}: no evaluation at phase end(s) {missing}")
    base = run_results(plan.out, run)
    keep = {k: base[k] for k in ("strategy", "seed", "run", "tokens_per_s", "wall_s", "expert_param_steps",
                                 "optim_state_peak_bytes", "rss_peak_mb", "data_fingerprint")}
    return [{**keep, **row} for row in shift_metrics(evals, events, bounds, plan.within)]


def cycles_results(plan: Plan, run: Run) -> list[dict]:
    """One row per phase of a cycles run (or its fresh reference), with the run's own columns."""
    _, evals, events, bounds = phase_logs(plan, run)
    base = run_results(plan.out, run)
    keep = {k: base[k] for k in ("strategy", "seed", "run", "tokens_per_s", "wall_s", "data_fingerprint")}
    return [{**keep, **row} for row in visit_rows(evals, events, bounds, plan.k_steps)]


def rows_of(plan: Plan, run: Run) -> list[dict]:
    """A finished run's results rows, read from its run folder: one (grid) or one per phase (shift, cycles)."""
    if plan.protocol == "cycles":
        return cycles_results(plan, run)
    return shift_results(plan, run) if plan.protocol == "shift" else [run_results(plan.out, run)]


def collect(plan: Plan, failures: dict[str, str]) -> pd.DataFrame:
    """Results of every finished run: one row per run (grid) or per run and phase (shift, cycles; with
    the cycles protocol's fresh reference runs). A run summarised in the study folder is read from
    there; a finished one not yet there is added to it."""
    rows = []
    for run in plan.runs + plan.references:
        if run.name in failures:
            continue
        if has_summary(plan.study, run):
            rows += read_rows(plan.study, run)
            continue
        found = rows_of(plan, run)
        if plan.study is not None:
            write_summary(plan, run, found, run_costs(plan.out, run))
        rows += found
    if not rows:
        raise UserError("no run finished; see " + ", ".join(f"{n}: {w}" for n, w in failures.items()))
    frame = pd.DataFrame(rows)
    return frame.fillna({c: 0 for c in frame if c.startswith("event_")})   # a run without an event type had none
