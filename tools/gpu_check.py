#!/usr/bin/env python
"""GPU self-check: the T4 path through the real trainer in one command, a verdict table and JSON.

    python tools/gpu_check.py                       # on a GPU (a Colab T4: under 5 minutes)
    python tools/gpu_check.py --device cpu --quick  # the same plumbing on tiny shapes (its test)
    python tools/gpu_check.py --steps 300 --json gpu_check.json --run-dir /tmp/check

This tool trains, unlike the tools that read a run's files (tools/runfiles.py, tools/csvlogs.py): every run
is nemoe's Trainer, built and fit in this process through tools/harness.py, as
train_nemoe.py drives it: the t4 model and batch (configs/t4.yaml) on the built-in
corpus (no Hub access), expert morphogenesis on an interval of a quarter of the run so
that splits happen before and after the resume point. Checks, one table row each (PASS / FAIL / INFO / SKIP):

  fp16            fp16 autocast + GradScaler: finite losses, the scale, skipped steps
  tokens/s, MFU   after the first fifth of the steps; MFU against the device's dense
                  fp16 (bf16) tensor peak from PEAKS (an unknown device: no MFU, said so)
  memory          torch.cuda.max_memory_allocated of the fp16 run next to the memory
                  plan's prediction (nemoe/memory.py, the trainer's memory guard)
  checkpoint      Trainer.save() time
  resume          half the steps, save, a new Trainer(resume=True) for the rest: each
                  training_log.csv row after the resume point against the straight run's
                  (CPU: bit for bit; CUDA kernels are not bitwise deterministic, so
                  within RESUME_TOLERANCE)
  fp16 vs fp32    mean training loss over the last fifth of the steps, within PARITY_TOLERANCE
  bf16            the same against fp32, where bf16 is native (sm >= 8.0; on CPU: autocast)
  compile         train.compile on vs off tokens/s (CUDA only)
  ddp             with two or more GPUs: torchrun, 2 ranks, NCCL, replicas identical
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from nemoe import schema
from nemoe.config import config_from_dict, find_config, read_yaml
from nemoe.errors import UserError
from nemoe.flops import flops_per_token
from nemoe.memory import gb, plan_memory
from tools import harness
from tools.cli import guard, note, resolve_device
from tools.csvlogs import read_training_log

REPO = Path(__file__).resolve().parent.parent
# Dense tensor-core peaks, TFLOP/s, without sparsity (NVIDIA datasheets): (name pattern, fp16, bf16);
# bf16 None: not native. Matched against torch.cuda.get_device_name in this order.
PEAKS = [(r"\bT4\b", 65, None), (r"\bL4\b", 121, 121), (r"\bA10\b", 125, 125), (r"\bA100\b", 312, 312),
         (r"\bH100\b.*\bPCIe\b", 756, 756), (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", 989, 989),
         (r"\bH200\b(?!.*\bNVL\b)", 989, 989)]
RESUME_TOLERANCE = 0.02   # nats: |loss_ce row difference| after a resume on CUDA
PARITY_TOLERANCE = 0.02   # relative difference of the final mean training loss, half vs fp32
QUICK_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16, "d_expert": 64}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense tensor peak in FLOP/s for fp16 / bf16; None when not in PEAKS."""
    for pattern, fp16, bf16 in PEAKS:
        if re.search(pattern, device_name):
            value = {"fp16": fp16, "bf16": bf16}.get(precision)
            return None if value is None else value * 1e12
    return None


def check_config(quick: bool, device: str, precision: str, steps: int, compile_model: bool = False) -> dict:
    """local.yaml (built-in corpus) with the t4 model, experts and batch; the schedule spans `steps`."""
    raw = read_yaml(find_config("local.yaml"))
    t4 = read_yaml(find_config("t4.yaml"))
    raw["model"] = dict(QUICK_MODEL) if quick else dict(t4["model"])
    raw["moe"] = dict(t4["moe"])
    interval = max(steps // 4, 2)
    raw["plasticity"]["experts"].update(interval=interval, probation_steps=interval)
    batch = 4 if quick else t4["train"]["batch_size"]
    raw["train"].update(device=device, precision=precision, compile=compile_model, batch_size=batch,
                        grad_accum=t4["train"]["grad_accum"], lr=t4["train"]["lr"], min_lr=t4["train"]["min_lr"],
                        warmup_steps=max(steps // 10, 1),
                        total_tokens=steps * batch * t4["train"]["grad_accum"] * raw["model"]["seq_len"])
    raw["log"] = {"every_steps": log_every(steps), "sample_every_steps": 0, "console": "plain"}
    raw["eval"] = {"every_steps": 0, "batches": 1 if quick else 2, "batch_size": 4 if quick else 16}
    raw["checkpoint"] = {"every_steps": 0, "every_minutes": 0, "keep_last": 2}
    raw["name"] = "gpu_check"
    return raw


def log_every(steps: int) -> int:
    return 1 if steps < 50 else 10


def train(raw: dict, run_dir: Path, max_steps: int, resume: bool = False, time_save: bool = False) -> dict:
    """One Trainer run (fit to max_steps, its console lines kept out of the table); its figures."""
    trainer = harness.open_trainer(raw, run_dir, "check", resume=resume, max_steps=max_steps, quiet=True)
    device = trainer.runtime.device
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        harness.fit(trainer, quiet=True)   # the run's text log keeps its console lines
        out = {"precision": trainer.runtime.precision, "reason": trainer.runtime.precision_reason,
               "step": trainer.step, "loss_scale": trainer.train.loss_scale,
               "flops_per_token": flops_per_token(trainer.model, trainer.cfg.model.seq_len),
               "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        if time_save:
            start = time.perf_counter()
            trainer.save()
            out["save_s"] = time.perf_counter() - start
    finally:
        harness.close_trainer(trainer)
    rows = read_training_log(trainer.paths.log_dir / schema.TRAIN_CSV)
    out["rows"] = {c: rows[c].tolist() for c in ("step", "tokens", "loss_ce", "grad_scale", "skipped_steps",
                                                  "elapsed_s")}
    return out


def tokens_per_s(run: dict) -> float:
    """Training tokens/s over the rows after the first fifth of the steps (warm-up, compilation)."""
    r = run["rows"]
    first = next(i for i, s in enumerate(r["step"]) if s >= r["step"][-1] / 5)
    first = min(first, len(r["step"]) - 2)
    return (r["tokens"][-1] - r["tokens"][first]) / max(r["elapsed_s"][-1] - r["elapsed_s"][first], 1e-9)


def final_loss(run: dict) -> float:
    """Mean training loss over the rows of the last fifth of the steps."""
    r = run["rows"]
    tail = [loss for s, loss in zip(r["step"], r["loss_ce"]) if s > 0.8 * r["step"][-1]]
    return sum(tail) / len(tail)


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, check: str, value, bar: str, verdict: str) -> None:
        self.rows.append({"check": check, "value": value, "bar": bar, "verdict": verdict})

    def lines(self) -> list[str]:
        header = {"check": "check", "value": "value", "bar": "bar", "verdict": "verdict"}
        rows = [header] + self.rows
        width = {k: max(len(str(r[k])) for r in rows) for k in ("check", "value", "bar")}
        return [f"{r['check']:<{width['check']}}  {str(r['value']):<{width['value']}}  "
                f"{r['bar']:<{width['bar']}}  {r['verdict']}" for r in rows]


def speed_row(table: Table, name: str, run: dict, device_name: str) -> float:
    tps = tokens_per_s(run)
    peak = peak_flops(device_name, run["precision"])
    if peak is None:
        mfu = (f"no MFU: no {run['precision']} peak known for {device_name!r}" if run["precision"] != "fp32"
               else "no MFU for fp32")
        table.add(f"{name} tokens/s", f"{tps:,.0f}", mfu, "INFO")
    else:
        value = tps * run["flops_per_token"] / peak
        run["mfu"] = value
        table.add(f"{name} tokens/s, MFU", f"{tps:,.0f}, MFU {100 * value:.1f} %",
                  f"peak {peak / 1e12:g} TFLOP/s (dense)", "INFO")
    run["tokens_per_s"] = tps
    return tps


def parity_row(table: Table, name: str, run: dict, reference: dict) -> None:
    a, b = final_loss(run), final_loss(reference)
    rel = abs(a - b) / b
    table.add(f"{name} vs fp32 loss (last fifth)", f"{a:.4f} vs {b:.4f} ({100 * rel:.2f} %)",
              f"<= {100 * PARITY_TOLERANCE:g} %", "PASS" if rel <= PARITY_TOLERANCE else "FAIL")


def check_fp16(table: Table, run: dict) -> None:
    r = run["rows"]
    finite = all(math.isfinite(x) for x in r["loss_ce"])
    skipped = int(sum(r["skipped_steps"]))
    ok = finite and run["precision"] == "fp16" and skipped < run["step"]
    scales = sorted(set(r["grad_scale"]))
    table.add("fp16 + GradScaler run", f"{run['step']} steps, {skipped} skipped, scale "
              f"{r['grad_scale'][0]:g} -> {r['grad_scale'][-1]:g} ({len(scales)} values)",
              "finite losses, steps applied", "PASS" if ok else "FAIL")


def check_resume(table: Table, straight: dict, resumed: dict, split: int, exact: bool) -> None:
    a = dict(zip(straight["rows"]["step"], straight["rows"]["loss_ce"]))
    b = dict(zip(resumed["rows"]["step"], resumed["rows"]["loss_ce"]))
    after = [s for s in a if s > split]
    same_steps = sorted(a) == sorted(b)
    diff = max((abs(a[s] - b[s]) for s in after if s in b), default=math.inf)
    ok = same_steps and (diff == 0 if exact else diff <= RESUME_TOLERANCE)
    bar = "bit for bit (CPU)" if exact else f"<= {RESUME_TOLERANCE} nats (CUDA)"
    table.add(f"resume at step {split}", f"max |d loss| {diff:.2e} over {len(after)} rows", bar,
              "PASS" if ok else "FAIL")


def check_ddp(table: Table, raw: dict, run_dir: Path, steps: int) -> dict:
    """torchrun, 2 ranks (NCCL on CUDA): exit 0 and the replica digests agree."""
    path = run_dir / "ddp.yaml"
    raw = {**raw, "train": {**raw["train"], "device": "cuda"}}
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_nemoe.py"), "--config", str(path), "--run-dir", str(run_dir / "ddp"),
           "--run-name", "ddp", "--max-steps", str(steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text_log = run_dir / "ddp" / schema.LOGS_DIR / "ddp" / schema.TEXT_LOG
    identical = text_log.is_file() and "replicas identical" in text_log.read_text()
    ok = proc.returncode == 0 and identical
    table.add("ddp: 2 ranks (torchrun, NCCL)", f"exit {proc.returncode}, replicas "
              f"{'identical' if identical else 'NOT checked identical'}", "exit 0, identical",
              "PASS" if ok else "FAIL")
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "stderr_tail": proc.stderr[-2000:]}


def run_checks(device: torch.device, quick: bool, steps: int, run_dir: Path) -> tuple[Table, dict]:
    cuda = device.type == "cuda"
    device_name = harness.device_name(device)
    table, runs = Table(), {}
    every = log_every(steps)
    split = max(every, (steps // 2) // every * every)

    def run(name, precision, max_steps, resume=False, compile_model=False, folder=None, time_save=False):
        note(f"{name}: {precision}, to step {max_steps}{' (resume)' if resume else ''} ...")
        raw = check_config(quick, str(device), precision, steps, compile_model)
        runs[name] = train(raw, run_dir / (folder or name), max_steps, resume, time_save)
        return runs[name]

    fp16 = run("fp16", "fp16", steps, time_save=True)
    check_fp16(table, fp16)
    speed_row(table, "fp16", fp16, device_name)
    plan = plan_memory(config_from_dict(check_config(quick, str(device), "fp16", steps)), "fp16")
    runs["memory_plan"] = plan.as_dict()
    if cuda:
        peak = fp16["peak_bytes"]
        table.add("fp16 peak memory vs plan", f"{gb(peak)} measured, {gb(plan.total())} planned",
                  "measured <= plan", "PASS" if peak <= plan.total() else "FAIL")
    else:
        table.add("fp16 peak memory vs plan", f"{gb(plan.total())} planned", "CUDA only", "SKIP")
    table.add("checkpoint save", f"{fp16['save_s']:.2f} s", "Trainer.save()", "INFO")
    run("resume_first_half", "fp16", split, folder="resumed")
    resumed = run("resume_second_half", "fp16", steps, resume=True, folder="resumed")
    check_resume(table, fp16, resumed, split, exact=not cuda)
    fp32 = run("fp32", "fp32", steps)
    speed_row(table, "fp32", fp32, device_name)
    parity_row(table, "fp16", fp16, fp32)
    native_bf16 = not cuda or torch.cuda.get_device_capability(device)[0] >= 8
    if native_bf16:
        bf16 = run("bf16", "bf16", steps)
        speed_row(table, "bf16", bf16, device_name)
        parity_row(table, "bf16", bf16, fp32)
    else:
        table.add("bf16", "not native on this GPU (sm < 8.0)", "", "SKIP")
    if cuda:
        try:
            compiled = run("fp16_compile", "fp16", steps, compile_model=True)
            ratio = tokens_per_s(compiled) / fp16["tokens_per_s"]
            table.add("torch.compile on / off", f"{ratio:.2f}x tokens/s", "runs", "INFO")
        except Exception as err:   # report why it did not compile
            table.add("torch.compile", f"{type(err).__name__}: {str(err).splitlines()[0][:60]}", "runs", "FAIL")
    else:
        table.add("torch.compile", "train.compile acts on CUDA only", "", "SKIP")
    if cuda and torch.cuda.device_count() >= 2:
        runs["ddp"] = check_ddp(table, check_config(quick, "cuda", "fp16", steps), run_dir, min(steps, 50))
    else:
        table.add("ddp: 2 ranks", f"{torch.cuda.device_count() if cuda else 0} GPU(s) here", ">= 2 GPUs", "SKIP")
    return table, runs


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cuda, cuda:N, cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps: the plumbing, not the figures")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300; --quick 6)")
    p.add_argument("--json", default="gpu_check.json", metavar="PATH",
                   help="where the figures go (default: %(default)s)")
    p.add_argument("--run-dir", default=None,
                   help="keep the runs' logs and checkpoints here (default: a temporary folder)")
    return p.parse_args(argv)


@guard
def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    steps = args.steps or (6 if args.quick else 300)
    if steps < 4:
        raise UserError(f"--steps {steps}: at least 4 (the resume check splits the run in two)")
    if device.type != "cuda" and not args.quick:
        note("no GPU in this run: the t4 model on a CPU takes long (CPU half precision is slow); "
             "--quick checks the plumbing in a minute")
    name = harness.device_name(device)
    header = {"device": str(device), "device_name": name, "torch": torch.__version__, "quick": args.quick,
              "steps": steps, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        header["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        header["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    print(f"nemoe gpu_check | {device} ({name}) | torch {torch.__version__} | {steps} steps per run"
          f"{' | quick' if args.quick else ''}", flush=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        run_dir = Path(args.run_dir) if args.run_dir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="nemoe-gpu-check-")))
        table, runs = run_checks(device, args.quick, steps, run_dir)
    failed = [r["check"] for r in table.rows if r["verdict"] == "FAIL"]
    verdict = "FAIL: " + ", ".join(failed) if failed else "PASS"
    print("\n".join(table.lines()))
    print(f"verdict: {verdict} ({time.perf_counter() - start:.0f} s)")
    payload = {**header, "verdict": verdict, "seconds": time.perf_counter() - start, "checks": table.rows,
               "runs": runs, "peaks_tflops": {p: (f16, b16) for p, f16, b16 in PEAKS}}
    try:
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    except OSError as err:
        raise UserError(f"--json {args.json}: cannot write: {err}") from None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
