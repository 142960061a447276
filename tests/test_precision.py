"""Precision on CPU: fp16 autocast + GradScaler and bf16, the overflow policy, the memory guard.

The T4 path (fp16 + GradScaler) runs here on CPU through torch.autocast("cpu") and
torch.amp.GradScaler("cpu"). A forced overflow comes from TrainModule's
`loss_multiplier` seam (an infinite factor on one step's loss).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch.overrides import TorchFunctionMode

from nemoe import checkpoint_layout as layout
from nemoe import memory
from nemoe.errors import UserError
from nemoe.metrics import MetricsWindow
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity import Plasticity
from nemoe.runtime import Runtime, resolve_precision
from nemoe.train_module import LOSS_SCALE_FLOOR, TrainModule
from tests.conftest import tiny_config
from tests.test_trainer import TINY, logs, run

PRECISIONS = ["fp32", "fp16", "bf16"]
# Every mechanism on, intervals short enough that each one has statistics before step 6.
ALL_MECHANISMS = {"model": {"n_layers": 3, "n_heads": 4, "dropout": 0.1},
                  "plasticity": {"experts": {"interval": 4, "probation_steps": 4, "split_usage": 0.3},
                                 "layers": {"enabled": True, "interval": 5, "min_age": 4, "trigger": 100.0,
                                            "warmup_steps": 3, "max_dropout": 0.3, "lifespan": 50},
                                 "heads": {"enabled": True, "min_heads": 1, "interval": 5, "prune": "importance"},
                                 "neuron": {"enabled": True, "interval": 5, "prune_rate": 0.1,
                                            "regrowth": "functional"}}}


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(seed))


def module(precision: str, **sections):
    """A TrainModule on a tiny model (vocabulary 32) with every mechanism of `sections` attached."""
    cfg = tiny_config(train={"precision": precision, "lr": 3e-3, "warmup_steps": 2, **sections.pop("train", {})},
                      **sections)
    torch.manual_seed(0)
    tm = TrainModule(cfg, Runtime(cfg.train), total_steps=100)
    return tm, Plasticity(cfg, tm.model, batch(999))


def clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def assert_same(a, b, where="state"):
    """Nested dicts / lists of tensors and values, equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# What the logs count of every step, skipped or not (as the log window counts its losses): the
# expert mechanism's routing counts since the last row and its live-expert parameter-steps.
LOG_COUNTS = ("window_counts", "param_steps")


def everything(tm: TrainModule, plasticity: Plasticity) -> dict:
    """What a skipped step must leave alone: weights, optimizer moments, every mechanism's state
    (but the log counts)."""
    # (The LR follows the step count, skipped or not: param_groups are not compared.)
    state = plasticity.state_dict()
    state["experts"] = {k: v for k, v in state["experts"].items() if k not in LOG_COUNTS}
    return clone({"params": dict(tm.model.named_parameters()), "optimizer": tm.optimizer.state_dict()["state"],
                  "plasticity": state})


# --------------------------------------------------------------------------- #
# Runtime: which precision, and why
# --------------------------------------------------------------------------- #

def test_half_precision_is_accepted_on_cpu_and_auto_stays_fp32():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("fp32", "CPU")
    assert resolve_precision("fp32", cpu) == ("fp32", "train.precision")
    for name in ("fp16", "bf16"):
        precision, why = resolve_precision(name, cpu)
        assert precision == name and "CPU autocast" in why
    assert "GradScaler" in resolve_precision("fp16", cpu)[1]
    runtime = Runtime(tiny_config(train={"precision": "fp16"}).train)
    assert runtime.uses_scaler and runtime.autocast_dtype == torch.float16
    assert not Runtime(tiny_config(train={"precision": "bf16"}).train).uses_scaler


# --------------------------------------------------------------------------- #
# (e) router, softmax, losses and load-balance statistics in fp32 under every precision
# --------------------------------------------------------------------------- #

class DtypeRecorder(TorchFunctionMode):
    """The dtype of every floating-point tensor each torch function returns."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.is_floating_point():
                self.seen.append((getattr(func, "__name__", str(func)), t.dtype))
        return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_router_softmax_losses_and_balance_statistics_are_fp32(precision):
    tm, _ = module(precision)
    runtime, model = tm.runtime, tm.model
    layer = model.moe_layers[0]
    x = torch.randn(2, 16, 32)
    with runtime.autocast():
        half = torch.nn.functional.linear(x, torch.randn(32, 32)).reshape(-1, 32)   # as a block hands it over
        with DtypeRecorder() as rec:
            top_idx, gates, aux = layer.route(half)
    assert rec.seen and all(dtype == torch.float32 for _, dtype in rec.seen), rec.seen
    assert {"linear", "softmax", "logsumexp"} <= {name for name, _ in rec.seen}
    assert gates.dtype == aux.lb_loss.dtype == aux.z_loss.dtype == torch.float32
    assert aux.counts.dtype == torch.int64
    if precision != "fp32":
        assert half.dtype == runtime.autocast_dtype, "autocast is on: the fp32 router is the router's doing"
    with runtime.autocast():
        out = model(*split_block(batch(0)))
    assert out.loss_ce.dtype == out.loss_lb.dtype == out.loss_z.dtype == torch.float32
    assert all(c.dtype == torch.int64 for c in out.counts)
    result = tm.train_batch([batch(1)], 0)
    window = MetricsWindow.empty("cpu", 0.0)
    window.add(result)
    assert window.loss_ce.dtype == window.loss_lb.dtype == window.grad_norm.dtype == torch.float32
    assert all(m.counts.dtype == torch.int64 for m in result.micro)


# --------------------------------------------------------------------------- #
# (c) a forced overflow skips exactly that step and changes nothing
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_forced_overflow_skips_that_step_and_leaves_every_state_bit_identical(precision):
    tm, plasticity = module(precision, **ALL_MECHANISMS)
    experts, neuron, heads, layers = plasticity.mechanisms
    tm.loss_multiplier = lambda step: math.inf if step == 3 else 1.0
    for step in range(3):
        assert tm.train_batch([batch(step)], step, plasticity).finite
    # Statistics of every kind are under way, so "unchanged" means something.
    assert experts.usage_counts.sum() > 0 and neuron.taylor.sum() > 0 and heads.gate_grad_steps > 0
    before, scale = everything(tm, plasticity), tm.loss_scale
    counted = experts.window_counts.sum().item(), experts.param_steps.total
    result = tm.train_batch([batch(3)], 3, plasticity)
    assert experts.window_counts.sum() == counted[0] + 3 * 4 * 16, "the skipped step's routing is in the log window"
    assert experts.param_steps.total > counted[1], "and its live experts in the parameter-steps"
    assert not result.finite and tm.bad_steps == 1
    assert all(layer.usage_counts.sum() == 0 for layer in tm.model.moe_layers), "the step's buffer is cleared"
    assert_same(everything(tm, plasticity), before)
    if precision == "fp16":
        assert tm.loss_scale == scale / 2, "the GradScaler backs off"
        assert f"at fp16 loss scale {scale:g}: update skipped, scale lowered to {scale / 2:g}" in result.skip_note
    else:
        assert tm.loss_scale == scale == 1.0 and "update skipped (1 in a row)" in result.skip_note
    assert tm.divergence is None, "one skipped step is no divergence"
    # The next step applies as usual and counts its statistics.
    assert tm.train_batch([batch(4)], 4, plasticity).finite and tm.bad_steps == 0
    assert experts.usage_counts.sum() > before["plasticity"]["experts"]["usage_counts"][0].sum()


def test_a_skipped_step_is_the_same_as_no_step_for_the_decisions():
    """Usage counts of a skipped step do not count: with the skip, the interval's counts are
    those of the applied steps alone (counted by a run that never saw the skipped batch)."""
    skipping, plasticity = module("fp16")
    skipping.loss_multiplier = lambda step: math.inf if step == 1 else 1.0
    reference, ref_plasticity = module("fp16")
    for step, seed in enumerate([0, 1, 2]):
        skipping.train_batch([batch(seed)], step, plasticity)
    for step, seed in enumerate([0, 2]):
        reference.train_batch([batch(seed)], step if seed == 0 else 2, ref_plasticity)
    # Same weights at step 0 and untouched by the skip: the counts of steps 0 and 2 agree.
    assert torch.equal(plasticity.experts.usage_counts, ref_plasticity.experts.usage_counts)
    assert plasticity.experts.usage_counts.sum() == 2 * 4 * 16 * 2, "two applied steps, 2 layers, 64 tokens"


def test_interval_usage_counts_follow_a_layer_shift_as_the_blocks_buffers_did():
    from nemoe.plasticity import ExpertMorphogenesis, LayerShift
    cfg = tiny_config(model={"n_layers": 4})
    controller = ExpertMorphogenesis(cfg, NemoeLM(cfg))
    controller.usage_counts.copy_(torch.arange(16).view(4, 4))
    controller.on_layer_shift(LayerShift(7, [2, 0, 1, 2], newborn=0, parent=2))   # L3 died, copy of L2 at 0
    assert controller.usage_counts.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    controller.on_layer_shift(LayerShift(9, [-1, 0, 1, 2], newborn=0, parent=-1))  # a fresh block at 0
    assert controller.usage_counts.tolist() == [[0, 0, 0, 0], [8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]]


def test_neuron_statistics_do_not_depend_on_the_loss_scale():
    """Taylor fitness (activation x gradient, recorded by a hook) is divided by the fp16 scale."""
    runs = []
    for init_scale in (2.0 ** 16, 2.0 ** 8):
        tm, plasticity = module("fp16", plasticity={"neuron": {"enabled": True, "interval": 5}})
        tm.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        tm.train_batch([batch(0)], 0, plasticity)
        runs.append(plasticity.mechanisms[1].taylor.clone())
    assert runs[0].sum() > 0
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- #
# The overflow policy: the scaler's early back-off is no divergence, real divergence is
# --------------------------------------------------------------------------- #

def run_overflows(precision: str, overflowing, steps: int, max_bad_steps: int = 20):
    tm, plasticity = module(precision, train={"max_bad_steps": max_bad_steps})
    tm.loss_multiplier = lambda step: math.inf if overflowing(step) else 1.0
    for step in range(steps):
        tm.train_batch([batch(step)], step, plasticity)
        if tm.divergence:
            return tm, step + 1
    return tm, steps


def test_early_back_off_of_the_scaler_goes_on():
    tm, stopped_after = run_overflows("fp16", lambda s: s < 4, steps=8)
    assert stopped_after == 8 and tm.divergence is None and tm.bad_steps == 0
    assert tm.loss_scale == 2.0 ** 16 / 2 ** 4


def test_the_scale_at_its_floor_is_divergence():
    tm, stopped_after = run_overflows("fp16", lambda s: True, steps=40, max_bad_steps=40)
    # 2^16 halves 16 times to 1 (the floor); the 17th overflow takes it below: stop.
    assert stopped_after == 17 and tm.loss_scale < LOSS_SCALE_FLOOR
    assert "below its floor" in tm.divergence and "not the GradScaler's early back-off" in tm.divergence


def test_max_bad_steps_in_a_row_is_divergence():
    tm, stopped_after = run_overflows("fp16", lambda s: s >= 2, steps=40, max_bad_steps=5)
    assert stopped_after == 7 and "5 steps in a row overflowed in fp16" in tm.divergence
    tm, stopped_after = run_overflows("fp32", lambda s: True, steps=40, max_bad_steps=3)
    assert stopped_after == 3 and "3 steps in a row had a non-finite loss or gradient" in tm.divergence


def test_skipped_steps_are_counted_in_the_log_window_and_left_out_of_the_grad_norm():
    tm, plasticity = module("fp16")
    tm.loss_multiplier = lambda step: math.inf if step == 1 else 1.0
    window = MetricsWindow.empty("cpu", 0.0)
    results = [tm.train_batch([batch(s)], s, plasticity) for s in range(3)]
    for r in results:
        window.add(r)
    row = window.row(3, 192, 1.0, 64, 1, tm.cfg.moe, tm.loss_scale)
    assert row["skipped_steps"] == 1 and row["grad_scale"] == 2.0 ** 15
    applied = [float(r.grad_norm) for r in results if r.finite]
    assert row["grad_norm"] == pytest.approx(sum(applied) / 2) and math.isfinite(row["grad_norm"])
    restored = MetricsWindow.from_state(window.state_dict(), "cpu")
    assert restored.skipped == 1
    old = {k: v for k, v in window.state_dict().items() if k != "skipped"}   # a checkpoint from before
    assert MetricsWindow.from_state(old, "cpu").skipped == 0


# --------------------------------------------------------------------------- #
# The memory plan and the guard's decision (injected numbers)
# --------------------------------------------------------------------------- #

def plan_of(micro_batch=16, grad_accum=1, static=1e9, fixed=1e8, per_sequence=2e8, transient=1e8):
    return memory.MemoryPlan(params=int(static / 16), static={"params": static / 4, "grads": static / 4,
                                                               "adamw_state": static / 2},
                             fixed_activation_bytes=fixed, activation_bytes_per_sequence=per_sequence,
                             transient_bytes_per_sequence=transient, micro_batch=micro_batch,
                             grad_accum=grad_accum, seq_len=64, precision="fp16", measured_at=(1, 2),
                             activation_bytes_measured=(0, 0))


def test_memory_plan_totals_and_the_largest_micro_batch():
    plan = plan_of()
    assert plan.total() == 1e9 + 1e8 + 16 * 3e8
    assert plan.total(4) == 1e9 + 1e8 + 4 * 3e8
    largest = plan.largest_micro_batch(4e9)
    assert plan.total(largest) <= 4e9 < plan.total(largest + 1)
    assert plan.largest_micro_batch(1e9) == 0


def test_a_plan_that_fits_passes_and_one_that_does_not_says_what_to_change():
    plan = plan_of()                                              # 5.9 GB at micro-batch 16
    assert memory.fit_problem(plan, free=7e9, device_name="cuda:0 (Tesla T4)") is None
    message = memory.fit_problem(plan, free=4e9, device_name="cuda:0 (Tesla T4)")
    assert "5.90 GB" in message and "4.00 GB free" in message and "cuda:0 (Tesla T4)" in message
    # 90 % of 4 GB: micro-batch 8 fits; the effective batch of 16 stays 16 = 8 x 2.
    assert "train.batch_size to 8 or less" in message
    assert "--set train.batch_size=8 --set train.grad_accum=2" in message
    assert "model.seq_len" in message and "train.grad_accum" in message
    tight = memory.fit_problem(plan_of(micro_batch=12, grad_accum=1), free=2.9e9, device_name="cuda:0")
    assert "batch_size to 5 or less" in tight   # 5 fits, but 12 = 4 x 3 is the split that keeps 12
    assert "--set train.batch_size=4 --set train.grad_accum=3" in tight
    hopeless = memory.fit_problem(plan, free=1e9, device_name="cuda:0")
    assert "Not even a micro-batch of one sequence fits" in hopeless


def test_measured_plan_counts_bytes_per_parameter_and_leaves_the_run_alone():
    cfg = tiny_config()
    rng, n = torch.get_rng_state(), sum(p.numel() for p in NemoeLM(cfg).parameters())
    torch.set_rng_state(rng)
    plan = memory.plan_memory(cfg, "fp16")
    assert torch.equal(torch.get_rng_state(), rng), "the plan's model copy draws from a forked generator"
    assert plan.static == {"params": 4 * n, "grads": 4 * n, "adamw_state": 8 * n, "autocast_weights": 2 * n}
    assert "autocast_weights" not in memory.plan_memory(cfg, "fp32").static
    act1, act2 = plan.activation_bytes_measured
    assert 0 < act1 < act2 and plan.activation_bytes_per_sequence == act2 - act1
    assert plan.transient_bytes_per_sequence == 12 * 16 * 32
    assert memory.guard(cfg, Runtime(cfg.train)) == "", "no guard on CPU"


@pytest.mark.slow
def test_the_guard_refuses_before_any_file_is_written(tmp_path, monkeypatch, capsys):
    from train_nemoe import main
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 6)   # a device with 1 MB free
    args = ["--config", "local", "--run-dir", str(tmp_path), "--max-steps", "1", "--set", "train.device=cpu",
            "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--set", "model.seq_len=16", "--set", "model.d_expert=32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "GB of GPU memory per step" in err and "0.00 GB free" in err and "model.d_model" in err
    assert list(tmp_path.iterdir()) == [], "no files written"


def test_guard_raises_a_user_error_naming_both_figures(monkeypatch):
    cfg = tiny_config()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    assert memory.guard(cfg, Runtime(cfg.train)).startswith(" | memory plan ")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 4)
    with pytest.raises(UserError, match="needs about .* but cpu has"):
        memory.guard(cfg, Runtime(cfg.train))


# --------------------------------------------------------------------------- #
# Through the trainer
# --------------------------------------------------------------------------- #

def open_trainer(run_dir, *overrides, max_steps=12):
    from nemoe.config import load_config
    from nemoe.schema import RunPaths
    from nemoe.trainer import Trainer
    cfg = load_config("local", TINY + ["train.precision=fp16", *overrides])
    return Trainer(cfg, RunPaths.of(run_dir, "tiny"), max_steps=max_steps)


@pytest.mark.slow
def test_a_skipped_step_is_logged_counted_and_the_scale_column_moves(tmp_path):
    trainer = open_trainer(tmp_path, max_steps=6)
    trainer.train.loss_multiplier = lambda step: math.inf if step == 3 else 1.0   # the 4th step
    try:
        trainer.fit()
    finally:
        trainer.close()
    train = logs(tmp_path)[0]
    assert train["skipped_steps"].tolist() == [0, 0, 0, 1, 0, 0]
    assert train["grad_scale"].tolist() == [65536.0] * 3 + [32768.0] * 3
    assert math.isnan(train["grad_norm"][3]) and train["grad_norm"].drop(index=3).notna().all()
    text = (tmp_path / "logs" / "tiny" / "training_log.txt").read_text()
    assert ("Step 4 | Warning | gradient overflow at fp16 loss scale 65536: update skipped, scale lowered "
            "to 32768 (1 in a row)") in text
    assert "precision fp16 (train.precision; CPU autocast + GradScaler" in text


@pytest.mark.slow
def test_divergence_stops_the_run_and_says_which_kind(tmp_path):
    trainer = open_trainer(tmp_path, "train.max_bad_steps=10")
    trainer.train.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)   # the floor is 3 back-offs away
    trainer.train.loss_multiplier = lambda step: math.inf if step >= 2 else 1.0
    try:
        with pytest.raises(UserError, match="stopped at step 5: the fp16 loss scale backed off to 0.5, below "
                                            "its floor 1.*3 steps in a row skipped.*last finite weights"):
            trainer.fit()
    finally:
        trainer.close()
    from nemoe import checkpoint as ckpt
    (step, path), = ckpt.list_checkpoints(tmp_path / "checkpoints" / "tiny")[:1]
    assert step == 5
    weights = layout.model_weights(ckpt.load_checkpoint(path))
    assert all(torch.isfinite(v).all() for k, v in weights.items()
               if v.is_floating_point() and not k.endswith("route_offset"))


@pytest.mark.slow
def test_loss_scale_settings_drive_the_scaler_and_resume(tmp_path):
    """train.loss_scale_init / loss_scale_growth_interval: the scale doubles after every 2 clean
    steps from 1024, and a resumed run continues the scale and its clean-step count exactly."""
    fp16 = ("--set", "train.precision=fp16", "--set", "train.loss_scale_init=1024",
            "--set", "train.loss_scale_growth_interval=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, "--max-steps", "6", *fp16) == 0
    assert logs(straight)[0]["grad_scale"].tolist() == [1024.0, 2048.0, 2048.0, 4096.0, 4096.0, 8192.0]
    assert run(resumed, "--max-steps", "3", *fp16) == 0   # stops one clean step into the 2048 window
    assert run(resumed, "--resume", "--max-steps", "6", *fp16) == 0
    a, b = logs(straight)[0], logs(resumed)[0]
    assert b["grad_scale"].tolist() == a["grad_scale"].tolist()
    assert b["loss_ce"].tolist() == a["loss_ce"].tolist()


@pytest.mark.slow
def test_an_fp32_checkpoint_resumes_in_fp16_with_a_fresh_scaler(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "3") == 0
    assert run(tmp_path, "--resume", "--max-steps", "5", "--set", "train.precision=fp16") == 0
    out = capsys.readouterr().out
    assert "config change on resume: train.precision: 'fp32' -> 'fp16'" in out
    train = logs(tmp_path)[0]
    assert train["step"].tolist() == [1, 2, 3, 4, 5]
    assert train["grad_scale"].tolist()[3:] == [65536.0, 65536.0]


@pytest.mark.slow
def test_bf16_trains_and_resumes_exactly(tmp_path):
    """(d) bf16 autocast on CPU: N steps + resume + M steps equals N + M straight, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    bf16 = ("--set", "train.precision=bf16")
    assert run(straight, "--max-steps", "10", *bf16) == 0
    assert run(resumed, "--max-steps", "7", *bf16) == 0
    (resumed / "checkpoints" / "tiny" / "nemo_ckpt_step7.pt").unlink()   # back to step 5
    assert run(resumed, "--resume", "--max-steps", "10", *bf16) == 0
    (a_train, a_events, a_eval), (b_train, b_events, b_eval) = logs(straight), logs(resumed)
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist()
    assert a_train["loss_ce"].iloc[-1] < a_train["loss_ce"].iloc[0], "it trains"
    pd.testing.assert_frame_equal(b_events, a_events)
    assert (a_events["step"] > 5).any(), "an expert event after the resume point"
    assert b_eval["loss"].tolist() == a_eval["loss"].tolist()
    assert "precision bf16" in (resumed / "logs" / "tiny" / "training_log.txt").read_text()
