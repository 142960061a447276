"""Layer senescence (plasticity.layers): zones, shifts with optimizer state, newborns, drives, resume."""

import math

import pandas as pd
import pytest
import torch

from nemoe.errors import UserError
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity import LayerShift
from nemoe.plasticity.experts import ExpertMorphogenesis
from nemoe.plasticity.layers import LayerSenescence
from tests.conftest import act, tiny_config
from tests.test_trainer import logs, run


LAYERS = {"enabled": True, "interval": 2, "birth_zone": 2, "death_zone": 2, "min_age": 0,
          "trigger": 100.0, "warmup_steps": 4, "mutation_std": 0.0}


def setup(n_layers=6, **layers):
    """Model, AdamW with per-block groups (after 3 real steps), mechanism, probe batch."""
    cfg = tiny_config(model={"n_layers": n_layers, "dropout": 0.1},
                      plasticity={"layers": {**LAYERS, **layers}})
    model = NemoeLM(cfg)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    probe = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    mech = LayerSenescence(cfg, model, probe)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        out = model(*split_block(torch.randint(0, 32, (4, 17), generator=gen)))
        out.loss_ce.backward()
        mech.observe(step)
        optimizer.step()
        optimizer.zero_grad()
    return cfg, model, optimizer, mech, probe


def probe_recorder(model, probe):
    """A probe_loss callable that also keeps the logits of every call."""
    logits = []

    @torch.no_grad()
    def probe_loss():
        model.eval()
        out = model(*split_block(probe))
        model.train()
        logits.append(out.logits.clone())
        return out.loss_ce.item()
    return probe_loss, logits


def block_snapshot(block, optimizer):
    params = [p.detach().clone() for p in block.parameters()]
    states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in block.parameters()]
    return params, states


def test_shift_moves_parameters_and_their_exact_optimizer_state():
    cfg, model, optimizer, mech, probe = setup(newborn="copy")
    for r, v in zip(mech.records, [3.0, 3.0, 3.0, 3.0, 0.5, 3.0]):
        r.vitality = r.importance_ema = v
    before = [block_snapshot(b, optimizer) for b in model.blocks]
    probe_loss, _ = probe_recorder(model, probe)
    mech.measure = lambda *a: None        # keep the vitalities set above: position 4 must die
    events = act(mech, optimizer, 3, 0, probe_loss)
    assert [e.event for e in events] == ["death", "birth"]
    assert (events[0].layer, events[1].layer) == (4, 1)   # death zone 4..5, birth position 1
    # Positions 1..3 moved to 2..4 with their exact moments and step; 0 and 5 untouched.
    for new, old in [(0, 0), (2, 1), (3, 2), (4, 3), (5, 5)]:
        params, states = block_snapshot(model.blocks[new], optimizer)
        for a, b in zip(params, before[old][0]):
            assert torch.equal(a, b)
        for a, b in zip(states, before[old][1]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The newborn is a copy of the most vital block (id 0, at position 0): parameters
    # (mutation_std 0) and optimizer moments equal its parent's.
    assert events[1].parents == "0" and mech.records[1].origin == "copy"
    params, states = block_snapshot(model.blocks[1], optimizer)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0][0]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states, before[0][1]) for k in a)
    for p in model.parameters():
        for s in optimizer.state[p].values():
            assert s.dim() == 0 or s.shape == p.shape
    assert [r.id for r in mech.records] == [0, 6, 1, 2, 3, 5]
    assert events[1].shift.sources == [0, 0, 1, 2, 3, 5] and events[1].shift.newborn == 1


@pytest.mark.parametrize("newborn", ["copy", "fresh"])
def test_newborn_at_zero_influence_leaves_the_logits_bit_identical(newborn):
    cfg, model, optimizer, mech, probe = setup(newborn=newborn, mutation_std=0.05)
    probe_loss, logits = probe_recorder(model, probe)
    events = act(mech, optimizer, 3, 0, probe_loss)
    death, birth = events
    # Calls: base, 6 ablations, before the death, after it, after the birth.
    assert len(logits) == 1 + 6 + 3
    assert torch.equal(logits[-2], logits[-1])
    assert birth.probe_loss_before == birth.probe_loss_after
    assert model.blocks[birth.layer].influence.item() == 0.0
    assert death.n_before == death.n_after == 6 and death.granularity == "layer"
    if newborn == "fresh":
        p = next(model.blocks[birth.layer].parameters())
        assert all(torch.count_nonzero(s) == 0 for s in optimizer.state[p].values())


def test_zones_core_never_dies_and_newborns_land_in_the_birth_zone():
    cfg, model, optimizer, mech, probe = setup(n_layers=7, birth_zone=2, death_zone=2)
    probe_loss, _ = probe_recorder(model, probe)
    stem = [p.detach().clone() for p in model.blocks[0].parameters()]
    deaths, births = [], []
    for step in range(4, 28, 2):
        for e in act(mech, optimizer, step, 0, probe_loss):
            (deaths if e.event == "death" else births).append(e.layer)
        mech.observe(step)
    assert deaths and len(deaths) == len(births)
    assert set(deaths) <= {5, 6} and set(births) == {1}
    assert all(torch.equal(a, b) for a, b in zip(model.blocks[0].parameters(), stem)), "position 0 never moves"


def test_death_needs_age_and_low_vitality():
    cfg, model, optimizer, mech, probe = setup(min_age=10, trigger=0.01)
    probe_loss, _ = probe_recorder(model, probe)
    assert act(mech, optimizer, 4, 0, probe_loss) == []        # young and vital
    mech.section.trigger = 100.0
    assert act(mech, optimizer, 6, 0, probe_loss) == []        # still younger than min_age
    assert len(act(mech, optimizer, 10, 0, probe_loss)) == 2


def test_vitality_formula_and_newborn_warmup():
    cfg, model, optimizer, mech, probe = setup(lifespan=100, importance_ema=0.5)
    probe_loss, _ = probe_recorder(model, probe)
    base = probe_loss()
    mech.step = 50
    mech.measure(base, probe_loss)
    shares = [r.importance for r in mech.records]
    assert sum(shares) == pytest.approx(6.0)                  # shares average to 1
    for r in mech.records:
        assert r.vitality == pytest.approx((0.5 + 0.5 * r.importance) * math.exp(-0.5))
    mech.section.trigger = 0.0
    events = act(mech, optimizer, 4, 0, probe_loss)
    assert events == []
    mech.section.trigger = 100.0
    birth = act(mech, optimizer, 6, 0, probe_loss)[1]
    ramp = []
    for step in range(6, 12):
        mech.observe(step)
        ramp.append(model.blocks[birth.layer].influence.item())
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])    # warmup_steps 4


def test_temperature_dropout_and_lr_scale_follow_vitality():
    cfg, model, optimizer, mech, probe = setup(max_temperature=2.0, max_dropout=0.3, min_lr_scale=0.2)
    for r, v in zip(mech.records, [0.0, 0.25, 0.5, 1.0, 2.0, 0.75]):
        r.vitality = v
    mech.apply_drives(optimizer)
    for i, v in enumerate([0.0, 0.25, 0.5, 1.0, 2.0, 0.75]):
        h = min(v, 1.0)
        block = model.blocks[i]
        assert block.attn.temperature.item() == pytest.approx(2.0 - h)
        assert block.attn.resid_drop.p == block.moe_drop.p == pytest.approx(0.3 - 0.2 * h)
        scales = [g["lr_scale"] for g in optimizer.param_groups if g["name"].startswith(f"block{i}.")]
        assert scales == pytest.approx([0.2 + 0.8 * h] * 2)
    assert all("lr_scale" not in g for g in optimizer.param_groups if g["name"].startswith("shared"))
    # The temperature reaches attention: a hotter block changes the output.
    probe_loss, logits = probe_recorder(model, probe)
    probe_loss()
    model.blocks[3].attn.temperature.fill_(5.0)
    probe_loss()
    assert not torch.equal(logits[0], logits[1])


def test_param_groups_keep_the_decay_split_and_cover_every_parameter():
    cfg, model, optimizer, mech, probe = setup(n_layers=3, birth_zone=1, death_zone=1)
    groups = model.param_groups(0.1)
    names = [g["name"] for g in groups]
    assert names[:2] == ["shared.decay", "shared.no_decay"] and "block2.no_decay" in names
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    for g in groups:
        assert g["weight_decay"] == (0.1 if g["name"].endswith(".decay") else 0.0)
        assert all(p.dim() >= 2 for p in g["params"]) or g["name"].endswith("no_decay")
    plain = NemoeLM(tiny_config()).param_groups(0.1)
    assert [g["name"] for g in plain] == ["shared.decay", "shared.no_decay"]


def test_checkpoints_without_influence_or_temperature_still_load():
    model = NemoeLM(tiny_config())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("influence", "temperature"))}
    fresh = NemoeLM(tiny_config())
    fresh.load_state_dict(state)                       # strict
    assert all(b.influence.item() == 1.0 and b.attn.temperature.item() == 1.0 for b in fresh.blocks)


def test_controller_records_follow_the_shift():
    cfg = tiny_config(model={"n_layers": 4}, plasticity={"layers": {**LAYERS, "birth_zone": 1,
                                                                       "death_zone": 1}})
    controller = ExpertMorphogenesis(cfg, NemoeLM(cfg))
    rows = [list(row) for row in controller.records]
    next_id = controller.next_id
    controller.on_layer_shift(LayerShift(7, [2, 0, 1, 2], newborn=0, parent=2))   # L3 died, copy of L2 at 0
    assert controller.records[1:] == rows[:3]
    assert [r.parents for r in controller.records[0] if r] == [(r.id,) for r in rows[2] if r]
    assert [r.id for r in controller.records[0] if r] == [next_id, next_id + 1]
    controller.on_layer_shift(LayerShift(9, [-1, 0, 1, 2], newborn=0, parent=-1))  # fresh
    assert [(r.birth_step, r.origin) for r in controller.records[0] if r] == [(9, "init")] * 2


@pytest.mark.parametrize("layers, message", [
    ({"birth_zone": 2, "death_zone": 2}, "stable core"),
    ({"birth_zone": 0}, "stable core"),
    ({"newborn": "clone"}, "copy or fresh"),
    ({"max_dropout": 0.05}, "max_dropout"),
])
def test_invalid_layer_settings_are_one_clear_error(layers, message):
    with pytest.raises(UserError) as err:
        tiny_config(model={"n_layers": 4, "dropout": 0.1}, plasticity={"layers": {"enabled": True, **layers}})
    assert message in str(err.value) and str(err.value).count("\n  - ") == 1


# --------------------------------------------------------------------------- #
# Through the trainer (slow): events, logs, exact resume, the vitality plot
# --------------------------------------------------------------------------- #

LAYER_RUN = ["--set", "model.n_layers=4", "--set", "plasticity.layers.enabled=true",
             "--set", "plasticity.layers.interval=4", "--set", "plasticity.layers.min_age=4",
             "--set", "plasticity.layers.trigger=100", "--set", "plasticity.layers.warmup_steps=3",
             "--set", "plasticity.layers.max_dropout=0.3", "--set", "plasticity.layers.lifespan=50"]


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("layers")
    assert run(run_dir, *LAYER_RUN, "--max-steps", "16") == 0
    return run_dir


@pytest.mark.slow
def test_run_logs_layer_events_and_vitality(layer_run):
    train, events, _ = logs(layer_run)
    layer = events[events["granularity"] == "layer"]
    assert list(layer["event"]) == ["death", "birth"] * 4
    assert list(layer["step"]) == [4, 4, 8, 8, 12, 12, 16, 16]
    assert set(layer[layer["event"] == "death"]["layer"]) == {3}
    assert set(layer[layer["event"] == "birth"]["layer"]) == {0}
    births = layer[layer["event"] == "birth"]
    assert (births["probe_loss_before"] == births["probe_loss_after"]).all()
    state = pd.read_csv(layer_run / "logs" / "tiny" / "plasticity.csv")
    vit = state[state["name"] == "vitality"]
    assert sorted(vit["layer"].unique()) == [0, 1, 2, 3] and vit["step"].nunique() == 16
    text = (layer_run / "logs" / "tiny" / "training_log.txt").read_text()
    assert "Event layer_death | Layer 3" in text and "Event layer_birth | Layer 0" in text


@pytest.mark.slow
def test_resume_is_bit_exact_across_layer_deaths_and_births(layer_run, tmp_path):
    assert run(tmp_path, *LAYER_RUN, "--max-steps", "10") == 0
    (tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step10.pt").unlink()   # back to step 5
    assert run(tmp_path, *LAYER_RUN, "--resume", "--max-steps", "16") == 0
    straight_train, straight_events, _ = logs(layer_run)
    train, events, _ = logs(tmp_path)
    assert train["loss_ce"].tolist() == straight_train["loss_ce"].tolist()   # bit for bit
    pd.testing.assert_frame_equal(events, straight_events)
    assert {8, 12, 16} <= set(events[events["granularity"] == "layer"]["step"]), "events after step 5"
    state = lambda d: pd.read_csv(d / "logs" / "tiny" / "plasticity.csv")  # noqa: E731
    pd.testing.assert_frame_equal(state(tmp_path), state(layer_run))


def vitality_picture(fig):
    """plot_vitality's figure: (layers x steps colour grid, {"death"/"birth": sorted (step, layer)},
    the dashed zone lines' y)."""
    import numpy as np
    ax = fig.axes[0]
    mesh = ax.collections[0]
    grid = np.asarray(mesh.get_array()).reshape(len(ax.get_yticks()), -1)
    marks = {c.get_label().split()[0]: sorted(map(tuple, np.asarray(c.get_offsets(), dtype=float).tolist()))
             for c in ax.collections[1:]}
    zones = sorted(float(line.get_ydata()[0]) for line in ax.lines if line.get_linestyle() == "--")
    return grid, marks, zones


def test_plot_vitality_draws_the_csv_values_and_marks_deaths_and_births(tmp_path, saved_figures):
    from nemoe.logs import EVENT_COLUMNS
    from tests.test_tools import PNG_SIGNATURE, csv_text, event
    from tools.plot_vitality import main as plot_main

    log_dir = tmp_path / "logs" / "hand"
    log_dir.mkdir(parents=True)
    # Rows in step order, as the trainer writes them (a step going back reads as a resume).
    value = {(layer, step): round(0.1 * layer + 0.01 * step, 4) for step in (2, 4, 6, 8) for layer in range(3)}
    rows = ["step,tokens,granularity,layer,unit,name,value"]
    for (layer, step), v in value.items():
        rows += [f"{step},{64 * step},layer,{layer},L{layer},vitality,{v}",
                 f"{step},{64 * step},layer,{layer},L{layer},lr_scale,{1 - v}",
                 f"{step},{64 * step},head,{layer},h0,gate,1.0"]           # another granularity: not drawn
    (log_dir / "plasticity.csv").write_text("\n".join(rows) + "\n")
    layer_event = lambda step, layer, kind: event(step, layer, kind, -1) | {  # noqa: E731
        "granularity": "layer", "unit": f"L{layer}"}
    events = [layer_event(4, 2, "death"), layer_event(4, 0, "birth"), event(6, 1, "split", 4, "0"),
              layer_event(8, 2, "death"), layer_event(8, 0, "birth")]    # the split: not drawn
    (log_dir / "events.csv").write_text(csv_text(events, EVENT_COLUMNS))
    (log_dir / "config.yaml").write_text(
        "plasticity: {layers: {enabled: true, birth_zone: 1, death_zone: 1}}\n")

    assert plot_main([str(log_dir), "-o", str(tmp_path / "vitality.png")]) == 0
    assert (tmp_path / "vitality.png").read_bytes().startswith(PNG_SIGNATURE)
    grid, marks, zones = vitality_picture(saved_figures[-1])
    assert grid.tolist() == [[value[(layer, step)] for step in (2, 4, 6, 8)] for layer in range(3)]
    assert marks == {"death": [(4.0, 2.0), (8.0, 2.0)], "birth": [(4.0, 0.0), (8.0, 0.0)]}
    assert zones == [0.5, 1.5], "birth zone below layer 1, death zone above layer 2"
    assert plot_main([str(log_dir / "plasticity.csv"), "-o", str(tmp_path / "lr.png"), "--value", "lr_scale"]) == 0
    grid, _, _ = vitality_picture(saved_figures[-1])
    assert grid.tolist() == [[1 - value[(layer, step)] for step in (2, 4, 6, 8)] for layer in range(3)]


@pytest.mark.slow
def test_plot_vitality_on_a_real_run(layer_run, tmp_path, capsys, saved_figures):
    from tools.plot_vitality import main as plot_main
    out = tmp_path / "vitality.png"
    log_dir = layer_run / "logs" / "tiny"
    assert plot_main([str(log_dir), "-o", str(out)]) == 0
    grid, marks, _ = vitality_picture(saved_figures[-1])
    state = pd.read_csv(log_dir / "plasticity.csv")
    vitality = state[state["name"] == "vitality"].pivot(index="layer", columns="step", values="value")
    assert grid.tolist() == vitality.to_numpy().tolist()
    events = pd.read_csv(log_dir / "events.csv")
    for kind in ("death", "birth"):
        rows = events[(events["granularity"] == "layer") & (events["event"] == kind)]
        assert marks[kind] == sorted((float(e.step), float(e.layer)) for e in rows.itertuples())
    assert plot_main([str(log_dir), "-o", str(tmp_path / "lr.png"), "--value", "lr_scale"]) == 0
    assert plot_main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_plot_vitality_says_when_a_run_has_no_layer_rows(tmp_path, capsys):
    from tools.plot_vitality import main as plot_main
    csv = tmp_path / "plasticity.csv"
    csv.write_text("step,tokens,granularity,layer,unit,name,value\n1,64,head,0,h1,gate,1.0\n")
    assert plot_main([str(csv)]) == 2
    assert "plasticity.layers.enabled=true" in capsys.readouterr().err
