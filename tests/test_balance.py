"""Auxiliary-loss-free balancing (moe.balance: bias / both) and the reported load balance.

The bias picks experts and never weighs them; it moves once per applied optimizer step
from the step's counts summed over micro-batches and ranks; it is fp32 model state that
checkpoints carry; morphogenesis gives newborn, crossed-over and freed slots a stated
bias and births still keep the function. With balance: aux_loss nothing of it exists.
"""

from __future__ import annotations

import math

import pytest
import torch

import nemoe.train_module as train_module
from nemoe import checkpoint_layout as layout
from nemoe.model import NemoeLM, split_block
from nemoe.moe import MoELayer
from nemoe.plasticity.expert_surgery import blend_slots, clear_slot, copy_slot, open_slot
from nemoe.runtime import Runtime
from nemoe.train_module import TrainModule
from tests.conftest import tiny_config
from tests.test_evolution import probe_logits, trained_model


def biased_layer(top_k: int) -> MoELayer:
    """Slots 0-2 live, slot 3 free; a router that spreads tokens."""
    layer = MoELayer(16, 24, n_slots=4, n_active=3, top_k=top_k, select_bias=True)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer


# --------------------------------------------------------------------------- #
# Selection only
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("top_k", [1, 2])
def test_bias_picks_the_experts_but_never_weighs_them(top_k):
    layer = biased_layer(top_k)
    x = torch.randn(64, 16)
    with torch.no_grad():
        layer.select_bias.copy_(torch.tensor([0.0, 100.0, -100.0, 1000.0]))  # slot 3 is free
    idx, gates, aux = layer.route(x)
    logits = x @ layer.router.weight.T + layer.route_offset
    probs = logits.softmax(-1)
    if top_k == 1:
        assert (idx[:, 0] == 1).all(), "the bias decides the choice"
        assert torch.allclose(gates[:, 0], probs[:, 1], atol=1e-6), "the gate is the router's p, without b"
    else:
        assert (idx == torch.tensor([1, 0])).all()
        assert torch.allclose(gates, logits[:, [1, 0]].softmax(-1), atol=1e-6)
    assert aux.counts[2:].sum() == 0, "a free slot is never chosen, whatever its bias"


def test_bias_gets_no_gradient_and_the_router_still_does():
    layer = biased_layer(1)
    with torch.no_grad():
        layer.select_bias.copy_(torch.tensor([0.0, 2.0, -1.0, 0.0]))
    y, aux = layer(torch.randn(2, 8, 16))
    (y.pow(2).sum() + aux.z_loss).backward()
    assert not layer.select_bias.requires_grad and layer.select_bias.grad is None
    assert layer.router.weight.grad[:3].abs().sum() > 0


# --------------------------------------------------------------------------- #
# The update rule
# --------------------------------------------------------------------------- #

def test_update_rule_on_hand_numbers():
    layer = MoELayer(8, 8, n_slots=5, n_active=4, top_k=1, select_bias=True)
    with torch.no_grad():
        layer.route_offset[3] = math.log(0.5)   # a ramping newborn
    counts = torch.tensor([10, 2, 6, 1, 0])
    layer.update_select_bias(counts, 0.25)
    # Open experts 0, 1, 2 (mean load 6): the busy one down, the idle one up, the one at the
    # mean stays; the ramping newborn and the free slot keep theirs.
    assert layer.select_bias.tolist() == [-0.25, 0.25, 0.0, 0.0, 0.0]
    layer.update_select_bias(counts, 0.25)
    assert layer.select_bias.tolist() == [-0.5, 0.5, 0.0, 0.0, 0.0]
    assert layer.select_bias.dtype == torch.float32


def module(**moe) -> TrainModule:
    """A TrainModule on a tiny config (seeded: equal arguments, equal weights)."""
    cfg = tiny_config(moe=moe, train={"batch_size": 2, "grad_accum": 2, "warmup_steps": 0, "lr": 1e-2})
    torch.manual_seed(0)
    tm = TrainModule(cfg, Runtime(cfg.train), total_steps=10)
    for layer in tm.model.moe_layers:   # a router that spreads tokens over the experts
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return tm


def batches(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randint(0, 32, (2, 17), generator=gen) for _ in range(2)]


def expected_bias(before: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """b + rate * sign(mean - load) per layer, every live expert open (no newborns here)."""
    live = counts[:, :2].double()
    return before + torch.cat([rate * torch.sign(live.mean(1, keepdim=True) - live),
                               torch.zeros(counts.size(0), 2, dtype=torch.float64)], 1).float()


def biases(tm: TrainModule) -> torch.Tensor:
    return torch.stack([layer.select_bias.clone() for layer in tm.model.moe_layers])   # (L, E)


def test_train_module_moves_the_bias_once_per_step_from_all_micro_batches():
    tm = module(balance="bias", bias_rate=0.01)
    for step in range(3):
        before = biases(tm)
        result = tm.train_batch(batches(step), step)
        counts = sum(m.counts for m in result.micro)   # both micro-batches
        assert result.finite and len(result.micro) == 2
        assert torch.equal(biases(tm), expected_bias(before, counts, 0.01))
    assert biases(tm).abs().sum() > 0


def test_the_update_uses_counts_summed_over_ranks(monkeypatch):
    """The reduction path: whatever sum_over_ranks returns (every rank's counts) drives the update."""
    other_rank = torch.tensor([[0, 1000, 0, 0], [1000, 0, 0, 0]], dtype=torch.float64)
    seen = []

    def two_ranks(values):
        seen.append(values.clone())
        return values + other_rank

    monkeypatch.setattr(train_module, "sum_over_ranks", two_ranks)
    tm = module(balance="bias", bias_rate=0.01)
    result = tm.train_batch(batches(0), 0)
    mine = sum(m.counts for m in result.micro)
    assert len(seen) == 1 and torch.equal(seen[0], mine.double()), "one all-reduce per step, of the step's counts"
    assert torch.equal(biases(tm), expected_bias(torch.zeros(2, 4), mine + other_rank.long(), 0.01))
    assert biases(tm)[0, 1] < 0 < biases(tm)[0, 0], "the other rank's load counts"


def test_a_skipped_step_leaves_the_bias(monkeypatch):
    tm = module(balance="bias", bias_rate=0.01)
    tm.train_batch(batches(0), 0)
    before = biases(tm)
    real = NemoeLM.forward

    def poisoned(self, idx, targets=None):
        out = real(self, idx, targets)
        out.loss_ce = out.loss_ce * float("nan")
        return out

    monkeypatch.setattr(NemoeLM, "forward", poisoned)
    result = tm.train_batch(batches(1), 1)
    assert not result.finite
    assert torch.equal(biases(tm), before)


# --------------------------------------------------------------------------- #
# aux_loss unchanged; bias = no balance loss
# --------------------------------------------------------------------------- #

def test_aux_loss_models_carry_no_bias():
    cfg = tiny_config()
    assert cfg.moe.balance == "aux_loss" and cfg.moe.aux_coef == cfg.moe.lb_coef
    assert not any("select_bias" in k for k in NemoeLM(cfg).state_dict())
    assert tiny_config(moe={"balance": "bias"}).moe.aux_coef == 0.0
    assert tiny_config(moe={"balance": "both"}).moe.aux_coef == tiny_config().moe.lb_coef


def params(tm: TrainModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tm.model.parameters()]


def test_both_at_rate_zero_trains_exactly_like_aux_loss():
    """The bias branch with b = 0 selects exactly as the plain one: same weights bit for bit."""
    a, b = module(), module(balance="both", bias_rate=0.0)
    for step in range(3):
        ra, rb = a.train_batch(batches(step), step), b.train_batch(batches(step), step)
        assert torch.equal(ra.loss_ce, rb.loss_ce)
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))


def test_bias_mode_drops_the_balance_loss_from_the_objective():
    """balance: bias with lb_coef 0.01 takes its first step (b = 0 then) exactly like aux_loss
    with lb_coef 0; loss_lb is still measured."""
    a, b = module(lb_coef=0.0), module(balance="bias", lb_coef=0.01)
    ra, rb = a.train_batch(batches(0), 0), b.train_batch(batches(0), 0)
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert torch.equal(ra.micro[0].loss_lb, rb.micro[0].loss_lb) and rb.micro[0].loss_lb > 0


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #

def test_the_bias_is_fp32_state_in_the_state_dict():
    tm = module(balance="bias", bias_rate=0.01)
    for step in range(3):
        tm.train_batch(batches(step), step)
    state = tm.state_dict()["model"]
    saved = torch.stack([state[f"blocks.{i}.moe.select_bias"] for i in range(2)])
    assert saved.dtype == torch.float32 and saved.abs().sum() > 0 and torch.equal(saved, biases(tm))
    fresh = module(balance="bias")
    fresh.load_state_dict(tm.state_dict())
    assert torch.equal(biases(fresh), biases(tm))
    # An aux_loss checkpoint resumed under bias starts at 0; a bias one under aux_loss drops it.
    fresh.model.load_state_dict(module().model.state_dict())
    assert biases(fresh).abs().sum() == 0
    plain = module()
    plain.model.load_state_dict(tm.model.state_dict())
    assert plain.model.moe_layers[0].select_bias is None


# --------------------------------------------------------------------------- #
# Morphogenesis under bias
# --------------------------------------------------------------------------- #

def test_births_keep_the_function_and_get_their_stated_bias():
    for top_k in (1, 2):
        cfg = tiny_config(moe={"top_k": top_k, "balance": "bias"})
        model, opt = trained_model(cfg)
        layer = model.moe_layers[0]
        with torch.no_grad():
            layer.select_bias.copy_(torch.tensor([0.3, -0.2, 0.7, -0.9]))   # slots 2, 3 free
        before = probe_logits(model, cfg)
        copy_slot(layer, opt, src=0, dst=2, mutation_std=0.05, generator=torch.Generator().manual_seed(0))
        open_slot(layer, 2)
        blend_slots(layer, opt, 0, 1, dst=3, alpha=0.3)
        open_slot(layer, 3)
        assert torch.allclose(before, probe_logits(model, cfg), atol=1e-6), top_k
        bias = layer.select_bias.tolist()
        assert bias[2] == bias[0] == pytest.approx(0.3), "a split child copies its parent's bias"
        assert bias[3] == pytest.approx(0.3 * 0.3 + 0.7 * -0.2), "a crossover child gets the blend"
        clear_slot(layer, opt, 3)
        assert layer.select_bias[3] == 0, "a freed slot gets 0"


# --------------------------------------------------------------------------- #
# The reported balance
# --------------------------------------------------------------------------- #

def test_routable_experts_count_a_ramping_newborn_by_its_weight():
    layer = MoELayer(8, 8, n_slots=4, n_active=3, top_k=1)
    assert layer.routable_experts().item() == 3.0
    with torch.no_grad():
        layer.route_offset[2] = -math.inf     # just born: cannot take traffic
    assert layer.routable_experts().item() == 2.0
    with torch.no_grad():
        layer.route_offset[2] = math.log(0.5)
    assert layer.routable_experts().item() == pytest.approx(2.5 ** 2 / 2.25)


def test_balance_reads_one_at_even_routing_beside_a_newborn():
    """Two even experts and a newborn at routing weight 0: the trained loss reads 1.5 (n_live = 3),
    the reported balance 1.0."""
    layer = MoELayer(8, 8, n_slots=4, n_active=3, top_k=1)
    with torch.no_grad():
        layer.route_offset[2] = -math.inf
        layer.router.weight.copy_(torch.eye(4, 8) * 1e-4)
    x = torch.zeros(1, 8, 8)
    x[0, torch.arange(8), torch.arange(8) % 2] = 1.0
    _, aux = layer(x)
    assert aux.counts.tolist() == [4, 4, 0, 0]
    assert aux.lb_loss.item() == pytest.approx(1.5, rel=1e-3)
    assert aux.balance.item() == pytest.approx(1.0, rel=1e-3)


def test_balance_equals_the_trained_loss_without_newborns():
    layer = biased_layer(2)
    _, aux = layer(torch.randn(2, 8, 16))
    assert aux.balance.item() == aux.lb_loss.item()


# --------------------------------------------------------------------------- #
# Trainer runs: exact resume and function-preserving births under balance: bias
# --------------------------------------------------------------------------- #

BIAS = ["--set", "moe.balance=bias", "--set", "moe.bias_rate=0.01"]


@pytest.fixture(scope="module")
def bias_straight(tmp_path_factory):
    from tests.test_trainer import run
    run_dir = tmp_path_factory.mktemp("bias_straight")
    assert run(run_dir, "--max-steps", "24", *BIAS) == 0
    return run_dir


def saved_bias(run_dir, step: int) -> torch.Tensor:
    from nemoe import checkpoint as ckpt
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / "tiny" / f"nemo_ckpt_step{step}.pt")
    model = layout.model_weights(state)
    return torch.stack([model[f"blocks.{i}.moe.select_bias"] for i in range(2)])


@pytest.mark.slow
def test_resume_under_bias_is_bit_exact(bias_straight, tmp_path):
    """The bias is checkpointed (not as zeros): stop at 13, lose that checkpoint, resume from 10."""
    import pandas as pd
    from tests.test_trainer import logs, run
    assert run(tmp_path, "--max-steps", "13", *BIAS) == 0
    (tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step13.pt").unlink()
    assert saved_bias(tmp_path, 10).abs().sum() > 0, "the checkpoint holds the bias, not zeros"
    assert run(tmp_path, "--resume", "--max-steps", "24", *BIAS) == 0
    (a_train, a_events, a_eval), (b_train, b_events, b_eval) = logs(bias_straight), logs(tmp_path)
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist()
    assert b_train["grad_norm"].tolist() == a_train["grad_norm"].tolist()
    pd.testing.assert_frame_equal(a_events, b_events)
    assert a_eval["loss"].tolist() == b_eval["loss"].tolist()
    assert torch.equal(saved_bias(tmp_path, 24), saved_bias(bias_straight, 24))
    assert a_events["step"].min() < 10 < a_events["step"].max(), "events before and after the resume point"


@pytest.mark.slow
def test_births_under_bias_keep_probe_loss_and_balance_reads_routable_experts(bias_straight):
    from tests.test_trainer import logs
    train, events, _ = logs(bias_straight)
    births = events[events["event"].isin(["split", "crossover"])]
    assert len(births) > 0
    assert (births["probe_loss_after"] == births["probe_loss_before"]).all(), "a birth changes nothing"
    # loss_lb is measured but not trained on: `loss` is CE + z-loss only.
    assert (train["loss"] - train["loss_ce"] - train["loss_z_scaled"]).abs().max() < 1e-6
    assert (train["loss_lb_scaled"] == 0).all()
    after_birth = train[train["step"].isin(births["step"] + 1)]
    assert (after_birth["balance"] < after_birth["loss_lb"]).all(), "a just-born expert is not counted"
