"""One run seed: train.seed; every other section's seed derives from it unless set explicitly."""

from __future__ import annotations

import torch
import yaml

from nemoe.config import config_from_dict, dump_config, load_config
from nemoe.config.lib import derive_seed, flatten
from nemoe.model import NemoeLM
from nemoe.plasticity.heads import HeadPlasticity
from nemoe.plasticity.layers import LayerSenescence
from tests.conftest import act, tiny_config
from tests.test_plasticity_neuron import setup as neuron_setup
from tests.test_plasticity_neuron import probe as neuron_probe
from tests.test_plasticity_neuron import train as neuron_train
from tools.comparison import plan as cmp

DERIVED = ("plasticity.experts.seed", "data.seed", "plasticity.neuron.seed", "plasticity.heads.seed",
           "plasticity.layers.seed")


def seeds(cfg) -> dict[str, int]:
    flat = flatten(cfg.to_dict())
    return {key: flat[key] for key in DERIVED}


def test_derived_seeds_differ_per_run_seed_and_are_stable():
    a, b = seeds(tiny_config(train={"seed": 0})), seeds(tiny_config(train={"seed": 1}))
    assert all(a[key] != b[key] for key in DERIVED), (a, b)
    assert a == seeds(tiny_config(train={"seed": 0})), "same run seed, same derived seeds"
    assert len(set(a.values())) == len(DERIVED), "each section draws from its own stream"
    assert all(isinstance(v, int) and 0 <= v < 2**31 for v in a.values())
    assert a["plasticity.heads.seed"] == derive_seed(0, "plasticity.heads")
    # The rule is part of what a config means: pinned, so a change to it cannot go unnoticed.
    assert derive_seed(1337, "data") == 1680710313 and derive_seed(0, "morph") == derive_seed(0, "morph")


def test_the_experts_seed_keeps_the_label_of_its_old_path():
    """plasticity.experts was the top-level `morph` section: its seed still derives from "morph", so
    every run made before the move reproduces bit-identically (PlasticityConfig's seed_label)."""
    cfg = tiny_config(train={"seed": 1337})
    assert cfg.plasticity.experts.seed == derive_seed(1337, "morph") == 1134203188
    assert cfg.plasticity.experts.seed != derive_seed(1337, "plasticity.experts")
    assert load_config("local").plasticity.experts.seed == derive_seed(1337, "morph")


def test_explicit_seeds_win_and_saved_configs_reload_to_the_same_values():
    cfg = tiny_config(train={"seed": 0}, data={"seed": 0},
                      plasticity={"experts": {"seed": 5}, "heads": {"seed": 7}, "layers": {"seed": None}})
    assert (cfg.plasticity.experts.seed, cfg.data.seed, cfg.plasticity.heads.seed) == (5, 0, 7)
    assert cfg.plasticity.neuron.seed == derive_seed(0, "plasticity.neuron")
    assert cfg.plasticity.layers.seed == derive_seed(0, "plasticity.layers"), "null means derived"
    saved = yaml.safe_load(dump_config(cfg))
    assert all(isinstance(flatten(saved)[key], int) for key in DERIVED), "config.yaml holds concrete seeds"
    assert config_from_dict(saved).to_dict() == cfg.to_dict()
    saved["train"]["seed"] = 99   # a saved (concrete) seed is explicit from then on
    assert seeds(config_from_dict(saved)) == seeds(cfg)


def test_two_run_seeds_give_different_head_draws():
    probe = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))

    def random_prune_scores(run_seed: int) -> torch.Tensor:
        cfg = tiny_config(train={"seed": run_seed}, plasticity={"heads": {"enabled": True, "prune": "random"}})
        torch.manual_seed(0)   # the same model whatever the run seed: only the mechanism's draws differ
        scores, _, _ = HeadPlasticity(cfg, NemoeLM(cfg), probe).prune_scores()
        return scores

    assert torch.equal(random_prune_scores(0), random_prune_scores(0))
    assert not torch.equal(random_prune_scores(0), random_prune_scores(1))


def test_two_run_seeds_give_different_neuron_draws():
    def after_turnover(run_seed: int) -> dict[str, torch.Tensor]:
        model, mech, optimizer = neuron_setup(seed=0, train={"seed": run_seed}, regrowth="random")
        neuron_train(model, mech, optimizer, 2)
        events = act(mech, optimizer, 2, 0, neuron_probe(model))
        assert events, "a turnover happened"
        return model.state_dict()

    first, again, other = after_turnover(0), after_turnover(0), after_turnover(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first), "random newborns differ by run seed"


def test_layer_senescence_uses_its_own_section_seed():
    def generator_seed(**train) -> int:
        cfg = tiny_config(model={"n_layers": 4}, train=train, plasticity={"layers": {"enabled": True}})
        mech = LayerSenescence(cfg, NemoeLM(cfg), torch.zeros(2, 17, dtype=torch.int64))
        assert mech.generator.initial_seed() == cfg.plasticity.layers.seed
        return cfg.plasticity.layers.seed

    assert generator_seed(seed=0) != generator_seed(seed=1)


def test_compare_seeds_vary_every_mechanism():
    """tools/compare.py sets only train.seed; neuron and heads strategies then differ by seed too."""
    assert cmp.seed_overrides(3) == ["train.seed=3"]
    a, b = (load_config("local", cmp.seed_overrides(s)) for s in (0, 1))
    assert all(seeds(a)[key] != seeds(b)[key] for key in DERIVED)
