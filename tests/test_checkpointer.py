"""The checkpoint components alone: the snapshot, the background writer's failure counting,
the mirror's verified copies and the newest-valid choice across the run folder and the mirror.
(Whole runs with kills and faults: tests/test_unattended.py, tests/test_reliability.py.)"""

from __future__ import annotations

import json
import types

import pytest
import torch

from nemoe import checkpoint as ckpt
from nemoe import checkpoint_layout as layout
from nemoe import mirror
from nemoe.distributed import DistInfo
from nemoe.errors import UserError
from nemoe.schema import RunPaths, list_checkpoints, manifest_name


class RecordingLog:
    def __init__(self):
        self.lines = []

    def line(self, step, text, echo=True):
        self.lines.append((step, text))
        self.echoed = getattr(self, "echoed", []) + [text] * echo

    def warn(self, step, text):
        self.lines.append((step, f"Warning | {text}"))

    def fsync(self):
        pass

    def flush_views(self):
        pass


def config(**kw):
    return types.SimpleNamespace(**{"every_minutes": 0, "keep_last": 2, "max_failures": 3, "background": True,
                                    "mirror_dir": None, **kw})


def test_snapshot_is_independent_keeps_shared_storage_and_reuses_its_buffers():
    tied = torch.randn(100, 8)
    state = {"model": {"emb": tied, "head": tied, "view": torch.randn(6, 6)[:, 1:4]},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}, "rng": (3, [1, 2]), "none": None}
    snapshots = ckpt.Snapshotter()
    first = snapshots.take(state)
    model = first["model"]
    assert model["emb"].untyped_storage().data_ptr() == model["head"].untyped_storage().data_ptr(), "still tied"
    assert torch.equal(model["view"], state["model"]["view"]) and model["view"].stride() == (6, 1)
    assert first["rng"] == (3, [1, 2]) and first["rng"][1] is not state["rng"][1]
    tied.add_(1.0)   # training goes on
    assert not torch.equal(model["emb"], tied), "the snapshot does not follow the live tensor"
    buffer = model["emb"].untyped_storage().data_ptr()
    second = snapshots.take(state)   # after the first was written: its buffers are refilled
    assert second["model"]["emb"].untyped_storage().data_ptr() == buffer
    assert torch.equal(second["model"]["emb"], tied)


def test_background_write_failures_are_counted_at_the_next_save(tmp_path, monkeypatch):
    log = RecordingLog()
    saver = ckpt.Checkpointer(config(max_failures=2), RunPaths.of(tmp_path, "run"), DistInfo(), log)
    saver.save({"step": 1, "w": torch.ones(4)})
    saver.wait()
    assert [s for s, _ in list_checkpoints(saver.directory)] == [1]

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    saver.save({"step": 2, "w": torch.ones(4)})     # fails in the background
    saver.save({"step": 3, "w": torch.ones(4)})     # learns of step 2's failure, then fails too
    assert any("checkpoint at step 2 failed" in text and "1 failures in a row" in text for _, text in log.lines)
    with pytest.raises(UserError, match="2 checkpoint saves in a row failed"):
        saver.wait()
    assert [p.name for p in saver.directory.iterdir()] == ["nemo_ckpt_step1.pt"], "no partial file, 1 kept"
    assert len(saver.blocked_s) == 3


@pytest.mark.parametrize("background", [True, False])
def test_a_checkpoint_line_names_the_step_it_saved_and_reaches_the_console(tmp_path, background):
    log = RecordingLog()
    saver = ckpt.Checkpointer(config(background=background), RunPaths.of(tmp_path, "run"), DistInfo(), log)
    saver.save({"step": 182, "w": torch.ones(4)})
    saver.save({"step": 250, "w": torch.ones(4)})   # a background write is learned of here
    saver.wait()
    done = [(step, text) for step, text in log.lines if text.startswith("Checkpoint |")]
    path = saver.directory / "nemo_ckpt_step182.pt"
    if background:
        assert done[0][0] == 250 and done[0][1].startswith(f"Checkpoint | saved step 182 to {path} (written in ")
        assert done[0][1].endswith(" s in the background, done by step 250)")
    else:
        assert done[0][0] == 182 and done[0][1].endswith(" s)") and "background" not in done[0][1]
    assert done[1][0] == 250 and "saved step 250" in done[1][1] and "done by" not in done[1][1]
    assert log.echoed == [text for _, text in done], "on the console too"


def test_the_mirror_copies_verifies_and_keeps_the_last(tmp_path):
    local = RunPaths.of(tmp_path / "local", "run")
    local.ckpt_dir.mkdir(parents=True)
    local.log_dir.mkdir(parents=True)
    (local.log_dir / "training_log.csv").write_text("step\n1\n")
    copies = mirror.Mirror(tmp_path / "drive", local, keep_last=2)
    for step in (1, 2, 3):
        path = local.ckpt_dir / f"nemo_ckpt_step{step}.pt"
        path.write_bytes(bytes([step]) * 1000)
        copies.submit(path)
        assert copies.close()
    folder = copies.paths.ckpt_dir
    assert [s for s, _ in list_checkpoints(folder)] == [3, 2]
    assert sorted(p.name for p in folder.iterdir()) == ["nemo_ckpt_step2.pt", "nemo_ckpt_step2.pt.json",
                                                         "nemo_ckpt_step3.pt", "nemo_ckpt_step3.pt.json"]
    manifest = json.loads((folder / manifest_name("nemo_ckpt_step3.pt")).read_text())
    assert manifest == {"file": "nemo_ckpt_step3.pt", "step": 3, "size": 1000,
                        "sha256": mirror.sha256_of(local.ckpt_dir / "nemo_ckpt_step3.pt")[1]}
    assert mirror.verify(folder / "nemo_ckpt_step3.pt") is None
    assert (copies.paths.log_dir / "training_log.csv").read_text() == "step\n1\n"
    (folder / "nemo_ckpt_step3.pt").write_bytes(bytes([9]) * 1000)
    assert "checksum mismatch" in mirror.verify(folder / "nemo_ckpt_step3.pt")
    (folder / manifest_name("nemo_ckpt_step2.pt")).unlink()
    assert "no manifest" in mirror.verify(folder / "nemo_ckpt_step2.pt")


def test_load_latest_takes_the_newest_valid_of_both_folders(tmp_path):
    local, drive = tmp_path / "local", tmp_path / "drive"
    state = lambda step: layout.new(step=step, tokens=0, elapsed=0.0, world_size=1,  # noqa: E731
                                    config={}, train_module={}, ranks=[])
    ckpt.save_checkpoint(local, state(4), keep_last=3)
    for step in (4, 8):   # the mirror has a newer verified copy (the local disk lost 8)
        path = ckpt.save_checkpoint(drive, state(step), keep_last=3)
        size, digest = mirror.sha256_of(path)
        (drive / manifest_name(path.name)).write_text(json.dumps({"size": size, "sha256": digest}))
    warnings = []
    path, loaded = ckpt.load_latest(local, warnings.append, also=(drive, mirror.verify))
    assert path == drive / "nemo_ckpt_step8.pt" and loaded["step"] == 8 and warnings == []
    (drive / manifest_name("nemo_ckpt_step8.pt")).write_text(json.dumps({"size": 1, "sha256": "0"}))
    path, loaded = ckpt.load_latest(local, warnings.append, also=(drive, mirror.verify))
    assert path == local / "nemo_ckpt_step4.pt", "equal steps: the run folder's file"
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0]
