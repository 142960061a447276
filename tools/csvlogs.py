"""Reading a run's CSV logs (training_log.csv, events.csv, eval.csv, plasticity.csv) as tables.

The readers tolerate a run that is still writing (a partial last line is skipped
with a note) and a run that was resumed (rows of a replaced timeline are dropped,
each step kept once, in order), and read logs in legacy column names as today's.
Columns come from nemoe.schema, as the trainer's do; a file the user can fix
raises `UserError`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from nemoe import schema
from nemoe.errors import UserError
from tools.cli import note


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
