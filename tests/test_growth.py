"""The growth schedule (morph.grow_until, morph.split_by) and what growth costs (the run's
expert_param_steps and optim_state_bytes columns, the comparison's cost table)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from nemoe import checkpoint_layout as layout

from nemoe.config import load_config
from nemoe.errors import UserError
from nemoe.plasticity.growth import params_per_expert
from nemoe.slot_optim import state_bytes
from nemoe.model import NemoeLM, split_block
from nemoe.plasticity.experts import ExpertMorphogenesis, ExpertRecord, plan_layer
from nemoe.plasticity.growth import Growth, growth_target, slot_grad_sq
from tests.conftest import act, tiny_config

GROW = {"grow_until": 0.5, "interval": 4, "probation_steps": 4, "prune_usage": 0.0,
        "probation_min_usage": 0.0}


def grow_config(split_by="usage", **moe):
    # 40 steps (total_tokens = 40 x 4 x 16); experts 1 -> 4 by step 20: five decisions.
    return tiny_config(moe={"experts_init": 1, "experts_min": 1, **moe},
                       plasticity={"experts": {**GROW, "split_by": split_by}},
                       train={"device": "cpu", "seed": 0, "batch_size": 4, "total_tokens": 2560})


def test_schedule_rises_linearly_to_the_max_by_grow_until():
    cfg = grow_config()
    assert cfg.total_steps() == 40
    targets = [growth_target(s, cfg.plasticity.experts, 1, 4, 40) for s in range(4, 41, 4)]
    # Decision k of 5: 1 + ceil(3 k / 5); experts_max at step 20 and after.
    assert targets == [2, 3, 3, 4, 4, 4, 4, 4, 4, 4]
    assert growth_target(20, tiny_config().plasticity.experts, 2, 4, 40) is None, "no schedule: None"


def test_config_refuses_a_schedule_that_cannot_work():
    def problems(*sets):
        with pytest.raises(UserError) as err:
            load_config("local.yaml", list(sets))
        return str(err.value)
    assert "needs plasticity.experts.enabled: true" in problems("plasticity.experts.grow_until=0.5",
                                                               "plasticity.experts.enabled=false")
    assert "must be > moe.experts_init (6)" in problems("plasticity.experts.grow_until=0.5", "moe.experts_init=6")
    assert "plasticity.experts.grow_until must be in (0, 1], got 1.5" in problems("plasticity.experts.grow_until=1.5")
    assert "plasticity.experts.grow_until must be in (0, 1], got 0" in problems("plasticity.experts.grow_until=0")
    assert "leaves no morph decision" in problems("plasticity.experts.grow_until=0.05")
    assert "set plasticity.experts.grow_until too" in problems("plasticity.experts.split_by=gradient")
    assert "plasticity.experts.split_by must be usage or gradient" in problems("plasticity.experts.grow_until=0.5",
                                                                               "plasticity.experts.split_by=size")
    cfg = load_config("local.yaml", ["plasticity.experts.grow_until=0.5", "plasticity.experts.split_by=gradient"])
    assert cfg.plasticity.experts.grow_until == 0.5 and cfg.plasticity.experts.split_by == "gradient"


def _records(n_live, slots=6):
    return [ExpertRecord(id=i) if i < n_live else None for i in range(slots)]


def test_plan_births_follow_the_target_ranked_by_the_criterion():
    morph = grow_config().plasticity.experts
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    records = _records(3)
    records[2].probation_until = 99     # a newborn: not a parent, but it counts as live
    scores = [0.2, 0.7, 0.9, 0, 0, 0]
    growth = Growth(target=6, experts_max=6, until_step=50, criterion="gradient", scores=scores)
    actions = plan_layer(records, [0.5, 0.5, 0, 0, 0, 0], morph, 1, 1, 20, gen, growth)
    # Three births into the free slots; graduated parents best first, round-robin: 1, 0, 1.
    assert [(a.kind, a.slot, a.parents) for a in actions] == [("split", 3, (1,)), ("split", 4, (0,)),
                                                              ("split", 5, (1,))]
    assert all(a.cause.startswith("scheduled growth: 3 -> 6 of 6 experts") and "gradient utility" in a.cause
               for a in actions)
    assert torch.equal(gen.get_state(), state), "no crossover draw under a schedule"
    # At the target: no birth, even with a usage far above split_usage and a free slot.
    at_target = Growth(target=3, experts_max=6, until_step=50, criterion="usage", scores=[0.9, 0.1, 0, 0, 0, 0])
    assert plan_layer(_records(3), [0.9, 0.1, 0, 0, 0, 0], morph, 1, 1, 20, gen, at_target) == []


def tiny_step(model, gen):
    block = torch.randint(0, 32, (4, 17), generator=gen)
    model(*split_block(block)).loss_ce.backward()


def test_gradient_utility_is_the_summed_squared_expert_gradient_norm_and_is_checkpointed():
    cfg = grow_config("gradient", experts_init=2, experts_min=2)
    model = NemoeLM(cfg)
    controller = ExpertMorphogenesis(cfg, model)
    gen = torch.Generator().manual_seed(1)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for step in range(3):
        tiny_step(model, gen)
        for li, layer in enumerate(model.moe_layers):
            e = layer.experts
            for slot in range(4):
                expected[li, slot] += sum(float(p.grad[slot].double().pow(2).sum())
                                          for p in (e.w_in, e.b_in, e.w_out, e.b_out))
        controller.observe(step)
        controller.after_step(step)
        model.zero_grad(set_to_none=True)
    assert torch.allclose(controller.grad_utility, expected, rtol=1e-12)
    assert (expected[:, :2] > 0).all() and (expected[:, 2:] == 0).all(), "free slots get no gradient"
    resumed = ExpertMorphogenesis(cfg, NemoeLM(cfg))
    resumed.load_state_dict(controller.state_dict())
    assert torch.equal(resumed.grad_utility, controller.grad_utility)
    # Without split_by: gradient nothing is measured or saved (today's checkpoints and speed).
    plain = ExpertMorphogenesis(grow_config("usage"), NemoeLM(grow_config("usage")))
    assert plain.grad_utility is None and "grad_utility" not in plain.state_dict()
    assert slot_grad_sq(NemoeLM(cfg).moe_layers[0]).tolist() == [0.0] * 4, "no gradient yet: zeros"


def test_scheduled_births_grow_every_layer_and_keep_the_function():
    cfg = grow_config("gradient")
    model = NemoeLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = ExpertMorphogenesis(cfg, model)
    gen = torch.Generator().manual_seed(2)
    probe = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(3))
    counts = []
    for step in range(1, 25):
        model.train()
        tiny_step(model, gen)
        controller.observe(step - 1)
        opt.step()
        controller.after_step(step - 1)
        opt.zero_grad()
        if step % 4:
            continue
        model.eval()
        with torch.no_grad():
            before = model(probe).logits
        events = act(controller, opt, step)
        with torch.no_grad():
            assert torch.allclose(before, model(probe).logits, atol=1e-6), "births leave the output unchanged"
        counts.append(controller.expert_counts())
        assert all(e.event in ("split", "graduate") for e in events)
        assert all(e.cause.startswith("scheduled growth") for e in events if e.event == "split")
    assert counts == [[2, 2], [3, 3], [3, 3], [4, 4], [4, 4], [4, 4]]


def test_cost_measures():
    cfg = tiny_config()
    model = NemoeLM(cfg)
    d, h = cfg.model.d_model, cfg.d_expert
    assert params_per_expert(model) == d * h + h + h * d + d
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert state_bytes(opt) == 0, "AdamW makes its state at the first step"
    tiny_step(model, torch.Generator().manual_seed(0))
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    steps = sum(1 for s in opt.state.values() if "step" in s)
    assert state_bytes(opt) == 2 * 4 * n + 4 * steps   # two fp32 moments, one fp32 step each


# --------------------------------------------------------------------------- #
# The comparison's cost columns
# --------------------------------------------------------------------------- #

def test_what_a_run_had_spent_at_each_evaluation_from_its_log_rows():
    from tools.comparison.results import cost_log, spent_at
    cfg = load_config("study_bytes.yaml")
    per_expert = params_per_expert(NemoeLM(tiny_config(model={"d_model": 128, "d_expert": 512, "n_layers": 4,
                                                             "n_heads": 4, "vocab_size": 320, "seq_len": 16})))
    log = pd.DataFrame({"step": [20, 40, 60], "elapsed_s": [10.0, 20.0, 32.0], "experts_L0": [8, 8, 8],
                        "experts_L1": [8, 8, 8], "experts_L2": [8, 8, 8], "experts_L3": [8, 8, 8]})
    # a log from before the expert_param_steps column: counted from its experts per layer (a static pool: exact)
    costs = cost_log(cfg, log)
    assert costs["expert_param_steps"].tolist() == [20 * 32 * per_expert, 40 * 32 * per_expert, 60 * 32 * per_expert]
    counted = cost_log(cfg, log.assign(expert_param_steps=[1.0, 5.0, 9.0]))
    assert counted["expert_param_steps"].tolist() == [1.0, 5.0, 9.0], "the run's own count wins"
    spent = spent_at(pd.Series([0, 10, 30, 60]), counted)
    assert spent["wall_s"] == [0.0, 5.0, 15.0, 32.0] and spent["expert_param_steps"] == [0.0, 0.5, 3.0, 9.0]
    assert all(math.isnan(x) for x in spent_at(pd.Series([10]), None)["wall_s"])


def test_a_committed_run_from_before_the_count_takes_it_from_its_costs(tmp_path):
    import json
    import types
    from tools.comparison.committed import COSTS_CSV, read_rows
    run = types.SimpleNamespace(name="static_max-s0")
    folder = tmp_path / "runs" / run.name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"format": 1, "protocol": "grid",
                                                     "rows": [{"strategy": "static_max"}]}))
    assert "expert_param_steps" not in read_rows(tmp_path, run)[0], "no costs.csv: nothing to count from"
    pd.DataFrame({"step": [20], "elapsed_s": [1.0], "expert_param_steps": [64.0]}).to_csv(folder / COSTS_CSV,
                                                                                          index=False)
    assert read_rows(tmp_path, run)[0]["expert_param_steps"] == 64.0


def test_size_costs_and_tokens_to_target_from_the_runs_files():
    from tools.comparison.results import add_tokens_to_target, size_costs
    log = pd.DataFrame({"step": [1, 2], "tokens": [64, 128], "rss_mb": [500.0, 480.0],
                        "expert_param_steps": [100.0, 300.0], "optim_state_bytes": [10.0, 20.0]})
    assert size_costs(log) == {"expert_param_steps": 300.0, "optim_state_peak_bytes": 20.0, "rss_peak_mb": 500.0}
    old = size_costs(log.drop(columns=["expert_param_steps", "optim_state_bytes"]))
    assert math.isnan(old["expert_param_steps"]) and math.isnan(old["optim_state_peak_bytes"])
    results = pd.DataFrame({"strategy": ["static_max", "static_max", "grow"], "seed": [0, 1, 0],
                            "loss_all": [2.0, 2.2, 2.3]})
    curves = pd.DataFrame({"strategy": ["grow"] * 3 + ["static_max"] * 4, "seed": [0] * 3 + [0, 0, 1, 1],
                           "step": [1, 2, 3, 1, 2, 1, 2], "tokens": [10, 20, 30, 10, 20, 10, 20],
                           "source": ["all"] * 7, "loss": [2.5, 2.09, 2.0, 2.3, 2.0, 2.4, 2.2]})
    out = add_tokens_to_target(results, curves, "static_max")
    assert out["target_loss"].tolist() == pytest.approx([2.1] * 3)
    assert out["tokens_to_target"].tolist()[0] == 20 and out["tokens_to_target"].tolist()[2] == 20
    assert math.isnan(out["tokens_to_target"].tolist()[1]), "seed 1 never got to 2.1"
    assert "tokens_to_target" not in add_tokens_to_target(results, curves, None)


def test_growth_strategies_set_what_they_say():
    from tools.comparison.plan import STRATEGIES, target_baseline
    base = load_config("study_bytes.yaml")
    for name, split_by in (("grow", "usage"), ("grow_grad", "gradient")):
        cfg = load_config("study_bytes.yaml", STRATEGIES[name].overrides(base))
        experts = cfg.plasticity.experts
        assert (experts.enabled, experts.grow_until, experts.split_by) == (True, 0.5, split_by)
        assert (cfg.moe.experts_init, cfg.moe.experts_max) == (2, 8)
        assert experts.prune_usage == 0 and experts.probation_min_usage == 0
        assert "by 0.5 of the run" in STRATEGIES[name].about
    assert target_baseline(None, ["dense", "static_max", "grow"]) == "static_max"
    assert target_baseline(None, ["dense", "grow"]) is None
    with pytest.raises(UserError, match="--target-baseline dense: not among"):
        target_baseline("dense", ["static_max", "grow"])


# --------------------------------------------------------------------------- #
# End to end: a growing run, its logs and its exact resume
# --------------------------------------------------------------------------- #

def grow_run(run_dir, *extra):
    from tests.test_trainer import TINY
    from train_nemoe import main
    args = ["--config", "local", "--run-dir", str(run_dir), "--run-name", "g"]
    # 30 steps: experts 2 -> 4 by step 15 (decisions at 4, 8, 12: targets 3, 4, 4); no deaths.
    for item in TINY + ["plasticity.experts.grow_until=0.5", "plasticity.experts.split_by=gradient",
                        "plasticity.experts.prune_usage=0", "plasticity.experts.probation_min_usage=0",
                        "eval.every_steps=4"]:
        args += ["--set", item]
    assert main(args + list(extra)) == 0
    d = run_dir / "logs" / "g"
    return [pd.read_csv(d / name) for name in ("training_log.csv", "events.csv", "eval.csv")]


HOST = ["tokens_per_s", "elapsed_s", "rss_mb"]   # wall clock and host memory


@pytest.mark.slow
def test_a_growing_run_logs_its_cost_and_resumes_exactly_across_scheduled_births(tmp_path):
    train, events, evals = grow_run(tmp_path / "straight", "--max-steps", "12")
    births = events[events["event"] == "split"]
    assert sorted(set(births["step"])) == [4, 8] and len(births) == 4, "2 -> 3 -> 4 in each layer"
    assert births["cause"].str.startswith("scheduled growth").all()
    assert (births["probe_loss_after"] == births["probe_loss_before"]).all(), "function-preserving births"
    assert train[["experts_L0", "experts_L1"]].iloc[-1].tolist() == [4, 4]
    # Each step adds the parameters of the experts it trained (the previous row's counts).
    from tests.test_trainer import TINY
    cfg = load_config("local", TINY)
    per_expert = params_per_expert(NemoeLM(cfg))
    live = [4] + (train["experts_L0"] + train["experts_L1"]).tolist()[:-1]
    assert train["expert_param_steps"].diff().fillna(train["expert_param_steps"]).tolist() == \
        [per_expert * n for n in live]
    # Optimizer state: two fp32 moments for the shared weights and for each live expert (its MLP
    # and its router row), none for free slots, plus a few bytes of step counters per live slot.
    model = NemoeLM(cfg)
    router = model.blocks[0].moe.router
    per_slot = per_expert + router.weight[0].numel() + (0 if router.bias is None else router.bias[0].numel())
    live_now = train["experts_L0"] + train["experts_L1"]
    rest = train["optim_state_bytes"] - 8 * per_slot * live_now
    assert 0 <= rest.max() - rest.min() <= 64 * (live_now.max() - live_now.min())
    assert train["optim_state_bytes"].iloc[-1] > train["optim_state_bytes"].iloc[0], "births bring state"
    slots = sum(layer.n_slots for layer in model.moe_layers)
    shared = sum(p.numel() for p in model.parameters()) - slots * per_slot
    assert 8 * shared <= rest.min() <= 8 * shared + 4096, "free slots hold no state"
    # Stop at 6 (mid-interval: gradient utility half summed), resume to 12 across the birth at 8.
    grow_run(tmp_path / "resumed", "--max-steps", "6")
    old = tmp_path / "old"   # the same checkpoint as written before expert_param_steps existed
    __import__("shutil").copytree(tmp_path / "resumed", old)
    resumed = grow_run(tmp_path / "resumed", "--resume", "--max-steps", "12")
    resumed[2] = resumed[2][resumed[2]["step"] != 6].reset_index(drop=True)   # the stop's own evaluation
    for straight, again in zip((train, events, evals), resumed):
        pd.testing.assert_frame_equal(straight.drop(columns=[c for c in HOST if c in straight]),
                                      again.drop(columns=[c for c in HOST if c in again]))
    path = old / "checkpoints" / "g" / "nemo_ckpt_step6.pt"
    state = torch.load(path, weights_only=True)
    del layout.expert_state(state)["param_steps"]
    torch.save(state, path)
    train_old, _, _ = grow_run(old, "--resume", "--max-steps", "8")
    assert "the checkpoint predates expert_param_steps" in (old / "logs" / "g" / "training_log.txt").read_text()
    # Counted at the 3 + 3 experts live at step 6 for steps 1..6, then as measured.
    assert train_old["expert_param_steps"].iloc[-1] == per_expert * (6 * 6 + 6 + 6)


@pytest.mark.slow
def test_the_comparison_reports_what_growth_cost(tmp_path):
    import yaml
    from tests.test_compare import TINY, compare
    folder = tmp_path / "corpus"   # two small local sources (as tests/test_compare.py's config)
    folder.mkdir()
    (folder / "prose.txt").write_text("".join(f"Note {i}. the river bends past an old mill number {i}.\n\n"
                                              for i in range(300)))
    (folder / "code.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"heldout_fraction": 0.2, "sources": [
        {"name": n, "kind": "files", "path": str(folder / f"{n}.txt"), "weight": 0.5} for n in ("prose", "code")]}}))
    out = tmp_path / "out"
    assert compare(str(config), out, "--strategies", "static_max,grow,grow_grad", "--seeds", "1") == 0
    results = pd.read_csv(out / "results.csv").set_index("strategy")
    # 12 steps, 2 layers: static_max trains 4 + 4 experts throughout; growth 2 + 2 until its one
    # decision (step 4, grow_until 0.5 of 12 steps), then 4 + 4.
    per_expert = params_per_expert(NemoeLM(load_config(str(config), TINY)))
    assert results.loc["static_max", "expert_param_steps"] == per_expert * 8 * 12
    for grow in ("grow", "grow_grad"):
        assert results.loc[grow, "expert_param_steps"] == per_expert * (4 * 4 + 8 * 8)
        assert results.loc[grow, "optim_state_peak_bytes"] > 0 and results.loc[grow, "rss_peak_mb"] > 0
    assert results["target_loss"].iloc[0] == results.loc["static_max", "loss_all"]
    assert results.loc["static_max", "tokens_to_target"] <= 768
    report = (out / "report.md").read_text()
    assert "## What the expert pool cost" in report
    assert "| grow | 1 | " in report and "| 0.83 |" in report   # (16 + 64) / 96 of static_max's
    summary = pd.read_csv(out / "summary.csv")
    assert {"expert_param_steps", "optim_state_peak_bytes", "rss_peak_mb"} <= set(summary["metric"])
    assert (out / "cost.png").stat().st_size > 0, "held-out loss against what each arm spent"

