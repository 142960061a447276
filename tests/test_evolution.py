"""Invariants 3 and 4: morph events keep the function and the optimizer state."""

import math

import pytest
import torch

from nemoe.model import NemoeLM, split_block
from nemoe.plasticity.expert_surgery import blend_slots, clear_slot, copy_slot, open_slot, slot_params
from nemoe.plasticity.experts import ExpertMorphogenesis, ExpertRecord, plan_layer
from tests.conftest import act, tiny_config


def trained_model(cfg, steps=3):
    """A tiny model with a few AdamW steps behind it, so moments are non-zero."""
    model = NemoeLM(cfg)
    for layer in model.moe_layers:
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        block = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1), generator=gen)
        model(*split_block(block)).loss_ce.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), opt


def probe_logits(model, cfg):
    gen = torch.Generator().manual_seed(42)
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len), generator=gen)
    with torch.no_grad():
        return model(x).logits


def snapshot(opt, layer):
    return {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for p in slot_params(layer)}


def test_split_and_crossover_keep_logits_at_birth():
    for top_k in (1, 2):
        cfg = tiny_config(moe={"top_k": top_k, "experts_init": 2})
        model, opt = trained_model(cfg)
        before = probe_logits(model, cfg)
        layer = model.moe_layers[0]
        copy_slot(layer, opt, src=0, dst=2, mutation_std=0.05, generator=torch.Generator().manual_seed(0))
        open_slot(layer, 2)
        blend_slots(layer, opt, 0, 1, dst=3, alpha=0.3)
        open_slot(layer, 3)
        assert layer.active.tolist() == [True] * 4
        after = probe_logits(model, cfg)
        assert torch.allclose(before, after, atol=1e-6), (top_k, (before - after).abs().max())


def test_newborn_opens_and_changes_the_function_once_ramped():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    before = probe_logits(model, cfg)
    layer = model.moe_layers[0]
    copy_slot(layer, opt, 0, 2, mutation_std=0.5, generator=torch.Generator().manual_seed(0))
    open_slot(layer, 2)
    with torch.no_grad():
        layer.route_offset[2] = 0.0  # fully open
    assert not torch.allclose(before, probe_logits(model, cfg), atol=1e-4)


def test_prune_of_expert_without_traffic_keeps_logits():
    # top_k=2 gates are a softmax over the selected experts only, so an expert that
    # is never selected cannot influence any output: pruning it is exact.
    cfg = tiny_config(moe={"top_k": 2, "experts_init": 3, "experts_min": 2})
    model, opt = trained_model(cfg)
    block, layer = model.blocks[1], model.moe_layers[1]
    with torch.no_grad():
        # Make the router's input lie near one direction u; slot 2's row points away.
        u = torch.nn.functional.normalize(torch.randn(cfg.model.d_model), dim=0)
        block.ln_moe.weight.mul_(0.05)
        block.ln_moe.bias.copy_(u)
        layer.router.weight[:2] = 3 * u + 0.5 * torch.randn(2, cfg.model.d_model) / cfg.model.d_model ** 0.5
        layer.router.weight[2] = -3 * u
    gen = torch.Generator().manual_seed(42)
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len), generator=gen)
    with torch.no_grad():
        model.train()
        out = model(x)
        model.eval()
    assert out.counts[1][2] == 0, "test setup: slot 2 must receive no tokens"
    before = probe_logits(model, cfg)
    clear_slot(layer, opt, 2)
    assert torch.allclose(before, probe_logits(model, cfg), atol=1e-6)


def test_surgery_keeps_optimizer_state_aligned_and_survivors_untouched():
    cfg = tiny_config(moe={"experts_init": 3})
    model, opt = trained_model(cfg)
    layer = model.moe_layers[0]
    before = snapshot(opt, layer)
    gen = torch.Generator().manual_seed(0)
    copy_slot(layer, opt, 0, 3, 0.01, gen)      # split 0 -> 3
    open_slot(layer, 3)
    clear_slot(layer, opt, 1)                   # prune 1
    blend_slots(layer, opt, 0, 2, 1, 0.5)       # crossover 0 x 2 -> 1
    open_slot(layer, 1)
    clear_slot(layer, opt, 3)                   # prune 3
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.shape == p.shape, key
    for p in slot_params(layer):
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[id(p)][key], opt.state[p][key]
            for survivor in (0, 2):
                assert torch.equal(old[survivor], new[survivor]), (key, survivor)
            assert torch.equal(new[1], 0.5 * old[0] + 0.5 * old[2])
            assert torch.count_nonzero(new[3]) == 0
    # optimizer keeps stepping after surgery
    block = torch.randint(0, 32, (2, 17))
    model.train()
    model(*split_block(block)).loss_ce.backward()
    opt.step()


def test_split_copies_parent_moments_and_mutates_relative_to_scale():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    layer = model.moe_layers[0]
    copy_slot(layer, opt, 0, 2, 0.01, torch.Generator().manual_seed(0))
    w = layer.experts.w_in
    rel = (w[2] - w[0]).pow(2).mean().sqrt() / w[0].pow(2).mean().sqrt()
    assert 0.005 < rel.item() < 0.02
    assert torch.equal(opt.state[w]["exp_avg"][2], opt.state[w]["exp_avg"][0])


# -- policy ------------------------------------------------------------------- #

def _records(n_live, n_slots=4, newborn=()):
    rows = []
    for s in range(n_slots):
        if s < n_live:
            rows.append(ExpertRecord(id=s, probation_until=100 if s in newborn else 0))
        else:
            rows.append(None)
    return rows


def _plan(records, usage, step=1000, **morph):
    cfg = tiny_config(plasticity={"experts": morph})
    return plan_layer(records, usage, cfg.plasticity.experts, cfg.moe.top_k, cfg.moe.experts_min, step,
                      torch.Generator().manual_seed(0))


def test_policy_splits_most_used_and_prunes_least_used():
    actions = _plan(_records(3), [0.6, 0.39, 0.01, 0.0], crossover_prob=0.0)
    assert [(a.kind, a.slot, a.parents) for a in actions] == [("split", 3, (0,)), ("prune", 2, ())]


def test_policy_respects_cap_and_floor():
    # at the cap: no split even though usage is high
    assert _plan(_records(4), [0.7, 0.1, 0.1, 0.1], crossover_prob=0.0) == []
    # at the floor (experts_min=2): no prune even though usage is tiny
    assert [a.kind for a in _plan(_records(2), [0.99, 0.01, 0, 0], crossover_prob=0.0)] == ["split"]


def test_policy_never_prunes_a_newborn_on_probation():
    records = _records(3, newborn=(2,))
    actions = _plan(records, [0.5, 0.5, 0.0, 0.0], step=50, crossover_prob=0.0, split_usage=0.9)
    assert actions == []
    # at review time the starving newborn fails probation
    actions = _plan(records, [0.5, 0.5, 0.0, 0.0], step=100, crossover_prob=0.0, split_usage=0.9)
    assert [(a.kind, a.slot) for a in actions] == [("failed_probation", 2)]
    actions = _plan(records, [0.4, 0.4, 0.2, 0.0], step=100, crossover_prob=0.0, split_usage=0.9)
    assert [(a.kind, a.slot) for a in actions] == [("graduate", 2)]


def test_crossover_parents_follow_fitness():
    picks = {0: 0, 1: 0, 2: 0}
    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(plasticity={"experts": {"crossover_prob": 1.0, "split_usage": 0.99}})
    for _ in range(200):
        records = _records(3)
        for r, fit in zip(records, (0.8, 0.19, 0.01)):
            r.usage_ema = fit
        (action,) = plan_layer(records, [0.34, 0.33, 0.33, 0.0], cfg.plasticity.experts, 1, 2, 1000, gen)
        assert action.kind == "crossover" and action.slot == 3
        for p in action.parents:
            picks[p] += 1
    assert picks[0] > picks[1] > picks[2]


def test_controller_events_and_bounds_over_many_intervals():
    cfg = tiny_config(plasticity={"experts": {"interval": 1, "probation_steps": 2, "split_usage": 0.3,
                                              "prune_usage": 0.2, "crossover_prob": 0.5}})
    model, opt = trained_model(cfg)
    controller = ExpertMorphogenesis(cfg, model)
    gen = torch.Generator().manual_seed(3)
    kinds = set()
    for step in range(1, 30):
        model.train()
        block = torch.randint(0, 32, (4, 17), generator=gen)
        model(*split_block(block)).loss_ce.backward()
        controller.observe(step - 1)    # as the trainer does: the step's usage counts ...
        opt.step()
        controller.after_step(step - 1)  # ... and the per-step buffer cleared
        opt.zero_grad()
        events = act(controller, opt, step, step * 64)
        kinds |= {e.event for e in events}
        for li, layer in enumerate(model.moe_layers):
            n = layer.n_active()
            assert n == controller.expert_counts()[li]
            assert cfg.moe.experts_min <= n <= cfg.moe.experts_max
            live = [r is not None for r in controller.records[li]]
            assert layer.active.tolist() == live
        for e in events:
            assert abs(e.n_after - e.n_before) <= 1
    assert {"split", "prune"} <= kinds, kinds


def test_controller_state_round_trip_gives_same_future_decisions():
    cfg = tiny_config(plasticity={"experts": {"crossover_prob": 0.5}})
    a = ExpertMorphogenesis(cfg, NemoeLM(cfg))
    torch.rand(5, generator=a.generator)
    b = ExpertMorphogenesis(cfg, NemoeLM(cfg))
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.rand(3, generator=a.generator), torch.rand(3, generator=b.generator))
    assert b.records == a.records and b.next_id == a.next_id


def test_ramp_opens_linearly():
    cfg = tiny_config(plasticity={"experts": {"probation_steps": 8}})   # ramp = 4 steps
    model, opt = trained_model(cfg)
    controller = ExpertMorphogenesis(cfg, model)
    layer = model.moe_layers[0]
    controller.records[0][2] = ExpertRecord(id=9, birth_step=10, probation_until=18, origin="split")
    open_slot(layer, 2)
    seen = []
    for step in range(10, 16):
        controller.update_routing(step)
        seen.append(math.exp(layer.route_offset[2].item()))
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-6)


# -- cool-down after a failed probation ------------------------------------------ #

def _loop_controller(**morph):
    """A controller whose layer 0 holds expert 0 (busy), expert 1 and expert 2, a split child of 0
    on probation until step 100 that got no traffic: the split-fail loop's setup."""
    cfg = tiny_config(plasticity={"experts": {"interval": 100, "probation_steps": 100, "split_usage": 0.5,
                                              "crossover_prob": 0.0, "prune_usage": 0.0} | morph})
    model, opt = trained_model(cfg)
    controller = ExpertMorphogenesis(cfg, model)
    copy_slot(model.moe_layers[0], opt, 0, 2, 0.01, torch.Generator().manual_seed(0))
    open_slot(model.moe_layers[0], 2)
    controller.records[0][2] = ExpertRecord(id=controller.next_id, parents=(0,), birth_step=0,
                                            probation_until=100, origin="split")
    controller.next_id += 1
    return cfg, model, opt, controller


def _interval(controller, opt, step, shares):
    """One decision at `step` after an interval whose layer-0 usage was `shares` (of 1000 choices)."""
    controller.usage_counts.zero_()
    controller.usage_counts[0, :len(shares)] = torch.tensor([round(1000 * s) for s in shares])
    controller.usage_counts[1, :2] = 500        # layer 1: balanced, nothing happens there
    return [(e.event, e.slot, e.parents) for e in act(controller, opt, step) if e.layer == 0]


def test_a_parent_whose_child_failed_probation_does_not_split_again_at_once():
    # Today's split-fail loop: the child fails, its slot is freed and the same parent splits
    # into it at the same decision, again and again. The default cool-down stops that.
    cfg, model, opt, controller = _loop_controller()
    parent_id = controller.records[0][0].id
    assert _interval(controller, opt, 100, [0.6, 0.4, 0.0]) == [("failed_probation", 2, "")]
    assert cfg.plasticity.experts.cooldown_intervals >= 1
    for k in range(1, cfg.plasticity.experts.cooldown_intervals):   # still cooling: no split of expert 0
        assert _interval(controller, opt, 100 + 100 * k, [0.6, 0.4, 0.0]) == []
    step = 100 + 100 * cfg.plasticity.experts.cooldown_intervals       # cool-down over: it may split again
    assert _interval(controller, opt, step, [0.6, 0.4, 0.0]) == [("split", 2, str(parent_id))]


def test_cool_down_blocks_only_the_failed_childs_parent_and_zero_turns_it_off():
    cfg, model, opt, controller = _loop_controller(cooldown_intervals=3)
    # Another busy expert may split while expert 0 cools down; births stay function-preserving.
    probe = probe_logits(model, cfg)
    events = _interval(controller, opt, 100, [0.3, 0.7, 0.0])
    assert events == [("failed_probation", 2, ""), ("split", 2, str(controller.records[0][1].id))]
    assert torch.allclose(probe, probe_logits(model, cfg), atol=1e-6)
    assert controller.records[0][0].cooldown_until == 400
    # Off: the old loop (same parent, same slot, same decision).
    cfg, model, opt, controller = _loop_controller(cooldown_intervals=0)
    assert _interval(controller, opt, 100, [0.6, 0.4, 0.0]) == [("failed_probation", 2, ""), ("split", 2, "0")]


def test_cool_down_survives_a_checkpoint_and_old_checkpoints_load_without_it():
    cfg, model, opt, controller = _loop_controller(cooldown_intervals=2)
    _interval(controller, opt, 100, [0.6, 0.4, 0.0])
    state = controller.state_dict()
    assert state["records"][0][0]["cooldown_until"] == 300
    resumed = ExpertMorphogenesis(cfg, model)
    resumed.load_state_dict(state)
    assert resumed.records == controller.records
    assert _interval(resumed, opt, 200, [0.6, 0.4, 0.0]) == []
    # A checkpoint written before the cool-down existed: no cool-down, the parent may split.
    for row in state["records"]:
        for r in row:
            if r is not None:
                del r["cooldown_until"]
    old = ExpertMorphogenesis(cfg, model)
    old.load_state_dict(state)
    assert all(r.cooldown_until == 0 for row in old.records for r in row if r is not None)
    assert _interval(old, opt, 200, [0.6, 0.4, 0.0]) == [("split", 2, "0")]
