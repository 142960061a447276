#!/usr/bin/env python
"""Benchmark: throughput, MFU, MoE dispatch, morphogenesis overhead, checkpoints, data, memory, I/O faults.

    python tools/bench.py                          # the full run on this machine (CPU: a few minutes)
    python tools/bench.py --quick                  # tiny shapes, seconds (what the test runs)
    python tools/bench.py --only moe_layer,data --json bench.json
    python tools/bench.py --device cuda            # on a GPU: also fp16 + GradScaler, 15 GB cap, compile
    python tools/bench.py --only parquet --parquet-mb 2048   # parquet resume on a 2 GB file
    python tools/bench.py --free-slots --threads 1   # what free expert slots cost (8 slots, 2 live)

Everything runs in one process on one device and measures the real code paths:
nemoe.model.NemoeLM with AdamW over `param_groups`, the real Trainer (built-in
corpus, the t4 model shapes) for morphogenesis, checkpoints and resume, and
nemoe.data.TokenStream with the GPT-2 tokenizer for the data pipeline. Timings
are medians over repeats; on a shared machine they move with the other load, so
compare figures from one run, never across runs.

This tool trains, unlike the tools that read a run's files (tools/runfiles.py, tools/csvlogs.py): it builds
nemoe's Trainer through tools/harness.py (a Trainer for a config, its steps run and timed),
and the morph section times the mechanisms' own calls inside it.

Sections (`--only` takes a comma list):
  throughput  training tokens/s: MoE vs dense with equal active parameters vs seed-style MoE
  mfu         model FLOPs utilisation against this device's measured fp32 matmul peak
  moe_layer   the MoE layer alone (forward + backward) for E in {2, 4, 8}, k in {1, 2}, per dispatch
  morph       share of wall time in controller work (decide, surgery, probe batches)
  checkpoint  save / load time and size of the t4 model; resume to the first step; the loop's blocked
              time per save, synchronous and in the background; snapshot memory; a mirror copy
  data        text -> packed blocks tokens/s against the trainer's consumption
  prefetch    training tokens/s with a slow source (5 ms per document), read-ahead off and on
  parquet     resume time of a parquet source 90 % into a --parquet-mb MB file, row-group shards vs
              one shard per file (tools/bench_unattended.py has these three)
  memory      t4 memory plan: parameters, gradients, AdamW state, activations, largest micro-batch
  gpu         (CUDA only) t4 tokens/s and peak memory under fp16 + GradScaler, capped to 15 GB;
              the largest micro-batch that fits; torch.compile speedup
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nemoe import checkpoint as ckpt
from nemoe import schema
from nemoe.config import config_from_dict
from nemoe.data import TokenStream
from nemoe.errors import UserError
from nemoe.flops import flops_per_token  # 6 N + 12 L T d (PaLM appendix B)
from nemoe.model import NemoeLM
from nemoe.moe import MoELayer
from nemoe.runtime import Runtime
from nemoe.tokenizer import get_tokenizer
from nemoe.train_module import TrainModule
from tools.cli import guard, note, resolve_device
from tools.bench_dispatch import DISPATCH, use_dispatch
from tools.bench_report import flops_split_lines, table_lines, targets
from tools.bench_slots import bench_free_slots, free_slot_lines
from tools.bench_t4 import T4_MORPH_INTERVAL, bench_gpu, bench_memory, trainer_overrides
from tools.bench_unattended import bench_parquet, bench_prefetch, measure_saves
from tools.harness import close_trainer, device_name, open_trainer, peak_matmul_flops, sync, timed

SECTIONS = ("throughput", "mfu", "moe_layer", "morph", "checkpoint", "data", "memory", "gpu", "prefetch", "parquet")
NEEDS = {"mfu": ("throughput",), "data": ("throughput",)}   # sections that read another's figures
FREE_SLOTS_RUN = (2, 1, 3)   # --free-slots: batch (sequences), timed steps per round, rounds


@dataclass
class Shapes:
    """Sizes of one benchmark run. FULL: the t4 model grown to 4 experts; QUICK: seconds."""

    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    d_expert: int
    batch_size: int
    n_experts: int            # live experts in the throughput comparison
    top_k: int
    warmup_steps: int         # untimed steps before each timed stretch
    timed_steps: int          # timed steps per round
    rounds: int               # rounds of (MoE, dense, seed-style), interleaved against drifting load
    layer_repeats: int        # timed forward+backward passes per MoE-layer variant
    morph_interval: int       # short interval timed in the morph section, extrapolated to the t4 one
    morph_intervals: int      # how many of them
    matmul_n: int             # side of the square matmul that measures the peak
    data_batches: int         # batches timed in the data section
    memory_batches: tuple[int, int]   # micro-batches at which activations are measured (linear fit)


FULL = Shapes(d_model=384, n_layers=6, n_heads=6, seq_len=64, d_expert=1536, batch_size=16, n_experts=4,
              top_k=1, warmup_steps=1, timed_steps=2, rounds=2, layer_repeats=3, morph_interval=3,
              morph_intervals=2, matmul_n=2048, data_batches=200, memory_batches=(1, 16))
QUICK = Shapes(d_model=32, n_layers=2, n_heads=2, seq_len=16, d_expert=64, batch_size=4, n_experts=4,
               top_k=1, warmup_steps=1, timed_steps=2, rounds=1, layer_repeats=2, morph_interval=2,
               morph_intervals=2, matmul_n=256, data_batches=20, memory_batches=(1, 2))


# --------------------------------------------------------------------------- #
# Models: nemoe's MoE, the dense baseline, the seed-style MoE
# --------------------------------------------------------------------------- #

def model_config(shapes: Shapes, n_experts: int, top_k: int, d_expert: int):
    """A Config with `n_experts` live experts in `n_experts` slots (no free slots)."""
    return config_from_dict({
        "model": {"d_model": shapes.d_model, "n_layers": shapes.n_layers, "n_heads": shapes.n_heads,
                  "seq_len": shapes.seq_len, "d_expert": d_expert, "dropout": 0.0},
        "moe": {"experts_init": n_experts, "experts_min": n_experts, "experts_max": n_experts, "top_k": top_k},
        "train": {"batch_size": shapes.batch_size}})


def builtin_batches(shapes: Shapes, n: int) -> list[torch.Tensor]:
    """`n` packed (B, T+1) blocks of the built-in corpus, GPT-2 tokens."""
    cfg = model_config(shapes, 2, 1, shapes.d_expert)
    stream = TokenStream(cfg.data, get_tokenizer(cfg.data.tokenizer), shapes.seq_len)
    try:
        return [stream.next_batch(shapes.batch_size) for _ in range(n)]
    finally:
        stream.close()


class TrainLoop:
    """nemoe's TrainModule (AdamW over param_groups, clipping, the trainer's step) in fp32 on `device`,
    its model switched to the given dispatch."""

    def __init__(self, cfg, dispatch: str, device: torch.device):
        torch.manual_seed(0)  # MoE and seed-style start from identical weights
        self.device = device
        runtime = Runtime(dataclasses.replace(cfg.train, device=str(device), precision="fp32"))
        self.module = TrainModule(cfg, runtime, total_steps=10**6)
        use_dispatch(self.module.model, dispatch)
        self.steps = 0

    def step(self, batch: torch.Tensor) -> None:
        self.module.train_batch([batch], self.steps)
        self.steps += 1

    def tokens_per_s(self, batches: list[torch.Tensor], warmup: int) -> float:
        for batch in batches[:warmup]:
            self.step(batch)
        timed_batches = batches[warmup:]
        seconds = timed(lambda: [self.step(b) for b in timed_batches], self.device)
        return len(timed_batches) * batches[0].size(0) * (batches[0].size(1) - 1) / seconds


def bench_throughput(ctx) -> dict:
    s, device = ctx.shapes, ctx.device
    configs = {"moe": (model_config(s, s.n_experts, s.top_k, s.d_expert), "sorted"),
               "dense": (model_config(s, 1, 1, s.top_k * s.d_expert), "sorted"),
               "seed_style": (model_config(s, s.n_experts, s.top_k, s.d_expert), "seed_all_experts")}
    batches = builtin_batches(s, s.warmup_steps + s.timed_steps)
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(s.rounds):   # interleaved, so a burst of other load hits all three alike
        for name, (cfg, dispatch) in configs.items():
            loop = TrainLoop(cfg, dispatch, device)
            samples[name].append(loop.tokens_per_s(batches, s.warmup_steps))
            del loop
    tps = {name: statistics.median(v) for name, v in samples.items()}
    moe_model = NemoeLM(configs["moe"][0])
    dense_model = NemoeLM(configs["dense"][0])
    return {
        "shapes": {"d_model": s.d_model, "n_layers": s.n_layers, "seq_len": s.seq_len, "batch_size": s.batch_size,
                   "n_experts": s.n_experts, "top_k": s.top_k, "d_expert": s.d_expert, "vocab": 50257,
                   "precision": "fp32"},
        "tokens_per_s": tps, "samples": samples,
        "active_params": {"moe": moe_model.count_params()["active_per_token"],
                          "dense": dense_model.count_params()["active_per_token"]},
        "flops_per_token": {"moe": flops_per_token(moe_model, s.seq_len),
                            "dense": flops_per_token(dense_model, s.seq_len)},
        "moe_vs_dense": tps["moe"] / tps["dense"],
        "moe_vs_seed_style": tps["moe"] / tps["seed_style"],
    }


def bench_mfu(ctx) -> dict:
    thr = ctx.results["throughput"]
    peak = peak_matmul_flops(ctx.device, ctx.shapes.matmul_n)
    achieved = {name: thr["tokens_per_s"][name] * thr["flops_per_token"][name] for name in ("moe", "dense")}
    return {"formula": "6*N_active_matmul + 12*L*T*d FLOPs per token (PaLM appendix B)",
            "peak_matmul_flops": peak, "matmul_n": ctx.shapes.matmul_n, "achieved_flops": achieved,
            "mfu": {name: flops / peak for name, flops in achieved.items()}}


# --------------------------------------------------------------------------- #
# Section 3: the MoE layer alone
# --------------------------------------------------------------------------- #

def layer_seconds(layer: MoELayer, fn, x: torch.Tensor, grad: torch.Tensor, repeats: int, device) -> float:
    """Median seconds of forward + backward of one dispatch variant."""
    def once():
        y, aux = fn(layer, x)
        (y * grad).sum().add(aux.lb_loss + aux.z_loss).backward()
    once()
    return statistics.median(timed(once, device) for _ in range(repeats))


def bench_moe_layer(ctx) -> dict:
    s, device = ctx.shapes, ctx.device
    n_tokens = s.batch_size * s.seq_len
    rows = []
    for n_experts in (2, 4, 8):
        for top_k in (1, 2):
            torch.manual_seed(0)
            layer = MoELayer(s.d_model, s.d_expert, n_experts, n_experts, top_k).to(device)
            x = torch.randn(s.batch_size, s.seq_len, s.d_model, device=device, requires_grad=True)
            grad = torch.randn_like(x)
            reference = layer(x)[0]
            ms, max_diff = {}, {}
            for name, fn in DISPATCH.items():
                fn = fn or MoELayer.forward
                with torch.no_grad():
                    max_diff[name] = (fn(layer, x)[0] - reference).abs().max().item()
                ms[name] = 1e3 * layer_seconds(layer, fn, x, grad, s.layer_repeats, device)
            rows.append({"n_experts": n_experts, "top_k": top_k, "ms": ms, "max_abs_diff": max_diff,
                         "fastest": min(ms, key=ms.get),
                         "sorted_vs_seed": ms["seed_all_experts"] / ms["sorted"]})
    return {"tokens": n_tokens, "d_model": s.d_model, "d_expert": s.d_expert, "rows": rows}


# --------------------------------------------------------------------------- #
# Sections 4 + 5: morphogenesis overhead, checkpoints and resume (the real Trainer)
# --------------------------------------------------------------------------- #

def get_trainer(ctx):
    """The t4-shaped Trainer shared by the morph and checkpoint sections (opened once)."""
    if ctx.trainer is None:
        ctx.trainer_raw = trainer_overrides(ctx.shapes, ctx.quick, ctx.device)
        ctx.trainer = open_trainer(ctx.trainer_raw, ctx.run_dir, "bench")
    return ctx.trainer


def bench_morph(ctx) -> dict:
    """Time the training step and the mechanisms' act() separately over a few short intervals;
    extrapolate to the t4 interval.

    share(I) = (t_evolve + I * t_routing) / (I * t_step + t_evolve), with t_step the
    mean training step (update_routing, the per-step expert work, included),
    t_evolve the mean act() at a due step (decide + surgery + probe losses) and
    t_routing the per-step cost of update_routing.
    """
    s, trainer = ctx.shapes, get_trainer(ctx)
    experts = trainer.plasticity.experts
    probe_seconds = []

    def timed_probe() -> float:
        start = time.perf_counter()
        loss = trainer.evaluator.probe_loss()
        probe_seconds.append(time.perf_counter() - start)
        return loss

    step_seconds, evolve_seconds, n_events = [], [], 0
    for _ in range(s.morph_interval * s.morph_intervals):
        step_seconds.append(timed(trainer.train_step, ctx.device))
        due = experts.due(trainer.step)
        start = time.perf_counter()
        events = trainer.plasticity.act(trainer.train.optimizer, trainer.step, trainer.tokens, timed_probe)
        sync(ctx.device)
        if due:
            evolve_seconds.append(time.perf_counter() - start)
            n_events += len(events)
    routing = statistics.median(timed(lambda: experts.update_routing(trainer.step), ctx.device) for _ in range(50))
    t_step, t_evolve = statistics.mean(step_seconds), statistics.mean(evolve_seconds)

    def share(interval: int) -> float:
        return (t_evolve + interval * routing) / (interval * t_step + t_evolve)

    return {"steps": len(step_seconds), "interval_timed": s.morph_interval, "evolve_calls": len(evolve_seconds),
            "events": n_events, "step_s": t_step, "evolve_s": t_evolve,
            "probe_s_per_evolve": sum(probe_seconds) / max(len(evolve_seconds), 1),
            "update_routing_s": routing, "share_at_timed_interval": share(s.morph_interval),
            "t4_interval": T4_MORPH_INTERVAL, "share_at_t4_interval": share(T4_MORPH_INTERVAL),
            "expert_counts": experts.expert_counts()}


def bench_checkpoint(ctx) -> dict:
    trainer = get_trainer(ctx)
    if trainer.step == 0:
        trainer.train_step()   # so the checkpoint holds AdamW state, as every real one does
    saves = measure_saves(trainer, ctx.device, 1 if ctx.quick else 3, ctx.run_dir / "mirror")
    path = schema.list_checkpoints(trainer.paths.ckpt_dir)[0][1]
    load_s = statistics.median(timed(lambda: ckpt.load_checkpoint(path), ctx.device)
                               for _ in range(1 if ctx.quick else 3))
    step = trainer.step
    close_trainer(trainer)
    ctx.trainer = None
    # Resume: a new Trainer finds the checkpoint, restores everything, then takes a step.
    start = time.perf_counter()
    resumed = open_trainer(ctx.trainer_raw, ctx.run_dir, "bench", resume=True)
    opened = time.perf_counter() - start
    resumed.train_step()
    sync(ctx.device)
    to_first_step = time.perf_counter() - start
    resumed_at = resumed.step - 1
    close_trainer(resumed)
    params = sum(p.numel() for p in resumed.model.parameters())
    return {"model_params": params, "size_bytes": path.stat().st_size, **saves, "load_s": load_s, "resume_open_s": opened, "resume_to_first_step_s": to_first_step,
            "saved_step": step, "resumed_step": resumed_at, "path_on": str(ctx.run_dir)}


# --------------------------------------------------------------------------- #
# Section 6: data pipeline
# --------------------------------------------------------------------------- #

def bench_data(ctx) -> dict:
    s = ctx.shapes
    cfg = model_config(s, 2, 1, s.d_expert)
    start = time.perf_counter()
    stream = TokenStream(cfg.data, get_tokenizer(cfg.data.tokenizer), s.seq_len)
    stream.next_batch(s.batch_size)   # opens the mixture (built-in corpus build, interleave threads)
    startup = time.perf_counter() - start
    seconds = timed(lambda: [stream.next_batch(s.batch_size) for _ in range(s.data_batches)], torch.device("cpu"))
    stream.close()
    tokens_per_s = s.data_batches * s.batch_size * s.seq_len / seconds
    consumed = ctx.results["throughput"]["tokens_per_s"]["moe"]
    return {"batches": s.data_batches, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "startup_s": startup, "tokens_per_s": tokens_per_s, "trainer_tokens_per_s": consumed,
            "ratio": tokens_per_s / consumed}


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #

class Context:
    def __init__(self, shapes: Shapes, device: torch.device, quick: bool, run_dir: Path, parquet_mb: int = 4):
        self.shapes, self.device, self.quick, self.run_dir = shapes, device, quick, run_dir
        self.parquet_mb = parquet_mb
        self.results: dict = {}
        self.trainer, self.trainer_raw = None, None


RUNNERS = {"throughput": bench_throughput, "mfu": bench_mfu, "moe_layer": bench_moe_layer, "morph": bench_morph,
           "checkpoint": bench_checkpoint, "data": bench_data, "memory": bench_memory, "gpu": bench_gpu,
           "prefetch": bench_prefetch, "parquet": bench_parquet}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds, figures meaningless")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a shared "
                        "machine 1 avoids waiting at every parallel region for a descheduled thread")
    p.add_argument("--parquet-mb", type=int, default=None, metavar="MB",
                   help="size of the parquet file the parquet section writes (default 2048; --quick: 4)")
    p.add_argument("--flops", metavar="CONFIG[,CONFIG]", default=None,
                   help="only print each config's training FLOPs per token, split into LM head, attention, "
                        "experts and router (at experts_init live experts), e.g. --flops study.yaml,study_bytes.yaml")
    p.add_argument("--free-slots", metavar="CONFIG[,CONFIG]", nargs="?", const="study_bytes.yaml,t4.yaml",
                   default=None,
                   help="only time a train step and the optimizer step, and measure AdamW's state, of an 8-slot "
                        "pool with 2 live experts against a 2-slot pool and 8 live, at each config's model "
                        "shapes on the CPU (default: study_bytes.yaml,t4.yaml; tools/bench_slots.py)")
    p.add_argument("--only", default=",".join(SECTIONS), metavar="A,B",
                   help=f"comma list of sections ({', '.join(SECTIONS)}); those they need run too")
    return p.parse_args(argv)


def selected_sections(only: str) -> list[str]:
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        raise UserError(f"--only {only!r}: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(SECTIONS)}")
    needed = set(wanted) | {dep for s in wanted for dep in NEEDS.get(s, ())}
    return [s for s in SECTIONS if s in needed]


@guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flops:
        print("\n".join(flops_split_lines(args.flops.split(","))))
        return 0
    sections = selected_sections(args.only)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    if args.free_slots:
        batch, steps, rounds = (1, 1, 1) if args.quick else FREE_SLOTS_RUN
        results = bench_free_slots(args.free_slots.split(","), batch, steps, rounds)
        print("\n".join(free_slot_lines(results, batch, steps, rounds)))
        return 0
    device = resolve_device(args.device)
    shapes = QUICK if args.quick else FULL
    header = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "quick": args.quick, "shapes": asdict(shapes)}
    print(f"nemoe bench | {header['device']} ({header['device_name']}, {header['threads']} threads) | "
          f"torch {header['torch']} | {header['date']}{' | quick' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nemoe-bench-") as tmp:
        parquet_mb = args.parquet_mb or (4 if args.quick else 2048)
        ctx = Context(shapes, device, args.quick, Path(tmp), parquet_mb)
        try:
            for name in sections:
                start = time.perf_counter()
                ctx.results[name] = RUNNERS[name](ctx)
                note(f"{name} done in {time.perf_counter() - start:.1f} s")
        finally:
            if ctx.trainer is not None:
                close_trainer(ctx.trainer)
    print("\n".join(table_lines(ctx.results)))
    if args.json:
        payload = {**header, "sections": ctx.results, "targets": targets(ctx.results)}
        try:
            Path(args.json).write_text(json.dumps(payload, indent=2))
        except OSError as err:
            raise UserError(f"--json {args.json}: cannot write: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
