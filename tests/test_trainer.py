"""End-to-end trainer runs: exact resume (invariant 5), checkpoints (6), signals, logs."""

import os
import re
import resource
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from nemoe import checkpoint as ckpt
from nemoe import checkpoint_layout as layout
from nemoe.schema import train_columns
from tests.conftest import REPO
from train_nemoe import main

pytestmark = pytest.mark.slow

# A tiny run: two built-in sources, events every 4 steps, per-step CSV rows.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.d_expert=64",
    "model.dropout=0.1",  # dropout on: resume must restore the RNG too
    "moe.experts_init=2", "moe.experts_max=4",
    "plasticity.experts.interval=4", "plasticity.experts.probation_steps=4", "plasticity.experts.split_usage=0.3",
    "plasticity.experts.prune_usage=0.2",
    "plasticity.experts.crossover_prob=0.5", "plasticity.experts.probation_min_usage=0.2",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=3", "train.total_tokens=1920",
    "train.device=cpu", "train.precision=fp32",
    "log.every_steps=1", "log.sample_every_steps=0", "log.console=plain",
    "eval.every_steps=8", "eval.batches=1", "eval.batch_size=2",
    "checkpoint.every_steps=5", "checkpoint.every_minutes=0", "checkpoint.keep_last=3",
]


def set_args(items) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for item in items for arg in ("--set", item)]


def run(run_dir, *extra, name="tiny"):
    args = ["--config", "local", "--run-dir", str(run_dir), "--run-name", name]
    for item in TINY:
        args += ["--set", item]
    return main(args + list(extra))


def logs(run_dir, name="tiny"):
    d = run_dir / "logs" / name
    return (pd.read_csv(d / "training_log.csv"), pd.read_csv(d / "events.csv"),
            pd.read_csv(d / "eval.csv"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    assert run(run_dir, "--max-steps", "24") == 0
    return run_dir


def test_run_writes_every_output(uninterrupted):
    train, events, evals = logs(uninterrupted)
    assert list(train["step"]) == list(range(1, 25))
    for col in ("step", "tokens", "loss_ce", "loss_lb", "loss_z", "lr", "grad_norm", "tokens_per_s",
                "elapsed_s", "experts_L0", "experts_L1"):
        assert col in train.columns
    assert train["tokens"].iloc[-1] == 24 * 4 * 16
    assert list(train.columns[:16]) == list(train_columns(2)[:16]) and train.columns[15] == "rss_mb", "appended"
    # This process's resident memory at each row: at least the model's, at most the process's peak.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6   # KiB on Linux
    assert ((train["rss_mb"] > 100) & (train["rss_mb"] <= peak_mb + 0.1)).all()
    assert set(evals["source"]) == {"prose", "code", "all"}
    assert sorted(set(evals["step"])) == [0, 8, 16, 24]
    assert len(events) > 0 and {"split"} <= set(events["event"])
    text = (uninterrupted / "logs" / "tiny" / "training_log.txt").read_text()
    assert "Event expert_split | Layer" in text and "→" in text
    # The lines say what they show: the cap, which loss, experts per layer, the step a checkpoint saved.
    assert "(30 steps) | stops at step 24 (1,536 tokens, --max-steps)" in text
    assert "| LossCE (mean of 1 step) " in text and "| LossCE (this step) " in text and "> split_usage 0.3" in text
    assert "| Experts per layer [" in text and "Thresh" not in text
    assert re.search(r"Step 10 \| Checkpoint \| saved step 5 to \S+nemo_ckpt_step5\.pt \(written in [\d.]+ s in "
                     r"the background, done by step 10\)", text)
    assert (uninterrupted / "logs" / "tiny" / "config.yaml").exists()
    steps = [s for s, _ in ckpt.list_checkpoints(uninterrupted / "checkpoints" / "tiny")]
    assert steps == [24, 20, 15], "keep_last=3 and a final checkpoint"


def test_expert_counts_in_csv_follow_the_events(uninterrupted):
    train, events, _ = logs(uninterrupted)
    for layer in (0, 1):
        counts = dict(zip(train["step"], train[f"experts_L{layer}"]))
        n = 2
        for step, group in events[events["layer"] == layer].groupby("step", sort=True):
            for _, e in group.iterrows():
                assert e["n_before"] == n, "events chain: each starts from the previous count"
                n = e["n_after"]
            assert counts[step] == n, "the CSV row of an event step shows the count after it"
        assert counts[24] == n
        assert train[f"experts_L{layer}"].between(2, 4).all()


def test_births_keep_probe_loss(uninterrupted):
    _, events, _ = logs(uninterrupted)
    births = events[events["event"].isin(["split", "crossover"])]
    assert len(births) > 0
    rel = (births["probe_loss_after"] - births["probe_loss_before"]).abs() / births["probe_loss_before"]
    assert rel.max() < 1e-3


def test_resume_is_bit_exact_across_events(uninterrupted, resumed_tiny):
    # resumed_tiny (conftest.py): stopped at 13 (final checkpoint 13), checkpoint 13 lost as if
    # the VM died before it landed, so the resume went back to step 10, dropped rows 11..13 and
    # replayed them; then resumed again at 20. Its first invocation is a fresh run of the same
    # seed, so rows 1-10 also show that the same seed gives the same run.
    straight_train, straight_events, straight_eval = logs(uninterrupted)
    train, events, evals = logs(resumed_tiny)
    assert list(train["step"]) == list(range(1, 25)), "each step exactly once, in order"
    assert train["loss_ce"].tolist() == straight_train["loss_ce"].tolist()   # bit for bit
    assert train["grad_norm"].tolist() == straight_train["grad_norm"].tolist()
    pd.testing.assert_frame_equal(events, straight_events)
    # the second invocation also evaluated where it stopped (step 20); the straight run did not
    assert evals[evals["step"] != 20]["loss"].tolist() == straight_eval["loss"].tolist()
    assert events["step"].min() < 10 < events["step"].max(), "events before and after the resume point"
    text = (resumed_tiny / "logs" / "tiny" / "training_log.txt").read_text()
    assert "resumed from nemo_ckpt_step10.pt at step 10" in text
    assert "resumed from nemo_ckpt_step20.pt at step 20" in text


def test_a_checkpoint_from_before_free_slots_resumes_and_both_optimizers_train_alike(uninterrupted, tmp_path,
                                                                                      monkeypatch):
    """The saved-state builder: the run as it was before nemoe.slot_optim, torch's AdamW over every
    expert slot (moments for free slots too), to step 13 with births and deaths; resumed by today's
    code, its checkpoint is upgraded on load. Rows 1-13 (old optimizer) and 14-24 (resumed) are the
    uninterrupted run of today's code bit for bit."""
    with monkeypatch.context() as patch:
        patch.setattr("nemoe.train_module.SlotAdamW", lambda params, slotted=(), **kw: torch.optim.AdamW(params, **kw))
        assert run(tmp_path, "--max-steps", "13") == 0
    saved = torch.load(tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step13.pt", weights_only=False)
    moments = layout.optimizer_state(saved)["state"].values()
    assert all("slots" not in m for m in moments) and any(m["exp_avg"].dim() == 3 for m in moments), "old layout"
    assert run(tmp_path, "--resume", "--max-steps", "24") == 0
    straight_train, straight_events, straight_eval = logs(uninterrupted)
    train, events, evals = logs(tmp_path)
    assert train["loss_ce"].tolist() == straight_train["loss_ce"].tolist()
    assert train["grad_norm"].tolist() == straight_train["grad_norm"].tolist()
    pd.testing.assert_frame_equal(events, straight_events)
    # the first invocation also evaluated where it stopped (step 13); the straight run did not
    assert evals[evals["step"] != 13]["loss"].tolist() == straight_eval["loss"].tolist()
    assert {"split", "prune"} & set(events[events["step"] <= 13]["event"]), "births or deaths before the checkpoint"


def test_resume_without_checkpoint_starts_fresh_unless_the_name_is_a_near_miss(tmp_path, capsys):
    assert run(tmp_path, "--resume", "--max-steps", "2") == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert list(logs(tmp_path)[0]["step"]) == [1, 2]
    # A mistyped name beside that run: refused, naming the run it resembles; nothing made.
    assert run(tmp_path, "--resume", "--max-steps", "4", name="tiyn") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: there is no run named 'tiyn'") and "but there is 'tiny'." in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["tiny"]
    # A name unlike any run there is a new experiment (the notebook always passes --resume): fresh.
    assert run(tmp_path, "--resume", "--max-steps", "1", name="static") == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["static", "tiny"]


def test_fresh_start_on_existing_run_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "5") == 0
    assert run(tmp_path, "--max-steps", "5") == 2
    assert "--resume" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints" / "tiny")] == [5]


def test_resume_with_an_incompatible_model_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "5") == 0
    assert run(tmp_path, "--resume", "--set", "model.d_model=48", "--set", "model.n_heads=2") == 2
    err = capsys.readouterr().err
    assert "written by an incompatible config: model.d_model: 32 -> 48" in err
    assert "--allow-config-change" in err


def test_checkpoint_save_is_atomic_and_keeps_last(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, {"step": step, "x": torch.ones(3) * step}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "nemo_ckpt_step1.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(Exception, match="not a nemoe checkpoint"):
        ckpt.load_checkpoint(path)
    path.write_bytes(os.urandom(256))
    with pytest.raises(Exception, match="unreadable checkpoint"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    args = [sys.executable, str(REPO / "train_nemoe.py"), "--config", "local", "--run-dir", str(tmp_path),
            "--run-name", "tiny"]
    for item in TINY + ["checkpoint.every_steps=0", "train.total_tokens=10000000"]:
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = tmp_path / "logs" / "tiny" / "training_log.csv"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and (
            not csv.exists() or len(csv.read_text().splitlines()) < 4):
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.time() - sent < 15, "a signal ends the run within seconds"
    assert not (tmp_path / "logs" / "tiny" / ".lock").exists(), "the run lock is released"
    assert "Traceback" not in err
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints" / "tiny")
    assert len(saved) == 1
    last_row = int(csv.read_text().splitlines()[-1].split(",")[0])
    assert saved[0][0] == last_row, "the checkpoint is at the last logged step"
    assert "stopped by signal" in out


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, capsys, monkeypatch):
    from nemoe.model import NemoeLM

    real, training_passes = NemoeLM.forward, []

    def poisoned(self, idx, targets=None):  # the loss of every training pass from step 4 on is NaN
        out = real(self, idx, targets)
        if self.training and torch.is_grad_enabled():
            training_passes.append(1)
            if len(training_passes) > 3:
                out.loss_ce = out.loss_ce * float("nan")
        return out

    monkeypatch.setattr(NemoeLM, "forward", poisoned)
    assert run(tmp_path, "--set", "train.max_bad_steps=3", "--max-steps", "20") == 2
    captured = capsys.readouterr()
    assert "non-finite loss or gradient" in captured.err
    (step, path), = ckpt.list_checkpoints(tmp_path / "checkpoints" / "tiny")[:1]
    assert step == 6
    state = ckpt.load_checkpoint(path)
    weights = {k: v for k, v in layout.model_weights(state).items() if not k.endswith("route_offset")}  # -inf = free slot
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_fresh_start_drops_rows_of_an_attempt_killed_before_its_first_checkpoint(tmp_path):
    log_dir = tmp_path / "logs" / "tiny"
    log_dir.mkdir(parents=True)
    (log_dir / "eval.csv").write_text("step,tokens,source,loss,ppl\n0,0,all,10.8,49000.0\n")
    (log_dir / "training_log.txt").write_text("[2026-01-01 00:00:00] Step 0 | Eval | all 10.8000\n")
    assert run(tmp_path, "--resume", "--max-steps", "2") == 0
    evals = logs(tmp_path)[2]
    assert list(evals["step"]).count(0) == 3, "one step-0 evaluation: prose, code, all"
    assert "all 10.8000" not in (log_dir / "training_log.txt").read_text()


def test_last_step_gets_a_row_even_off_the_log_interval(tmp_path):
    assert run(tmp_path, "--set", "log.every_steps=5", "--max-steps", "7") == 0
    assert list(logs(tmp_path)[0]["step"]) == [5, 7]
