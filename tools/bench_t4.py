"""The bench's T4 sections: the memory plan of configs/t4.yaml (`memory`) and, on CUDA, the real
Trainer under fp16 autocast + GradScaler capped to a T4's memory (`gpu`). Run by tools/bench.py.

This module trains: the `gpu` section builds nemoe's Trainer (through tools/harness.py) and runs
its steps, and `trainer_overrides` is the t4-shaped config of the Trainer the bench's morph and
checkpoint sections train too.
"""

from __future__ import annotations

import gc
import math

import torch

from nemoe.config import config_from_dict, find_config, read_yaml
from nemoe.flops import flops_per_token
from nemoe.memory import plan_memory
from nemoe.model import NemoeLM
from tools.harness import close_trainer, open_trainer, peak_matmul_flops, run_steps, timed

MEMORY_CAP = 15e9          # bytes: a T4's usable memory, with a little room (15 GB, not GiB)
T4_MORPH_INTERVAL = 1000   # configs/t4.yaml plasticity.experts.interval, the interval the overhead target is for


# --------------------------------------------------------------------------- #
# The t4-shaped Trainer of the morph, checkpoint and gpu sections
# --------------------------------------------------------------------------- #

def trainer_overrides(shapes, quick: bool, device: torch.device) -> dict:
    """local.yaml (built-in corpus) with the t4 model, expert and batch settings (`shapes`: the
    bench's Shapes, tools/bench.py; quick: its model and batch instead of t4's).

    Morphogenesis on a short interval with thresholds that make every interval act
    (2 live experts: the busier has usage >= 0.5 > split_usage, so it splits).
    """
    raw = read_yaml(find_config("local.yaml"))
    t4 = read_yaml(find_config("t4.yaml"))
    if quick:
        raw["model"] = {"d_model": shapes.d_model, "n_layers": shapes.n_layers, "n_heads": shapes.n_heads,
                        "seq_len": shapes.seq_len, "d_expert": shapes.d_expert}
        raw["train"]["batch_size"] = shapes.batch_size
    else:
        raw["model"] = dict(t4["model"])
        raw["train"].update(batch_size=t4["train"]["batch_size"], grad_accum=t4["train"]["grad_accum"])
        raw["eval"] = {"batch_size": t4["eval"]["batch_size"]}
    raw["moe"] = dict(t4["moe"])
    raw["plasticity"]["experts"].update(interval=shapes.morph_interval, probation_steps=shapes.morph_interval,
                        split_usage=0.3, prune_usage=0.02, crossover_prob=1.0, probation_min_usage=0.01)
    raw["train"].update(device=str(device), precision="fp32", warmup_steps=1)
    raw["log"] = {"every_steps": 10 ** 6, "sample_every_steps": 0, "console": "plain"}
    raw["eval"] = {**raw.get("eval", {}), "every_steps": 0, "batches": 1}
    raw["checkpoint"] = {"every_steps": 0, "every_minutes": 0, "keep_last": 2}
    raw["name"] = "bench"
    return raw



# --------------------------------------------------------------------------- #
# Section 7: memory plan for configs/t4.yaml
# --------------------------------------------------------------------------- #

def t4_config(batch_size: int | None = None):
    raw = read_yaml(find_config("t4.yaml"))
    raw["data"] = {}   # the plan needs the model only; no Hub access
    raw["train"]["device"] = "cpu"
    if batch_size is not None:
        raw["train"]["batch_size"] = batch_size
    return config_from_dict(raw)


def bench_memory(ctx) -> dict:
    """nemoe.memory's plan (the trainer's memory guard) for configs/t4.yaml against the 15 GB cap."""
    cfg = t4_config()
    plan = plan_memory(cfg, "fp32", batches=ctx.shapes.memory_batches)
    b = {**plan.static, "activations_at_micro_batch": plan.activations(),
         "transient_at_micro_batch": plan.transient(), "total_at_micro_batch": plan.total()}
    return {"config": "configs/t4.yaml", "precision": "fp32 (an upper bound for fp16 autocast)",
            "method": "static: bytes per parameter; activations: saved-tensor hooks at two micro-batches, "
                      "linear fit; + the (B, T, V) logits and two fp32 gradients of them (nemoe/memory.py)",
            "params": plan.params, "bytes": b, "activation_bytes_per_sequence": plan.activation_bytes_per_sequence,
            "measured_at": list(plan.measured_at),
            "activation_bytes_measured": list(plan.activation_bytes_measured),
            "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "cap_bytes": MEMORY_CAP,
            "largest_micro_batch": plan.largest_micro_batch(MEMORY_CAP), "fits": plan.total() <= MEMORY_CAP}


# --------------------------------------------------------------------------- #
# Section 8: GPU (CUDA only)
# --------------------------------------------------------------------------- #

def gpu_trainer_run(ctx, batch_size: int, steps: int, compile_model: bool = False) -> dict:
    """The real Trainer on the t4 model under fp16 autocast + GradScaler: tokens/s, peak memory, scale.

    Built-in corpus (no Hub), morphogenesis at the t4 interval (no event in the window).
    """
    raw = trainer_overrides(ctx.shapes, ctx.quick, ctx.device)
    raw["train"].update(precision="fp16", batch_size=batch_size, compile=compile_model)
    raw["plasticity"]["experts"]["interval"] = T4_MORPH_INTERVAL
    trainer = open_trainer(raw, ctx.run_dir / f"gpu-b{batch_size}-compile{int(compile_model)}", "bench")
    try:
        losses = run_steps(trainer, 3)   # warm-up (and compilation)
        torch.cuda.reset_peak_memory_stats(ctx.device)
        seconds = timed(lambda: losses.extend(run_steps(trainer, steps)), ctx.device)
        return {"batch_size": batch_size, "tokens_per_s": steps * trainer.tokens_per_step / seconds,
                "peak_bytes": torch.cuda.max_memory_allocated(ctx.device),
                "precision": trainer.runtime.precision, "grad_scaler": trainer.train.scaler.is_enabled(),
                "scale": trainer.train.loss_scale, "losses_finite": all(math.isfinite(x) for x in losses)}
    finally:
        close_trainer(trainer)


def release_gpu_memory() -> None:
    """Free the cached blocks of trainers that are gone, so the next run starts from an empty GPU."""
    gc.collect()
    torch.cuda.empty_cache()


def bench_gpu(ctx) -> dict:
    device = ctx.device
    if device.type != "cuda":
        return {"skipped": "no CUDA device in this run"}
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP / total), device)
    steps = 5 if ctx.quick else 30
    peak = {"fp32": peak_matmul_flops(device, 4096), "fp16": peak_matmul_flops(device, 8192, torch.float16)}
    out = {"device_name": torch.cuda.get_device_name(device), "cap_bytes": MEMORY_CAP, "peak_matmul_flops": peak}
    micro_batch = t4_config().train.batch_size
    out["t4_fp16"] = run = gpu_trainer_run(ctx, micro_batch, steps)
    release_gpu_memory()
    flops = flops_per_token(NemoeLM(t4_config()), t4_config().model.seq_len)
    run["mfu_fp16"] = run["tokens_per_s"] * flops / peak["fp16"]
    # Doubling from the configured micro-batch until the 15 GB cap refuses.
    largest, batch = None, micro_batch
    while batch <= (4 * micro_batch if ctx.quick else 4096):
        try:
            gpu_trainer_run(ctx, batch, 1)
            largest, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            release_gpu_memory()
    out["largest_micro_batch_measured"] = largest
    try:
        compiled = gpu_trainer_run(ctx, micro_batch, steps, compile_model=True)
        out["compile"] = {**compiled, "speedup": compiled["tokens_per_s"] / run["tokens_per_s"]}
    except Exception as err:   # optional: report why it did not compile
        out["compile"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return out
