"""TensorBoard output of a run, driven by RunLogger (nemoe/logs.py) at log intervals and events.

    <log_dir>/tensorboard/      tensorboard --logdir <run-dir>/logs   (Colab: %tensorboard --logdir ...)

What goes in (tag names in nemoe.schema):
    scalars     every training_log.csv column (loss/..., moe/..., optim/..., speed/..., progress/...),
                held-out loss and perplexity per source (heldout/...), every plasticity.csv
                row (plasticity/<granularity>/<name>/L<i>[.<unit>]: head gates, layer vitality, the
                dormant expert neurons of every run, plasticity/neuron/dormant_<tau>/L<i>, ...)
    text        `events`: one table per step with events.csv's columns; `config` at each start
    histograms  `usage/L<i>` at each morph decision: the usage share of every expert that was live
                when the controller decided (what split and prune compared with their thresholds)
    layout      custom scalars: experts per layer next to held-out loss per source, and more

Resume, as for the CSVs: `truncate_tensorboard` cuts the event files back to the restored
step before the writer opens. Records of later steps are dropped and the survivors are
copied, as they are, into one file whose name sorts before every writer's (so the order
of files never depends on clocks or process ids); then the writer opens with
`purge_step = step + 1`, TensorBoard's own marker, which covers files that could not be
rewritten. Readers that ignore that marker (TensorBoard's fast Rust loader) therefore see
one timeline too. Everything before the restored step was flushed before its checkpoint
was written (RunLogger.sync), so nothing a checkpoint covers is lost to a kill.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from nemoe.schema import (EVENT_COLUMNS, TB_CONFIG_TAG, TB_EVENTS_TAG, eval_tag, state_tag,
                          tensorboard_tag)

# Rewritten by every writer at its start step, so a truncation drops them from that step on.
_LAYOUT_TAG = "custom_scalars__config__"   # tensorboard.plugins.custom_scalar.metadata.CONFIG_SUMMARY_TAG
START_TAGS = (_LAYOUT_TAG, TB_CONFIG_TAG)
# The file the survivors of a truncation go to: "0000000000" (the writers' seconds field)
# sorts before every file a writer names after its start time.
HISTORY_FILE = "events.out.tfevents.0000000000.nemoe.history"
SHARE_BINS = [i / 20 for i in range(21)]   # shares in [0, 1], 0.05 wide

# Custom scalars (TensorBoard's "Custom Scalars" tab): charts that overlay several tags, by regex.
LAYOUT = {
    "nemoe": {
        "experts per layer": ["Multiline", [r"moe/experts/L\d+"]],
        "held-out loss per source": ["Multiline", [r"heldout/loss/.*"]],
        "train CE vs held-out (all)": ["Multiline", [r"loss/ce$", r"heldout/loss/all$"]],
        "usage entropy per layer": ["Multiline", [r"moe/usage_entropy/L\d+"]],
        "max load per layer": ["Multiline", [r"moe/max_load/L\d+"]],
        "dormant expert neurons (tau 0.1) per layer": ["Multiline", [r"plasticity/neuron/dormant_0\.1/L\d+"]],
    },
}
# Charts of the plasticity mechanisms, by config section, shown when the section is on.
PLASTICITY_LAYOUT = {
    "neuron": {"neuron deaths per layer": ["Multiline", [r"plasticity/neuron/deaths/.*"]],
               "neuron fitness (mean) per layer": ["Multiline", [r"plasticity/neuron/fitness_mean/.*"]]},
    "heads": {"head gates": ["Multiline", [r"plasticity/head/gate/.*"]],
              "head attention entropy": ["Multiline", [r"plasticity/head/entropy/.*"]]},
    "layers": {"layer vitality": ["Multiline", [r"plasticity/layer/vitality/.*"]],
               "layer importance": ["Multiline", [r"plasticity/layer/importance/.*"]]},
}


def layout(plasticity: set[str]) -> dict:
    """The custom-scalars layout for a run whose enabled plasticity sections are `plasticity`."""
    charts = {title: chart for name in sorted(plasticity)
              for title, chart in PLASTICITY_LAYOUT.get(name, {}).items()}
    return LAYOUT | ({"plasticity": charts} if charts else {})


class TensorBoardLog:
    """One run's SummaryWriter (main process only). Writes happen at log intervals and events;
    the writer's own thread does the file I/O, flushed every FLUSH_SECS and by `flush()`."""

    FLUSH_SECS = 15

    def __init__(self, directory: Path, start_step: int, config_text: str, plasticity: set[str] = frozenset()):
        """`plasticity`: the enabled plasticity sections (their charts join the layout)."""
        from torch.utils.tensorboard import SummaryWriter   # ~1 s of imports: only when on
        from torch.utils.tensorboard.summary import custom_scalars

        _quiet_writer_thread()
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory), purge_step=start_step + 1, max_queue=200,
                                    flush_secs=self.FLUSH_SECS)
        self.writer.file_writer.add_summary(custom_scalars(layout(plasticity)), start_step)
        self.writer.add_text(TB_CONFIG_TAG, _code_block(config_text), start_step)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Several scalars of one step as one event: one record and one queue item instead of one
        per tag (a fifth of add_scalar's time per value), read back like add_scalar's."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar
        summary = Summary(value=[v for tag, x in values.items() for v in scalar(tag, float(x)).value])
        self.writer.file_writer.add_summary(summary, step)

    def train_row(self, row: dict) -> None:
        self.scalars(row["step"], {tag: value for column, value in row.items()
                                   if (tag := tensorboard_tag(column)) is not None})

    def eval_rows(self, rows: list[dict]) -> None:
        values = {eval_tag(kind, row["source"]): row[kind] for row in rows for kind in ("loss", "ppl")}
        self.scalars(rows[0]["step"], values)

    def state_rows(self, rows: list[dict]) -> None:
        values = {state_tag(r["granularity"], r["name"], r["layer"], str(r["unit"])): r["value"] for r in rows}
        self.scalars(rows[0]["step"], values)

    def events(self, step: int, rows: list[dict]) -> None:
        """All of one step's events as one markdown table (one text per tag and step)."""
        lines = ["| " + " | ".join(EVENT_COLUMNS) + " |", "|" + "---|" * len(EVENT_COLUMNS)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in EVENT_COLUMNS) + " |" for row in rows]
        self.writer.add_text(TB_EVENTS_TAG, "\n".join(lines), step)

    def histograms(self, step: int, values: dict[str, list[float]]) -> None:
        """Histograms of shares in [0, 1] (the mechanisms' distributions, e.g. expert usage at a decision)."""
        import numpy as np
        for tag, shares in values.items():
            self.writer.add_histogram(tag, np.asarray(shares, dtype=np.float64), step, bins=np.asarray(SHARE_BINS))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "/") or " "


def _code_block(text: str) -> str:
    # Four-space indentation: a markdown code block (the text plugin renders markdown).
    return "\n".join("    " + line for line in text.splitlines())


def _quiet_writer_thread() -> None:
    """A write that fails in the writer's thread resurfaces at the next write, where RunLogger
    reports it once; keep threading's default hook from also printing a traceback."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:   # another tensorboard layout: tracebacks stay as they are
        return
    previous = threading.excepthook
    if getattr(previous, "nemoe_quiet", False):
        return

    def hook(args):
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)
    hook.nemoe_quiet = True
    threading.excepthook = hook


# --------------------------------------------------------------------------- #
# Truncation on resume: the event files read as one uninterrupted run
# --------------------------------------------------------------------------- #

def event_files(directory: Path) -> list[Path]:
    """Event files in the order TensorBoard reads them (by name)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and "tfevents" in p.name)


def record_ends(data: bytes) -> list[int]:
    """Where each whole TFRecord in `data` ends (offsets from its start), in order.

    A record cut off (by a kill, or by reading a file while its writer appends to it), or one
    whose length CRC does not match (a torn write), ends the data: nothing from there on counts.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    ends, at = [], 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[at + 8:at + 12])
        end = at + 12 + length + 4
        if crc != masked_crc32c(header) or end > len(data):
            break
        ends.append(end)
        at = end
    return ends


def whole_records_size(data: bytes) -> int:
    """The length of the longest prefix of `data` made of whole records (what a copy may take)."""
    ends = record_ends(data)
    return ends[-1] if ends else 0


def read_records(path: Path) -> list[bytes]:
    """The whole TFRecords of an event file, each with its framing (length, CRCs), as written
    (a cut-off or torn record ends the file: see `record_ends`)."""
    data = path.read_bytes()
    ends = record_ends(data)
    return [data[start:end] for start, end in zip([0] + ends, ends)]


def _payload(record: bytes) -> bytes:
    return record[12:-4]


def _is_start_record(event) -> bool:
    # add_text stores tag "config" as "config/text_summary"
    return any(v.tag == t or v.tag.startswith(t + "/") for v in event.summary.value for t in START_TAGS)


def truncate_tensorboard(directory: Path, last_step: int) -> int:
    """Drop every record of a step after `last_step` (-1: all of them, a fresh start) and the
    start records (layout, config) from `last_step` on; returns how many records went.

    The survivors are written to HISTORY_FILE (a temporary name, fsync, rename), then the
    other files are deleted; a kill in between leaves copies that the next truncation
    removes (records are compared byte for byte).
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    files = event_files(directory)
    if not files:
        return 0
    if last_step < 0:
        for path in files:
            path.unlink()
        return len(files)
    kept, seen, dropped, first_time = [], set(), 0, None
    for path in files:
        for record in read_records(path):
            event = Event.FromString(_payload(record))
            if event.HasField("file_version") or event.HasField("session_log"):
                continue    # per-file markers: the history file gets its own
            if event.step > last_step or (event.step == last_step and _is_start_record(event)):
                dropped += 1
            elif record not in seen:
                seen.add(record)
                kept.append(record)
                first_time = event.wall_time if first_time is None else min(first_time, event.wall_time)
    if dropped == 0 and [p.name for p in files] == [HISTORY_FILE]:
        return 0
    tmp = directory / ".history.tmp"   # not an event file's name until the rename
    try:
        with open(tmp, "wb") as f:
            header = Event(wall_time=first_time or 0.0, file_version="brain.Event:2")
            RecordWriter(f).write(header.SerializeToString())
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / HISTORY_FILE)
    finally:
        if tmp.exists():
            tmp.unlink()
    for path in files:
        if path.name != HISTORY_FILE:
            path.unlink()
    return dropped
