"""The training loop, as a sequence of named calls.

One `Trainer` owns the model, optimizer, GradScaler, morphogenesis controller,
data stream and logs. Its `state_dict` is the checkpoint: restoring it and
continuing gives the same per-step losses, bit for bit on CPU in fp32, as never
having stopped.
"""

from __future__ import annotations

import math
import random
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torch.nn.parallel import DistributedDataParallel

from nemoe import checkpoint as ckpt
from nemoe import distributed as dist
from nemoe.config import Config, config_changes, dump_config, is_unsafe
from nemoe.data import DataExhausted, TokenStream, heldout_batches
from nemoe.errors import UserError
from nemoe.evolution import MorphController, MorphEvent
from nemoe.lock import RunLock
from nemoe.files import atomic_write, remove_temporaries
from nemoe.logs import NullLogger, RunLogger
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity import build_mechanisms
from nemoe.tokenizer import get_tokenizer


# --------------------------------------------------------------------------- #
# Device, precision, schedule, RNG
# --------------------------------------------------------------------------- #

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when present. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.launched_by_torchrun():
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA GPU is visible; use train.device=auto or cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 on CPU; on CUDA bf16 only with native support (sm >= 8.0), else fp16 + GradScaler.

    torch.cuda.is_bf16_supported() says True on a T4 (sm 7.5) because it counts
    emulation, so the compute capability decides.
    """
    if device.type != "cuda":
        if name in ("fp16", "bf16"):
            raise UserError(f"train.precision={name} needs a CUDA GPU; this run is on {device}")
        return "fp32"
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    if name == "auto":
        return "bf16" if native_bf16 else "fp16"
    if name == "bf16" and not native_bf16:
        raise UserError("train.precision=bf16 needs a GPU with compute capability >= 8.0; use fp16")
    return name


def lr_at(step: int, cfg: Config, world_size: int = 1) -> float:
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at the token target."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, cfg.total_steps(world_size) - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # As a tensor, so the checkpoint loads with torch.load(weights_only=True).
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "gauss": gauss}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- #
# The trainer
# --------------------------------------------------------------------------- #

@dataclass
class RunPaths:
    log_dir: Path
    ckpt_dir: Path

    @classmethod
    def of(cls, run_dir: Path, run_name: str) -> "RunPaths":
        return cls(run_dir / "logs" / run_name, run_dir / "checkpoints" / run_name)


class Trainer:
    def __init__(self, cfg: Config, paths: RunPaths, resume: bool = False, max_steps: int | None = None,
                 allow_config_change: bool = False):
        self.cfg, self.paths, self.max_steps = cfg, paths, max_steps
        self.allow_config_change = allow_config_change
        self.dist = dist.init_distributed(cfg.train.device)
        self.lock = RunLock(paths.log_dir)
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        seed_everything(cfg.train.seed)

        self.tokenizer = get_tokenizer("gpt2")
        if cfg.model.vocab_size < self.tokenizer.n_vocab:
            raise UserError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
                            f"tokenizer's vocabulary ({self.tokenizer.n_vocab})")
        self.model = NemoeLM(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr,
            # fused: one kernel over all parameters, on CUDA and CPU alike; on CPU it measured
            # 5x faster than the default per-parameter loop (t4 shapes, one thread).
            betas=(cfg.train.beta1, cfg.train.beta2), fused=True)
        # A GradScaler only for fp16; bf16 and fp32 have fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.controller = MorphController(cfg, cfg.model.n_layers)
        self.stream = TokenStream(cfg.data, self.tokenizer, cfg.model.seq_len,
                                  self.dist.rank, self.dist.world_size)
        self.eval_batches = heldout_batches(cfg.data, self.tokenizer, cfg.model.seq_len,
                                            cfg.eval.batches, cfg.eval.batch_size)
        # Probe batch: the first held-out batch of each source, fixed for the run.
        self.probe_batch = torch.cat([batches[0] for batches in self.eval_batches.values()])
        self.plasticity = build_mechanisms(cfg, self.model, self.probe_batch)

        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.window = self._empty_window()
        self.stop_requested = False
        self.bad_steps, self.diverged, self.save_failures = 0, False, 0
        if self.dist.rank > 0:
            # Same initial weights on every rank (seeded above), its own dropout stream.
            seed_everything(cfg.train.seed + self.dist.rank)
        self._restore_or_start(resume)
        # DDP averages gradients over ranks in backward. broadcast_buffers=False: the
        # buffers are expert usage counts (summed over ranks by the controller, so rank 0's
        # must not overwrite the others') and routing state every rank updates identically.
        wrapped = self.model
        if self.dist.enabled:
            with warnings.catch_warnings():
                # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, whose
                # False still syncs buffers at init; its own advice for rank-local buffers is to
                # keep broadcast_buffers=False for now.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                wrapped = DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False)
        self.ddp = wrapped
        self.forward = torch.compile(wrapped) if cfg.train.compile and self.device.type == "cuda" else wrapped

    # -- start / resume ------------------------------------------------------- #
    def _restore_or_start(self, resume: bool) -> None:
        """Every rank restores the same checkpoint; rank 0 alone takes the lock and opens the logs.
        A failure on any rank stops all of them together (no rank left waiting)."""
        error = None
        try:
            paths = self.paths
            existing = ckpt.list_checkpoints(paths.ckpt_dir)
            if existing and not resume:
                raise UserError(f"run folder {paths.ckpt_dir} already has checkpoints (newest: step "
                                f"{existing[0][0]}); add --resume to continue it, or pick a new --run-name")
            if self.dist.is_main:
                self.lock.acquire()
            try:
                self._open_run(resume, existing)
            except BaseException:
                self.lock.release()
                raise
        except (UserError, OSError) as err:
            error = err
        dist.agree_or_raise(error)

    def _open_run(self, resume: bool, existing: list) -> None:
        paths, notes = self.paths, []
        if self.dist.is_main:
            for leftover in remove_temporaries(paths.ckpt_dir) + remove_temporaries(paths.log_dir):
                notes.append(f"removed {leftover.name}, left by a write that was cut off")
        loaded = None
        if resume:
            loaded = ckpt.load_latest(paths.ckpt_dir, warn=lambda m: notes.append(f"skipping {m}"),
                                      reject=self._incompatibility)
            # Every rank must continue from the same checkpoint: rank 0's choice holds.
            chosen = dist.broadcast_object(None if loaded is None else loaded[0].name)
            if (None if loaded is None else loaded[0].name) != chosen:
                loaded = None if chosen is None else (paths.ckpt_dir / chosen,
                                                      ckpt.load_checkpoint(paths.ckpt_dir / chosen))
            if loaded is None and existing:
                hint = ("\nTo resume under the changed settings anyway, add --allow-config-change "
                        "(parameter shapes must still match)." if any("config" in n for n in notes) else "")
                raise UserError(f"--resume: none of the {len(existing)} checkpoints in {paths.ckpt_dir} "
                                f"can be used; nothing was deleted:\n  - " + "\n  - ".join(notes) + hint)
        if loaded is not None:
            path, state = loaded
            notes += self._restore(state)
            notes.append(f"resumed from {path.name} at step {self.step} ({self.tokens:,} tokens)")
        elif resume:
            notes.append(f"--resume: no checkpoint in {paths.ckpt_dir} yet, starting fresh")
        if not self.dist.is_main:
            self.log = NullLogger()
            return
        # A fresh start keeps no rows at all: not even step-0 rows of an attempt
        # that was killed before its first checkpoint.
        RunLogger.truncate_after(paths.log_dir, self.step if loaded is not None else -1)
        self.log = RunLogger(paths.log_dir, self.cfg.model.n_layers, self.cfg.log.console,
                             self.cfg.train.total_tokens)
        atomic_write(paths.log_dir / "config.yaml", dump_config(self.cfg))
        params = self.model.count_params()
        t = self.cfg.train
        ranks = (f" | data-parallel: {self.dist.world_size} ranks x {t.grad_accum} micro-batches x "
                 f"{t.batch_size} sequences" if self.dist.enabled else "")
        self.log.line(self.step, f"Start | device {self.device} | precision {self.precision} | params "
                      f"{params['total']:,} total, {params['active_per_token']:,} active per token | "
                      f"{self.cfg.tokens_per_step(self.dist.world_size):,} tokens/step{ranks} | target "
                      f"{self.cfg.train.total_tokens:,} tokens ({self.cfg.total_steps(self.dist.world_size):,} steps)")
        for note in notes:
            self.log.line(self.step, f"Note | {note}")

    def _incompatibility(self, state: dict) -> str | None:
        """Why this checkpoint cannot be resumed under the current config (None: it can)."""
        saved_world = state["trainer"].get("world_size", state["config"].get("world_size", 1))
        if saved_world != self.dist.world_size:
            # Each rank's data state is its own document stream: no resharding to another count.
            return (f"written by {saved_world} data-parallel process(es), this run has "
                    f"{self.dist.world_size}; resume with the same torchrun --nproc_per_node "
                    f"({saved_world}), or start a new run")
        unsafe = [c for c in config_changes(state["config"], self.cfg.to_dict()) if is_unsafe(c[0])]
        if not unsafe or self.allow_config_change:
            return None
        return "written by an incompatible config: " + "; ".join(
            f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in unsafe)

    def _restore(self, state: dict) -> list[str]:
        """Load a checkpoint's state; returns notes on config changes since it was written."""
        changes = config_changes(state["config"], self.cfg.to_dict())
        data_changed = any(key.startswith("data.") and is_unsafe(key) for key, _, _ in changes)
        try:
            self.load_state_dict(state, restore_data=not data_changed)
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"the checkpoint does not fit this model ({str(err)[:300]})") from None
        notes = [f"config change on resume: {key}: {_short(old)} -> {_short(new)}"
                 + (" (unsafe, allowed by --allow-config-change)" if is_unsafe(key) else "")
                 for key, old, new in changes]
        if data_changed:
            notes.append("data settings changed: the data stream starts from its beginning")
        return notes

    # -- the loop --------------------------------------------------------------- #
    def train(self) -> None:
        try:
            self._train()
        finally:
            self.log.close()
            self.lock.release()

    def _train(self) -> None:
        cfg = self.cfg
        total_steps = cfg.total_steps(self.dist.world_size)
        target_steps = total_steps if self.max_steps is None else min(self.max_steps, total_steps)
        if self.step >= target_steps:
            self.log.line(self.step, f"Note | nothing to do: step {self.step} already reached the target "
                                     f"({target_steps} steps)")
            return
        old_handlers = self._install_signal_handlers()
        self.last_save = time.monotonic()
        try:
            if self.step == 0:
                self.evaluate()
            self.controller.update_routing(self.model.moe_layers, self.step)
            while self.step < target_steps and not (self.stop_requested or self.diverged):
                started = time.perf_counter()
                try:
                    loss_ce = self.train_step()
                except DataExhausted as err:
                    self.optimizer.zero_grad(set_to_none=True)  # drop the unfinished step
                    self.log.line(self.step, f"Note | {err}")
                    break
                events = self.evolve()
                self.elapsed += time.perf_counter() - started
                self.report(events, loss_ce)
                if self._due(cfg.eval.every_steps) or self.step == target_steps:
                    self.evaluate()
                if self._due(cfg.log.sample_every_steps) and self.dist.is_main:
                    self.sample()
                if self.step == target_steps:
                    self._flush_window()
                # Ranks agree on stopping and on time-based saves (their signals and clocks differ).
                self.stop_requested, timed_save = dist.any_rank([self.stop_requested, self._minutes_due()])
                if self._due(cfg.checkpoint.every_steps) or timed_save or self.step == target_steps:
                    self.save()
                self.lock.heartbeat()
            if self.diverged:
                self.save()
                raise UserError(f"stopped at step {self.step}: {self.bad_steps} steps in a row had a "
                                f"non-finite loss or gradient (train.max_bad_steps); the checkpoint holds "
                                f"the last finite weights. Lower train.lr or check the data.")
            if self.step < target_steps:
                self._flush_window()
                self.save()
            if self.stop_requested:
                self.log.line(self.step, "Note | stopped by signal after saving a checkpoint; "
                                         "rerun with --resume to continue")
            else:
                self.log.line(self.step, f"Done | {self.tokens:,} tokens in {self.elapsed:.1f}s")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _minutes_due(self) -> bool:
        minutes = (time.monotonic() - self.last_save) / 60
        every_minutes = self.cfg.checkpoint.every_minutes
        return bool(every_minutes and minutes >= every_minutes)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean CE (on device)."""
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(self.step, cfg, self.dist.world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: set by plasticity mechanisms
        total_ce = torch.zeros((), device=self.device)
        for batch in self._step_batches():
            inputs, targets = split_block(batch.to(self.device, non_blocking=True))
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                out = self.forward(inputs, targets)
            loss = out.loss_ce + cfg.moe.lb_coef * out.loss_lb + cfg.moe.z_coef * out.loss_z
            self.scaler.scale(loss / cfg.train.grad_accum).backward()
            total_ce += out.loss_ce.detach()
            self._accumulate(out)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # One host sync per step: a non-finite gradient must not reach the weights.
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            for mechanism in self.plasticity:
                mechanism.observe(self.step)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the GradScaler skips non-finite steps itself
        for mechanism in self.plasticity:
            mechanism.after_step(self.step)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._note_bad_step(finite)
        self.step += 1
        self.tokens += cfg.tokens_per_step(self.dist.world_size)
        w = self.window
        w["steps"] += 1
        w["grad_norm"] += grad_norm.detach().float()
        w["lr"] = lr
        self.controller.update_routing(model.moe_layers, self.step)
        return total_ce / cfg.train.grad_accum

    def _step_batches(self):
        """The step's micro-batches. Under DDP, gradients are all-reduced only in the last
        micro-batch's backward (no_sync before it); DDP averages them over ranks."""
        cfg = self.cfg
        batches = []
        try:
            for _ in range(cfg.train.grad_accum):
                batches.append(self.stream.next_batch(cfg.train.batch_size))
            exhausted = None
        except DataExhausted as err:
            exhausted = err
        # A rank whose data ran out must not leave the others waiting in backward
        # (only data.on_exhausted: stop can run out).
        if self.dist.enabled and cfg.data.on_exhausted == "stop":
            if dist.any_rank([exhausted is not None])[0]:
                raise exhausted or DataExhausted("another rank's training data ran out")
        elif exhausted is not None:
            raise exhausted
        for i, batch in enumerate(batches):
            if self.dist.enabled and i < len(batches) - 1:
                with self.ddp.no_sync():   # stays entered while the caller runs forward + backward
                    yield batch
            else:
                yield batch

    def _note_bad_step(self, finite: bool) -> None:
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        what = "gradient overflow (fp16 loss scale lowered)" if self.scaler.is_enabled() else \
            "non-finite loss or gradient"
        self.log.warn(self.step + 1, f"{what}: update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            self.diverged = True

    def _accumulate(self, out) -> None:
        w = self.window
        w["micro"] += 1
        w["loss_ce"] += out.loss_ce.detach()
        w["loss_lb"] += out.loss_lb.detach()
        w["loss_z"] += out.loss_z.detach()
        w["counts"] += torch.stack(out.counts).to(w["counts"].device)

    def _empty_window(self) -> dict:
        n_layers, n_slots = self.cfg.model.n_layers, self.cfg.moe.experts_max
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        return {"steps": 0, "micro": 0, "lr": 0.0, "loss_ce": zero(), "loss_lb": zero(),
                "loss_z": zero(), "grad_norm": zero(), "wall_start": self.elapsed,
                "counts": torch.zeros(n_layers, n_slots, dtype=torch.long, device=self.device)}

    def evolve(self) -> list[MorphEvent]:
        """Run the controller and the plasticity mechanisms due at this optimizer-step boundary."""
        events = []
        if self.controller.due(self.step):
            events += self.controller.evolve(self.model.moe_layers, self.optimizer, self.step,
                                             self.tokens, self.probe_loss)
        for mechanism in self.plasticity:
            if mechanism.due(self.step):
                events += mechanism.act(self.optimizer, self.step, self.tokens, self.probe_loss)
                # Blocks moved by layer senescence take their expert records along.
                for shift in mechanism.layer_shifts:
                    self.controller.remap_layers(shift.sources, shift.newborn, self.step)
        return events

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss on the fixed probe batch, eval mode, fp32-accumulated."""
        return self._loss_on([self.probe_batch])

    def _loss_on(self, batches: list[torch.Tensor]) -> float:
        return self._loss_sum(batches) / len(batches)

    @torch.no_grad()
    def _loss_sum(self, batches: list[torch.Tensor]) -> float:
        """Sum of the batches' mean losses, eval mode (the bare model: no DDP collectives)."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for batch in batches:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                out = self.model(*split_block(batch))
            total += out.loss_ce.item()
        self.model.train(was_training)
        return total

    # -- output ----------------------------------------------------------------- #
    def report(self, events: list[MorphEvent], loss_ce: torch.Tensor) -> None:
        if events:
            # The step's loss over all ranks (every rank has the same events, so all take part).
            mean_ce = dist.sum_over_ranks(loss_ce.detach().double()).item() / self.dist.world_size
            step_text = self._step_text(mean_ce, None)
            for e in events:
                self.log.event_row(e.as_row(), f"{step_text} | {e.describe()}")
            if any(e.granularity == "expert" for e in events):
                counts = self.controller.expert_counts()
                self.log.line(self.step, f"Experts | {' '.join(map(str, counts))}", echo=False)
        if self.step % self.cfg.log.every_steps == 0:
            self._write_train_row()
            self._write_state_rows()

    def _flush_window(self) -> None:
        """A row for the steps since the last one, so a run's last step is always in the CSV."""
        if self.window["steps"]:
            self._write_train_row()
            self._write_state_rows()

    def _step_text(self, loss_ce: float, loss_lb: float | None) -> str:
        lb = f" | LossLB {loss_lb:.4f}" if loss_lb is not None else ""
        return (f"Tokens {self.tokens:,} | LossCE {loss_ce:.4f}{lb} | "
                f"LR {self.window['lr']:.2e}")

    def _write_train_row(self) -> None:
        w, cfg = self.window, self.cfg
        micro, steps = max(w["micro"], 1), max(w["steps"], 1)
        # Means over every rank's micro-batches (equal sizes), and every rank's routing counts.
        losses = dist.sum_over_ranks(torch.stack([w["loss_ce"], w["loss_lb"], w["loss_z"]]).double())
        loss_ce, loss_lb, loss_z = (losses / (micro * self.dist.world_size)).tolist()
        tokens_per_s = steps * cfg.tokens_per_step(self.dist.world_size) / max(self.elapsed - w["wall_start"], 1e-9)
        counts = dist.sum_over_ranks(w["counts"].double()).cpu()
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        experts = self.controller.expert_counts()
        row = {"step": self.step, "tokens": self.tokens, "loss_ce": loss_ce, "loss_lb": loss_lb,
               "loss_z": loss_z, "loss_lb_scaled": cfg.moe.lb_coef * loss_lb,
               "loss_z_scaled": cfg.moe.z_coef * loss_z,
               "loss": loss_ce + cfg.moe.lb_coef * loss_lb + cfg.moe.z_coef * loss_z,
               "lr": w["lr"], "grad_norm": (w["grad_norm"] / steps).item(),
               "grad_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
               "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(self.elapsed, 3)}
        for i, n in enumerate(experts):
            p = share[i][share[i] > 0]
            row[f"experts_L{i}"] = n
            row[f"usage_entropy_L{i}"] = round(float(-(p * p.log()).sum()), 6)
            row[f"max_load_L{i}"] = round(float(share[i].max() * n), 6)  # max / mean over live experts
        self.log.train_row(row, f"{self._step_text(loss_ce, loss_lb)} | GradNorm {row['grad_norm']:.3f} | "
                                f"Tok/s {tokens_per_s:,.0f} | Experts {'/'.join(map(str, experts))}",
                           experts="/".join(map(str, experts)))
        self.window = self._empty_window()

    def _write_state_rows(self) -> None:
        for mechanism in self.plasticity:
            self.log.state_rows([{"step": self.step, "tokens": self.tokens,
                                  "granularity": mechanism.granularity, **row}
                                 for row in mechanism.snapshot()])

    def evaluate(self) -> None:
        # Rank r evaluates batches r, r+W, ... of each source; sums and counts are all-reduced.
        r, world = self.dist.rank, self.dist.world_size
        sums = torch.tensor([[self._loss_sum(b[r::world]), len(b[r::world])]
                             for b in self.eval_batches.values()], dtype=torch.float64)
        sums = dist.sum_over_ranks(sums).tolist()
        rows = []
        for source, (total, n) in zip(self.eval_batches, sums):
            loss = total / n
            rows.append({"step": self.step, "tokens": self.tokens, "source": source, "loss": loss,
                         "ppl": math.exp(min(loss, 50.0))})
        weights = [len(b) for b in self.eval_batches.values()]
        mixed = sum(r["loss"] * n for r, n in zip(rows, weights)) / sum(weights)
        rows.append({"step": self.step, "tokens": self.tokens, "source": "all", "loss": mixed,
                     "ppl": math.exp(min(mixed, 50.0))})
        self.log.eval_rows(rows, "Eval | " + " | ".join(f"{r['source']} {r['loss']:.4f}" for r in rows))

    @torch.no_grad()
    def sample(self) -> None:
        """A generated sample in the log, drawn with its own generator (training RNG untouched)."""
        cfg = self.cfg.log
        if not cfg.sample_tokens:
            return
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + self.step)
        prompt = torch.tensor([self.tokenizer.encode(cfg.sample_prompt)], device=self.device)
        self.model.eval()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            out = self.model.generate(prompt, cfg.sample_tokens, temperature=0.8, generator=generator)
        self.model.train()
        text = self.tokenizer.decode(out[0].tolist())
        self.log.line(self.step, f"Sample | {text!r}")

    # -- checkpoints -------------------------------------------------------------- #
    def save(self) -> None:
        """Checkpoint now. A failed write keeps the previous checkpoints; too many in a row stop the run.

        Under DDP every rank takes part (the state gathers each rank's RNG and data
        state), rank 0 writes, and the outcome is shared so all ranks go on or stop together.
        """
        state = self.state_dict()
        if self.dist.enabled:
            self._check_replicas()
        path, err = None, None
        if self.dist.is_main:
            try:
                self.log.sync()
                path = ckpt.save_checkpoint(self.paths.ckpt_dir, state, self.cfg.checkpoint.keep_last)
            except OSError as error:
                err = error
        if self.dist.enabled:
            err = dist.broadcast_object(None if err is None else str(err))
        if err is not None:
            self.save_failures += 1
            self.log.warn(self.step, f"checkpoint at step {self.step} failed ({err}); the previous "
                                     f"checkpoints are intact ({self.save_failures} failures in a row)")
            if self.save_failures >= self.cfg.checkpoint.max_failures:
                raise UserError(f"stopping: {self.save_failures} checkpoint saves in a row failed, last: "
                                f"{err}. Free disk space or fix {self.paths.ckpt_dir}, then --resume") from None
            return
        self.save_failures = 0
        self.last_save = time.monotonic()
        self.log.line(self.step, f"Checkpoint | {path}", echo=False)

    def _check_replicas(self) -> None:
        """Data-parallel replicas must be identical: weights, buffers (except the per-rank usage
        counts since the last decision), optimizer state, expert records and the controller's
        generator (plasticity mechanisms act on the model, so their decisions show there; their
        own state holds per-rank statistics until the next decision). Compared by digest at every
        checkpoint; a mismatch is a bug and stops the run."""
        replica = {"model": {k: v for k, v in self.model.state_dict().items() if not k.endswith("usage_counts")},
                   "optimizer": self.optimizer.state_dict(), "controller": self.controller.state_dict()}
        digests = dist.gather_objects(dist.state_digest(replica))
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel replicas diverged at step {self.step}: digests by rank {digests}")
        self.log.line(self.step, f"Ranks | {self.dist.world_size} replicas identical (digest {digests[0]})",
                      echo=False)

    def state_dict(self) -> dict:
        """The checkpoint. Under DDP (a collective): `ranks` holds every rank's RNG and data state."""
        window = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.window.items()}
        # Per rank: RNG, data position, the partial log interval, the usage counted since the
        # last decision (the controller all-reduces it at the next one) and the plasticity
        # mechanisms' state (their statistics are likewise all-reduced only when they decide).
        per_rank = {"rng": rng_state(), "data": self.stream.state_dict(), "window": window,
                    "usage_counts": [layer.usage_counts.cpu() for layer in self.model.moe_layers],
                    "plasticity": {m.config_key: m.state_dict() for m in self.plasticity}}
        ranks = dist.gather_objects(per_rank) if self.dist.enabled else None
        return {"step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "controller": self.controller.state_dict(), "data": per_rank["data"],
                "plasticity": per_rank["plasticity"],
                "trainer": {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                            "bad_steps": self.bad_steps, "window": window, "world_size": self.dist.world_size},
                "rng": per_rank["rng"], "config": self.cfg.to_dict(),
                **({"ranks": ranks} if ranks is not None else {})}

    def load_state_dict(self, state: dict, restore_data: bool = True) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.controller.load_state_dict(state["controller"])
        mine = state["ranks"][self.dist.rank] if "ranks" in state else state
        for mechanism in self.plasticity:  # a mechanism switched on at resume starts fresh
            if mechanism.config_key in mine.get("plasticity", {}):
                mechanism.load_state_dict(mine["plasticity"][mechanism.config_key])
        if restore_data:
            self.stream.load_state_dict(mine["data"])
        t = state["trainer"]
        self.step, self.tokens, self.elapsed = t["step"], t["tokens"], t["elapsed"]
        self.bad_steps = t["bad_steps"]
        for layer, counts in zip(self.model.moe_layers, mine.get("usage_counts", [])):
            layer.usage_counts.copy_(counts)
        window = mine.get("window", t["window"])   # the rank's own partial log interval
        self.window = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in window.items()}
        set_rng_state(mine["rng"])

    def _install_signal_handlers(self) -> dict:
        """SIGINT / SIGTERM: finish the current step, save, exit cleanly."""
        def request_stop(signum, frame):
            if self.stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log.print(f"received signal {signum}: saving a checkpoint after this step ...")

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return old
