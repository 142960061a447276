"""t4.yaml's `kind: hf` sources end to end, against a Hub stand-in on 127.0.0.1 (tests/hub_server.py).

`python train_nemoe.py --config t4.yaml` runs in a subprocess with `HF_ENDPOINT` pointing at
the stand-in (the Hub clients read it at import), shrunk with --set in its model and batch
sizes only (plus a CPU, fp32, a log row per step and a checkpoint every 4 steps), under
tests/fault_launcher.py's fail-fast mode: the libraries' own retries wait milliseconds, so
faults reach nemoe's retries quickly, and no host but the loopback can be looked up. Faults are served at each place the run reads the Hub:
opening the sources, the held-out text at start-up (and on resume), the first batch and
shard reads mid-run. Every outlasted fault leaves the losses bit-identical, step by step,
to the fault-free run's; an outage past data.retry_minutes saves and exits 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from nemoe.schema import list_checkpoints
from tests.conftest import REPO
from tests.hub_server import Fault, serve, write_t4_repos

pytestmark = pytest.mark.slow

STEPS = 12
SHRINK = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16", "model.d_expert=64",
          "train.batch_size=2", "eval.batch_size=1"]
RUN = ["train.device=cpu", "train.precision=fp32", "log.every_steps=1", "log.console=plain",
       "log.sample_every_steps=0", "checkpoint.every_steps=4"]
OPEN = r"GET /api/datasets/Salesforce/wikitext/revision/"                    # opening a source
HELDOUT = r"GET .*/wikitext-103-raw-v1/validation-"                           # WikiText's validation split
SHARD = r"GET .*/sample/10BT/000_00000\.parquet"                             # a FineWeb shard
AFTER_STARTUP = "validation-"   # the held-out text is the last thing read before training


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return write_t4_repos(tmp_path_factory.mktemp("hub"))


def train(run_dir, server, *extra: str, retry_minutes: float = 1.0, timeout: float = 400):
    """train_nemoe.py --config t4.yaml against `server`, in a fresh process with a fresh Hub cache."""
    args = [sys.executable, str(REPO / "tests" / "fault_launcher.py"), "fail-fast", "-", "--",
            "--config", "t4.yaml", "--run-dir", str(run_dir), "--run-name", "t4", "--max-steps", str(STEPS)]
    for item in SHRINK + RUN + [f"data.retry_minutes={retry_minutes}"]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(run_dir / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DOWNLOAD_TIMEOUT="1", HF_HUB_ETAG_TIMEOUT="1", PYTHONPATH=str(REPO))
    return subprocess.run(args + list(extra), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "logs" / "t4" / "training_log.csv")


def text_log(run_dir) -> str:
    return (run_dir / "logs" / "t4" / "training_log.txt").read_text()


def evals(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "logs" / "t4" / "eval.csv")


@pytest.fixture(scope="module")
def reference(repos, tmp_path_factory):
    """The fault-free run, and the requests the stand-in had to answer for it."""
    run_dir = tmp_path_factory.mktemp("reference")
    server = serve(repos)
    try:
        proc = train(run_dir, server)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    print("\nrequests the stand-in answered:\n  " + "\n  ".join(server.requests()))
    return run_dir, server, proc.stderr


def assert_same_run(run_dir, reference_dir, steps=STEPS) -> None:
    a, b = losses(reference_dir), losses(run_dir)
    assert list(b["step"]) == list(range(1, steps + 1)), "each step once, in order"
    assert b["loss_ce"].tolist() == a["loss_ce"].tolist(), "bit-identical losses, step by step"
    assert b["grad_norm"].tolist() == a["grad_norm"].tolist()
    assert evals(run_dir)["loss"].tolist() == evals(reference_dir)["loss"].tolist(), "the same held-out text"


def test_t4_trains_from_the_stand_in_through_the_real_clients(reference):
    run_dir, server, stderr = reference
    assert set(evals(run_dir)["source"]) == {"fineweb", "alpaca", "wikitext", "all"}, "held-out per source"
    asked = "\n".join(server.requests())
    for pattern in ("HEAD /datasets/HuggingFaceFW/fineweb/resolve/main/README.md",
                    "GET /api/datasets/yahma/alpaca-cleaned/revision/<sha>",
                    "GET /api/datasets/Salesforce/wikitext/tree/<sha>/wikitext-103-raw-v1?recursive=false",
                    "GET /datasets/HuggingFaceFW/fineweb/resolve/<sha>/sample/10BT/001_00000.parquet",
                    "GET /datasets/yahma/alpaca-cleaned/resolve/<sha>/alpaca_data_cleaned.json",
                    "GET /datasets/Salesforce/wikitext/resolve/<sha>/wikitext-103-raw-v1/validation-00000-of-00001"):
        assert pattern in asked, f"{pattern} not among:\n{asked}"
    # The hosts outside the stand-in a client asked for: `datasets` looks for exported dataset
    # infos at datasets-server.<the endpoint's host> (it treats the failure as "none") and may
    # ping its download counter on s3.amazonaws.com (datasets.load.increase_load_count, errors
    # ignored); the launcher refuses those lookups, so nothing leaves 127.0.0.1.
    blocked = {line.split()[-1] for line in stderr.splitlines() if "blocked a lookup of" in line}
    print(f"lookups refused by the launcher: {sorted(blocked)}")
    assert blocked <= {"datasets-server.127.0.0.1", "s3.amazonaws.com"}, blocked


# Each fault at each place: opening a source, the held-out text, the first batch, a shard mid-run.
# A burst (times) longer than huggingface_hub's own 5 retries reaches nemoe's.
def _everywhere(kind: str, times: int) -> list[Fault]:
    return [Fault(kind, OPEN, nth=1, times=times), Fault(kind, HELDOUT, nth=2, times=times),
            Fault(kind, SHARD, nth=1, times=times, after=AFTER_STARTUP),
            Fault(kind, SHARD, nth=8, times=times, after=AFTER_STARTUP)]


@pytest.mark.parametrize("kind", ["500", "429", "reset", "truncated", "stall"])
def test_transport_faults_everywhere_are_outlasted_with_the_same_losses(repos, reference, tmp_path, kind):
    server = serve(repos, faults=_everywhere(kind, 7), stall_s=60.0)
    try:
        proc = train(tmp_path, server)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (A client may route around a failed request when it opens a source: that place needs one.)
    assert server.faults[0].fired >= 1 and [f.fired for f in server.faults[1:]] == [7] * 3, server.fired
    # Bursts longer than the Hub client's own retries reach nemoe's: at start-up and mid-run.
    assert "retrying in" in proc.stderr and "data source 'wikitext'" in proc.stderr, proc.stderr[-3000:]
    assert "reopening the stream at its position" in text_log(tmp_path)
    assert "Traceback" not in proc.stderr
    if kind == "stall":   # the stalls end by the client's read timeout (HF_HUB_*_TIMEOUT=1), not the server's 60 s
        # (one hang-up can go unrecorded: a CI run under load recorded 21 of 22, each ~1 s, and
        # the 22nd not before the server closed; why is not known)
        assert len(server.hung_up) >= len(server.fired) - 1 and max(server.hung_up) < 10, server.hung_up
    assert_same_run(tmp_path, reference[0])
    print(f"\n{kind}: {len(server.fired)} faulty answers at 4 places; losses equal to the fault-free run")


def test_connection_refused_at_start_and_mid_run_is_outlasted(repos, reference, tmp_path):
    faults = [Fault("refuse", HELDOUT, nth=2), Fault("refuse", SHARD, nth=1, after=AFTER_STARTUP),
              Fault("refuse", SHARD, nth=8, after=AFTER_STARTUP)]
    server = serve(repos, faults=faults, refuse_first_s=3.0, refuse_s=2.0)
    try:
        proc = train(tmp_path, server)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f.fired for f in faults), server.fired
    assert "retrying in" in proc.stderr, "the refused start was retried by nemoe"
    assert_same_run(tmp_path, reference[0])
    assert "reopening the stream at its position" in text_log(tmp_path)
    print(f"\nrefused for 3 s at the start and 2 s at {len(server.fired)} places; losses equal")


def test_outage_past_retry_minutes_saves_exits_2_and_a_resume_outlasts_a_heldout_fault(repos, reference, tmp_path):
    """500s on every FineWeb read from the 6th after start-up on, past data.retry_minutes: the run
    saves and exits 2 with one line; the resume meets a burst of 500s while it collects the
    held-out text again (the defect: that escaped as a traceback), outlasts it, and finishes
    with the losses of the fault-free run."""
    server = serve(repos, faults=[Fault("500", SHARD, nth=6, times=10**6, after=AFTER_STARTUP)])
    try:
        proc = train(tmp_path, server, retry_minutes=0.05)
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "longer than data.retry_minutes (0.05)" in errors[0], proc.stderr[-3000:]
    assert "--resume" in errors[0] and "Traceback" not in proc.stderr
    trained = list(losses(tmp_path)["step"])
    assert 0 < len(trained) < STEPS
    assert list_checkpoints(tmp_path / "checkpoints" / "t4")[0][0] == trained[-1], "saved where it stopped"

    server = serve(repos, faults=[Fault("500", HELDOUT, nth=2, times=12), Fault("500", OPEN, times=7)])
    try:
        proc = train(tmp_path, server, "--resume")
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [f.fired for f in server.faults] == [12, 7] and "retrying in" in proc.stderr
    assert_same_run(tmp_path, reference[0])
    print(f"\nstopped after step {trained[-1]} (exit 2, checkpoint saved); the resume outlasted "
          f"{len(server.fired)} 500s at start-up; losses equal")


def test_startup_outage_past_retry_minutes_is_one_line_exit_2(repos, tmp_path):
    """The held-out text cannot be collected for longer than data.retry_minutes: exit 2, one line."""
    server = serve(repos, faults=[Fault("500", HELDOUT, nth=2, times=10**6)])
    try:
        proc = train(tmp_path, server, retry_minutes=0.02)
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data source 'wikitext' (hf: Salesforce/wikitext, config wikitext-103-raw-v1) cannot be reached" in errors[0]
    assert "longer than data.retry_minutes (0.02)" in errors[0]
