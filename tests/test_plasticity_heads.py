"""Attention-head plasticity (plasticity.heads): gates, prune/grow criteria, surgery, resume, plot.

Unit tests drive HeadPlasticity by hand on a tiny model (2 layers x 4 heads); the
slow tests train through train_nemoe.main in cycle mode with importance pruning,
gradient-sensitivity growth and a new-head LR multiplier, and resume mid-run.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from nemoe.config import config_from_dict
from nemoe.errors import UserError
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity.heads import HeadPlasticity, attention_entropy, count_of, head_slices
from tests.conftest import act, tiny_config
from tests.test_trainer import logs, run, set_args
from tools import plot_heads

HS = 8  # head size: d_model 32 / 4 heads


def setup(**heads):
    cfg = tiny_config(plasticity={"heads": {"enabled": True, **heads}})
    model = NemoeLM(cfg)
    probe = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    return model, HeadPlasticity(cfg, model, probe), probe


def optimizer_of(model, weight_decay=0.1):
    return torch.optim.AdamW(model.param_groups(weight_decay), lr=1e-2)


def probe_loss_of(model, probe):
    @torch.no_grad()
    def probe_loss():
        was = model.training
        model.eval()
        loss = model(*split_block(probe)).loss_ce.item()
        model.train(was)
        return loss
    return probe_loss


def train_step(model, optimizer, mech, step, batch):
    """What the trainer does around the mechanism: backward, observe, step, after_step."""
    model.train()
    model(*split_block(batch)).loss_ce.backward()
    mech.observe(step)
    optimizer.step()
    mech.after_step(step)
    optimizer.zero_grad(set_to_none=True)


def batch(seed):
    return torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(seed))


def live(mech):
    return mech.alive.sum(dim=1).tolist()


# --------------------------------------------------------------------------- #
# Gates in the model
# --------------------------------------------------------------------------- #

def test_open_gates_change_nothing_and_off_adds_no_state():
    torch.manual_seed(0)
    plain = NemoeLM(tiny_config())
    torch.manual_seed(0)
    gated = NemoeLM(tiny_config(plasticity={"heads": {"enabled": True}}))
    assert plain.blocks[0].attn.head_gate is None
    assert not any("head_gate" in k for k in plain.state_dict())
    x = batch(2)[:, :-1]
    assert torch.equal(plain.eval()(x).logits, gated.eval()(x).logits)


def test_checkpoints_load_with_head_plasticity_switched_on_or_off():
    plain = NemoeLM(tiny_config())
    gated = NemoeLM(tiny_config(plasticity={"heads": {"enabled": True}}))
    with torch.no_grad():
        gated.blocks[1].attn.head_gate.fill_(0.5)
    gated.load_state_dict(plain.state_dict())             # an old checkpoint: every head open
    assert all(torch.equal(b.attn.head_gate, torch.ones(4)) for b in gated.blocks)
    plain.load_state_dict(gated.state_dict())             # all gates open: nothing is lost
    with torch.no_grad():
        gated.blocks[0].attn.head_gate[1] = 0.0
    with pytest.raises(RuntimeError, match="pruned attention heads"):
        plain.load_state_dict(gated.state_dict())


def test_pruned_head_contributes_exactly_nothing_and_gets_no_gradient():
    model, mech, probe = setup()
    reference = copy.deepcopy(model)
    mech.prune_head(None, 1, 2, step=5)
    with torch.no_grad():
        reference.blocks[1].attn.proj.weight[:, 2 * HS:3 * HS] = 0
    x = probe[:, :-1]
    assert torch.equal(model.eval()(x).logits, reference.eval()(x).logits)
    model.train()
    model(*split_block(probe)).loss_ce.backward()
    for p, index in head_slices(model.blocks[1].attn, 2):
        assert p.grad[index].abs().max() == 0
    assert all(p.grad[index].abs().max() > 0 for p, index in head_slices(model.blocks[1].attn, 1)
               if p.dim() == 2)


# --------------------------------------------------------------------------- #
# Prune criteria, bounds
# --------------------------------------------------------------------------- #

def _make_head_diffuse(model, layer, head):
    """All other heads attend sharply (large q, k); this head's queries are 0: uniform attention."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for h in range(4):
                w, b = block.attn.qkv.weight, block.attn.qkv.bias
                q_rows, k_rows = slice(h * HS, (h + 1) * HS), slice(32 + h * HS, 32 + (h + 1) * HS)
                if (i, h) == (layer, head):
                    w[q_rows], b[q_rows] = 0, 0
                else:
                    w[q_rows] *= 40
                    w[k_rows] *= 40


def _make_head_small(model, layer, head):
    with torch.no_grad():
        for p, index in head_slices(model.blocks[layer].attn, head):
            p[index] *= 0.1


def _make_head_useless(model, layer, head):
    """proj columns 0: the loss does not depend on the head's gate, dL/dg = 0."""
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight[:, head * HS:(head + 1) * HS] = 0


@pytest.mark.parametrize("rule,prepare", [("entropy", _make_head_diffuse), ("magnitude", _make_head_small),
                                          ("importance", _make_head_useless)])
def test_each_prune_criterion_picks_the_right_head(rule, prepare):
    model, mech, probe = setup(prune=rule, prune_fraction=0.1, interval=4)
    prepare(model, 1, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)   # the prepared weights stay as they are
    for step in range(4):
        train_step(model, optimizer, mech, step, batch(step))
    if rule == "importance":
        assert mech.gate_grad_steps == 4
    if rule == "entropy":
        entropy = attention_entropy(model, probe)
        assert entropy[1, 3] == entropy.max() and entropy[1, 3] > 0.99
    events = act(mech, optimizer, 4, 0, probe_loss_of(model, probe))
    assert [(e.event, e.layer, e.unit) for e in events] == [("prune", 1, "h3")]
    assert rule.split("_")[0] in events[0].cause
    assert model.blocks[1].attn.head_gate[3] == 0 and live(mech) == [4, 3]


def test_random_prune_follows_its_own_seeded_generator():
    picks = []
    for seed in (0, 1, 2):
        model, mech, probe = setup(prune="random", prune_fraction=0.1, seed=seed)
        draw = torch.rand(2, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        layer, head = divmod(int(draw.argmax()), 4)
        events = act(mech, optimizer_of(model), 4, 0, probe_loss_of(model, probe))
        assert [(e.layer, e.unit) for e in events] == [(layer, f"h{head}")]
        picks.append((layer, head))
    assert len(set(picks)) > 1


def test_min_heads_and_counts_are_honoured():
    assert [count_of(0.25, n) for n in (0, 1, 2, 6, 8)] == [0, 1, 1, 2, 2]
    model, mech, probe = setup(prune="magnitude", prune_fraction=0.9, min_heads=3, grow="balanced",
                               grow_fraction=0.5, interval=4, warmup_steps=2)
    optimizer = optimizer_of(model)
    events = act(mech, optimizer, 4, 0, probe_loss_of(model, probe))
    assert [e.event for e in events] == ["prune", "prune"] and live(mech) == [3, 3]
    events = act(mech, optimizer, 8, 0, probe_loss_of(model, probe))
    # balanced regrowth: 1 of 2 dead heads, in layer 0 (tie -> lowest layer); then one prune,
    # in layer 0 again: layer 1 is at min_heads and the newborn is protected
    assert [(e.event, e.layer) for e in events] == [("grow", 0), ("prune", 0)]
    assert events[0].unit != events[1].unit and live(mech) == [3, 3]
    assert all(e.n_after >= 3 for e in events)


# --------------------------------------------------------------------------- #
# Growth: function preserved, optimizer state, learning rate
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("rule", ["gradient_sensitivity", "entropy_gap", "balanced", "random"])
def test_newborn_head_leaves_the_output_bit_identical_at_birth(rule):
    # cycle mode: prune at step 1, grow at step 2
    model, mech, probe = setup(mode="cycle", interval=1, recover_steps=1, cycles=1, prune="magnitude",
                               prune_fraction=0.3, grow=rule, grow_fraction=1.0, warmup_steps=4)
    optimizer = optimizer_of(model)
    probe_loss = probe_loss_of(model, probe)
    train_step(model, optimizer, mech, 0, batch(0))
    pruned = act(mech, optimizer, 1, 64, probe_loss)
    dead = [(e.layer, int(e.unit[1:])) for e in pruned if e.event == "prune"]
    assert len(dead) == 2
    train_step(model, optimizer, mech, 1, batch(1))
    before_logits = model.eval()(probe[:, :-1]).logits
    old = {lh: [p[i].clone() for p, i in head_slices(model.blocks[lh[0]].attn, lh[1]) if p.dim() == 2]
           for lh in dead}
    events = act(mech, optimizer, 2, 128, probe_loss)
    grown = [e for e in events if e.event == "grow"]
    assert len(grown) == 2 and events[-1].event == "measure"
    assert torch.equal(model.eval()(probe[:, :-1]).logits, before_logits)
    assert all(e.probe_loss_before == e.probe_loss_after for e in events)
    for lh in dead:
        attn = model.blocks[lh[0]].attn
        assert attn.head_gate[lh[1]] == 0 and mech.born[lh] == 2
        new = [p[i] for p, i in head_slices(attn, lh[1]) if p.dim() == 2]
        assert all(not torch.equal(a, b) for a, b in zip(old[lh], new)), "reinitialised"
    # the gate opens linearly over warmup_steps
    for step in range(2, 7):
        train_step(model, optimizer, mech, step, batch(step))
        gate = float(model.blocks[dead[0][0]].attn.head_gate[dead[0][1]])
        assert gate == pytest.approx(min(1.0, (step + 1 - 2) / 4))


def test_optimizer_state_follows_prune_and_grow():
    model, mech, probe = setup(prune="magnitude", prune_fraction=0.1, grow="random", interval=2)
    optimizer = optimizer_of(model)
    for step in range(2):
        train_step(model, optimizer, mech, step, batch(step))
    attn = model.blocks[0].attn
    _make_head_small(model, 0, 1)
    kept = {id(p): [s.clone() for s in optimizer.state[p].values()] for p in (attn.qkv.weight, attn.proj.weight)}
    probe_loss = probe_loss_of(model, probe)
    assert [(e.layer, e.unit) for e in act(mech, optimizer, 2, 0, probe_loss)] == [(0, "h1")]
    for p in (attn.qkv.weight, attn.proj.weight):
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        own = dict(head_slices(attn, 1))[p]
        assert state["exp_avg"][own].abs().max() == 0 and state["exp_avg_sq"][own].abs().max() == 0
        other = dict(head_slices(attn, 2))[p]
        assert torch.equal(state["exp_avg"][other], kept[id(p)][1][other]), "other heads keep their moments"
    for step in range(2, 4):
        train_step(model, optimizer, mech, step, batch(step))
    events = act(mech, optimizer, 4, 0, probe_loss)
    assert events[0].event == "grow" and (events[0].layer, events[0].unit) == (0, "h1")
    for p, index in head_slices(attn, 1):
        assert all(s[index].abs().max() == 0 for s in optimizer.state[p].values() if s.shape == p.shape)
    assert all(s.shape == p.shape for p in model.parameters() for s in optimizer.state[p].values() if s.dim())


def _newborn_step(mult):
    """Train a grown head for one step after its gate opened; returns (params before, after)."""
    torch.manual_seed(0)
    model, mech, probe = setup(mode="cycle", interval=1, recover_steps=1, cycles=1, prune="magnitude",
                               prune_fraction=0.1, grow="balanced", warmup_steps=4, new_head_lr_mult=mult)
    _make_head_small(model, 0, 2)
    optimizer = optimizer_of(model, weight_decay=0.0)
    probe_loss = probe_loss_of(model, probe)
    train_step(model, optimizer, mech, 0, batch(0))
    act(mech, optimizer, 1, 0, probe_loss)
    train_step(model, optimizer, mech, 1, batch(1))
    act(mech, optimizer, 2, 0, probe_loss)                 # (0, h2) is reborn, gate 0
    train_step(model, optimizer, mech, 2, batch(2))       # gate 0: no gradient, no move
    before = copy.deepcopy(model.state_dict())
    train_step(model, optimizer, mech, 3, batch(3))       # gate 1/4: the first real step
    return model, before, model.state_dict()


def test_new_head_lr_multiplier_scales_the_newborns_step_only():
    model, before1, after1 = _newborn_step(1.0)
    _, before3, after3 = _newborn_step(3.0)
    attn = model.blocks[0].attn
    for name in before1:
        assert torch.equal(before1[name], before3[name]), name
    moved = 0
    for p, index in head_slices(attn, 2):
        name = next(n for n, q in model.named_parameters() if q is p)
        step1 = after1[name][index] - before1[name][index]
        step3 = after3[name][index] - before3[name][index]
        torch.testing.assert_close(step3, 3 * step1, rtol=1e-4, atol=1e-8)
        moved += int(step1.abs().max() > 0)
        after1[name][index] = after3[name][index] = 0          # compare the rest below
    assert moved == 3
    for name in after1:
        assert torch.equal(after1[name], after3[name]), f"{name}: only the newborn's slices differ"


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #

def test_bad_options_give_one_config_error():
    raw = {"model": {"n_heads": 4, "d_model": 32},
           "plasticity": {"heads": {"enabled": True, "prune": "loudest", "grow": "x", "mode": "waves",
                                    "prune_fraction": 1.5, "min_heads": 4, "warmup_steps": -1}}}
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    text = str(err.value)
    for key in ("prune must be", "grow must be", "mode must be", "prune_fraction", "min_heads (4) must be <",
                "warmup_steps"):
        assert key in text
    assert text.count("\n  - ") == 6


def test_cycle_schedule():
    _, mech, _ = setup(mode="cycle", interval=4, recover_steps=2, cycles=2)
    assert mech.cycle_schedule() == {4: ("prune", 1), 6: ("grow", 1), 10: ("prune", 2), 12: ("grow", 2),
                                     16: ("learn", 2)}
    assert [s for s in range(20) if mech.due(s)] == [4, 6, 10, 12, 16]


# --------------------------------------------------------------------------- #
# Through the trainer: cycle mode, exact resume, plasticity.csv, plot
# --------------------------------------------------------------------------- #

HEADS = ["plasticity.heads.enabled=true", "plasticity.heads.mode=cycle", "plasticity.heads.interval=4",
         "plasticity.heads.recover_steps=2", "plasticity.heads.cycles=3", "plasticity.heads.prune=importance",
         "plasticity.heads.grow=gradient_sensitivity", "plasticity.heads.prune_fraction=0.3",
         "plasticity.heads.warmup_steps=3", "plasticity.heads.new_head_lr_mult=2", "model.n_heads=4"]


def run_heads(run_dir, *extra):
    return run(run_dir, *set_args(HEADS), *extra)


def read(run_dir):
    train, events, _ = logs(run_dir)
    return train, events, pd.read_csv(run_dir / "logs" / "tiny" / "plasticity.csv")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("heads")
    assert run_heads(run_dir, "--max-steps", "20") == 0
    return run_dir


@pytest.mark.slow
def test_cycle_run_logs_events_and_gates(straight):
    _, events, state = read(straight)
    heads = events[events["granularity"] == "head"]
    measures = heads[heads["event"] == "measure"]
    assert measures["step"].tolist() == [4, 6, 10, 12, 16, 18]       # phase ends (learn end: 22)
    assert [u.split()[1] for u in measures["unit"]] == ["prune", "grow"] * 3
    prunes, grows = heads[heads["event"] == "prune"], heads[heads["event"] == "grow"]
    assert set(prunes["step"]) == {4, 10, 16} and set(grows["step"]) == {6, 12, 18}
    assert (prunes.groupby("step").size() == 2).all(), "0.3 of 8 live heads"
    assert (grows["probe_loss_before"] == grows["probe_loss_after"]).all(), "births preserve the function"
    assert (heads["n_after"] >= 1).all()
    gates = state[(state["granularity"] == "head") & (state["name"] == "gate")]
    assert len(gates) == 20 * 8 and gates["value"].between(0, 1).all()
    after_prune = gates[gates["step"] == 4]
    assert (after_prune["value"] == 0).sum() == 2


@pytest.mark.slow
def test_resume_is_bit_exact_across_head_events(straight, tmp_path):
    assert run_heads(tmp_path, "--max-steps", "9") == 0
    assert run_heads(tmp_path, "--resume", "--max-steps", "20") == 0
    train, events, state = read(tmp_path)
    s_train, s_events, s_state = read(straight)
    assert train["loss_ce"].tolist() == s_train["loss_ce"].tolist()
    pd.testing.assert_frame_equal(events, s_events)
    pd.testing.assert_frame_equal(state, s_state)
    resumed = events[(events["granularity"] == "head") & (events["step"] > 9)]
    assert {"prune", "grow"} <= set(resumed["event"])


def heads_picture(fig):
    """plot_heads' figure: (row labels top to bottom, heads x steps colour grid,
    {"prune"/"grow": sorted (step, row label)})."""
    import numpy as np
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    grid = np.asarray(ax.collections[0].get_array()).reshape(len(labels), -1)
    marks = {c.get_label().split()[0]: sorted((float(x), labels[int(y)]) for x, y in c.get_offsets())
             for c in ax.collections[1:]}
    return labels, grid, marks


def gate_table(state, metric="gate"):
    """plasticity.csv's head rows of `metric` as {row label: [value at each step]}, steps in order."""
    rows = state[(state["granularity"] == "head") & (state["name"] == metric)]
    table = rows.pivot_table(index=["layer", "unit"], columns="step", values="value", aggfunc="last")
    return {f"L{layer}.{unit}": list(values) for (layer, unit), values in table.iterrows()}


def test_plot_heads_draws_the_csv_gates_and_marks_prunes_and_grows(tmp_path, saved_figures):
    from nemoe.logs import EVENT_COLUMNS
    from tests.test_tools import PNG_SIGNATURE, csv_text, event

    log_dir = tmp_path / "logs" / "hand"
    log_dir.mkdir(parents=True)
    # 2 layers x 2 heads, 3 log steps; head L1.h0 is pruned at step 4 and grown back at 6.
    gate = {(2, 0, 0): 1.0, (2, 0, 1): 0.9, (2, 1, 0): 0.8, (2, 1, 1): 1.0,
            (4, 0, 0): 1.0, (4, 0, 1): 0.7, (4, 1, 0): 0.0, (4, 1, 1): 1.0,
            (6, 0, 0): 1.0, (6, 0, 1): 0.6, (6, 1, 0): 0.1, (6, 1, 1): 0.5}
    rows = ["step,tokens,granularity,layer,unit,name,value"]
    for (step, layer, head), g in gate.items():
        rows += [f"{step},{64 * step},head,{layer},h{head},gate,{g}",
                 f"{step},{64 * step},head,{layer},h{head},entropy,{round(1 - g / 2, 3)}"]
    (log_dir / "plasticity.csv").write_text("\n".join(rows) + "\n")
    head_event = lambda step, layer, head, kind: event(step, layer, kind, -1) | {  # noqa: E731
        "granularity": "head", "unit": f"h{head}"}
    events = [head_event(4, 1, 0, "prune"), event(5, 0, "split", 4, "0"), head_event(6, 1, 0, "grow")]
    (log_dir / "events.csv").write_text(csv_text(events, EVENT_COLUMNS))

    out = tmp_path / "heads.png"
    assert plot_heads.main([str(log_dir), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    labels, grid, marks = heads_picture(saved_figures[-1])
    assert labels == ["L0.h0", "L0.h1", "L1.h0", "L1.h1"]        # layer 0 on top
    by_row = {f"L{layer}.h{head}": [gate[(step, layer, head)] for step in (2, 4, 6)]
              for layer in (0, 1) for head in (0, 1)}
    assert grid.tolist() == [by_row[label] for label in labels]
    assert marks == {"prune": [(4.0, "L1.h0")], "grow": [(6.0, "L1.h0")]}
    assert plot_heads.main([str(log_dir / "plasticity.csv"), "-o", str(out), "--metric", "entropy"]) == 0
    _, grid, _ = heads_picture(saved_figures[-1])
    assert grid.tolist() == [[round(1 - g / 2, 3) for g in by_row[label]] for label in labels]


@pytest.mark.slow
def test_plot_heads_on_a_real_run(straight, tmp_path, capsys, saved_figures):
    log_dir = straight / "logs" / "tiny"
    out = tmp_path / "heads.png"
    assert plot_heads.main([str(log_dir), "-o", str(out)]) == 0
    labels, grid, marks = heads_picture(saved_figures[-1])
    _, events, state = read(straight)
    gates = gate_table(state)
    assert labels == list(gates) and len(labels) == 8
    assert grid.tolist() == [gates[label] for label in labels]
    for kind in ("prune", "grow"):
        rows = events[(events["granularity"] == "head") & (events["event"] == kind)]
        assert len(rows) > 0
        assert marks[kind] == sorted((float(e.step), f"L{e.layer}.{e.unit}") for e in rows.itertuples())
    assert plot_heads.main([str(log_dir), "-o", str(tmp_path / "e.png"), "--metric", "entropy"]) == 0
    _, grid, _ = heads_picture(saved_figures[-1])
    entropies = gate_table(state, "entropy")
    assert grid.tolist() == [entropies[label] for label in labels]
    assert plot_heads.main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cycles_flag_is_short_for_the_config_keys():
    from nemoe.config import load_config
    from train_nemoe import overrides_of, parse_args
    args = parse_args(["--cycles", "4", "--set", "plasticity.heads.interval=50"])
    cfg = load_config(None, overrides_of(args))
    h = cfg.plasticity.heads
    assert (h.enabled, h.mode, h.cycles, h.interval) == (True, "cycle", 4, 50)
    with pytest.raises(UserError, match="plasticity.heads.cycles must be >= 1"):
        load_config(None, overrides_of(parse_args(["--cycles", "0"])))
