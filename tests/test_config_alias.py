"""The old spelling `morph:` of the plasticity.experts section: read as the section wherever a config
enters (YAML, --set, a checkpoint's or a committed run's config), never both spellings at once."""

import pytest
import torch
import yaml

from nemoe import checkpoint as ckpt
from nemoe.config import (ALIASES, Config, apply_overrides, config_changes, config_from_dict, find_config, load_config,
                          normalise)
from nemoe.errors import UserError
from tests.conftest import tiny_config


def old_spelling(cfg_dict: dict) -> dict:
    """A config dict as files written before the move held it: experts as the top-level `morph`."""
    old = {k: (dict(v) if k == "plasticity" else v) for k, v in cfg_dict.items()}
    old["morph"] = old["plasticity"].pop("experts")
    return old


def test_the_alias_table_names_the_section():
    assert ALIASES == {"morph": "plasticity.experts"}
    assert normalise({"morph": {"interval": 3}, "train": {}}) == {"plasticity": {"experts": {"interval": 3}},
                                                                  "train": {}}


def test_yaml_with_morph_loads_equal_to_plasticity_experts(tmp_path):
    new = yaml.safe_load(find_config("local.yaml").read_text())
    assert "morph" not in new and "interval" in new["plasticity"]["experts"]
    old = {**new, "plasticity": {k: v for k, v in new["plasticity"].items() if k != "experts"},
           "morph": new["plasticity"]["experts"]}
    for name, raw in (("new", new), ("old", old)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "name": "same"}))
    a, b = load_config(str(tmp_path / "new.yaml")), load_config(str(tmp_path / "old.yaml"))
    assert a.to_dict() == b.to_dict() and b.plasticity.experts.interval == 100
    # --set on either spelling reaches the section, whichever spelling the file used
    mixed = load_config(str(tmp_path / "old.yaml"), ["plasticity.experts.interval=9", "morph.split_usage=0.5"])
    assert (mixed.plasticity.experts.interval, mixed.plasticity.experts.split_usage) == (9, 0.5)


def test_set_morph_equals_set_plasticity_experts():
    a = load_config("local", ["morph.interval=7"])
    b = load_config("local", ["plasticity.experts.interval=7"])
    assert a.to_dict() == b.to_dict() and a.plasticity.experts.interval == 7
    assert apply_overrides({}, ["morph.seed=3"]) == {"plasticity": {"experts": {"seed": 3}}}
    assert load_config("local", ["morph.enabled=false"]).plasticity.experts.enabled is False


def test_old_spelling_validates_under_the_new_name():
    with pytest.raises(UserError) as err:
        config_from_dict({"morph": {"crossover_prob": 2}})
    assert "plasticity.experts.crossover_prob must be in [0, 1], got 2" in str(err.value)


@pytest.mark.parametrize("raw", [
    {"morph": {"interval": 5}, "plasticity": {"experts": {"interval": 5}}},
    {"morph": {}, "plasticity": {"experts": None, "neuron": {}}},
])
def test_both_spellings_at_once_is_one_error_naming_both(raw):
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "morph" in message and "plasticity.experts" in message and "both" in message
    with pytest.raises(UserError, match="both morph"):
        apply_overrides(raw, [])


def test_cli_refuses_both_spellings_with_one_message(tmp_path, monkeypatch, capsys):
    from train_nemoe import main
    path = tmp_path / "both.yaml"
    path.write_text("morph: {interval: 5}\nplasticity:\n  experts: {interval: 6}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "both morph" in err and "plasticity.experts" in err
    assert not (tmp_path / "run").exists()


def test_config_changes_compares_the_spellings_as_one_section():
    now = tiny_config().to_dict()
    old = old_spelling(now)
    assert "morph" in old and "experts" not in old["plasticity"]
    assert config_changes(old, now) == [] and config_changes(now, old) == []
    assert config_from_dict(old).to_dict() == tiny_config().to_dict()
    changed = tiny_config(plasticity={"experts": {"interval": 7}}).to_dict()
    assert config_changes(old, changed) == [("plasticity.experts.interval", 1000, 7)]
    assert old["morph"]["interval"] == 1000, "config_changes leaves its inputs alone"


def test_seed_is_unchanged_by_the_move():
    default = Config()
    assert default.plasticity.experts.seed == config_from_dict(old_spelling(default.to_dict())).plasticity.experts.seed


@pytest.mark.slow
def test_resume_from_a_checkpoint_written_with_morph(tmp_path, capsys):
    """A checkpoint whose stored config says `morph:` (as every checkpoint before the move)
    resumes with no config change reported."""
    from tests.test_trainer import logs, run
    assert run(tmp_path, "--max-steps", "5") == 0
    path = tmp_path / "checkpoints" / "tiny" / "nemo_ckpt_step5.pt"
    state = torch.load(path, weights_only=True)
    state["config"] = old_spelling(state["config"])
    torch.save(state, path)
    assert "morph" in ckpt.load_checkpoint(path)["config"]
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--max-steps", "7") == 0
    out = capsys.readouterr().out
    assert "resumed from nemo_ckpt_step5.pt at step 5" in out and "config change" not in out
    assert list(logs(tmp_path)[0]["step"]) == [1, 2, 3, 4, 5, 6, 7]
