"""Shared reading code for the tools: find a run, read its CSV logs, report errors.

Every tool reads files a run wrote (DESIGN §8, README "What a run writes") and
nothing else: no trainer internals. File names, columns, checkpoint names and the
run layout come from nemoe.schema, as the trainer's do. The CSV readers here
tolerate a run that is still writing (a partial last line is skipped with a note)
and a run that was resumed (rows of a replaced timeline are dropped, each step
kept once, in order), and read logs in legacy column names as today's.
A problem the user can fix raises `UserError`; `guard` turns it into one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from nemoe import schema
from nemoe.errors import UserError

# Colours and markers of expert events (events.csv `event` of granularity expert),
# shared by every plot so they read the same.
EVENT_STYLE = {
    "split": {"marker": "^", "color": "tab:green", "label": "split"},
    "crossover": {"marker": "*", "color": "tab:purple", "label": "crossover"},
    "prune": {"marker": "v", "color": "tab:red", "label": "prune"},
    "failed_probation": {"marker": "X", "color": "tab:orange", "label": "failed probation"},
}


# --------------------------------------------------------------------------- #
# Errors and notes
# --------------------------------------------------------------------------- #

def note(text: str) -> None:
    """A one-line remark on stderr (stdout stays the tool's output)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def guard(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a tool's main: UserError -> 'error: ...' on stderr and its exit code."""
    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return err.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `tool | head`: the reader went away
            return 0
    return wrapped


# --------------------------------------------------------------------------- #
# Finding a run
# --------------------------------------------------------------------------- #

def _is_log_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (schema.TRAIN_CSV, schema.EVENTS_CSV))


def find_log_dir(arg: str | Path) -> Path:
    """The log folder `<run-dir>/logs/<run-name>` named by `arg`.

    Also accepted: a run dir whose `logs/` holds exactly one run, and a run's
    checkpoint folder `<run-dir>/checkpoints/<run-name>`.
    """
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a run's log folder, "
                        f"e.g. logs/<run-name>)")
    if path.is_file():
        raise UserError(f"{path}: is a file; expected a run's log folder, e.g. logs/<run-name>")
    if _is_log_dir(path):
        return path
    logs = path / schema.LOGS_DIR
    if logs.is_dir():
        runs = sorted(p for p in logs.iterdir() if _is_log_dir(p))
        if len(runs) == 1:
            return runs[0]
        if runs:
            raise UserError(f"{logs} holds several runs; name one: " + ", ".join(str(r) for r in runs))
    if path.parent.name == schema.CHECKPOINTS_DIR:
        log_dir = schema.RunPaths(path.parent.parent, path.name).log_dir
        if _is_log_dir(log_dir):
            return log_dir
    raise UserError(f"{path}: no {schema.TRAIN_CSV} or {schema.EVENTS_CSV} here; expected a run's log "
                    f"folder <run-dir>/{schema.LOGS_DIR}/<run-name>")


def run_csv(arg: str | Path, name: str) -> tuple[Path, Path]:
    """(csv path, log folder) for an argument that is a run's log folder or one of its CSV files."""
    path = Path(arg).expanduser()
    if path.suffix == ".csv":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return path, path.parent
    log_dir = find_log_dir(path)
    return log_dir / name, log_dir


def read_run_config(log_dir: Path, required: bool = True) -> dict | None:
    """The run's resolved config (config.yaml in the log folder) as nested dicts."""
    path = log_dir / schema.CONFIG_YAML
    if not path.is_file():
        if required:
            raise UserError(f"{path}: missing (every run writes its resolved config there)")
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections")
    return raw


# --------------------------------------------------------------------------- #
# Reading CSV logs
# --------------------------------------------------------------------------- #

def read_log_csv(path: Path, required: list[str], numeric: list[str], *,
                 allow_empty: bool = False, renames: dict[str, str] | None = None) -> pd.DataFrame:
    """Read one of a run's CSV logs, tolerating a run that is still writing it.

    Only whole rows count: a last line without its newline (the writer is mid-row)
    or a row with the wrong number of fields is skipped with a note. Raises
    UserError for a missing or empty file, missing columns or non-numeric values.
    `allow_empty`: a header without rows is a valid, empty log (events.csv of a run
    without events yet); otherwise it is an error. `renames`: {old: new} column
    names of logs written before a rename (schema.LEGACY_EVENT_RENAMES); in such a
    log, a column already named like a new one held something else and is dropped.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].strip():
        raise UserError(f"{path}: empty file (no header row); is the run writing it yet?")
    header = _current_names(next(csv.reader([lines[0]])), renames or {})
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: not a nemoe log, missing column(s) {', '.join(missing)}")
    rows = _complete_rows(path, lines[1:], len(header))
    if not rows and not allow_empty:
        raise UserError(f"{path}: no complete rows yet (the run has not logged anything)")
    frame = pd.read_csv(io.StringIO(lines[0] + "".join(rows)), header=0, names=header, dtype=str,
                        keep_default_na=False)
    frame = frame.drop(columns=[c for c in header if c.startswith(_SUPERSEDED)])
    return _parse_numbers(frame, numeric, path)


_SUPERSEDED = "(superseded) "


def _current_names(header: list[str], renames: dict[str, str]) -> list[str]:
    """The header in today's names: old names renamed; a legacy column that bears a
    name the renames give to another one is marked _SUPERSEDED (and then dropped)."""
    if not any(old in header for old in renames):
        return header
    return [_SUPERSEDED + c if c in renames.values() else renames.get(c, c) for c in header]


def _complete_rows(path: Path, lines: list[str], n_fields: int) -> list[str]:
    """The data lines that are whole rows: a note for a partial last line or malformed rows."""
    kept, partial, malformed = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        if not line.endswith("\n"):
            partial += 1           # only ever the last line: a row being written
            continue
        if len(next(csv.reader([line]), [])) != n_fields:
            malformed += 1
            continue
        kept.append(line)
    if partial:
        note(f"{path.name}: skipped a partial last line (a run still writing?)")
    if malformed:
        note(f"{path.name}: skipped {malformed} malformed row(s)")
    return kept


def _parse_numbers(frame: pd.DataFrame, numeric: list[str], path: Path) -> pd.DataFrame:
    """`numeric` columns as floats ('' and nan: NaN); UserError naming the first other value."""
    for column in numeric:
        if column not in frame.columns:
            continue
        values = pd.to_numeric(frame[column].replace("", "nan"), errors="coerce")
        bad = frame[column][values.isna() & ~frame[column].isin(["", "nan", "NaN"])]
        if len(bad):
            raise UserError(f"{path}: column {column!r} has a non-numeric value {bad.iloc[0]!r} "
                            f"(row {bad.index[0] + 2})")
        frame[column] = values
    return frame


def one_timeline(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Rows of the run's final timeline: each `key` once (the last written), sorted by step.

    A run that restarts from an earlier checkpoint and appends (instead of the
    trainer truncating its logs) writes rows whose step goes back; everything the
    old timeline wrote from that step on is superseded by the new one.
    """
    if frame.empty:
        return frame
    steps = frame["step"].to_numpy()
    keep = [True] * len(frame)
    for i in range(1, len(steps)):
        if steps[i] < steps[i - 1]:      # a restart: drop earlier rows at or after steps[i]
            for j in range(i):
                if steps[j] >= steps[i]:
                    keep[j] = False
    frame = frame[keep]
    frame = frame.drop_duplicates(subset=key, keep="last")
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def read_training_log(path: Path) -> pd.DataFrame:
    """training_log.csv: one row per step, in order; at least one row."""
    frame = read_log_csv(path, ["step", "tokens", "loss_ce"], schema.TRAIN_NUMERIC)
    for prefix in schema.LAYER_COLUMNS:
        for column in layer_columns(frame, prefix):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame.dropna(subset=["step"])
    frame["step"] = frame["step"].astype(int)
    return one_timeline(frame, ["step"])


def read_events(path: Path, required: bool = False, granularity: str | None = "expert") -> pd.DataFrame:
    """events.csv (possibly without rows) in schema.EVENT_COLUMNS; a missing file is an empty log unless `required`.

    `granularity`: keep only events of that kind (expert, neuron, head, layer); None keeps all.
    Logs in the legacy columns (`action`, `usage`) read as today's (`event`, `value`);
    logs written before the `granularity` column existed hold expert events only.
    """
    if not path.is_file() and not required:
        return pd.DataFrame(columns=schema.EVENT_COLUMNS)
    frame = read_log_csv(path, ["step", "layer", "event", "expert"], schema.EVENT_NUMERIC,
                         allow_empty=True, renames=schema.LEGACY_EVENT_RENAMES)
    for column in ("step", "layer", "expert"):
        frame[column] = frame[column].astype(int)
    if "granularity" not in frame.columns:
        frame["granularity"] = "expert"
    frame["granularity"] = frame["granularity"].fillna("expert").replace("", "expert")
    if "unit" not in frame.columns:
        frame["unit"] = ""
    frame["unit"] = frame["unit"].fillna("").astype(str)
    frame = one_timeline(frame, ["step", "granularity", "layer", "event", "expert", "unit"])
    if granularity is not None:
        frame = frame[frame["granularity"] == granularity].reset_index(drop=True)
    return frame


def read_eval(path: Path) -> pd.DataFrame:
    """eval.csv (possibly without rows, empty when missing): held-out loss per source."""
    if not path.is_file():
        return pd.DataFrame(columns=schema.EVAL_COLUMNS)
    frame = read_log_csv(path, ["step", "source", "loss"], schema.EVAL_NUMERIC, allow_empty=True)
    frame["step"] = frame["step"].astype(int)
    return one_timeline(frame, ["step", "source"])


def read_state(path: Path) -> pd.DataFrame:
    """plasticity.csv (schema.STATE_COLUMNS, long format), at least one row; step and layer as ints."""
    frame = read_log_csv(path, schema.STATE_COLUMNS, schema.STATE_NUMERIC)
    frame = frame.dropna(subset=["step", "layer"])
    return frame.astype({"step": int, "layer": int})


def latest_step(*frames: pd.DataFrame) -> tuple[int, int]:
    """(step, tokens) of the newest row in any of the logs.

    training_log.csv gets a row every `log.every_steps` only, while eval.csv and
    events.csv may be written at a later step (the run's final evaluation).
    """
    best = (0, 0)
    for frame in frames:
        if len(frame):
            row = frame.loc[frame["step"].idxmax()]
            tokens = int(row["tokens"]) if "tokens" in frame and pd.notna(row["tokens"]) else 0
            best = max(best, (int(row["step"]), tokens))
    return best


def layer_columns(frame: pd.DataFrame, prefix: str = "experts") -> list[str]:
    """`experts_L0, experts_L1, ...` (schema.layer_column) in layer order."""
    columns = []
    while (column := schema.layer_column(prefix, len(columns))) in frame.columns:
        columns.append(column)
    return columns


def parent_ids(text) -> list[int]:
    """events.csv `parents`: space-separated expert ids ('' when none)."""
    return [int(p) for p in str(text).split() if p.lstrip("-").isdigit()]


# --------------------------------------------------------------------------- #
# Plot helpers
# --------------------------------------------------------------------------- #

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; works without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str | Path) -> Path:
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {out}: {err}") from None
    print(f"wrote {out}")
    return out


def steps_to_tokens(train: pd.DataFrame):
    """(step -> tokens, tokens -> step) from the training log, for a second x axis.

    Piecewise linear through the logged (step, tokens) pairs and through (0, 0), so
    a run whose batch size changed on resume still maps right; extended linearly
    past the last row (matplotlib asks for values outside the data range).
    """
    import numpy as np
    rows = train[train["step"] > 0]
    steps = np.concatenate([[0.0], rows["step"].to_numpy(dtype=float)])
    tokens = np.concatenate([[0.0], rows["tokens"].to_numpy(dtype=float)])
    ratio = tokens[-1] / steps[-1] if steps[-1] > 0 else 1.0

    def forward(s):
        s = np.asarray(s, dtype=float)
        return np.where(s > steps[-1], tokens[-1] + (s - steps[-1]) * ratio,
                        np.where(s < 0, s * ratio, np.interp(s, steps, tokens)))

    def inverse(t):
        t = np.asarray(t, dtype=float)
        return np.where(t > tokens[-1], steps[-1] + (t - tokens[-1]) / ratio,
                        np.where(t < 0, t / ratio, np.interp(t, tokens, steps)))
    return forward, inverse


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"


# --------------------------------------------------------------------------- #
# Checkpoints -> a model (generate, evaluate)
# --------------------------------------------------------------------------- #

CHECKPOINT_FILES = schema.checkpoint_name("<N>")  # type: ignore[arg-type]  # in messages

def resolve_device(name: str):
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`, `mps`."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def checkpoint_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's argument parser that starts with the CHECKPOINT argument."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help=f"{CHECKPOINT_FILES}, a run's checkpoint/log folder (newest checkpoint), or a folder "
                        f"written by tools/export_hf.py --format nemoe")
    return p


def load_checkpoint_state(arg: str | Path) -> tuple[Path, dict]:
    """(path, state) of a checkpoint file, or of the newest loadable one in a folder.

    A folder may be `<run-dir>/checkpoints/<run-name>` or the run's log folder
    `<run-dir>/logs/<run-name>`.
    """
    from nemoe import checkpoint as ckpt

    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a checkpoint "
                        f"<run-dir>/{schema.CHECKPOINTS_DIR}/<run-name>/{CHECKPOINT_FILES})")
    if path.is_file():
        # torch.save writes a zip archive; anything else (a YAML file, a truncated
        # download) gets a plain message instead of torch's unpickling advice.
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not a nemoe checkpoint (not a complete file written by "
                            f"torch.save: truncated, or another kind of file)")
        return path, ckpt.load_checkpoint(path)
    folder = path
    if not schema.list_checkpoints(folder) and _is_log_dir(folder):
        folder = schema.RunPaths.from_log_dir(folder).ckpt_dir
    if not schema.list_checkpoints(folder):
        raise UserError(f"{path}: no {CHECKPOINT_FILES} checkpoints here")
    found = ckpt.load_latest(folder, warn=note)
    if found is None:
        raise UserError(f"{folder}: none of its checkpoints could be loaded")
    return found


def load_model(arg: str | Path, device_name: str = "auto"):
    """(model in eval mode on its device, Config, checkpoint state, path) from a checkpoint.

    The model is built from the checkpoint's own config, so any expert topology
    (live slots, routing offsets) loads exactly as it was saved. A folder written by
    tools/export_hf.py --format nemoe (safetensors + JSON) loads without pickle; its
    `state` holds what the tools read: step, tokens, config and the expert records.
    """
    from nemoe.config import config_from_dict
    from nemoe.model import NemoeLM
    from nemoe.pretrained import is_nemoe_folder, read_nemoe

    if is_nemoe_folder(Path(arg).expanduser()):
        path = Path(arg).expanduser()
        meta, weights = read_nemoe(path)
        state = {"step": meta["step"], "tokens": meta["tokens"], "config": meta["config"],
                 "ranks": [{"plasticity": {"experts": {"records": meta["expert_records"]}}}]}
    else:
        path, state = load_checkpoint_state(arg)
        weights = state["train_module"]["model"]
    device = resolve_device(device_name)
    try:
        cfg = config_from_dict(state["config"])
    except UserError as err:
        raise UserError(f"{path}: its saved config no longer validates: {err}") from None
    model = NemoeLM(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match the model its config describes: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, state, path
