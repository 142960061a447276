"""The training loop: a short sequence of calls to named components.

    Runtime       device, precision, autocast, random state          (runtime.py)
    RunDir        lock, leftovers, which checkpoint to resume         (rundir.py)
    TrainModule   model, optimizer, scaler, LR: train_batch()         (train_module.py)
    TokenStream   training batches with an exact position             (data.py)
    Evaluator     held-out loss, probe loss, samples                  (evaluator.py)
    Plasticity    experts, neurons, heads, layers: observe/act        (plasticity/)
    MetricsWindow the open log interval                               (metrics.py)
    Checkpointer  when and how to save                                (checkpoint.py)
    RunLogger     text, CSV, TensorBoard and console output           (logs.py)

The checkpoint is the components' states by name plus step, tokens and training time;
restoring it and continuing gives the same per-step losses, bit for bit on CPU in fp32,
as never having stopped.
"""

from __future__ import annotations

import time

from nemoe import checkpoint_layout as layout
from nemoe import distributed as dist
from nemoe.checkpoint import Checkpointer
from nemoe.config import Config, dump_config
from nemoe.data import DataStopped, TokenStream
from nemoe.dormancy import probe_dormancy
from nemoe.errors import UserError
from nemoe.evaluator import Evaluator
from nemoe.files import atomic_write
from nemoe.logs import NullLogger, RunLogger, start_line
from nemoe.metrics import MetricsWindow, release_free_memory
from nemoe.plasticity import Plasticity
from nemoe.rundir import RunDir, change_notes, incompatibility
from nemoe.runtime import Runtime, on_stop_signal
from nemoe.schema import CONFIG_YAML, RunPaths
from nemoe.slot_optim import state_bytes
from nemoe.tokenizer import get_tokenizer
from nemoe.train_module import StepResult, TrainModule

__all__ = ["RunPaths", "Trainer"]


class Trainer:
    def __init__(self, cfg: Config, paths: RunPaths, resume: bool = False, max_steps: int | None = None,
                 allow_config_change: bool = False):
        self.cfg, self.paths = cfg, paths
        info = dist.init_distributed(cfg.train.device)
        self.runtime = Runtime(cfg.train, info)
        self.world = info.world_size
        self.tokens_per_step = cfg.tokens_per_step(self.world)
        total_steps = cfg.total_steps(self.world)
        self.target_steps = total_steps if max_steps is None else min(max_steps, total_steps)
        Runtime.seed(cfg.train.seed)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size)
        self.train = TrainModule(cfg, self.runtime, total_steps)
        self.model = self.train.model
        self.stream = TokenStream(cfg.data, self.tokenizer, cfg.model.seq_len, info.rank, self.world,
                                  lambda text: self.log.warn(self.step, text), lambda: self.stop_requested)
        self.evaluator = Evaluator(cfg, self.tokenizer, self.model, self.runtime)
        self.plasticity = Plasticity(cfg, self.model, self.evaluator.probe_batch)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.metrics, self.stop_requested = self._new_window(), False
        if info.rank > 0:
            # Same initial weights on every rank (seeded above), its own dropout stream.
            Runtime.seed(cfg.train.seed + info.rank)
        self.rundir = RunDir(paths, info, cfg.checkpoint.mirror_dir)
        self.log = NullLogger(cfg.log.every_steps)
        try:
            self._open(resume, allow_config_change)
        except BaseException:
            self.rundir.close()
            raise
        self.checkpointer = Checkpointer(cfg.checkpoint, paths, info, self.log)
        self.train.wrap()

    # -- start / resume ----------------------------------------------------------- #
    def _open(self, resume: bool, allow_config_change: bool) -> None:
        now = self.cfg.to_dict()
        found, notes = self.rundir.open(
            resume, reject=lambda state: incompatibility(state, now, self.world, allow_config_change))
        if found is not None:
            path, state = found
            more, data_changed = change_notes(state, now)
            try:
                restored = self.load_state_dict(state, restore_data=not data_changed)
            except (RuntimeError, KeyError, ValueError) as err:
                raise UserError(f"the checkpoint does not fit this model ({str(err)[:300]})") from None
            notes += more + [f"resumed from {path.name} at step {self.step} ({self.tokens:,} tokens)"] + restored
        else:
            notes += self.train.start_fresh()   # a pretrained source is read on a fresh start only
        if not self.runtime.dist.is_main:
            return
        # A fresh start keeps no rows, not even step-0 rows of an attempt killed before its first checkpoint.
        RunLogger.truncate_after(self.paths.log_dir, self.step if found is not None else -1)
        self.log = RunLogger(self.paths.log_dir, self.cfg, self.step, self.target_steps * self.tokens_per_step)
        atomic_write(self.paths.log_dir / CONFIG_YAML, dump_config(self.cfg))
        start = start_line(self.runtime, self.model.count_params(), self.cfg, self.world, self.train.memory_note,
                           self.target_steps)
        self.log.line(self.step, start)
        for note in notes + [self.evaluator.describe()]:
            self.log.line(self.step, f"Note | {note}")

    # -- the loop ------------------------------------------------------------------- #
    def fit(self) -> None:
        """Train to the target (or --max-steps): step, act, then whatever is due."""
        target = self.target_steps
        if self.step >= target:
            self.log.line(self.step, f"Note | nothing to do: step {self.step} already reached the target "
                                     f"({target} steps)")
            return
        stopped = None   # a DataStopped: ran out, unreachable past data.retry_minutes, a signal while waiting
        with on_stop_signal(self._request_stop):
            if self.step == 0:
                self.evaluate()
            while self.step < target and not (self.stop_requested or self.train.divergence):
                started = time.perf_counter()
                try:
                    result = self.train_step()
                except DataStopped as err:
                    self.log.line(self.step, f"Note | {err}")
                    stopped = err
                    break
                events = self.plasticity.act(self.train.optimizer, self.step, self.tokens,
                                             self.evaluator.probe_loss)
                self.elapsed += time.perf_counter() - started
                self.report(events, result)
                self._whatever_is_due(target)
            self._finish(stopped)

    def _whatever_is_due(self, target: int) -> None:
        """After a step, in this order: evaluation, a sample, the last log row, a checkpoint."""
        if self.evaluator.due(self.step, target):
            self.evaluate()
        if self.evaluator.sample_due(self.step):
            self.log.line(self.step, f"Sample | {self.evaluator.sample(self.step)!r}")
        if self.step == target:
            self.write_metrics()
        # Ranks agree on stopping and on time-based saves (their signals and clocks differ).
        self.stop_requested, timed = dist.any_rank([self.stop_requested, self.checkpointer.minutes_due()])
        if self.checkpointer.due(self.step, target, timed):
            self.save()
        self.rundir.heartbeat()

    def _finish(self, stopped: DataStopped | None) -> None:
        """Save where training stopped and wait for the write; a fatal data stop then raises (exit 2)."""
        if reason := self.train.divergence:
            self.save()
            raise UserError(f"stopped at step {self.step}: {reason}")
        if self.step < self.target_steps:
            self.write_metrics()
            self.save()
        self.checkpointer.wait()
        if stopped is not None and stopped.fatal:
            raise stopped
        if self.stop_requested:
            self.log.line(self.step, "Note | stopped by signal after saving a checkpoint; "
                                     "rerun with --resume to continue")
        else:
            self.log.line(self.step, f"Done | {self.tokens:,} tokens in {self.elapsed:.1f}s")

    def close(self) -> None:
        """Wait for the checkpoint write and mirror copy in flight, close the logs, release the run.
        (The data stream closes at exit: closing a parquet stream waits ~5 s, see TokenStream.close.)"""
        self.checkpointer.close()
        self.log.close()
        self.rundir.close()

    def train_step(self) -> StepResult:
        """One optimizer step on the next batches; step, tokens and the log window advance."""
        batches = self.stream.next_batches(self.cfg.train.grad_accum, self.cfg.train.batch_size)
        result = self.train.train_batch(batches, self.step, self.plasticity)
        if not result.finite:
            self.log.warn(self.step + 1, result.skip_note)
        self.step, self.tokens = self.step + 1, self.tokens + self.tokens_per_step
        self.metrics.add(result)
        return result

    # -- output --------------------------------------------------------------------- #
    def report(self, events, result) -> None:
        if events:
            # The step's loss over all ranks (every rank has the same events, so all take part).
            mean_ce = dist.sum_over_ranks(result.loss_ce.double()).item() / self.world
            self.log.events(self.step, self.tokens, mean_ce, self.metrics.lr, events,
                            self.plasticity.event_notes(events))
        self.log.distributions(self.step, self.plasticity.distributions(self.step))
        if self.log.row_due(self.step):
            self.write_metrics()

    def write_metrics(self) -> None:
        """A training_log.csv row for the steps since the last one, and plasticity.csv rows (the
        mechanisms' state and, in every run, the dormant expert neurons on the probe batch)."""
        if not self.metrics.steps:
            return
        release_free_memory()   # before rss_mb is measured: the row shows what the run holds
        row = self.metrics.row(self.step, self.tokens, self.elapsed, self.tokens_per_step, self.world,
                               self.cfg.moe, self.train.loss_scale)
        row.update(self.plasticity.log_row(), optim_state_bytes=state_bytes(self.train.optimizer))
        self.log.train_row(row, self.plasticity.structure())
        self.metrics = self._new_window()
        states = self.plasticity.snapshot()
        if self.runtime.dist.is_main:   # dormant expert neurons, every run (measuring changes nothing)
            states += probe_dormancy(self.model, self.evaluator.probe_batch, self.runtime.autocast)
        if states:
            self.log.state_rows([{"step": self.step, "tokens": self.tokens, **row} for row in states])

    def _new_window(self) -> MetricsWindow:
        return MetricsWindow.empty(self.runtime.device, self.elapsed)

    def evaluate(self) -> None:
        rows = self.evaluator.evaluate(self.step, self.tokens)
        self.log.eval_rows(rows, "Eval | " + " | ".join(f"{r['source']} {r['loss']:.4f}" for r in rows))

    # -- checkpoints ------------------------------------------------------------------ #
    def save(self) -> None:
        self.checkpointer.save(self.state_dict())   # state_dict: a collective under DDP (every rank's part)

    def state_dict(self) -> dict:
        """The checkpoint (checkpoint_layout.py describes it); every rank's own part gathered from all."""
        mine = layout.rank_part(rng=Runtime.rng_state(), data=self.stream.state_dict(),
                                metrics=self.metrics.state_dict(), plasticity=self.plasticity.state_dict())
        return layout.new(step=self.step, tokens=self.tokens, elapsed=self.elapsed, world_size=self.world,
                          config=self.cfg.to_dict(), train_module=self.train.state_dict(),
                          ranks=dist.gather_objects(mine))

    def load_state_dict(self, state: dict, restore_data: bool = True) -> list[str]:
        """Every component's state from the checkpoint; returns notes for the log."""
        rank = self.runtime.dist.rank
        self.train.load_state_dict(layout.train_module(state))
        self.step, self.tokens, self.elapsed = layout.step(state), layout.tokens(state), layout.elapsed(state)
        notes = self.plasticity.load_state_dict(layout.rank_plasticity(state, rank), self.step)
        if restore_data:
            self.stream.load_state_dict(layout.rank_data(state, rank))
        self.metrics = MetricsWindow.from_state(layout.rank_metrics(state, rank), self.runtime.device)
        Runtime.set_rng_state(layout.rank_rng(state, rank))
        return notes

    def _request_stop(self, signum: int) -> None:
        """SIGINT / SIGTERM: finish the current step, save, exit cleanly (a second one stops now)."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log.print(f"received signal {signum}: saving a checkpoint after this step ...")
