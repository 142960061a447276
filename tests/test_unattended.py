"""Long unattended runs: the network and the disk fail, nothing is lost.

Every test compares with one straight run (`straight`): a tiny model on two local sources,
12 steps, checkpoints every 4. After each fault the run's per-step losses, events and
evaluations must equal the straight run's bit for bit, each step logged once.

- stream faults (a dropped connection, HTTP 500, 429) of http:// sources served on 127.0.0.1;
- an outage longer than data.retry_minutes: save, exit 2, resume;
- a SIGKILL inside a background checkpoint write and inside a mirror copy;
- the local run folder lost: resume from the mirror alone;
- a corrupted mirror copy: detected by its checksum, not used;
- a copy that fails verification (retried, reported) and a mirror that cannot be written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemoe import mirror, sources
from nemoe.schema import list_checkpoints, manifest_name
from nemoe.trainer import Trainer
from tests.conftest import REPO
from tests.fixtures_data import fineweb_rows, write_alpaca
from tests.http_server import fail_fast, serve
from tests.test_trainer import TINY, logs
from train_nemoe import main

pytestmark = pytest.mark.slow

STEPS = 12
SETTINGS = TINY + ["checkpoint.every_steps=4", "checkpoint.keep_last=2", "eval.every_steps=6",
                   "data.heldout_fraction=0.1"]


@pytest.fixture(autouse=True, scope="module")
def _fast_failures():
    """Faults reach nemoe's retry at once (one read attempt in `datasets`, no sleeps), and sources
    are read in small formatting batches, so an http source is read all along the run rather than
    in one go at its start (text documents do not depend on the batch size)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "MAP_BATCH_ROWS", 4)
        fail_fast(patch)
        patch.setattr(mirror, "MIRROR_RETRY_S", 0.0)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    # Row groups of 2 documents: over HTTP, every few steps read a new one (a request that can fail).
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(fineweb_rows(400))), d / "web.parquet", row_group_size=2)
    write_alpaca(d / "alpaca.jsonl", n=40)
    return d


def args(run_dir, web, alpaca, *extra) -> list[str]:
    sources = (f"[{{name: web, kind: files, path: '{web}', weight: 0.7}}, "
               f"{{name: alpaca, kind: files, path: '{alpaca}', format: alpaca, weight: 0.3}}]")
    out = ["--config", "local", "--run-dir", str(run_dir), "--run-name", "tiny"]
    for item in SETTINGS + [f"data.sources={sources}"]:
        out += ["--set", item]
    return out + list(extra)


def local_args(run_dir, files, *extra) -> list[str]:
    return args(run_dir, files / "web.parquet", files / "alpaca.jsonl", *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, files):
    run_dir = tmp_path_factory.mktemp("straight")
    assert main(local_args(run_dir, files, "--max-steps", str(STEPS))) == 0
    return run_dir


def assert_same_run(run_dir, straight) -> None:
    a_train, a_events, a_eval = logs(straight)
    b_train, b_events, b_eval = logs(run_dir)
    assert list(b_train["step"]) == list(range(1, STEPS + 1)), "each step once, in order"
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist(), "bit-exact losses"
    assert b_train["grad_norm"].tolist() == a_train["grad_norm"].tolist()
    pd.testing.assert_frame_equal(b_events, a_events)
    assert b_eval["loss"].tolist() == a_eval["loss"].tolist()


def text_log(run_dir) -> str:
    return (run_dir / "logs" / "tiny" / "training_log.txt").read_text()


@pytest.fixture
def arm_at_step(monkeypatch):
    """arm_at_step(server, step): the server's faults start when training reaches `step`
    (start-up reads are never faulted: there a fault is a clear error, not a retry)."""
    def arm(server, step: int = 0):
        real = Trainer.train_step

        def train_step(self):
            if self.step == step:
                server.arm()
            return real(self)
        monkeypatch.setattr(Trainer, "train_step", train_step)
    return arm


# --------------------------------------------------------------------------- #
# Stream faults
# --------------------------------------------------------------------------- #

def test_dropped_connections_500_and_429_change_no_loss(tmp_path, files, straight, arm_at_step):
    plan = {("web.parquet", 2): "drop", ("web.parquet", 9): "500", ("alpaca.jsonl", 2): "drop",
            ("web.parquet", 16): "429"}
    server = serve(files, plan=plan)
    arm_at_step(server)
    try:
        code = main(args(tmp_path, server.url("web.parquet"), server.url("alpaca.jsonl"), "--max-steps", str(STEPS)))
    finally:
        server.close()
    assert code == 0
    assert sorted(f for _, f, _ in server.fired) == ["429", "500", "drop", "drop"], server.fired
    assert_same_run(tmp_path, straight)
    text = text_log(tmp_path)
    assert text.count("reopening the stream at its position") >= 3   # two faults may fail one read
    print(f"\n{len(server.fired)} faults served ({', '.join(f for _, f, _ in server.fired)}), "
          f"{text.count('reopening the stream')} reopenings, losses equal to the straight run")


def test_outage_past_retry_minutes_saves_exits_2_then_resumes_exactly(tmp_path, files, straight, arm_at_step,
                                                                      capsys):
    server = serve(files, fail_all_after=0)
    arm_at_step(server, 3)   # from step 3 on every request fails; one batch is read ahead
    try:
        extra = ("--set", "data.retry_minutes=0.01", "--set", "data.prefetch_batches=1", "--max-steps", str(STEPS))
        run_args = args(tmp_path, server.url("web.parquet"), server.url("alpaca.jsonl"), *extra)
        assert main(run_args) == 2
        err = capsys.readouterr().err
        assert "longer than data.retry_minutes (0.01)" in err and "--resume" in err and "Traceback" not in err
        trained = list(logs(tmp_path)[0]["step"])
        assert 0 < len(trained) < STEPS
        assert list_checkpoints(tmp_path / "checkpoints" / "tiny")[0][0] == trained[-1], "saved where it stopped"
        server.heal()
        assert main(run_args + ["--resume"]) == 0
    finally:
        server.close()
    assert_same_run(tmp_path, straight)
    print(f"\nstopped after step {trained[-1]} with exit 2 (checkpoint saved), resumed to step {STEPS}: "
          "losses equal to the straight run")


# --------------------------------------------------------------------------- #
# Kills inside background writes
# --------------------------------------------------------------------------- #

def kill_inside(mode: str, run_dir, files, *extra) -> str:
    """Start the run under tests/fault_launcher.py, SIGKILL it once it pauses inside the write."""
    marker = run_dir / "paused"
    launcher = [sys.executable, str(REPO / "tests" / "fault_launcher.py"), mode, str(marker), "--"]
    proc = subprocess.Popen(launcher + local_args(run_dir / "run", files, "--max-steps", str(STEPS), *extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no pause"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run_dir / "run"


def test_kill_during_a_background_checkpoint_write(tmp_path, files, straight):
    run_dir = kill_inside("pause-write:8", tmp_path, files)
    folder = run_dir / "checkpoints" / "tiny"
    assert [p.name for p in folder.glob(".nemo_ckpt_step8.pt.tmp*")], "killed inside the write of step 8"
    assert [s for s, _ in list_checkpoints(folder)] == [4]
    assert main(local_args(run_dir, files, "--max-steps", str(STEPS), "--resume")) == 0
    assert_same_run(run_dir, straight)
    text = text_log(run_dir)
    assert "left by a write that was cut off" in text and "resumed from nemo_ckpt_step4.pt at step 4" in text


def test_kill_during_a_mirror_copy(tmp_path, files, straight):
    mirror_dir = tmp_path / "mirror"
    run_dir = kill_inside("pause-mirror:8", tmp_path, files, "--mirror-dir", str(mirror_dir))
    copies = mirror_dir / "checkpoints" / "tiny"
    assert [p.name for p in copies.glob(".nemo_ckpt_step8.pt.tmp*")], "killed inside the copy of step 8"
    assert mirror.verify(copies / "nemo_ckpt_step4.pt") is None
    assert main(local_args(run_dir, files, "--max-steps", str(STEPS), "--resume", "--mirror-dir", str(mirror_dir))) == 0
    assert_same_run(run_dir, straight)
    assert f"in {copies}, left by a write that was cut off" in text_log(run_dir)
    assert [s for s, _ in list_checkpoints(copies)] == [12, 4], "the mirror caught up (8's copy was cut), keep_last 2"
    assert all(mirror.verify(p) is None for _, p in list_checkpoints(copies))


# --------------------------------------------------------------------------- #
# The mirror
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, files):
    """A whole run with a mirror (keep_last 3: it keeps steps 4, 8 and 12), whose first checkpoint
    copy is corrupted on its way (and retried)."""
    root = tmp_path_factory.mktemp("mirrored")
    real, calls = mirror.copy_and_hash, []

    def corrupting(source, target):
        result = real(source, target)
        if source.name.endswith(".pt"):
            calls.append(source.name)
            if len(calls) == 1:   # the copy on the mirror's disk differs from what was read
                with open(target, "r+b") as f:
                    f.seek(100)
                    byte = f.read(1)
                    f.seek(100)
                    f.write(bytes([byte[0] ^ 0xFF]))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mirror, "copy_and_hash", corrupting)
        assert main(local_args(root / "run", files, "--max-steps", str(STEPS), *KEEP3, "--mirror-dir",
                               str(root / "mirror"))) == 0
    return root


def test_a_copy_that_fails_verification_is_retried_and_reported(mirrored):
    text = text_log(mirrored / "run")
    assert "mirror: copying nemo_ckpt_step4.pt failed (MirrorMismatch: the copy read back differs" in text
    assert "retrying (1/3)" in text
    assert all(f"Mirror | nemo_ckpt_step{step}.pt copied to" in text for step in (4, 8, 12))
    copies = mirrored / "mirror" / "checkpoints" / "tiny"
    assert [s for s, _ in list_checkpoints(copies)] == [12, 8, 4], "keep_last applies in the mirror too"
    for step in (4, 8, 12):
        manifest = json.loads((copies / manifest_name(f"nemo_ckpt_step{step}.pt")).read_text())
        local = mirrored / "run" / "checkpoints" / "tiny" / f"nemo_ckpt_step{step}.pt"
        assert manifest["size"] == local.stat().st_size and manifest["sha256"] == mirror.sha256_of(local)[1]
    assert (mirrored / "mirror" / "logs" / "tiny" / "training_log.csv").exists()


KEEP3 = ("--set", "checkpoint.keep_last=3")


def lagging_mirror(mirrored, tmp_path):
    """The mirror as if the VM died after checkpoint 8 reached it: step 12's copy is not there."""
    shutil.copytree(mirrored / "mirror", tmp_path / "mirror")
    newest = tmp_path / "mirror" / "checkpoints" / "tiny" / "nemo_ckpt_step12.pt"
    newest.unlink()
    newest.with_name(manifest_name(newest.name)).unlink()
    return tmp_path / "mirror"


def test_the_run_resumes_from_the_mirror_alone(tmp_path, mirrored, files, straight):
    lagging_mirror(mirrored, tmp_path)
    run_dir = tmp_path / "fresh-vm"   # an empty local disk: no logs, no checkpoints
    assert main(local_args(run_dir, files, "--max-steps", str(STEPS), *KEEP3, "--resume",
                           "--mirror-dir", str(tmp_path / "mirror"))) == 0
    assert_same_run(run_dir, straight)
    text = text_log(run_dir)
    assert "using the mirror's verified copy" in text and "resumed from nemo_ckpt_step8.pt at step 8" in text
    assert "copied training_log.csv from the mirror" in text


def test_a_corrupted_mirror_copy_is_detected_and_not_used(tmp_path, mirrored, files, straight, capsys):
    lagging_mirror(mirrored, tmp_path)
    newest = tmp_path / "mirror" / "checkpoints" / "tiny" / "nemo_ckpt_step8.pt"
    data_bytes = bytearray(newest.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01   # one bit flipped on Drive: same size, loads fine or not
    newest.write_bytes(bytes(data_bytes))
    assert main(local_args(tmp_path / "run", files, "--max-steps", str(STEPS), *KEEP3, "--resume",
                           "--mirror-dir", str(tmp_path / "mirror"))) == 0
    out = capsys.readouterr().out
    assert f"skipping {newest}: checksum mismatch" in out
    assert "resumed from nemo_ckpt_step4.pt at step 4" in out, "the older verified copy"
    assert_same_run(tmp_path / "run", straight)


def test_a_mirror_that_cannot_be_written_does_not_stop_training(tmp_path, files, monkeypatch):
    def read_only(source, target):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(mirror, "copy_and_hash", read_only)
    assert main(local_args(tmp_path / "run", files, "--max-steps", "5", "--mirror-dir", str(tmp_path / "mirror"))) == 0
    text = text_log(tmp_path / "run")
    assert "copying nemo_ckpt_step4.pt failed (OSError: [Errno 30] Read-only file system); giving up" in text
    assert "copying the logs to" in text
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints" / "tiny")] == [5, 4]
    assert not os.path.exists(tmp_path / "mirror" / "checkpoints" / "tiny" / "nemo_ckpt_step4.pt")
