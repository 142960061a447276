"""Held-out evaluation, the probe loss structural events are judged by, and text samples.

The held-out batches are fixed for the run (the first held-out documents of each
source); the probe batch is the first of them per source. Everything here runs
the bare model in eval mode under the run's autocast, and never touches the
training RNG.
"""

from __future__ import annotations

import math

import torch

from nemoe import distributed as dist
from nemoe.heldout import describe_heldout, heldout_sets
from nemoe.model import NemoeLM, split_block
from nemoe.runtime import Runtime
from nemoe.schedule import every


class Evaluator:
    def __init__(self, cfg, tokenizer, model: NemoeLM, runtime: Runtime):
        self.cfg, self.tokenizer, self.model, self.runtime = cfg, tokenizer, model, runtime
        self.heldout = heldout_sets(cfg.data, tokenizer, cfg.model.seq_len, cfg.eval.batches, cfg.eval.batch_size)
        self.batches = {name: held.batches for name, held in self.heldout.items()}
        # Probe batch: the first held-out batch of each source, fixed for the run.
        self.probe_batch = torch.cat([batches[0] for batches in self.batches.values()])

    def due(self, step: int, target: int) -> bool:
        """A held-out evaluation after this step: every eval.every_steps, and at the target."""
        return every(step, self.cfg.eval.every_steps) or step == target

    def sample_due(self, step: int) -> bool:
        """A sample after this step: every log.sample_every_steps, on the main process (a log line)."""
        log = self.cfg.log
        return every(step, log.sample_every_steps) and bool(log.sample_tokens) and self.runtime.dist.is_main

    def describe(self) -> str:
        """The held-out sets' sizes, for the run's log."""
        return "held-out evaluation: " + describe_heldout(self.heldout)

    @torch.no_grad()
    def loss_sum(self, batches: list[torch.Tensor]) -> float:
        """Sum of the batches' mean losses, eval mode (the bare model: no DDP collectives)."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for batch in batches:
            with self.runtime.autocast():
                out = self.model(*split_block(batch.to(self.runtime.device)))
            total += out.loss_ce.item()
        self.model.train(was_training)
        return total

    def probe_loss(self) -> float:
        """Loss on the fixed probe batch, eval mode."""
        return self.loss_sum([self.probe_batch])

    def evaluate(self, step: int, tokens: int) -> list[dict]:
        """eval.csv rows: held-out loss per source and mixed ("all"). Under DDP rank r evaluates
        batches r, r+W, ... of each source and the sums are added over ranks (a collective)."""
        r, world = self.runtime.dist.rank, self.runtime.dist.world_size
        sums = torch.tensor([[self.loss_sum(b[r::world]), len(b[r::world])] for b in self.batches.values()],
                            dtype=torch.float64)
        sums = dist.sum_over_ranks(sums).tolist()
        rows = []
        for source, (total, n) in zip(self.batches, sums):
            loss = total / n
            rows.append({"step": step, "tokens": tokens, "source": source, "loss": loss,
                         "ppl": math.exp(min(loss, 50.0))})
        weights = [len(b) for b in self.batches.values()]
        mixed = sum(row["loss"] * n for row, n in zip(rows, weights)) / sum(weights)
        rows.append({"step": step, "tokens": tokens, "source": "all", "loss": mixed,
                     "ppl": math.exp(min(mixed, 50.0))})
        return rows

    @torch.no_grad()
    def sample(self, step: int) -> str:
        """A generated continuation of log.sample_prompt, drawn with its own generator."""
        cfg = self.cfg.log
        device = self.runtime.device
        generator = torch.Generator(device=device).manual_seed(self.cfg.train.seed + step)
        prompt = torch.tensor([self.tokenizer.encode(cfg.sample_prompt)], device=device)
        self.model.eval()
        with self.runtime.autocast():
            out = self.model.generate(prompt, cfg.sample_tokens, temperature=0.8, generator=generator)
        self.model.train()
        return self.tokenizer.decode(out[0].tolist())
