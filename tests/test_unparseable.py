"""Data that cannot be parsed: the run saves at once and exits 2 with a message naming the
source; nothing is lost (the checkpoint and logs are there, and a --resume once the file is
fixed finishes the run). A retry cannot help here, so none is made."""

from __future__ import annotations

import pandas as pd
import pytest

from nemoe.schema import list_checkpoints
from nemoe.trainer import Trainer
from tests.fixtures_data import write_alpaca, write_fineweb
from tests.test_trainer import TINY
from train_nemoe import main

pytestmark = pytest.mark.slow

STEPS = 12


def args(run_dir, d, *extra) -> list[str]:
    # Alpaca has 3 rows: it cycles, and every cycle reads its file again.
    sources = (f"[{{name: web, kind: files, path: '{d / 'web.parquet'}', weight: 0.6}}, "
               f"{{name: alpaca, kind: files, path: '{d / 'alpaca.jsonl'}', eval_split: '{d / 'held.jsonl'}', "
               "format: alpaca, weight: 0.4}]")
    out = ["--config", "local", "--run-dir", str(run_dir), "--run-name", "tiny", "--max-steps", str(STEPS)]
    for item in TINY + ["data.heldout_fraction=0.1", "data.prefetch_batches=0", "checkpoint.every_steps=4",
                        f"data.sources={sources}"]:
        out += ["--set", item]
    return out + list(extra)


def test_rows_that_cannot_be_parsed_save_and_exit_2_naming_the_source(tmp_path, monkeypatch, capsys):
    d = tmp_path / "data"
    d.mkdir()
    write_fineweb(d / "web.parquet", n=200)
    write_alpaca(d / "alpaca.jsonl", n=3)
    write_alpaca(d / "held.jsonl", n=20)
    good = (d / "alpaca.jsonl").read_text()
    real = Trainer.train_step

    def train_step(self):   # at step 3 the file is overwritten with rows that are not JSON
        if self.step == 3:
            (d / "alpaca.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n{not json at all\n')
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run_dir = tmp_path / "run"
    assert main(args(run_dir, d)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "cannot be parsed" in errors[0] and "data source 'alpaca' (files:" in errors[0], errors[0]
    print(f"\n{errors[0]}")
    trained = list(pd.read_csv(run_dir / "logs" / "tiny" / "training_log.csv")["step"])
    assert trained == list(range(1, len(trained) + 1)) and 3 <= len(trained) < STEPS
    assert list_checkpoints(run_dir / "checkpoints" / "tiny")[0][0] == trained[-1], "saved at once, where it stopped"

    # At start-up (a resume with the file still broken): one line naming the source, exit 2, the checkpoint kept.
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(args(run_dir, d, "--resume")) == 2
    err = capsys.readouterr().err
    assert "data source 'alpaca' (files:" in err and "cannot be parsed" in err and "Traceback" not in err, err
    assert list_checkpoints(run_dir / "checkpoints" / "tiny")[0][0] == trained[-1]

    (d / "alpaca.jsonl").write_text(good)   # fixed: the run goes on from its checkpoint
    assert main(args(run_dir, d, "--resume")) == 0
    assert list(pd.read_csv(run_dir / "logs" / "tiny" / "training_log.csv")["step"]) == list(range(1, STEPS + 1))
