#!/usr/bin/env python
"""Soak: does the trainer's resident memory stay flat over thousands of steps?

    OMP_NUM_THREADS=1 nice -n 10 python tools/soak.py --steps 3000
    python tools/soak.py --steps 3000 --trace       # also where the memory goes
    python tools/soak.py --steps 200 --set model.d_model=128 --json soak.json

Trains local.yaml shrunk to a small model (d_model 64, 2 layers, 4 sequences of 32
tokens; the GPT-2 vocabulary stays) on the built-in corpus, with every periodic
event made frequent: morphogenesis every 25 steps, neuron turnover every 50,
evaluation every 100, a checkpoint every 100 (in the background, mirrored to a
second folder with its logs and TensorBoard files), a log row every 10 steps.
It runs the real trainer in this process (train_nemoe.main) and reads back
training_log.csv's `rss_mb` column (the resident set size when each row was
written). Printed: the curve, and the growth after warm-up as the least-squares
slope in MB per 1,000 steps.

--trace also follows, at each log row, glibc's own count of the bytes malloc hands
out and holds (mallinfo2: in use, free inside its arenas, mmapped), the live
torch tensors and Python objects (gc), and compares tracemalloc snapshots at the
end of warm-up and at the end (Python allocations only: tensor storage is
allocated in C++ and shows in the malloc figures instead). tracemalloc slows the
run down severalfold.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

from nemoe.config import load_config
from nemoe.errors import UserError
from nemoe.metrics import resident_mb
from nemoe.trainer import Trainer
from tools.cli import guard
from tools.csvlogs import read_training_log

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.d_expert=128",
         "train.batch_size=4", "train.device=cpu", "train.precision=fp32", "train.warmup_steps=20",
         "moe.experts_max=4", "plasticity.experts.interval=25", "plasticity.experts.probation_steps=50",
         "plasticity.experts.probation_min_usage=0.0",
         "plasticity.neuron.enabled=true", "plasticity.neuron.interval=50",
         "log.every_steps=10", "log.sample_every_steps=500", "log.console=plain",
         "eval.every_steps=100", "eval.batches=2", "eval.batch_size=4",
         "checkpoint.every_steps=100", "checkpoint.every_minutes=0", "checkpoint.keep_last=2"]


def parse_args(argv):
    p = argparse.ArgumentParser(description="Resident memory of a long small training run, per step.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from the slope (default: steps / 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides, after the soak's own")
    p.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--trace", action="store_true", help="also malloc, gc and tracemalloc: where the memory goes")
    p.add_argument("--every", type=int, default=None, help="print the curve every N steps (default: steps / 15)")
    p.add_argument("--json", default=None, help="write the curve and the figures to this file")
    return p.parse_args(argv)


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, MB) points, in MB per 1,000 steps (NaN: fewer than two)."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    return 1000 * sum((s - mx) * (v - my) for s, v in points) / sxx if sxx else math.nan


def malloc_mb() -> dict[str, float] | None:
    """glibc's mallinfo2: bytes handed out, free bytes kept in its arenas, mmapped (None off glibc)."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    m = libc.mallinfo2()
    return {"in_use": round((m.uordblks + m.hblkhd) / 1e6, 1), "free_in_arenas": round(m.fordblks / 1e6, 1),
            "mmapped": round(m.hblkhd / 1e6, 1)}


def live_tensors() -> tuple[int, float]:
    """(number, MB of distinct storages) of the torch tensors gc can see."""
    import torch
    count, storages = 0, {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            count += 1
            try:
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except RuntimeError:
                pass
    return count, sum(storages.values()) / 1e6


class Tracer:
    """Hooks Trainer.write_metrics: a probe at each log row, tracemalloc snapshots at two steps."""

    def __init__(self, warmup: int, end: int):
        import tracemalloc

        self.tracemalloc, self.warmup, self.end, self.rows, self.snaps = tracemalloc, warmup, end, [], {}
        self.types: dict[int, Counter] = {}
        tracemalloc.start(12)
        real = Trainer.write_metrics

        def write_metrics(trainer):
            real(trainer)
            self.probe(trainer.step)
        Trainer.write_metrics = write_metrics

    def probe(self, step: int) -> None:
        tensors, tensor_mb = live_tensors()
        self.rows.append({"step": step, "rss_mb": resident_mb(), "objects": len(gc.get_objects()),
                          "tensors": tensors, "tensor_mb": round(tensor_mb, 1),
                          "traced_mb": round(self.tracemalloc.get_traced_memory()[0] / 1e6, 1),
                          **{f"malloc_{k}": v for k, v in (malloc_mb() or {}).items()}})
        if step in (self.warmup, self.end) and step not in self.snaps:
            gc.collect()
            self.snaps[step] = self.tracemalloc.take_snapshot()
            self.types[step] = Counter(type(o).__name__ for o in gc.get_objects())

    def report(self) -> list[str]:
        lines = []
        if self.warmup in self.snaps and self.end in self.snaps and self.warmup != self.end:
            lines.append(f"tracemalloc: the largest growths of Python allocations, step {self.warmup} -> {self.end}")
            stats = self.snaps[self.end].compare_to(self.snaps[self.warmup], "traceback")
            for stat in stats[:8]:
                frame = next((f for f in reversed(stat.traceback) if "/nemoe/" in f.filename), stat.traceback[0])
                lines.append(f"  {stat.size_diff / 1e6:+8.3f} MB {stat.count_diff:+7d} blocks  "
                             f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno}")
            grew = (self.types[self.end] - self.types[self.warmup]).most_common(6)
            lines.append("gc: object types that grew most: " + (", ".join(f"{n} +{c}" for n, c in grew) or "none"))
        return lines


@guard
def main(argv: list[str] | None = None) -> int:
    from train_nemoe import main as train   # the script at the repository root, not an installed module

    args = parse_args(argv)
    if args.steps < 20:
        raise UserError("--steps must be at least 20")
    warmup = args.warmup if args.warmup is not None else args.steps // 5
    settings = SMALL + args.overrides
    cfg = load_config("local.yaml", settings)
    tokens = args.steps * cfg.tokens_per_step(1)
    settings.append(f"train.total_tokens={tokens}")   # the LR schedule spans the soak
    with tempfile.TemporaryDirectory(prefix="nemoe-soak-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        log_every = load_config("local.yaml", settings).log.every_steps
        tracer = Tracer(warmup - warmup % log_every, args.steps) if args.trace else None
        cli = ["--config", "local.yaml", "--run-dir", str(run_dir / "run"), "--run-name", "soak",
               "--mirror-dir", str(run_dir / "mirror"), "--max-steps", str(args.steps)]
        for item in settings:
            cli += ["--set", item]
        started = time.monotonic()
        code = train(cli)
        seconds = time.monotonic() - started
        if code:
            raise UserError(f"the soak's training run exited with {code} (its error is printed above)")
        train_log = read_training_log(run_dir / "run" / "logs" / "soak" / "training_log.csv")
    if "rss_mb" not in train_log or train_log["rss_mb"].isna().all():
        raise UserError("training_log.csv has no rss_mb values (no /proc/self/statm on this system?)")
    points = [(int(s), float(v)) for s, v in zip(train_log["step"], train_log["rss_mb"]) if v == v]
    every = args.every or max(log_every, (args.steps // 15) // log_every * log_every)
    after = [(s, v) for s, v in points if s >= warmup]
    result = {"steps": args.steps, "warmup": warmup, "seconds": round(seconds, 1),
              "first_mb": points[0][1], "peak_mb": max(v for _, v in points), "last_mb": points[-1][1],
              "growth_mb_per_1000_steps": round(slope_per_1000(after), 2),
              "after_warmup_min_max_mb": [min(v for _, v in after), max(v for _, v in after)] if after else None,
              "curve": points}
    print(f"soak: {args.steps} steps in {seconds:.0f} s ({', '.join(settings)})")
    print("  step   rss_mb" + ("   malloc in use / free in arenas   tensors (MB)   objects" if tracer else ""))
    probes = {r["step"]: r for r in tracer.rows} if tracer else {}
    for step, value in points:
        if step % every == 0 or step == points[-1][0]:
            r = probes.get(step)
            more = (f"   {r.get('malloc_in_use', math.nan):8.1f} / {r.get('malloc_free_in_arenas', math.nan):8.1f}"
                    f"          {r['tensors']:5d} ({r['tensor_mb']:.1f})   {r['objects']:8d}") if r else ""
            print(f"  {step:5d}  {value:7.1f}{more}")
    lo, hi = result["after_warmup_min_max_mb"] or (math.nan, math.nan)
    print(f"resident memory: first row {result['first_mb']:.1f} MB, peak {result['peak_mb']:.1f} MB, "
          f"after warm-up (step >= {warmup}) {lo:.1f}..{hi:.1f} MB; "
          f"growth {result['growth_mb_per_1000_steps']:+.2f} MB per 1,000 steps (least squares)")
    if tracer:
        rows = [r for r in tracer.rows if r["step"] >= warmup]
        for key in ("malloc_in_use", "malloc_free_in_arenas", "tensor_mb", "objects", "traced_mb"):
            if rows and key in rows[0]:
                result[f"{key}_per_1000_steps"] = round(slope_per_1000([(r["step"], r[key]) for r in rows]), 2)
        print("after warm-up, per 1,000 steps: " + ", ".join(
            f"{k.replace('_per_1000_steps', '')} {v:+.2f}" for k, v in result.items() if k.endswith("_per_1000_steps")))
        for line in tracer.report():
            print(line)
        result["probes"] = tracer.rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
