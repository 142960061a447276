"""tools/bench.py --free-slots: what free expert slots cost (nemoe/slot_optim.py).

Per config (its model shapes; fp32 on the CPU, random tokens, `batch` sequences of the config's
seq_len per step), four pools with top-k as the config says:

    2 slots, 2 live       the small pool
    8 slots, 2 live       a pool that will grow to 8, before it has (SlotAdamW: free slots skipped)
    8 slots, 2 live, all stepped   the same with torch's AdamW over every slot (the optimizer before)
    8 slots, 8 live       the grown pool

and for each the median train step (TrainModule.train_batch: forward, backward, clipping,
optimizer), the median optimizer step alone, and the bytes of AdamW state. Times are this
process's CPU time (time.process_time): with --threads 1 that is the work done, not inflated by
waiting for a core on a shared machine (the table's last column is the wall time, for a quiet machine).
Variants are interleaved round by round, so a drifting machine load hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from nemoe.config import load_config
from nemoe.runtime import Runtime
from nemoe.slot_optim import state_bytes
from nemoe.train_module import TrainModule

VARIANTS = (("2 slots, 2 live", 2, 2, False), ("8 slots, 2 live", 8, 2, False),
            ("8 slots, 2 live, all stepped", 8, 2, True), ("8 slots, 8 live", 8, 8, False))


class Variant:
    """One pool: a TrainModule whose optimizer.step is timed."""

    def __init__(self, name: str, config: str, slots: int, live: int, plain: bool, batch: int):
        cfg = load_config(config, [f"moe.experts_max={slots}", f"moe.experts_init={live}",
                                   f"moe.experts_min={min(live, 2)}", f"train.batch_size={batch}"])
        torch.manual_seed(0)
        runtime = Runtime(dataclasses.replace(cfg.train, device="cpu", precision="fp32"))
        self.name, self.module = name, TrainModule(cfg, runtime, total_steps=10**6)
        if plain:   # the optimizer before free slots were skipped: torch's AdamW over every slot
            t = cfg.train
            self.module.optimizer = torch.optim.AdamW(self.module.model.param_groups(t.weight_decay), lr=t.lr,
                                                      betas=(t.beta1, t.beta2), fused=True)
        self.vocab, self.batch, self.seq_len = cfg.model.vocab_size, batch, cfg.model.seq_len
        self.step_s: list[float] = []
        self.wall_s: list[float] = []
        self.optim_s: list[float] = []
        self.steps = 0
        step = self.module.optimizer.step

        def timed_step(*args, **kwargs):
            start = time.process_time()
            out = step(*args, **kwargs)
            self._optim = time.process_time() - start
            return out
        self.module.optimizer.step = timed_step

    def run(self, n: int, timed: bool) -> None:
        for _ in range(n):
            g = torch.Generator().manual_seed(self.steps)
            block = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            start, wall = time.process_time(), time.perf_counter()
            self.module.train_batch([block], self.steps)
            if timed:
                self.step_s.append(time.process_time() - start)
                self.wall_s.append(time.perf_counter() - wall)
                self.optim_s.append(self._optim)
            self.steps += 1

    def row(self) -> dict:
        return {"variant": self.name, "step_s": statistics.median(self.step_s),
                "wall_s": statistics.median(self.wall_s),
                "optim_s": statistics.median(self.optim_s), "state_bytes": state_bytes(self.module.optimizer)}


def bench_free_slots(configs: list[str], batch: int, steps: int, rounds: int) -> dict[str, list[dict]]:
    """Per config, one row per variant (see the module docstring)."""
    results = {}
    for config in configs:
        variants = [Variant(name, config, slots, live, plain, batch) for name, slots, live, plain in VARIANTS]
        for v in variants:
            v.run(1, timed=False)   # warm-up: lazy state, allocator
        for _ in range(rounds):
            for v in variants:
                v.run(steps, timed=True)
        results[config] = [v.row() for v in variants]
        del variants
    return results


def free_slot_lines(results: dict[str, list[dict]], batch: int, steps: int, rounds: int) -> list[str]:
    """A markdown table per config, each variant against the 2-slot pool."""
    lines = [f"free slots: fp32 CPU, {torch.get_num_threads()} threads, batch {batch} sequences, "
             f"median of {steps * rounds} steps per variant; times are CPU seconds of this process", ""]
    for config, rows in results.items():
        base = rows[0]
        lines += [f"{config}", "",
                  "| pool | train step | vs 2 slots | optimizer step | vs 2 slots | AdamW state | vs 2 slots "
                  "| wall step |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['step_s'] * 1e3:.1f} ms | {r['step_s'] / base['step_s']:.3f}x | "
                         f"{r['optim_s'] * 1e3:.2f} ms | {r['optim_s'] / base['optim_s']:.3f}x | "
                         f"{r['state_bytes'] / 2**20:.2f} MiB | {r['state_bytes'] / base['state_bytes']:.3f}x | "
                         f"{r['wall_s'] * 1e3:.0f} ms |")
        lines.append("")
    return lines
