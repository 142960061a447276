"""The recyclers as plasticity.neuron methods (nemoe/plasticity/recyclers.py) and the dormant
neurons measured in every run (nemoe/dormancy.py).

Tiny model (tests/test_plasticity_neuron.py's setup: vocab 32, d 32, H 48, two layers, two
live experts of four slots), fixed seeds. Each method's rule is checked on hand-set
statistics: which neurons it picks, what their weights and AdamW moments become.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from nemoe.dormancy import activity_scores, dormant_fractions, probe_dormancy
from nemoe.errors import UserError
from nemoe.model import split_block
from nemoe.plasticity import recyclers
from tests.conftest import act, tiny_config
from tests.test_plasticity_neuron import H, batch, probe, setup, train


def moments(opt, p):
    state = opt.state[p]
    return state["exp_avg"], state["exp_avg_sq"]


# --------------------------------------------------------------------------- #
# Dormant neurons: the score, the fractions, the probe pass
# --------------------------------------------------------------------------- #

def test_scores_and_fractions_follow_redo_definition():
    abs_sum = torch.tensor([[0.0, 1.0, 2.0, 5.0], [4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    tokens = torch.tensor([2.0, 4.0, 0.0])
    scores = activity_scores(abs_sum, tokens)
    # expert 0: mean |h| = [0, .5, 1, 2.5], layer mean 1 -> scores = the means
    assert torch.allclose(scores[0], torch.tensor([0.0, 0.5, 1.0, 2.5], dtype=torch.float64))
    assert torch.allclose(scores[1], torch.ones(4, dtype=torch.float64))
    measured = torch.tensor([True, True, False])          # expert 2 had no tokens
    fractions = dormant_fractions(scores, measured, taus=(0.0, 0.5, 1.0))
    assert fractions == {0.0: 1 / 8, 0.5: 2 / 8, 1.0: 7 / 8}
    assert dormant_fractions(scores, torch.zeros(3, dtype=torch.bool)) == {}


def test_probe_dormancy_changes_nothing_and_matches_a_manual_count():
    model, mech, opt = setup()
    train(model, mech, opt, 2)
    state = copy.deepcopy(model.state_dict())
    captures = [layer.experts.capture for layer in model.moe_layers]
    rng = torch.get_rng_state()
    rows = probe_dormancy(model, batch(5), taus=(0.0, 0.9, 10.0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [layer.experts.capture for layer in model.moe_layers] == captures and model.training
    assert not any(capture.taylor.any() for capture in mech.captures), "the probe pass records no fitness"
    by = {(r["layer"], r["name"]): r["value"] for r in rows}
    assert set(by) == {(li, f"dormant_{t:g}") for li in (0, 1) for t in (0.0, 0.9, 10.0)}
    assert all(by[(li, "dormant_10")] == 1.0 for li in (0, 1))       # every score is below 10
    # The same count by hand: each expert's h on its tokens of the probe batch, layer 0.
    seen = {}

    def hook(slot, h):
        seen.setdefault(slot, []).append(h.abs().mean(0))
        return h
    model.eval()
    model.moe_layers[0].experts.capture = hook
    with torch.no_grad():
        model(split_block(batch(5))[0])
    model.moe_layers[0].experts.capture = captures[0]
    scores = torch.stack([torch.stack(v).mean(0) for v in seen.values()])  # one call per expert
    scores = scores / scores.mean(-1, keepdim=True)
    assert by[(0, "dormant_0.9")] == pytest.approx(float((scores <= 0.9).float().mean()))


# --------------------------------------------------------------------------- #
# Each method's rule
# --------------------------------------------------------------------------- #

def test_redo_recycles_the_dormant_and_resets_their_moments():
    model, mech, opt = setup(method="redo", redo_tau=0.2)
    train(model, mech, opt, 2)
    pool = model.moe_layers[0].experts
    mech.activity.fill_(1.0)
    mech.activity[0, 0, [5, 9]] = torch.tensor([0.1, 0.0], dtype=torch.float64)  # scores ~ 0.1, 0
    mech.activity[1] = 1.0
    before = {n: p.detach().clone() for n, p in (("w_in", pool.w_in), ("b_in", pool.b_in), ("w_out", pool.w_out))}
    events = act(mech, opt, 2, 0, probe(model))
    ((event,),) = [[e for e in events if (e.layer, e.slot) == (0, 0)]]
    assert event.unit == "n9 n5", "the dormant only, lowest score first"
    assert len(events) == 1, "no other expert has a dormant neuron"
    assert "redo" in event.cause and event.event == "turnover"
    for j in (5, 9):
        assert not torch.equal(pool.w_in[0, :, j], before["w_in"][0, :, j])
        assert pool.b_in[0, j] == 0 and pool.w_out[0, j].eq(0).all()
        for m in moments(opt, pool.w_in) + moments(opt, pool.w_out):
            assert m[0, ..., j, :].eq(0).all() if m.shape[1] == H else m[0, :, j].eq(0).all()
    others = [j for j in range(H) if j not in (5, 9)]
    assert torch.equal(pool.w_in[0][:, others], before["w_in"][0][:, others])
    assert torch.equal(pool.w_out[0][others], before["w_out"][0][others])
    assert torch.equal(pool.w_in[1], before["w_in"][1])
    assert mech.activity.eq(0).all(), "the interval's statistics restart"


def test_cbp_running_averages_and_replacement_count():
    util, mean_act = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    updates = torch.zeros(2, 3, dtype=torch.long)
    w_out = torch.tensor([[[1.0, -1.0], [0.5, 0.5], [0.0, 2.0]]] * 2)           # sum|w| = 2, 1, 2
    abs_sum = torch.tensor([[2.0, 4.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    h_sum = torch.tensor([[-2.0, 4.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    tokens = torch.tensor([2.0, 0.0], dtype=torch.float64)                         # expert 1: no tokens
    recyclers.cbp_update_(util, mean_act, updates, abs_sum, h_sum, tokens, w_out, decay=0.9)
    assert torch.allclose(util[0], 0.1 * torch.tensor([1 * 2, 2 * 1, 0.0], dtype=torch.float64))
    assert torch.allclose(mean_act[0], 0.1 * torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64))
    assert util[1].eq(0).all() and updates.tolist() == [[1, 1, 1], [0, 0, 0]]
    # bias correction: one update of decay 0.9 -> divide by 0.1; never updated -> 0
    assert torch.allclose(recyclers.corrected(util, updates, 0.9)[0], torch.tensor([2.0, 2.0, 0.0],
                                                                                  dtype=torch.float64))
    assert recyclers.corrected(util, updates, 0.9)[1].eq(0).all()
    due = recyclers.cbp_due(torch.tensor([0.5]), torch.tensor([10]), 0.07)
    assert due.tolist() == pytest.approx([1.2])


def test_cbp_replaces_the_lowest_mature_utilities_and_hands_their_mean_to_b_out():
    model, mech, opt = setup(method="cbp", cbp_replacement_rate=0.5 / H, cbp_maturity=0)
    train(model, mech, opt, 2)          # 2 steps x 0.5 neuron per step -> 1 due per live expert
    assert torch.allclose(mech.pending[:, :2], torch.ones(2, 2, dtype=torch.float64))
    assert mech.pending[:, 2:].eq(0).all(), "free slots accumulate nothing"
    pool = model.moe_layers[0].experts
    mech.util[0, 0] = 1.0
    mech.util[0, 0, 7] = 0.01
    mech.birth_step[0, 0, 3] = 2            # the lowest utility, but only 0 steps old: not mature
    mech.util[0, 0, 3] = 0.0
    mean = recyclers.corrected(mech.mean_act[0, 0, 7], mech.updates[0, 0, 7], 0.99)
    expected_b = pool.b_out[0].detach().double() + mean * pool.w_out[0, 7].detach().double()
    events = act(mech, opt, 2, 0, probe(model))
    (event,) = [e for e in events if (e.layer, e.slot) == (0, 0)]
    assert event.unit == "n7"
    assert torch.allclose(pool.b_out[0].double(), expected_b, atol=1e-6)
    assert pool.w_out[0, 7].eq(0).all() and pool.b_in[0, 7] == 0
    assert moments(opt, pool.w_out)[0][0, 7].eq(0).all() and moments(opt, pool.w_in)[1][0, :, 7].eq(0).all()
    assert mech.util[0, 0, 7] == 0 and mech.updates[0, 0, 7] == 0
    assert mech.pending[0, 0] == pytest.approx(0.0)
    assert len(events) == 4, "one replacement in each live expert of both layers"


def test_shrink_perturb_moves_every_live_expert_and_nothing_else():
    model, mech, opt = setup(method="shrink_perturb", sp_shrink=0.5, sp_perturb=0.2)
    train(model, mech, opt, 2)
    pool = model.moe_layers[1].experts
    before = [p.detach().clone() for p in (pool.w_in, pool.b_in, pool.w_out, pool.b_out)]
    kept = [m.clone() for m in moments(opt, pool.w_in)]
    expected = copy.deepcopy(mech.generator)
    events = act(mech, opt, 2, 0, probe(model))
    assert [(e.layer, e.event) for e in events] == [(0, "shrink_perturb"), (1, "shrink_perturb")]
    assert all(e.probe_loss_before == e.probe_loss_before and e.probe_loss_after for e in events)
    # layer 0 drew first: replay its draws, then layer 1's
    torch.randn(before[0][:2].shape, generator=expected)     # layer 0: w_in, then w_out (same shapes)
    torch.randn(before[2][:2].shape, generator=expected)
    noise_in = torch.randn(before[0][:2].shape, generator=expected) * 0.2 * 0.02
    noise_out = torch.randn(before[2][:2].shape, generator=expected) * 0.2 * mech.out_std
    assert torch.allclose(pool.w_in[:2], 0.5 * before[0][:2] + noise_in)
    assert torch.allclose(pool.w_out[:2], 0.5 * before[2][:2] + noise_out)
    assert torch.allclose(pool.b_in[:2], 0.5 * before[1][:2]) and torch.allclose(pool.b_out[:2], 0.5 * before[3][:2])
    assert torch.equal(pool.w_in[2:], before[0][2:]), "free slots stay"
    assert all(torch.equal(a, b) for a, b in zip(moments(opt, pool.w_in), kept)), "moments kept"


# --------------------------------------------------------------------------- #
# Exact resume across an event, config messages, strategies
# --------------------------------------------------------------------------- #

METHODS = {"functional": {}, "redo": {"redo_tau": 0.6},
           "cbp": {"cbp_replacement_rate": 0.02, "cbp_maturity": 1}, "shrink_perturb": {}}


@pytest.mark.parametrize("method", list(METHODS))
def test_state_round_trip_mid_interval_gives_the_same_event_and_future(method):
    kw = {"method": method, "interval": 4} | METHODS[method]
    straight = setup(**kw)
    train(*straight, 2)
    saved = copy.deepcopy([part.state_dict() for part in straight])
    resumed = setup(**kw)
    for part, state in zip(resumed, saved):
        part.load_state_dict(state)
    results = []
    for model, mech, opt in (straight, resumed):
        train(model, mech, opt, 2, start=2)
        events = act(mech, opt, 4, 0, probe(model))
        train(model, mech, opt, 2, start=4)
        results.append(([(e.layer, e.unit, e.probe_loss_after) for e in events],
                         [p.detach().clone() for p in model.parameters()]))
    assert results[0][0], f"{method}: an event in the resumed span"
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("neuron,words", [
    ({"method": "recycle"}, "method must be one of functional, redo, cbp, shrink_perturb"),
    ({"method": "redo", "regrowth": "clone"}, "plasticity.neuron.regrowth (clone): only method functional"),
    ({"method": "cbp", "metric": "weight", "prune_rate": 0.1}, "metric (weight), prune_rate (0.1): only"),
    ({"method": "redo", "redo_tau": -0.1}, "redo_tau must be >= 0"),
    ({"method": "cbp", "cbp_decay": 1.0}, "cbp_decay must be in [0, 1), got 1.0"),
    ({"method": "cbp", "cbp_replacement_rate": 0.0}, "cbp_replacement_rate must be in (0, 1], got 0.0"),
    ({"method": "shrink_perturb", "sp_shrink": 0.0}, "sp_shrink must be in (0, 1], got 0.0"),
    ({"method": "shrink_perturb", "sp_perturb": -1.0}, "sp_perturb must be >= 0"),
])
def test_config_errors(neuron, words):
    with pytest.raises(UserError) as err:
        tiny_config(plasticity={"neuron": {"enabled": True} | neuron})
    assert words in str(err.value)


def test_comparison_strategies_set_the_method():
    from nemoe.config import load_config
    from tools.comparison.plan import STRATEGIES
    base = load_config("local.yaml", [])
    want = {"neuron_protect": ("functional", 1), "neuron_unprotected": ("functional", 0),
            "redo": ("redo", 1), "cbp": ("cbp", 1), "shrink_perturb": ("shrink_perturb", 1)}
    for name, (method, maturity) in want.items():
        cfg = load_config("local.yaml", STRATEGIES[name].overrides(base))
        n = cfg.plasticity.neuron
        assert (n.enabled, n.method, n.maturity_intervals, cfg.plasticity.experts.enabled) == \
            (True, method, maturity, False)
    wd0 = load_config("local.yaml", STRATEGIES["static_wd0"].overrides(base))
    assert wd0.train.weight_decay == 0 and not wd0.plasticity.experts.enabled and not wd0.plasticity.neuron.enabled


# --------------------------------------------------------------------------- #
# Through the trainer: dormant rows in every run; exact resume across events (slow)
# --------------------------------------------------------------------------- #

def test_a_run_without_mechanisms_writes_dormant_fractions(tmp_path):
    from tests.test_trainer import run, set_args
    assert run(tmp_path, "--max-steps", "2", *set_args(["plasticity.experts.enabled=false"])) == 0
    state = pd.read_csv(tmp_path / "logs" / "tiny" / "plasticity.csv")
    assert set(state["granularity"]) == {"neuron", "expert"}
    dormant = state[state["granularity"] == "neuron"]
    assert set(dormant["name"]) == {"dormant_0", "dormant_0.025", "dormant_0.1"} and sorted(set(dormant["step"])) == [1, 2]
    assert len(dormant) == 2 * 2 * 3 and dormant["value"].between(0, 1).all()
    # and, as in every run, each live expert's share of its layer's routing since the last row
    usage = state[state["granularity"] == "expert"]
    assert set(usage["name"]) == {"usage"} and len(usage) == 2 * 2 * 2   # 2 rows x 2 layers x 2 experts
    assert (usage.groupby(["step", "layer"])["value"].sum() - 1).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["redo", "cbp", "shrink_perturb"])
def test_resume_is_bit_exact_across_recycler_events(tmp_path, method):
    from tests.test_trainer import logs, run, set_args
    sets = set_args(["plasticity.experts.enabled=false", "plasticity.neuron.enabled=true",
                     "plasticity.neuron.interval=3",
                     f"plasticity.neuron.method={method}", "plasticity.neuron.redo_tau=0.5",
                     "plasticity.neuron.cbp_replacement_rate=0.02", "plasticity.neuron.cbp_maturity=1"]
                    if method != "shrink_perturb" else
                    ["plasticity.experts.enabled=false", "plasticity.neuron.enabled=true",
                     "plasticity.neuron.interval=3",
                     "plasticity.neuron.method=shrink_perturb"])
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "--max-steps", "7", *sets) == 0
    assert run(b, "--max-steps", "4", *sets) == 0       # stops between the events at 3 and 6
    assert run(b, "--resume", "--max-steps", "7", *sets) == 0
    (a_train, a_events, a_eval), (b_train, b_events, b_eval) = logs(a), logs(b)
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist()
    pd.testing.assert_frame_equal(b_events, a_events)
    # b also evaluated at step 4, the first invocation's target; every other row is a's
    pd.testing.assert_frame_equal(b_eval[b_eval["step"] != 4].reset_index(drop=True), a_eval)
    assert (b_events[b_events["granularity"] == "neuron"]["step"] == 6).any(), "an event after the resume"
    state = lambda d: pd.read_csv(d / "logs" / "tiny" / "plasticity.csv")  # noqa: E731
    pd.testing.assert_frame_equal(state(b), state(a))
