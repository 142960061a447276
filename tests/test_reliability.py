"""Survive what Colab does: kills at any instant, corrupt files, failed writes, bad input."""

import json
import os
import random
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from nemoe import checkpoint as ckpt
from nemoe import lock as lock_module
from nemoe import mirror
from nemoe.config import load_config
from tests.conftest import REPO
from tests.fixtures_data import write_alpaca, write_fineweb
from tests.test_tensorboard import assert_tensorboard_matches_csv
from tests.test_trainer import TINY, logs, run
from train_nemoe import main

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- #
# 1. SIGKILL at random instants, resume each time
# --------------------------------------------------------------------------- #

N_KILLS = 20
KILL_STEPS = 30  # = TINY's token target
# Every background checkpoint write and mirror copy pauses this long halfway (tests/fault_launcher.py),
# so the random kills often land inside one.
WRITE_PAUSE_S = 0.15


def kill_args(run_dir, data_dir, precision="fp32"):
    """A tiny run on two small local sources (fast start), a checkpoint every step, a mirror."""
    args = [sys.executable, str(REPO / "tests" / "fault_launcher.py"), f"slow:{WRITE_PAUSE_S}",
            str(run_dir / "unused-marker"), "--", "--config", "local", "--run-dir", str(run_dir),
            "--run-name", "tiny", "--max-steps", str(KILL_STEPS), "--mirror-dir", str(run_dir / "mirror")]
    sources = (f"[{{name: web, kind: files, path: '{data_dir / 'web.parquet'}', weight: 0.7}}, "
               f"{{name: alpaca, kind: files, path: '{data_dir / 'alpaca.jsonl'}', format: alpaca, weight: 0.3}}]")
    for item in TINY + ["checkpoint.every_steps=1", "checkpoint.keep_last=2", "eval.every_steps=10",
                        f"data.sources={sources}", "data.heldout_fraction=0.1", f"train.precision={precision}"]:
        args += ["--set", item]
    return args + ["--resume"]


# fp16 (autocast + GradScaler on CPU, the T4 path) too, with fewer kills: its steps are slower
# (CPU half-precision matmuls), hence a longer time bound.
@pytest.mark.parametrize("precision, n_kills, bound_s", [("fp32", N_KILLS, 600), ("fp16", N_KILLS // 2, 1200)])
def test_random_sigkills_lose_nothing(tmp_path, precision, n_kills, bound_s):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_fineweb(data_dir / "web.parquet", n=400)
    write_alpaca(data_dir / "alpaca.jsonl", n=300)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    straight_run = subprocess.run(kill_args(straight, data_dir, precision), capture_output=True,
                                  timeout=bound_s // 2)
    assert straight_run.returncode == 0

    rng = random.Random(0)
    csv = killed / "logs" / "tiny" / "training_log.csv"
    kills = 0
    started = time.time()
    while True:
        proc = subprocess.Popen(kill_args(killed, data_dir, precision), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if kills < n_kills:
            # Mostly after training has resumed (so each life makes progress), sometimes at start-up.
            rows = len(csv.read_text().splitlines()) if csv.exists() else 0
            if rng.random() < 0.8:
                while proc.poll() is None and (not csv.exists() or len(csv.read_text().splitlines()) <= rows):
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                time.sleep(rng.uniform(0.0, 3.0))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
            continue
        _, err = proc.communicate(timeout=bound_s // 2)
        assert proc.returncode == 0, err.decode()[-2000:]
        break
    assert time.time() - started < bound_s

    a_train, a_events, a_eval = logs(straight)
    b_train, b_events, b_eval = logs(killed)
    assert list(b_train["step"]) == list(range(1, KILL_STEPS + 1)), "each step once, in order"
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist(), "bit-exact losses"
    assert b_train["grad_scale"].tolist() == a_train["grad_scale"].tolist()
    pd.testing.assert_frame_equal(b_events, a_events)
    assert b_eval["loss"].tolist() == a_eval["loss"].tolist()
    folders = [killed / "logs" / "tiny", killed / "checkpoints" / "tiny",
               killed / "mirror" / "logs" / "tiny", killed / "mirror" / "checkpoints" / "tiny"]
    leftovers = [p for d in folders for p in d.iterdir() if ".tmp" in p.name or p.name == ".lock"]
    assert leftovers == []
    copies = ckpt.list_checkpoints(killed / "mirror" / "checkpoints" / "tiny")
    assert copies[0][0] == KILL_STEPS and all(mirror.verify(p) is None for _, p in copies)
    text = (killed / "logs" / "tiny" / "training_log.txt").read_text()
    cut = re.findall(r"Note \| removed \.(\S+)\.tmp\d+( in \S+)?, left by a write that was cut off", text)
    cut_checkpoints = sum(1 for name, where in cut if name.startswith("nemo_ckpt") and not where)
    cut_copies = sum(1 for name, where in cut if name.startswith("nemo_ckpt") and where)
    print(f"{kills} kills survived; {len(cut)} of them cut a write short ({cut_checkpoints} background checkpoint "
          f"writes, {cut_copies} mirror copies); {text.count('resumed from')} resumes, "
          f"{text.count('using the mirror')} from the mirror")
    assert cut_checkpoints >= 1, "some kills should land inside a background checkpoint write"
    assert cut_copies >= 1, "some kills should land inside a mirror copy"
    # TensorBoard too: each step once (also as stored, for readers that ignore purge markers),
    # every scalar equal to the CSV's value at the same step.
    assert_tensorboard_matches_csv(killed / "logs" / "tiny")


# --------------------------------------------------------------------------- #
# 2. Corrupt newest checkpoint
# --------------------------------------------------------------------------- #

def _corrupt_zero(path):
    path.write_bytes(b"")


def _corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_random(path):
    path.write_bytes(os.urandom(4096))


def _corrupt_other_config(path):
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["d_model"] = 64
    torch.save(state, path)


@pytest.mark.parametrize("corrupt,reason", [
    (_corrupt_zero, "unreadable checkpoint"), (_corrupt_truncate, "unreadable checkpoint"),
    (_corrupt_random, "unreadable checkpoint"), (_corrupt_other_config, "incompatible config"),
])
def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys, corrupt, reason):
    assert run(tmp_path, "--max-steps", "10") == 0
    corrupt(tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step10.pt")
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--max-steps", "11") == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "nemo_ckpt_step10.pt" in out and reason in out
    assert "resumed from nemo_ckpt_step5.pt at step 5" in out
    assert list(logs(tmp_path)[0]["step"]) == list(range(1, 12)), "rows 6-10 rolled back and replayed once"


def test_no_good_checkpoint_exits_nonzero_and_deletes_nothing(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "10") == 0
    folder = tmp_path / "checkpoints" / "tiny"
    for path in folder.iterdir():
        _corrupt_random(path)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    assert run(tmp_path, "--resume", "--max-steps", "12") == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoints" in err and "nothing was deleted" in err
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before


# --------------------------------------------------------------------------- #
# 3. Write failures
# --------------------------------------------------------------------------- #

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):  # the 2nd checkpoint hits a full disk mid-write
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", flaky_save)
    assert run(tmp_path, "--max-steps", "15") == 0
    out = capsys.readouterr().out
    assert "checkpoint at step 10 failed" in out and "No space left on device" in out
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "tiny").iterdir())
    assert names == ["nemo_ckpt_step15.pt", "nemo_ckpt_step5.pt"], "no partial file, step 5 kept"
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step5.pt")["step"] == 5


def test_repeated_checkpoint_failures_stop_the_run(tmp_path, capsys, monkeypatch):
    def full_disk(obj, f, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    assert run(tmp_path, "--set", "checkpoint.every_steps=1", "--set", "checkpoint.max_failures=3",
               "--max-steps", "20") == 2
    err = capsys.readouterr().err
    assert "3 checkpoint saves in a row failed" in err
    # Writes run in the background: the third failure (step 3's) is learned at the next save, step 4's.
    assert list(logs(tmp_path)[0]["step"]) == [1, 2, 3, 4]


def test_failed_log_writes_are_reported_and_training_goes_on(tmp_path, capsys, monkeypatch):
    from nemoe import logs as logs_module

    def broken(self, row):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(logs_module.CsvLog, "write", broken)
    assert run(tmp_path, "--max-steps", "6") == 0
    captured = capsys.readouterr()
    assert "cannot write the logs" in captured.err and "training goes on" in captured.err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints" / "tiny")] == [6, 5]


# 4. SIGTERM / Ctrl-C: test_trainer.py::test_signal_saves_a_checkpoint_and_exits_cleanly
#    (checkpoint at the last step, exit 0 within seconds, lock released).
# 5. Non-finite loss: test_trainer.py::test_non_finite_steps_are_skipped_then_the_run_stops


# --------------------------------------------------------------------------- #
# 6. Bad input fuzz: each config is refused with one message, exit 2, no files
# --------------------------------------------------------------------------- #

BAD_CONFIGS = [
    "model: {d_model: 12\n",                                  # YAML syntax
    "model:\n  d_model: 12\n   n_layers: 2\n",                # bad indentation
    "- a\n- b\n",                                             # not a mapping
    "model: 5\n",                                             # section not a mapping
    "modle: {d_model: 64}\n",                                 # unknown section
    "model: {dmodel: 64}\n",                                  # unknown key
    "train: {lr: fast}\n",                                    # wrong type
    "train: {batch_size: 2.5}\n",                             # float for int
    "train: {batch_size: true}\n",                            # bool for int
    "morph: {enabled: yes please}\n",                         # str for bool
    "model: {seq_len: 0}\n",
    "model: {seq_len: -8}\n",
    "model: {n_heads: 5}\n",                                  # does not divide d_model
    "model: {dropout: 1.5}\n",
    "model: {vocab_size: 100}\n",                             # smaller than the tokenizer's
    "moe: {experts_min: 5, experts_max: 4, experts_init: 4}\n",
    "moe: {experts_init: 9}\n",
    "moe: {top_k: 3}\n",
    "moe: {top_k: 2, experts_min: 1, experts_init: 2}\n",
    "moe: {lb_coef: -1}\n",
    "plasticity: {experts: {interval: 0}}\n",
    "plasticity: {experts: {split_usage: 0.01, prune_usage: 0.02}}\n",
    "morph: {crossover_prob: 2}\n",                         # the old spelling of plasticity.experts
    "morph: {interval: 5}\nplasticity: {experts: {interval: 5}}\n",   # both spellings at once
    "morph: {interval: 5}\nplasticity: 3\n",                 # the alias's parent is not a section
    "train: {lr: 0}\n",
    "train: {precision: fp8}\n",
    "train: {device: cuda}\n",                                # no CUDA GPU on this machine
    "train: {device: tpu}\n",
    "train: {total_tokens: 0}\n",
    "checkpoint: {keep_last: 0}\n",
    "log: {console: fancy}\n",
    "data: {sources: []}\n",                                  # empty sources
    "data: {sources: [{name: a, kind: builtin, path: prose, weight: 0}]}\n",
    "data: {sources: [{name: a, kind: builtin, path: prose, weight: -1}, {name: b, kind: builtin, path: code, weight: 0}]}\n",
    "data: {sources: [{name: a, kind: ftp, path: x}]}\n",    # unknown kind
    "data: {sources: [{name: a, kind: files, path: /nonexistent/*.jsonl}]}\n",  # missing files
    "data: {sources: [{name: a, kind: builtin, path: poetry}]}\n",
    "data: {sources: [{name: a, kind: builtin, path: prose, colour: red}]}\n",
    "data: {sources: [{name: a, kind: builtin, path: prose}, {name: a, kind: builtin, path: code}]}\n",
    "data: {sources: 3}\n",
    "data: {heldout_fraction: 1.5}\n",
]


@pytest.mark.parametrize("text", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_malformed_config_is_refused_cleanly(tmp_path, capsys, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    run_dir = tmp_path / "run"
    assert main(["--config", str(path), "--run-dir", str(run_dir), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not run_dir.exists(), "a refused config creates no files"


def test_there_are_at_least_30_bad_configs():
    assert len(BAD_CONFIGS) >= 30


def test_missing_config_and_bad_flags(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--config", "local", "--set", "nonsense"]) == 2
    assert main(["--config", "local", "--max-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "KEY=VALUE" in err and "--max-steps" in err


# --------------------------------------------------------------------------- #
# 7. Resume with a changed config
# --------------------------------------------------------------------------- #

def test_safe_config_changes_are_applied_and_logged(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "5") == 0
    assert run(tmp_path, "--resume", "--max-steps", "8", "--set", "log.every_steps=2",
               "--set", "train.total_tokens=3840") == 0
    out = capsys.readouterr().out
    assert "config change on resume: log.every_steps: 1 -> 2" in out
    assert "config change on resume: train.total_tokens: 1920 -> 3840" in out
    assert list(logs(tmp_path)[0]["step"]) == [1, 2, 3, 4, 5, 6, 8]


def test_unsafe_changes_are_listed_and_need_the_override(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "5") == 0
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--set", "data.seed=7", "--set", "moe.top_k=2") == 2
    err = capsys.readouterr().err
    derived = load_config("local", TINY).data.seed  # data.seed was left to derive from train.seed
    assert f"data.seed: {derived} -> 7" in err and "moe.top_k: 1 -> 2" in err and "--allow-config-change" in err
    assert run(tmp_path, "--resume", "--max-steps", "7", "--set", "data.seed=7", "--allow-config-change") == 0
    out = capsys.readouterr().out
    assert "unsafe, allowed by --allow-config-change" in out and "starts from its beginning" in out


# --------------------------------------------------------------------------- #
# 8. One run, one writer
# --------------------------------------------------------------------------- #

def test_second_writer_is_refused_while_the_first_lives(tmp_path):
    lock = lock_module.RunLock(tmp_path / "logs" / "tiny")
    lock.acquire()  # this test process is the live holder
    try:
        args = [sys.executable, str(REPO / "train_nemoe.py"), "--config", "local", "--run-dir", str(tmp_path),
                "--run-name", "tiny", "--max-steps", "1"] + [a for item in TINY for a in ("--set", item)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "in use by another trainer" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        lock.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    log_dir = tmp_path / "logs" / "tiny"
    log_dir.mkdir(parents=True)
    me = lock_module.RunLock(log_dir).me
    (log_dir / ".lock").write_text(json.dumps({"host": me["host"], "pid": int(dead)}))
    assert run(tmp_path, "--max-steps", "2") == 0


def test_lock_from_another_host_expires(tmp_path, monkeypatch):
    log_dir = tmp_path / "logs" / "tiny"
    log_dir.mkdir(parents=True)
    (log_dir / ".lock").write_text(json.dumps({"host": "colab-vm-gone", "pid": 1}))
    with pytest.raises(Exception, match="in use by another trainer"):
        lock_module.RunLock(log_dir).acquire()
    old = time.time() - lock_module.STALE_AFTER_S - 1
    os.utime(log_dir / ".lock", (old, old))
    lock_module.RunLock(log_dir).acquire()
