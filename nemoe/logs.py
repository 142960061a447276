"""All run output in one place: training_log.txt, the CSV logs and the console.

Every text-log line starts with `[time] Step N |`, and every CSV row with its
step, so on resume everything after the restored step can be dropped and the
files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nemoe.files import atomic_write
from nemoe.schema import (CSV_LOGS, EVAL_COLUMNS, EVAL_CSV, EVENT_COLUMNS, EVENTS_CSV, LEGACY_EVENT_RENAMES,
                          STATE_COLUMNS, STATE_CSV, TEXT_LINE, TEXT_LOG, TRAIN_CSV, train_columns)


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest exact text: per-step losses compare bit for bit
    return str(value)


class CsvLog:
    """An append-only CSV file with a fixed header, flushed after every row."""

    def __init__(self, path: Path, columns: list[str], renames: dict[str, str] | None = None):
        """renames: old column name -> new, for a file written under an older header."""
        self.path, self.columns = path, columns
        if not path.exists() or path.stat().st_size == 0:
            atomic_write(path, ",".join(columns) + "\n")
        else:
            migrate_csv(path, columns, renames or {})
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore",
                                      lineterminator="\n")

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def migrate_csv(path: Path, columns: list[str], renames: dict[str, str]) -> bool:
    """Rewrite a CSV whose header is not `columns` (a run started by an older nemoe): old
    columns renamed, unknown ones dropped, missing ones empty. True when it was rewritten."""
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
        if header == columns:
            return False
        f.seek(0)
        rows = [{renames.get(k, k): v for k, v in row.items() if k not in renames.values()}
                for row in csv.DictReader(f)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, out.getvalue())
    return True


def truncate_csv(path: Path, last_step: int) -> int:
    """Keep the header and rows with step <= last_step (whole rows only); returns rows dropped."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    if not lines:
        return 0
    header = lines[0] if lines[0].endswith("\n") else lines[0] + "\n"
    width = len(next(csv.reader([header])))
    kept, dropped = [header], 0
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        complete = line.endswith("\n") and len(fields) == width
        if complete and fields[0].isdigit() and int(fields[0]) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write(path, "".join(kept))
    return dropped


def truncate_text_log(path: Path, last_step: int) -> int:
    """Drop text-log lines of steps after last_step (and a partial last line)."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.endswith("\n")
            and (m := TEXT_LINE.match(ln)) is not None and int(m.group(1)) <= last_step]
    atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


def start_line(runtime, params: dict, cfg, world: int, memory_note: str = "") -> str:
    """The text log's first line of a run (or of a resumed attempt): where and what it trains."""
    t = cfg.train
    ranks = (f" | data-parallel: {world} ranks x {t.grad_accum} micro-batches x {t.batch_size} "
             f"sequences" if runtime.dist.enabled else "")
    source = f" | initialised from {cfg.model.init_from}" if cfg.model.init_from else ""
    return (f"Start | device {runtime.device} | precision {runtime.precision} ({runtime.precision_reason})"
            f"{memory_note} | params {params['total']:,} total, {params['active_per_token']:,} active per "
            f"token | {cfg.tokens_per_step(world):,} tokens/step{ranks} | target {t.total_tokens:,} tokens "
            f"({cfg.total_steps(world):,} steps){source}")


def step_text(tokens: int, loss_ce: float, loss_lb: float | None, lr: float) -> str:
    """The part of a step's text line every training row and event shares."""
    lb = f" | LossLB {loss_lb:.4f}" if loss_lb is not None else ""
    return f"Tokens {tokens:,} | LossCE {loss_ce:.4f}{lb} | LR {lr:.2e}"


class RunLogger:
    """training_log.txt, training_log.csv, events.csv, eval.csv and the console."""

    def __init__(self, log_dir: Path, n_layers: int, console: str, total_tokens: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.write_failures = log_dir, 0
        self.train_csv = CsvLog(log_dir / TRAIN_CSV, train_columns(n_layers))
        self.events_csv = CsvLog(log_dir / EVENTS_CSV, EVENT_COLUMNS, LEGACY_EVENT_RENAMES)
        self.eval_csv = CsvLog(log_dir / EVAL_CSV, EVAL_COLUMNS)
        self.state_csv: CsvLog | None = None   # plasticity.csv, opened by the first state row
        self._text = open(log_dir / TEXT_LOG, "a", encoding="utf-8")
        use_rich = console == "rich" or (console == "auto" and sys.stdout.isatty())
        self.console = Console()
        self.progress = None
        if use_rich:
            self.progress = Progress(
                TextColumn("[bold]nemoe"), BarColumn(), TextColumn("{task.fields[tokens]}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("experts {task.fields[experts]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._task = self.progress.add_task("train", total=total_tokens, tokens="", loss="-",
                                                speed="-", experts="-")
            self.progress.start()

    @staticmethod
    def truncate_after(log_dir: Path, step: int) -> int:
        """On resume: drop every row and line after `step`; returns how many went."""
        dropped = 0
        for name in CSV_LOGS:
            dropped += truncate_csv(log_dir / name, step)
        return dropped + truncate_text_log(log_dir / TEXT_LOG, step)

    # -- writing ---------------------------------------------------------------- #
    def _guard(self, write, *args) -> None:
        """A failed log write (full disk, Drive hiccup) is reported, never fatal: training goes on."""
        try:
            write(*args)
        except OSError as err:
            self.write_failures += 1
            if self.write_failures == 1 or self.write_failures % 100 == 0:
                print(f"warning: cannot write the logs in {self.log_dir} ({err}); training goes on "
                      f"({self.write_failures} failed writes)", file=sys.stderr, flush=True)

    def _write_text(self, line: str) -> None:
        self._text.write(line + "\n")
        self._text.flush()

    def line(self, step: int, text: str, echo: bool = True) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        full = f"[{stamp}] Step {step} | {text}"
        self._guard(self._write_text, full)
        if echo:
            self.print(full)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def warn(self, step: int, text: str) -> None:
        self.line(step, f"Warning | {text}")

    def train_row(self, row: dict, summary: str, experts: str) -> None:
        self._guard(self.train_csv.write, row)
        self.line(row["step"], summary, echo=self.progress is None)
        if self.progress is not None:
            self.progress.update(self._task, completed=row["tokens"], tokens=f"{row['tokens']:,}",
                                 loss=f"{row['loss_ce']:.4f}", speed=f"{row['tokens_per_s']:,.0f}",
                                 experts=experts)

    def event_row(self, row: dict, text: str) -> None:
        self._guard(self.events_csv.write, row)
        self.line(row["step"], text)

    def eval_rows(self, rows: list[dict], text: str) -> None:
        for row in rows:
            self._guard(self.eval_csv.write, row)
        self.line(rows[0]["step"], text)

    def state_rows(self, rows: list[dict]) -> None:
        """Rows of plasticity.csv (per-unit state of the plasticity mechanisms)."""
        if self.state_csv is None:
            self.state_csv = CsvLog(self.log_dir / STATE_CSV, STATE_COLUMNS)
        for row in rows:
            self._guard(self.state_csv.write, row)

    @property
    def _csv_logs(self) -> list[CsvLog]:
        return [log for log in (self.train_csv, self.events_csv, self.eval_csv, self.state_csv) if log]

    def fsync(self) -> None:
        """Push every log to disk (before a checkpoint claims these steps are done). fsync only,
        no flush (each write flushes already): safe on the checkpoint writer's thread while the
        training thread goes on writing."""
        for fileno in [log._file.fileno for log in self._csv_logs] + [self._text.fileno]:
            try:
                os.fsync(fileno())
            except (OSError, ValueError):  # a full disk is reported by the writes; closed: nothing to do
                pass

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for log in self._csv_logs:
            log.close()
        self._text.close()


class NullLogger:
    """The logger of data-parallel ranks other than 0: rank 0 alone writes and prints."""

    write_failures = 0

    def line(self, step: int, text: str, echo: bool = True) -> None: ...
    def print(self, text: str) -> None: ...
    def warn(self, step: int, text: str) -> None: ...
    def train_row(self, row: dict, summary: str, experts: str) -> None: ...
    def event_row(self, row: dict, text: str) -> None: ...
    def eval_rows(self, rows: list[dict], text: str) -> None: ...
    def state_rows(self, rows: list[dict]) -> None: ...
    def fsync(self) -> None: ...
    def close(self) -> None: ...
