"""Data parallelism under torchrun (issue #9): two CPU processes on gloo.

1. Replicas stay identical through morph events (checked by digest at every checkpoint).
2. Two ranks with batch b train exactly like one process with batch 2b on the same
   blocks (the union of the ranks' batches), to float tolerance.
3. SIGKILL under torchrun + --resume continues with bit-identical losses.

The runs balance with the selection bias (moe.balance=bias), whose update reads the
step's counts summed over ranks: the digests cover it (a model buffer), and the union
batch's counts are the ranks' counts summed, so the one-process run moves it alike.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from nemoe import checkpoint_layout as layout
from nemoe.config import load_config
from nemoe.data import TokenStream
from nemoe.tokenizer import get_tokenizer
from nemoe.schema import RunPaths
from nemoe.tensorboard_log import event_files
from nemoe.trainer import Trainer
from tests.conftest import REPO
from tests.test_tensorboard import assert_tensorboard_matches_csv
from tests.test_trainer import TINY, logs
from train_nemoe import main

pytestmark = pytest.mark.slow

# lb_coef=0: the load-balance loss is computed per rank on the rank's own batch (as in
# Switch / GShard), which is not the loss of the union batch; everything else is linear
# in the batch and averages exactly. Dropout off: ranks draw their own masks.
# Two micro-batches per step: the first backward runs under DDP's no_sync.
DDP = TINY + ["moe.lb_coef=0", "model.dropout=0.0", "eval.batches=2", "train.total_tokens=3840",
              "train.batch_size=2", "train.grad_accum=2", "moe.balance=bias", "moe.bias_rate=0.01"]
STEPS = 15   # per rank 2 x 2 sequences of 16 tokens, 2 ranks: 128 tokens a step


def args(run_dir: Path, name: str, *extra: str) -> list[str]:
    out = ["--config", "local", "--run-dir", str(run_dir), "--run-name", name]
    for item in DDP:
        out += ["--set", item]
    return out + list(extra)


def torchrun(run_dir: Path, name: str, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_nemoe.py"), *args(run_dir, name, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_logs(a: list, b: list) -> None:
    """CSV logs equal bit for bit, except the wall-clock columns."""
    for x, y in zip(a, b):
        drop = [c for c in ("tokens_per_s", "elapsed_s", "rss_mb") if c in x.columns]   # time and host memory
        pd.testing.assert_frame_equal(x.drop(columns=drop), y.drop(columns=drop))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    torchrun(run_dir, "ddp", "--max-steps", str(STEPS))
    return run_dir


def test_rank_streams_deal_documents_round_robin():
    cfg = load_config("local").data
    tok = get_tokenizer("gpt2")
    one = TokenStream(cfg, tok, seq_len=16)
    ranks = [TokenStream(cfg, tok, seq_len=16, rank=r, world_size=2) for r in range(2)]
    docs = [one.next_document()["text"] for _ in range(12)]
    assert [ranks[0].next_document()["text"] for _ in range(6)] == docs[0::2]
    assert [ranks[1].next_document()["text"] for _ in range(6)] == docs[1::2]


def test_replicas_stay_identical_through_events(ddp_run):
    train, events, evals = logs(ddp_run, "ddp")
    assert list(train["step"]) == list(range(1, STEPS + 1))
    assert train["tokens"].iloc[-1] == STEPS * 2 * 4 * 16          # tokens count both ranks
    kinds = set(events["event"])
    assert "split" in kinds and kinds & {"prune", "failed_probation"}   # experts born and removed
    text = (ddp_run / "logs" / "ddp" / "training_log.txt").read_text()
    checks = re.findall(r"Step (\d+) \| Ranks \| 2 replicas identical", text)
    assert [int(s) for s in checks] == [5, 10, 15]                  # at every checkpoint
    assert "data-parallel: 2 ranks x 2 micro-batches x 2 sequences" in text
    state = torch.load(ddp_run / "checkpoints" / "ddp" / f"nemo_ckpt_step{STEPS}.pt", weights_only=True)
    assert len(layout.ranks(state)) == 2
    assert layout.rank_data(state, 0) != layout.rank_data(state, 1)   # each rank has its own position
    assert layout.model_weights(state)["blocks.0.moe.select_bias"].abs().sum() > 0  # in the digests too


class UnionStream:
    """One process's stream made of two ranks' streams: batch 2b = [rank 0's b; rank 1's b]."""

    def __init__(self, cfg, tokenizer, seq_len):
        self.ranks = [TokenStream(cfg, tokenizer, seq_len, rank=r, world_size=2) for r in range(2)]

    def next_batch(self, batch_size):
        return torch.cat([s.next_batch(batch_size // 2) for s in self.ranks])

    def next_batches(self, count, batch_size):   # the Trainer reads a step's micro-batches at once
        return [self.next_batch(batch_size) for _ in range(count)]

    def state_dict(self):
        return [s.state_dict() for s in self.ranks]

    def close(self):
        for s in self.ranks:
            s.close()


def test_two_ranks_train_like_one_process_on_the_union_batch(ddp_run, tmp_path):
    cfg = load_config("local", DDP + ["train.batch_size=4"])
    trainer = Trainer(cfg, RunPaths.of(tmp_path, "one"), max_steps=STEPS)
    trainer.stream = UnionStream(cfg.data, trainer.tokenizer, cfg.model.seq_len)
    try:
        trainer.fit()
    finally:
        trainer.close()
    ddp_train, ddp_events, ddp_evals = logs(ddp_run, "ddp")
    one_train, one_events, one_evals = logs(tmp_path, "one")
    assert list(one_train["tokens"]) == list(ddp_train["tokens"])
    assert (one_train["loss_ce"] - ddp_train["loss_ce"]).abs().max() < 1e-4
    assert (one_train["grad_norm"] - ddp_train["grad_norm"]).abs().max() < 1e-3
    # The selection bias moved by the ranks' summed counts, as by the union batch's counts.
    ddp_state = torch.load(ddp_run / "checkpoints" / "ddp" / f"nemo_ckpt_step{STEPS}.pt", weights_only=True)
    for i, layer in enumerate(trainer.model.moe_layers):
        assert torch.equal(layer.select_bias, layout.model_weights(ddp_state)[f"blocks.{i}.moe.select_bias"])
    # Same decisions: usage is summed over ranks before the controller decides.
    key = ["step", "layer", "event", "expert", "parents", "n_before", "n_after"]
    pd.testing.assert_frame_equal(one_events[key], ddp_events[key])
    # Held-out evaluation split over ranks and reduced = evaluated whole.
    assert list(one_evals["source"]) == list(ddp_evals["source"])
    assert (one_evals["loss"] - ddp_evals["loss"]).abs().max() < 1e-4


def test_sigkill_and_resume_under_torchrun(ddp_run, tmp_path):
    proc = torchrun(tmp_path, "ddp", "--max-steps", str(STEPS), wait=False)
    first = tmp_path / "checkpoints" / "ddp" / "nemo_ckpt_step5.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)     # torchrun and both ranks, mid-run
    proc.wait()
    assert first.exists(), proc.stdout.read()[-3000:]
    torchrun(tmp_path, "ddp", "--max-steps", str(STEPS), "--resume")
    assert_same_logs(logs(ddp_run, "ddp"), logs(tmp_path, "ddp"))
    assert_tensorboard_matches_csv(tmp_path / "logs" / "ddp")


def test_only_rank_0_writes_tensorboard(ddp_run):
    # One writer (rank 0: one event file); every scalar equals the CSV's at its step.
    assert len(event_files(ddp_run / "logs" / "ddp" / "tensorboard")) == 1
    assert_tensorboard_matches_csv(ddp_run / "logs" / "ddp")


def test_resume_with_another_world_size_is_refused(ddp_run, capsys):
    # One process cannot continue a two-process run: each rank's data position is its own.
    assert main(args(ddp_run, "ddp", "--resume", "--max-steps", str(STEPS + 2))) == 2
    err = capsys.readouterr().err
    assert "written by 2 data-parallel process(es), this run has 1" in err
    assert "Traceback" not in err


PLASTIC = ["--set", "plasticity.neuron.enabled=true", "--set", "plasticity.neuron.interval=4",
           "--set", "plasticity.heads.enabled=true", "--set", "plasticity.heads.interval=4",
           "--set", "plasticity.heads.prune=importance", "--set", "plasticity.heads.warmup_steps=2"]


def test_plasticity_under_torchrun_stays_in_sync_and_resumes_exactly(tmp_path):
    """Neuron and head statistics are per rank until a decision all-reduces them: each rank's
    own statistics are checkpointed, so a resumed run decides exactly as a straight one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    torchrun(straight, "p", "--max-steps", "12", *PLASTIC)
    torchrun(resumed, "p", "--max-steps", "6", *PLASTIC)      # stops mid-interval (events at 4, 8)
    torchrun(resumed, "p", "--max-steps", "12", "--resume", *PLASTIC)
    a, b = logs(straight, "p"), logs(resumed, "p")
    granularities = set(a[1]["granularity"])
    assert {"neuron", "head"} <= granularities
    assert_same_logs(a[:2], b[:2])   # training log and events
    # eval.csv: the interrupted run also evaluated where --max-steps stopped it (step 6).
    evals = b[2][b[2]["step"] != 6].reset_index(drop=True)
    pd.testing.assert_frame_equal(a[2], evals)
    text = (straight / "logs" / "p" / "training_log.txt").read_text()
    assert len(re.findall(r"Ranks \| 2 replicas identical", text)) == 3   # steps 5, 10, 12
