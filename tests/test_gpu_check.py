"""tools/gpu_check.py with --device cpu --quick: the GPU self-check's plumbing on tiny shapes.

No figure is judged here (DESIGN §9): only that every check ran through the real
trainer, that the resume check is exact on CPU, and that table and JSON agree.
"""

from __future__ import annotations

import json

import pytest

from tools import gpu_check

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out / "check.json"),
                           "--run-dir", str(out / "runs")]) == 0
    return json.loads((out / "check.json").read_text()), out


@pytest.mark.slow
def test_every_check_has_a_verdict_and_none_failed(report):
    payload, _ = report
    verdicts = {row["check"]: row["verdict"] for row in payload["checks"]}
    assert payload["verdict"] == "PASS" and "FAIL" not in verdicts.values()
    assert verdicts["fp16 + GradScaler run"] == "PASS"
    assert verdicts["resume at step 3"] == "PASS"
    assert verdicts["fp16 vs fp32 loss (last fifth)"] == "PASS"
    assert verdicts["bf16 vs fp32 loss (last fifth)"] == "PASS"
    # What a CPU cannot do is said, not failed.
    assert verdicts["torch.compile"] == verdicts["ddp: 2 ranks"] == verdicts["fp16 peak memory vs plan"] == "SKIP"
    assert payload["device"] == "cpu" and payload["quick"] is True and payload["steps"] == 6


@pytest.mark.slow
def test_runs_went_through_the_trainer_in_each_precision(report):
    payload, out = report
    runs = payload["runs"]
    assert [runs[name]["precision"] for name in ("fp16", "fp32", "bf16")] == ["fp16", "fp32", "bf16"]
    assert runs["fp16"]["rows"]["step"] == [1, 2, 3, 4, 5, 6] and runs["fp16"]["save_s"] > 0
    assert runs["resume_second_half"]["rows"]["step"] == [1, 2, 3, 4, 5, 6]
    assert runs["resume_second_half"]["rows"]["loss_ce"] == runs["fp16"]["rows"]["loss_ce"], "bit for bit on CPU"
    text = (out / "runs" / "resumed" / "logs" / "check" / "training_log.txt").read_text()
    assert "resumed from nemo_ckpt_step3.pt at step 3" in text
    plan = runs["memory_plan"]
    assert plan["precision"] == "fp16" and plan["total_bytes"] > plan["static"]["params"] > 0


def test_mfu_peaks_by_device_name():
    assert gpu_check.peak_flops("Tesla T4", "fp16") == 65e12
    assert gpu_check.peak_flops("Tesla T4", "bf16") is None, "no native bf16 on a T4"
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3", "fp16") == 989e12
    assert gpu_check.peak_flops("NVIDIA A10", "fp16") == 125e12
    assert gpu_check.peak_flops("NVIDIA A10G", "fp16") is None, "not the A10: unknown, so no MFU"
    assert gpu_check.peak_flops("NVIDIA L4", "fp16") == 121e12
    assert gpu_check.peak_flops("AMD EPYC", "fp16") is None
