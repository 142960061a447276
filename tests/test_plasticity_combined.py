"""Every mechanism at once: layer shifts carry the expert, neuron and head records with their blocks."""

import pandas as pd
import pytest
import torch

from nemoe.model import NemoeLM, split_block
from nemoe.plasticity import Plasticity
from tests.conftest import tiny_config
from tests.test_tensorboard import assert_tensorboard_matches_csv
from tests.test_trainer import logs, run, set_args

LAYERS = {"enabled": True, "interval": 4, "min_age": 4, "trigger": 100.0, "warmup_steps": 3,
          "max_dropout": 0.3, "lifespan": 50, "newborn": "copy"}


def all_mechanisms(newborn="copy"):
    cfg = tiny_config(model={"n_layers": 4, "n_heads": 4, "dropout": 0.1},
                      plasticity={"layers": {**LAYERS, "newborn": newborn},
                                  "heads": {"enabled": True, "min_heads": 1, "interval": 5},
                                  "neuron": {"enabled": True, "interval": 5, "prune_rate": 0.1}})
    model = NemoeLM(cfg)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    probe = torch.randint(0, 32, (2, 17), generator=torch.Generator().manual_seed(1))
    plasticity = Plasticity(cfg, model, probe)
    return cfg, model, optimizer, plasticity, probe


def one_step(model, optimizer, plasticity, step):
    model.train()
    block = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(step))
    model(*split_block(block)).loss_ce.backward()
    plasticity.observe(step)
    optimizer.step()
    plasticity.after_step(step)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("newborn", ["copy", "fresh"])
def test_a_layer_shift_moves_every_mechanisms_records_with_its_block(newborn):
    cfg, model, optimizer, plasticity, probe = all_mechanisms(newborn)
    experts, neuron, heads, layers = plasticity.mechanisms
    for step in range(3):
        one_step(model, optimizer, plasticity, step)
    # Distinct records per layer: head h=layer pruned, neuron death counts = layer + 1.
    for li in range(4):
        heads.prune_head(optimizer, li, li, step=2)
        neuron.deaths[li] = li + 1
    expert_ids = [[r.id if r else None for r in row] for row in experts.records]
    for r, v in zip(layers.records, [3.0, 3.0, 3.0, 0.1]):
        r.vitality = r.importance_ema = v
    layers.measure = lambda *a: None                    # keep the vitalities: position 3 must die
    events = plasticity.act(optimizer, 4, 0, lambda: 1.0)
    birth = [e for e in events if e.granularity == "layer" and e.event == "birth"][0]
    assert birth.shift.sources[1:] == [0, 1, 2] and birth.shift.newborn == 0
    # Blocks 0..2 moved to 1..3, each with its records of every kind.
    gates = [a.head_gate for a in heads.attns]
    for new, old in [(1, 0), (2, 1), (3, 2)]:
        assert heads.pruned_at[new].tolist() == [2 if h == old else -1 for h in range(4)]
        assert gates[new].tolist() == [0.0 if h == old else 1.0 for h in range(4)]
        assert neuron.deaths[new].eq(old + 1).all()
        assert [r.id if r else None for r in experts.records[new]] == expert_ids[old]
    # The newborn at position 0: neurons fresh, heads as its parent's (copy) or all open (fresh).
    assert neuron.deaths[0].eq(0).all() and neuron.birth_step[0].eq(4).all()
    for li in range(4):   # the head records describe the gates the model actually has
        assert ((heads.pruned_at[li] >= 0) == (gates[li] == 0)).all()
    if newborn == "fresh":
        assert heads.pruned_at[0].eq(-1).all() and gates[0].eq(1).all()
    assert all(r.id not in sum(expert_ids, []) for r in experts.records[0] if r is not None), "new expert ids"


# --------------------------------------------------------------------------- #
# Through the trainer: exact resume with events of every kind after the resume point
# --------------------------------------------------------------------------- #

ALL = ["model.n_layers=4", "model.n_heads=4",
       "plasticity.layers.enabled=true", "plasticity.layers.interval=5", "plasticity.layers.min_age=4",
       "plasticity.layers.trigger=100", "plasticity.layers.warmup_steps=3", "plasticity.layers.max_dropout=0.3",
       "plasticity.layers.lifespan=50",
       "plasticity.heads.enabled=true", "plasticity.heads.interval=3", "plasticity.heads.prune=importance",
       "plasticity.heads.warmup_steps=2", "plasticity.heads.prune_fraction=0.2",
       "plasticity.neuron.enabled=true", "plasticity.neuron.interval=4", "plasticity.neuron.prune_rate=0.1",
       "plasticity.neuron.record_steps=2"]


def run_all(run_dir, *extra):
    return run(run_dir, *set_args(ALL), *extra)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_exact_with_every_kind_of_event(tmp_path, precision):
    """Also the T4 path on CPU: fp16 autocast + GradScaler, its scale in the checkpoint (bf16:
    tests/test_precision.py)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mode = ("--set", f"train.precision={precision}")
    assert run_all(straight, "--max-steps", "16", *mode) == 0
    assert run_all(resumed, "--max-steps", "9", *mode) == 0
    (resumed / "checkpoints" / "tiny" / "nemo_ckpt_step9.pt").unlink()   # back to step 5
    assert run_all(resumed, "--resume", "--max-steps", "16", *mode) == 0
    a_train, a_events, a_eval = logs(straight)
    b_train, b_events, b_eval = logs(resumed)
    assert b_train["loss_ce"].tolist() == a_train["loss_ce"].tolist()   # bit for bit
    assert b_train["grad_scale"].tolist() == a_train["grad_scale"].tolist()
    pd.testing.assert_frame_equal(b_events, a_events)
    assert b_eval["loss"].tolist() == a_eval["loss"].tolist()
    after = a_events[a_events["step"] > 5]
    assert {"expert", "neuron", "head", "layer"} <= set(after["granularity"]), after["granularity"].value_counts()
    state = lambda d: pd.read_csv(d / "logs" / "tiny" / "plasticity.csv")  # noqa: E731
    pd.testing.assert_frame_equal(state(resumed), state(straight))
    assert_tensorboard_matches_csv(resumed / "logs" / "tiny")   # plasticity.csv rows too
