"""TensorBoard output: what RunLogger writes, read back with TensorBoard's own reader.

Fast tests drive RunLogger / TensorBoardLog directly (resume truncation, a kill's
torn record, failed writes); the slow one trains a tiny run with a resume and checks
every scalar against the CSV at the same step, each step once.
`assert_tensorboard_matches_csv` is also applied after test_reliability's random kills.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nemoe.logs import RunLogger
from nemoe.schema import (EVENT_COLUMNS, TENSORBOARD_DIR, TB_CONFIG_TAG, TB_EVENTS_TAG, eval_tag, state_tag,
                          tensorboard_tag, train_columns)
from nemoe.tensorboard_log import HISTORY_FILE, TensorBoardLog, event_files, read_records, truncate_tensorboard
from tests.conftest import tiny_config

TEXT = "/text_summary"   # torch's add_text appends this to a text tag


# --------------------------------------------------------------------------- #
# Reading event files back
# --------------------------------------------------------------------------- #

def accumulator(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def raw_tag_steps(tb_dir: Path) -> Counter:
    """(tag, step) of every summary value in every event file, as stored (no purging, as
    TensorBoard's Rust loader reads them)."""
    from tensorboard.compat.proto.event_pb2 import Event
    found = Counter()
    for path in event_files(tb_dir):
        for record in read_records(path):
            event = Event.FromString(record[12:-4])
            for value in event.summary.value:
                found[(value.tag, event.step)] += 1
    return found


def text_of(acc, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag + TEXT)}


def table_rows(markdown: str) -> list[dict]:
    """The rows of a markdown table written by TensorBoardLog.events."""
    lines = [ln.strip().strip("|").split(" | ") for ln in markdown.splitlines()]
    header = [c.strip() for c in lines[0]]
    return [dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]]


def assert_tensorboard_matches_csv(log_dir: Path) -> None:
    """Every training_log.csv column, eval.csv value, plasticity.csv row and events.csv step is in
    TensorBoard at the same steps (each once) with the same values (float32, TensorBoard's type)."""
    tb_dir = log_dir / TENSORBOARD_DIR
    acc = accumulator(tb_dir)
    train = pd.read_csv(log_dir / "training_log.csv")
    for column in train.columns:
        tag = tensorboard_tag(column)
        if tag is None:
            continue
        points = acc.Scalars(tag)
        assert [p.step for p in points] == train["step"].tolist(), tag
        # equal_nan: grad_norm is NaN in a row whose every step was skipped (an fp16 overflow)
        assert np.array_equal(np.array([p.value for p in points], dtype=np.float32),
                              train[column].to_numpy(dtype=np.float32), equal_nan=True), tag
    evals = pd.read_csv(log_dir / "eval.csv")
    for source, rows in evals.groupby("source"):
        for kind in ("loss", "ppl"):
            points = acc.Scalars(eval_tag(kind, source))
            assert [p.step for p in points] == rows["step"].tolist()
            assert np.array_equal(np.array([p.value for p in points], dtype=np.float32),
                                  rows[kind].to_numpy(dtype=np.float32))
    events = pd.read_csv(log_dir / "events.csv", dtype={"parents": str, "unit": str}, keep_default_na=False)
    tables = text_of(acc, TB_EVENTS_TAG) if len(events) else {}
    assert sorted(tables) == sorted(set(events["step"]))
    for step, table in tables.items():
        shown = [(r["granularity"], r["event"], int(r["layer"]), r["unit"], int(r["n_after"]))
                 for r in table_rows(table)]
        logged = events[events["step"] == step]
        assert shown == list(zip(logged["granularity"], logged["event"], logged["layer"], logged["unit"],
                                 logged["n_after"])), step
    if (log_dir / "plasticity.csv").exists():
        state = pd.read_csv(log_dir / "plasticity.csv", dtype={"unit": str}, keep_default_na=False)
        for (granularity, name, layer, unit), rows in state.groupby(["granularity", "name", "layer", "unit"]):
            points = acc.Scalars(state_tag(granularity, name, layer, unit))
            assert [p.step for p in points] == rows["step"].tolist(), (granularity, name, layer, unit)
            assert np.array_equal(np.array([p.value for p in points], dtype=np.float32),
                                  pd.to_numeric(rows["value"]).to_numpy(dtype=np.float32), equal_nan=True)
    stored = raw_tag_steps(tb_dir)
    repeated = {key: n for key, n in stored.items() if n > 1}
    assert not repeated, f"(tag, step) stored more than once: {sorted(repeated)[:5]}"


# --------------------------------------------------------------------------- #
# RunLogger and TensorBoardLog, no trainer
# --------------------------------------------------------------------------- #

def row_at(step: int, experts=(2, 3)) -> dict:
    row = {"step": step, "tokens": 64 * step, "loss": 9.0 - 0.1 * step, "loss_ce": 8.9 - 0.1 * step,
           "loss_lb": 1.01, "loss_z": 0.3, "loss_lb_scaled": 0.0101, "loss_z_scaled": 0.0003,
           "lr": 1e-3 * step, "grad_norm": 0.5 + step / 100, "grad_scale": 1.0, "skipped_steps": step % 3,
           "tokens_per_s": 1000.0 + step, "balance": 1.0 + step / 200,
           "elapsed_s": 0.1 * step, "rss_mb": 500.0 + step, "expert_param_steps": 1000 * step,
           "optim_state_bytes": 4096 + step}
    for i, n in enumerate(experts):
        row |= {f"experts_L{i}": n, f"usage_entropy_L{i}": 0.6 + step / 1000, f"max_load_L{i}": 1.2}
    return row


class FakeEvent:
    """What RunLogger.events needs of nemoe.plasticity.Event."""

    def __init__(self, step: int, layer: int, event: str = "split", granularity: str = "expert"):
        self.granularity = granularity
        self.row = {c: "" for c in EVENT_COLUMNS} | {
            "step": step, "tokens": 64 * step, "granularity": granularity, "event": event, "layer": layer,
            "unit": f"e{step}", "expert": step, "parents": "0", "value": 0.5, "threshold": 0.35,
            "n_before": 2, "n_after": 3, "probe_loss_before": 7.0, "probe_loss_after": 7.0,
            "cause": "usage 0.5 vs 0.35"}

    def as_row(self) -> dict:
        return self.row

    def describe(self) -> str:
        return f"Event expert_{self.row['event']} | Layer {self.row['layer']}"


def open_logger(log_dir: Path, start: int = 0, **log) -> RunLogger:
    cfg = tiny_config(log={"console": "plain", **log})
    return RunLogger(log_dir, cfg, start, target_tokens=64 * 20)


def write_steps(logger: RunLogger, steps, loss_shift: float = 0.0) -> None:
    for step in steps:
        row = row_at(step)
        row["loss_ce"] += loss_shift
        if step % 4 == 0:
            logger.events(step, 64 * step, 5.0, 1e-3, [FakeEvent(step, 0), FakeEvent(step, 1, "prune")],
                          ["Experts per layer | [2, 3]"])
            logger.distributions(step, {"usage/L0": [0.25, 0.75], "usage/L1": [0.2, 0.3, 0.5]})
        logger.train_row(row, "Experts per layer [2, 3]")   # the mechanisms' words (Plasticity.structure)
        logger.state_rows([{"step": step, "tokens": 64 * step, "granularity": "head", "layer": 0,
                            "unit": "h1", "name": "gate", "value": 1.0 - step / 100}])
        if step % 5 == 0:
            logger.eval_rows([{"step": step, "tokens": 64 * step, "source": s, "loss": 7.0 - step / 10 + d,
                               "ppl": math.exp(7.0 - step / 10 + d)} for s, d in (("prose", 0.1), ("all", 0.0))],
                             "Eval")


def test_tensorboard_holds_the_logs(tmp_path, capsys):
    log_dir = tmp_path / "logs" / "run"
    logger = open_logger(log_dir)
    write_steps(logger, range(1, 11))
    logger.close()
    assert_tensorboard_matches_csv(log_dir)
    acc = accumulator(log_dir / TENSORBOARD_DIR)
    gate = acc.Scalars(state_tag("head", "gate", 0, "h1"))
    assert [(p.step, round(p.value, 4)) for p in gate] == [(s, round(1.0 - s / 100, 4)) for s in range(1, 11)]
    assert sorted(acc.Tags()["histograms"]) == ["usage/L0", "usage/L1"]
    hist = acc.Histograms("usage/L1")
    assert [h.step for h in hist] == [4, 8] and hist[0].histogram_value.num == 3
    assert hist[0].histogram_value.sum == pytest.approx(1.0)
    assert "experts_init" in text_of(acc, TB_CONFIG_TAG)[0]
    assert acc.Tensors("custom_scalars__config__"), "the custom-scalars layout"
    # The plain console line: experts per layer and the ETA to the target.
    out = capsys.readouterr().out
    assert "| Experts per layer [2, 3] | ETA " in out.splitlines()[-3]


def test_resume_cuts_tensorboard_back_like_the_csvs(tmp_path):
    log_dir = tmp_path / "logs" / "run"
    logger = open_logger(log_dir)
    write_steps(logger, range(1, 11))
    logger.close()
    # A kill left a torn record at the end of the file.
    (first,) = event_files(log_dir / TENSORBOARD_DIR)
    with open(first, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x12\x34")
    RunLogger.truncate_after(log_dir, 6)        # the checkpoint at step 6 is the newest
    assert [p.name for p in event_files(log_dir / TENSORBOARD_DIR)] == [HISTORY_FILE]
    logger = open_logger(log_dir, start=6)
    write_steps(logger, range(7, 10), loss_shift=0.5)
    logger.close()
    # Killed before its next checkpoint: the next life resumes at step 6 again.
    RunLogger.truncate_after(log_dir, 6)
    logger = open_logger(log_dir, start=6)
    write_steps(logger, range(7, 13), loss_shift=1.0)   # the resumed run differs (another GPU, say)
    logger.close()
    assert_tensorboard_matches_csv(log_dir)
    acc = accumulator(log_dir / TENSORBOARD_DIR)
    assert [p.step for p in acc.Scalars("loss/ce")] == list(range(1, 13))
    assert sorted(text_of(acc, TB_CONFIG_TAG)) == [0, 6], "the config at each start, once"
    assert sorted(text_of(acc, TB_EVENTS_TAG)) == [4, 8, 12]


def test_fresh_start_and_interrupted_truncation(tmp_path):
    tb_dir = tmp_path / "logs" / "run" / TENSORBOARD_DIR
    logger = open_logger(tb_dir.parent)
    write_steps(logger, range(1, 9))
    logger.close()
    live = event_files(tb_dir)[0]
    copy = live.read_bytes()
    assert truncate_tensorboard(tb_dir, 5) > 0
    # A kill between the history file's rename and the old file's deletion: the old file is back.
    live.write_bytes(copy)
    truncate_tensorboard(tb_dir, 5)
    assert [p.name for p in event_files(tb_dir)] == [HISTORY_FILE]
    stored = raw_tag_steps(tb_dir)
    assert max(n for n in stored.values()) == 1 and max(step for _, step in stored) == 5
    assert truncate_tensorboard(tb_dir, 5) == 0, "nothing left to drop: the history file stays"
    assert truncate_tensorboard(tb_dir, -1) == 1 and event_files(tb_dir) == []


def test_tensorboard_off_writes_no_event_files(tmp_path):
    logger = open_logger(tmp_path / "run", tensorboard=False)
    write_steps(logger, range(1, 3))
    logger.close()
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert len(pd.read_csv(tmp_path / "run" / "training_log.csv")) == 2


def test_a_failed_tensorboard_write_is_reported_once_and_the_logs_go_on(tmp_path, capsys, monkeypatch):
    from tensorboard.summary.writer.record_writer import RecordWriter
    log_dir = tmp_path / "run"
    logger = open_logger(log_dir)
    write_steps(logger, range(1, 3))

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    # The failure happens in the writer's thread and surfaces at a later write or flush.
    monkeypatch.setattr(RecordWriter, "write", full_disk)
    write_steps(logger, range(3, 7))
    logger.fsync()
    write_steps(logger, range(7, 9))
    logger.close()
    err = capsys.readouterr().err
    assert err.count("cannot write TensorBoard files") == 1 and "No space left" in err
    assert "training and the CSV logs go on" in err and "Traceback" not in err
    assert pd.read_csv(log_dir / "training_log.csv")["step"].tolist() == list(range(1, 9))
    assert "TensorBoard output stopped" in (log_dir / "training_log.txt").read_text()


def test_tensorboard_that_cannot_open_leaves_the_run_alone(tmp_path, capsys):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / TENSORBOARD_DIR).write_text("a file where the folder should be")
    logger = open_logger(log_dir)
    write_steps(logger, range(1, 4))
    logger.fsync()
    logger.close()
    err = capsys.readouterr().err
    assert err.count("cannot write TensorBoard files") == 1 and "Traceback" not in err
    assert pd.read_csv(log_dir / "training_log.csv")["step"].tolist() == [1, 2, 3]


def test_layout_shows_plasticity_charts_of_the_mechanisms_that_are_on():
    from nemoe.tensorboard_log import layout
    assert set(layout(set())) == {"nemoe"}
    assert "experts per layer" in layout(set())["nemoe"] and "held-out loss per source" in layout(set())["nemoe"]
    assert set(layout({"heads", "layers"})["plasticity"]) == {"head gates", "head attention entropy",
                                                             "layer vitality", "layer importance"}


def test_every_training_column_has_a_group():
    tags = [tensorboard_tag(c) for c in train_columns(3)]
    assert tags[0] is None and None not in tags[1:], "step is the x axis, every other column a scalar"
    assert len(set(tags[1:])) == len(tags) - 1
    assert {t.split("/")[0] for t in tags[1:]} == {"progress", "loss", "optim", "speed", "moe", "host"}


# --------------------------------------------------------------------------- #
# The mirror's copy of the event files
# --------------------------------------------------------------------------- #

def test_the_mirror_copies_whole_records_and_appends_what_follows(tmp_path):
    from nemoe.mirror import Mirror
    from nemoe.schema import RunPaths
    from nemoe.tensorboard_log import whole_records_size
    local = RunPaths.of(tmp_path / "run", "r")
    logger = open_logger(local.log_dir)
    write_steps(logger, range(1, 9))
    logger.close()
    (source,) = event_files(local.log_dir / TENSORBOARD_DIR)
    full = source.read_bytes()
    ends = [len(b"".join(read_records(source)[:n])) for n in range(1, len(read_records(source)) + 1)]
    # The writer is halfway through a record when the mirror reads the file.
    cut = ends[len(ends) // 2] + 7
    source.write_bytes(full[:cut])
    mirror = Mirror(tmp_path / "mirror", local, keep_last=2)
    mirror._copy_logs()
    target = mirror.paths.log_dir / TENSORBOARD_DIR / source.name
    copied = target.read_bytes()
    assert copied == full[:ends[len(ends) // 2]], "whole records only: the half-written one waits"
    assert whole_records_size(copied) == len(copied)
    assert 0 < max(s for _, s in raw_tag_steps(target.parent)) < 8
    # The record completes and more follow: the copy grows in place (the same file, appended).
    inode = target.stat().st_ino
    source.write_bytes(full)
    mirror._copy_logs()
    assert target.read_bytes() == full and target.stat().st_ino == inode
    assert [p.step for p in accumulator(target.parent).Scalars("loss/ce")] == list(range(1, 9))
    # A file the run folder no longer has (cut back by a resume) leaves the mirror too.
    source.rename(source.with_name(HISTORY_FILE))
    mirror._copy_logs()
    assert [p.name for p in event_files(target.parent)] == [HISTORY_FILE]
    assert mirror.messages.empty(), "no warnings"


@pytest.mark.slow
def test_a_resume_from_the_mirror_alone_has_the_whole_tensorboard_history(tmp_path):
    from tests.test_trainer import run
    from nemoe.schema import manifest_name
    from nemoe.tensorboard_log import whole_records_size
    mirror = ["--mirror-dir", str(tmp_path / "mirror"), "--set", "checkpoint.every_steps=4"]
    assert run(tmp_path / "vm1", "--max-steps", "10", *mirror) == 0
    # The VM died after checkpoint 8 reached the mirror, and with it the local run folder; its
    # TensorBoard files in the mirror already had steps 9 and 10 (copied with checkpoint 10's).
    copies = tmp_path / "mirror" / "checkpoints" / "tiny"
    for name in ("nemo_ckpt_step10.pt", manifest_name("nemo_ckpt_step10.pt")):
        (copies / name).unlink()
    mirrored_tb = tmp_path / "mirror" / "logs" / "tiny" / TENSORBOARD_DIR
    assert max(step for _, step in raw_tag_steps(mirrored_tb)) == 10
    assert run(tmp_path / "vm2", "--resume", "--max-steps", "12", *mirror) == 0
    text = (tmp_path / "vm2" / "logs" / "tiny" / "training_log.txt").read_text()
    assert "resumed from nemo_ckpt_step8.pt at step 8" in text
    assert f"copied {TENSORBOARD_DIR}/events.out.tfevents" in text
    for log_dir in (tmp_path / "vm2" / "logs" / "tiny", tmp_path / "mirror" / "logs" / "tiny"):
        assert_tensorboard_matches_csv(log_dir)      # every tag, each step once (stored, not only shown)
        acc = accumulator(log_dir / TENSORBOARD_DIR)
        for tag in acc.Tags()["scalars"]:
            steps = [p.step for p in acc.Scalars(tag)]
            assert steps == sorted(set(steps)), tag
        assert [p.step for p in acc.Scalars("loss/ce")] == list(range(1, 13))
        assert sorted(text_of(acc, TB_CONFIG_TAG)) == [0, 8], "the config at each start, once"
        for path in event_files(log_dir / TENSORBOARD_DIR):
            data = path.read_bytes()
            assert whole_records_size(data) == len(data), path.name
    assert [p.name for p in event_files(mirrored_tb)] == [p.name for p in
                                                          event_files(tmp_path / "vm2" / "logs" / "tiny" / TENSORBOARD_DIR)]


# --------------------------------------------------------------------------- #
# A real run with a resume
# --------------------------------------------------------------------------- #

@pytest.mark.slow
def test_trainer_run_with_a_resume(resumed_tiny):
    # conftest.py's resumed_tiny: 13 steps, then the step-13 checkpoint is lost, so the first
    # resume goes back to 10 and replays; a second resume at 20 runs on to 24.
    log_dir = resumed_tiny / "logs" / "tiny"
    assert_tensorboard_matches_csv(log_dir)
    acc = accumulator(log_dir / TENSORBOARD_DIR)
    assert [p.step for p in acc.Scalars("loss/ce")] == list(range(1, 25))
    # Usage histograms at every morph decision (TINY: morph.interval=4), one per layer.
    for layer in (0, 1):
        hist = acc.Histograms(f"usage/L{layer}")
        assert [h.step for h in hist] == [4, 8, 12, 16, 20, 24]
        assert all(h.histogram_value.sum == pytest.approx(1.0) for h in hist), "shares of one layer"
    assert sorted(text_of(acc, TB_CONFIG_TAG)) == [0, 10, 20]
