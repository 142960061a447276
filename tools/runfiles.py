"""Finding a run's files: its log folder from what the user typed, a CSV log in it, its config.

Every tool reads files a run wrote (DESIGN §8, README "What a run writes") and
nothing else: no trainer internals. File names, columns, checkpoint names and the
run layout come from nemoe.schema, as the trainer's do. The CSV logs are read by
tools/csvlogs.py, checkpoints by tools/checkpoints.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nemoe import schema
from nemoe.errors import UserError


def is_log_dir(path: Path) -> bool:
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
    if is_log_dir(path):
        return path
    logs = path / schema.LOGS_DIR
    if logs.is_dir():
        runs = sorted(p for p in logs.iterdir() if is_log_dir(p))
        if len(runs) == 1:
            return runs[0]
        if runs:
            raise UserError(f"{logs} holds several runs; name one: " + ", ".join(str(r) for r in runs))
    if path.parent.name == schema.CHECKPOINTS_DIR:
        log_dir = schema.RunPaths(path.parent.parent, path.name).log_dir
        if is_log_dir(log_dir):
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
