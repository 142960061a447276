"""Free expert slots cost nothing (nemoe/slot_optim.py): no optimizer state, no update; state
at birth (a split child inherits its parent's moments), none after death; the live slots step
exactly as torch's AdamW over the stacked parameters did; resume and old checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from nemoe.plasticity.expert_surgery import blend_slots, clear_slot, copy_slot, open_slot, slot_params
from nemoe.runtime import Runtime
from nemoe.slot_optim import SlotAdamW, state_bytes
from nemoe.train_module import TrainModule
from tests.conftest import tiny_config


def module(precision="fp32", plain=False, init=2, slots=4) -> TrainModule:
    """A tiny TrainModule; plain: torch's AdamW over every slot (the optimizer before SlotAdamW)."""
    cfg = tiny_config(moe={"experts_init": init, "experts_min": min(init, 2), "experts_max": slots},
                      train={"precision": precision, "lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1})
    torch.manual_seed(0)
    tm = TrainModule(cfg, Runtime(cfg.train), total_steps=100)
    if plain:
        t = cfg.train
        tm.optimizer = torch.optim.AdamW(tm.model.param_groups(t.weight_decay), lr=t.lr,
                                         betas=(t.beta1, t.beta2), fused=True)
    return tm


def steps(tm: TrainModule, first: int, n: int) -> list[float]:
    """n optimizer steps on seeded batches (the same batches for the same step numbers)."""
    norms = []
    for step in range(first, first + n):
        batch = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(step))
        norms.append(tm.train_batch([batch], step).grad_norm.item())
    return norms


def saved_and_loaded(state: dict) -> dict:
    """`state` through torch.save and torch.load, as a checkpoint file has it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def entries(tm: TrainModule, p) -> set[int]:
    return set(tm.optimizer.state[p]["slots"])


def live(layer) -> list[int]:
    return [s for s, on in enumerate(layer.active.tolist()) if on]


def test_a_free_slot_has_no_state_and_its_weights_never_change():
    tm = module()
    layer = tm.model.moe_layers[0]
    before = [p.detach().clone() for p in slot_params(layer)]
    steps(tm, 0, 3)
    for p, old in zip(slot_params(layer), before):
        assert entries(tm, p) == {0, 1}, "state for the two live slots only"
        assert torch.equal(p[2:], old[2:]), "free slots: no update, no weight decay"
        assert not torch.equal(p[:2], old[:2]), "live slots train"
    full = module(init=4)
    steps(full, 0, 3)
    # Half the slots live: the expert and router moments take half the bytes (plus 4-byte steps).
    moments = sum(p.numel() * 4 * 2 for p in slot_params(layer)) * len(tm.model.moe_layers)
    assert state_bytes(full.optimizer) - state_bytes(tm.optimizer) == pytest.approx(moments / 2, abs=400)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_live_slots_step_bit_for_bit_as_torch_adamw_over_the_stacked_parameters(precision):
    slotted, plain = module(precision), module(precision, plain=True)
    assert steps(slotted, 0, 4) == steps(plain, 0, 4), "the same gradient norms"
    for (name, p), q in zip(slotted.model.named_parameters(), plain.model.parameters()):
        if p in slotted.optimizer.pool_of:
            assert torch.equal(p[:2], q[:2]), name
        else:
            assert torch.equal(p, q), name
            assert torch.equal(slotted.optimizer.state[p]["exp_avg"], plain.optimizer.state[q]["exp_avg"]), name
    layer, other = slotted.model.moe_layers[0], plain.model.moe_layers[0]
    for p, q in zip(slot_params(layer), slot_params(other)):
        for s in (0, 1):
            entry, state = slotted.optimizer.state[p]["slots"][s], plain.optimizer.state[q]
            assert torch.equal(entry["exp_avg"], state["exp_avg"][s])
            assert torch.equal(entry["exp_avg_sq"], state["exp_avg_sq"][s])
            assert torch.equal(entry["step"], state["step"])


def test_birth_gives_state_and_a_split_child_inherits_its_parents_moments():
    tm = module()
    steps(tm, 0, 3)
    opt, layer = tm.optimizer, tm.model.moe_layers[0]
    copy_slot(layer, opt, src=1, dst=2, mutation_std=0.01, generator=torch.Generator().manual_seed(0))
    open_slot(layer, 2)
    blend_slots(layer, opt, 0, 1, dst=3, alpha=0.25)
    open_slot(layer, 3)
    for p in slot_params(layer):
        slots = opt.state[p]["slots"]
        assert set(slots) == {0, 1, 2, 3}
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(slots[2][key], slots[1][key]), "split: the parent's moments"
            assert torch.equal(slots[3][key], 0.25 * slots[0][key] + 0.75 * slots[1][key]), "crossover: the blend"
            assert slots[2][key] is not slots[1][key]
        assert torch.equal(slots[2]["step"], slots[1]["step"]) and torch.equal(slots[3]["step"], slots[0]["step"])
    born = [p[2:].detach().clone() for p in slot_params(layer)]
    steps(tm, 3, 1)
    assert all(not torch.equal(p[2:], old) for p, old in zip(slot_params(layer), born)), "newborns train"
    assert all(float(opt.state[p]["slots"][2]["step"]) == 4 for p in slot_params(layer))


def test_death_gives_the_state_back_and_the_freed_slot_stays_still():
    tm = module(init=4)
    steps(tm, 0, 2)
    opt, layer = tm.optimizer, tm.model.moe_layers[1]
    full = state_bytes(opt)
    clear_slot(layer, opt, 3)
    freed = sum(p[3].numel() * 4 * 2 + 4 for p in slot_params(layer))
    assert state_bytes(opt) == full - freed, "given back at the death, not at the next step"
    assert all(entries(tm, p) == {0, 1, 2} for p in slot_params(layer))
    steps(tm, 2, 2)
    assert all(entries(tm, p) == {0, 1, 2} and p[3].eq(0).all() for p in slot_params(layer))
    assert state_bytes(opt) == full - freed


def birth_then_death(tm, parent: int, child: int, dead: int) -> None:
    """Six steps of layer 0: 3, a split of `parent` into `child`, 2, the death of `dead`, 1."""
    steps(tm, 0, 3)
    layer = tm.model.moe_layers[0]
    copy_slot(layer, tm.optimizer, parent, child, 0.01, torch.Generator().manual_seed(0))
    open_slot(layer, child)
    steps(tm, 3, 2)
    clear_slot(layer, tm.optimizer, dead)
    steps(tm, 5, 1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_after_births_and_deaths_is_bit_exact(precision):
    tm = module(precision)
    birth_then_death(tm, parent=0, child=2, dead=1)
    resumed = module(precision)
    resumed.load_state_dict(saved_and_loaded(tm.state_dict()))
    assert steps(resumed, 6, 3) == steps(tm, 6, 3)
    for p, q in zip(tm.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    from tests.test_precision import assert_same
    assert_same(tm.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert entries(resumed, resumed.model.moe_layers[0].router.weight) == {0, 2}


def test_an_old_checkpoint_is_upgraded_on_load_and_trains_on_as_it_would_have():
    """The tiny saved-state builder: the optimizer of before (torch's AdamW over every slot)
    trains through a birth and a death; its state dict loads into SlotAdamW, which then steps
    the live slots exactly as the old optimizer goes on stepping them."""
    old = module(plain=True)
    birth_then_death(old, parent=1, child=3, dead=0)
    layer = old.model.moe_layers[0]
    saved = saved_and_loaded(old.state_dict())
    assert saved["optimizer"]["state"][0]["exp_avg"].dim() >= 1 and "slots" not in saved["optimizer"]["state"][0]
    new = module()
    new.load_state_dict(saved)
    new_layer = new.model.moe_layers[0]
    for p, q in zip(slot_params(new_layer), slot_params(layer)):
        slots = new.optimizer.state[p]["slots"]
        assert set(slots) == {1, 3}, "live slots keep their rows, the free ones are dropped"
        for s in (1, 3):
            assert torch.equal(slots[s]["exp_avg_sq"], old.optimizer.state[q]["exp_avg_sq"][s])
            assert torch.equal(slots[s]["step"], old.optimizer.state[q]["step"])
    assert steps(new, 6, 3) == steps(old, 6, 3)
    for p, q in zip(slot_params(new_layer), slot_params(layer)):
        assert torch.equal(p[[1, 3]], q[[1, 3]])


def test_slot_moments_index_like_the_stacked_tensor():
    tm = module()
    steps(tm, 0, 1)
    w = tm.model.moe_layers[0].experts.w_in
    exp_avg = tm.optimizer.slot_moments(w)[0]
    exp_avg[0, :, 1] = 0                       # neuron turnover: one hidden unit's moments
    assert tm.optimizer.state[w]["slots"][0]["exp_avg"][:, 1].eq(0).all()
    assert exp_avg[2].eq(0).all() and 2 not in entries(tm, w), "a missing entry reads as zeros"
    exp_avg[2, :, 1] = 0
    assert 2 not in entries(tm, w), "zeroing part of a missing entry makes none"
    with pytest.raises(TypeError):
        exp_avg[1:3]
    assert tm.optimizer.slot_moments(tm.model.tok_emb.weight) is None
    assert isinstance(tm.optimizer, SlotAdamW)
