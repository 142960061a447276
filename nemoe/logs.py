"""All run output in one place: training_log.txt, the CSV logs, TensorBoard and the console.

Every text-log line starts with `[time] Step N |`, and every CSV row with its
step, so on resume everything after the restored step can be dropped and the
files read as one uninterrupted run; TensorBoard's event files are cut back the
same way (nemoe/tensorboard_log.py). Nothing here runs per step: rows at log
intervals, events, evaluations, and a flush before each checkpoint.
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

from nemoe.config import dump_config
from nemoe.files import atomic_write
from nemoe.schedule import every
from nemoe.schema import (CSV_LOGS, EVAL_COLUMNS, EVAL_CSV, EVENT_COLUMNS, EVENTS_CSV, LEGACY_EVENT_RENAMES,
                          STATE_COLUMNS, STATE_CSV, TENSORBOARD_DIR, TEXT_LINE, TEXT_LOG, TRAIN_CSV,
                          train_columns)


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


def start_line(runtime, params: dict, cfg, world: int, memory_note: str = "", stop_step: int | None = None) -> str:
    """The text log's first line of a run (or of a resumed attempt): where and what it trains.
    stop_step: where this process stops (--max-steps), when that is before the target."""
    t = cfg.train
    ranks = (f" | data-parallel: {world} ranks x {t.grad_accum} micro-batches x {t.batch_size} "
             f"sequences" if runtime.dist.enabled else "")
    source = f" | initialised from {cfg.model.init_from}" if cfg.model.init_from else ""
    total = cfg.total_steps(world)
    cap = (f" | stops at step {stop_step:,} ({stop_step * cfg.tokens_per_step(world):,} tokens, --max-steps); "
           f"the LR schedule still spans the target" if stop_step is not None and stop_step < total else "")
    return (f"Start | device {runtime.device} | precision {runtime.precision} ({runtime.precision_reason})"
            f"{memory_note} | params {params['total']:,} total, {params['active_per_token']:,} active per "
            f"token | {cfg.tokens_per_step(world):,} tokens/step{ranks} | target {t.total_tokens:,} tokens "
            f"({total:,} steps){cap}{source}")


class RunLogger:
    """training_log.txt, training_log.csv, events.csv, eval.csv, plasticity.csv, TensorBoard
    (log.tensorboard) and the console.

    `start_step`: the step the run starts or resumes at; `target_tokens`: where it stops
    (the progress bar's total and the ETA's aim).
    """

    def __init__(self, log_dir: Path, cfg, start_step: int, target_tokens: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.write_failures = log_dir, 0
        self.train_csv = CsvLog(log_dir / TRAIN_CSV, train_columns(cfg.model.n_layers))
        self.events_csv = CsvLog(log_dir / EVENTS_CSV, EVENT_COLUMNS, LEGACY_EVENT_RENAMES)
        self.eval_csv = CsvLog(log_dir / EVAL_CSV, EVAL_COLUMNS)
        self.state_csv: CsvLog | None = None   # plasticity.csv, opened by the first state row
        self._text = open(log_dir / TEXT_LOG, "a", encoding="utf-8")
        self.target_tokens, self.last_step = target_tokens, start_step
        self.every_steps = cfg.log.every_steps
        self._last_row: tuple[float, int] | None = None   # (time, tokens) of the last training row
        self.tensorboard = self._open_tensorboard(cfg, start_step) if cfg.log.tensorboard else None
        console = cfg.log.console
        use_rich = console == "rich" or (console == "auto" and sys.stdout.isatty())
        self.console = Console()
        self.progress = None
        if use_rich:
            self.progress = Progress(
                TextColumn("[bold]nemoe"), BarColumn(), TextColumn("{task.fields[tokens]}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("{task.fields[structure]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._task = self.progress.add_task("train", total=target_tokens, tokens="", loss="-",
                                                speed="-", structure="")
            self.progress.start()

    @staticmethod
    def truncate_after(log_dir: Path, step: int) -> int:
        """On resume: drop every row, line and TensorBoard record after `step`; returns how many went."""
        from nemoe.tensorboard_log import truncate_tensorboard   # torch.utils.tensorboard: only where it is used
        dropped = 0
        for name in CSV_LOGS:
            dropped += truncate_csv(log_dir / name, step)
        try:
            dropped += truncate_tensorboard(log_dir / TENSORBOARD_DIR, step)
        except Exception as err:  # noqa: BLE001 -- TensorBoard is a view; the run must not fail on it
            print(f"warning: cannot cut the TensorBoard files in {log_dir / TENSORBOARD_DIR} back to step "
                  f"{step} ({err!r}); TensorBoard's purge marker hides the later steps", file=sys.stderr)
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

    def _open_tensorboard(self, cfg, start_step: int):
        from nemoe.tensorboard_log import TensorBoardLog   # torch.utils.tensorboard: only with log.tensorboard on
        try:
            plasticity = {name for name, section in vars(cfg.plasticity).items() if section.enabled}
            return TensorBoardLog(self.log_dir / TENSORBOARD_DIR, start_step, dump_config(cfg), plasticity)
        except Exception as err:  # noqa: BLE001 -- TensorBoard is a view: the run goes on without it
            self._tensorboard_failed(err)
            return None

    def _tb(self, write) -> None:
        """A TensorBoard write (when it is open); a failure is reported once and ends TensorBoard
        output for this process (the CSV logs go on; --resume opens it again)."""
        if self.tensorboard is None:
            return
        try:
            write()
        except Exception as err:  # noqa: BLE001 -- any failure of the view must leave training alone
            writer, self.tensorboard = self.tensorboard, None
            self._tensorboard_failed(err)
            try:
                writer.close()
            except Exception:  # noqa: BLE001 -- already reported
                pass

    def _tensorboard_failed(self, err: Exception) -> None:
        self.write_failures += 1
        print(f"warning: cannot write TensorBoard files in {self.log_dir / TENSORBOARD_DIR} ({err!r}); "
              f"TensorBoard output stops at step {self.last_step}, training and the CSV logs go on",
              file=sys.stderr, flush=True)
        self.line(self.last_step, f"Warning | TensorBoard output stopped ({err!r})", echo=False)

    def _write_text(self, line: str) -> None:
        self._text.write(line + "\n")
        self._text.flush()

    def row_due(self, step: int) -> bool:
        """A training_log.csv row closes the log interval after this step: every log.every_steps."""
        return every(step, self.every_steps)

    def line(self, step: int, text: str, echo: bool = True) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.last_step = step
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

    def train_row(self, row: dict, structure: str = "") -> None:
        """A training_log.csv row, its text line (with the ETA and `structure`, the plasticity
        mechanisms' words for the model's shape, e.g. "Experts per layer [2, 3]"), TensorBoard."""
        self.last_step = row["step"]
        self._guard(self.train_csv.write, row)
        self._tb(lambda: self.tensorboard.train_row(row))
        n = row.get("window_steps")
        over = f"mean of {n} step{'s' if n != 1 else ''}" if n else "interval mean"
        text = (f"{step_text(row['tokens'], row['loss_ce'], row['lr'], row['loss_lb'], over)} | GradNorm "
                f"{row['grad_norm']:.3f} | Tok/s {row['tokens_per_s']:,.0f} | "
                f"{structure + ' | ' if structure else ''}ETA {duration(self._eta(row))}")
        self.line(row["step"], text, echo=self.progress is None)
        if self.progress is not None:
            self.progress.update(self._task, completed=row["tokens"], tokens=f"{row['tokens']:,}",
                                 loss=f"{row['loss_ce']:.4f}", speed=f"{row['tokens_per_s']:,.0f}",
                                 structure=structure)

    def _eta(self, row: dict) -> float:
        """Seconds to the target at the wall-clock rate since the previous row (evaluations and
        checkpoints included); the first row of a process uses its training tokens/s."""
        now, tokens = time.monotonic(), row["tokens"]
        rate = row["tokens_per_s"]
        if self._last_row is not None and now > self._last_row[0] and tokens > self._last_row[1]:
            rate = (tokens - self._last_row[1]) / (now - self._last_row[0])
        self._last_row = (now, tokens)
        return max(self.target_tokens - tokens, 0) / rate if rate > 0 else float("nan")

    def events(self, step: int, tokens: int, loss_ce: float, lr: float, events: list,
               notes: list[str] = ()) -> None:
        """One step's structural events (nemoe.plasticity.Event): events.csv rows, a text line each,
        one TensorBoard table; then the mechanisms' `notes` on them (text log only)."""
        rows = [e.as_row() for e in events]
        for e, row in zip(events, rows):
            self._guard(self.events_csv.write, row)
            self.line(step, f"{step_text(tokens, loss_ce, lr, over='this step')} | {e.describe()}")
        self._tb(lambda: self.tensorboard.events(step, rows))
        for note in notes:
            self.line(step, note, echo=False)

    def distributions(self, step: int, values: dict[str, list[float]]) -> None:
        """TensorBoard histograms (tag -> values) the mechanisms report at this step."""
        if values:
            self._tb(lambda: self.tensorboard.histograms(step, values))

    def eval_rows(self, rows: list[dict], text: str) -> None:
        for row in rows:
            self._guard(self.eval_csv.write, row)
        self._tb(lambda: self.tensorboard.eval_rows(rows))
        self.line(rows[0]["step"], text)

    def state_rows(self, rows: list[dict]) -> None:
        """Rows of plasticity.csv (per-unit state of the plasticity mechanisms)."""
        if self.state_csv is None:
            self.state_csv = CsvLog(self.log_dir / STATE_CSV, STATE_COLUMNS)
        for row in rows:
            self._guard(self.state_csv.write, row)
        self._tb(lambda: self.tensorboard.state_rows(rows))

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

    def flush_views(self) -> None:
        """Hand TensorBoard's queued records to the file (on the training thread, before a checkpoint
        claims their steps: after a kill, the steps up to it are in TensorBoard as in the CSVs)."""
        self._tb(lambda: self.tensorboard.flush())

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for log in self._csv_logs:
            log.close()
        self._text.close()
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception as err:  # noqa: BLE001
                print(f"warning: cannot close the TensorBoard files ({err!r})", file=sys.stderr)


def step_text(tokens: int, loss_ce: float, lr: float, loss_lb: float | None = None, over: str = "") -> str:
    """The start of a training or event line, `over` saying what the losses cover:
    `Tokens 1,024 | LossCE (mean of 10 steps) 5.1234 | LossLB (mean) 0.0100 | LR 1.00e-03` (a log
    interval's row) or `Tokens 1,024 | LossCE (this step) 5.1234 | LR 1.00e-03` (an event's)."""
    what = f" ({over})" if over else ""
    lb = f" | LossLB{' (mean)' if 'mean' in over else what} {loss_lb:.4f}" if loss_lb is not None else ""
    return f"Tokens {tokens:,} | LossCE{what} {loss_ce:.4f}{lb} | LR {lr:.2e}"


def duration(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'; '?' when unknown."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class NullLogger:
    """The logger of data-parallel ranks other than 0: rank 0 alone writes and prints (every
    rank still closes its log intervals at the same steps: the rows' sums are collectives)."""

    write_failures = 0

    def __init__(self, every_steps: int = 0):
        self.every_steps = every_steps

    def row_due(self, step: int) -> bool:
        return every(step, self.every_steps)

    def line(self, step: int, text: str, echo: bool = True) -> None: ...
    def print(self, text: str) -> None: ...
    def warn(self, step: int, text: str) -> None: ...
    def train_row(self, row: dict, structure: str = "") -> None: ...
    def events(self, step, tokens, loss_ce, lr, events, notes=()) -> None: ...
    def distributions(self, step: int, values) -> None: ...
    def eval_rows(self, rows: list[dict], text: str) -> None: ...
    def state_rows(self, rows: list[dict]) -> None: ...
    def fsync(self) -> None: ...
    def flush_views(self) -> None: ...
    def close(self) -> None: ...
