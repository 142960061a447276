"""Configs: every shipped YAML validates; bad input gets one clear message and exit 2."""

import dataclasses
import math
import subprocess
import sys
import typing

import pytest

from nemoe.config import CONFIG_DIR, Config, config_changes, config_from_dict, is_unsafe, load_config
from nemoe.config.lib import flatten
from nemoe.errors import UserError
from tests.conftest import REPO, tiny_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {"local.yaml", "t4.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem
    assert cfg.total_steps() > 0


def test_t4_is_the_seed_card():
    cfg = load_config("t4")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len) == (384, 6, 6, 64)
    assert (cfg.moe.experts_init, cfg.moe.experts_max) == (2, 4)
    assert cfg.train.batch_size * cfg.train.grad_accum == 16 and cfg.train.lr == 2e-4
    assert cfg.plasticity.experts.interval == 1000 and cfg.checkpoint.every_steps == 2000
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert weights == {"fineweb": 0.6, "alpaca": 0.2, "wikitext": 0.2}


def test_set_overrides_are_parsed_and_type_checked():
    cfg = load_config("local", ["train.lr=3e-4", "moe.top_k=2", "plasticity.experts.enabled=false"])
    assert cfg.train.lr == 3e-4 and cfg.moe.top_k == 2 and cfg.plasticity.experts.enabled is False
    with pytest.raises(UserError, match="train.batch_size: expected int"):
        load_config("local", ["train.batch_size=big"])


@pytest.mark.parametrize("sections,message", [
    ({"train": {"lrr": 1.0}}, "train.lrr: unknown key (valid keys: batch_size, grad_accum, lr"),
    ({"bogus": {}}, "bogus: unknown section"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"moe": {"experts_min": 5, "experts_max": 4, "experts_init": 4}}, "experts_min (5) must be <= moe.experts_max (4)"),
    ({"moe": {"top_k": 2, "experts_min": 1, "experts_init": 2}}, "moe.top_k (2) must be <= moe.experts_min (1)"),
    ({"model": {"seq_len": 0}}, "model.seq_len must be > 0"),
    ({"model": {"n_heads": 5}}, "model.n_heads (5) must divide model.d_model (32)"),
    ({"data": {"sources": [{"name": "a", "kind": "builtin", "path": "prose", "weight": 0}]}}, "weight"),
])
def test_bad_values_are_reported(sections, message):
    with pytest.raises(UserError) as err:
        tiny_config(**sections)
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as err:
        tiny_config(model={"seq_len": 0, "d_model": -1})
    assert "seq_len" in str(err.value) and "d_model" in str(err.value)


@pytest.mark.parametrize("args,message", [
    (["--config", "nope.yaml"], "config 'nope.yaml' not found"),
    (["--config", "local", "--set", "train.lrr=1"], "unknown key"),
    (["--config", "local", "--set", "moe.experts_min=7"], "experts_min (7) must be <= moe.experts_max"),
    (["--config", "local", "--set", "moe.top_k=3"], "moe.top_k must be 1 or 2"),
    (["--config", "local", "--set", "model.seq_len=-4"], "model.seq_len must be > 0"),
    (["--config", "local", "--set", "data.sources=[]"], "data"),
])
def test_cli_bad_config_exits_2_without_traceback(tmp_path, monkeypatch, capsys, args, message):
    """train_nemoe.main in this process (an exception escaping it fails the test), where a
    subprocess per case cost ~5 s of CPU; the test below runs the script as a process."""
    from train_nemoe import main
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert list(tmp_path.iterdir()) == [], "a refused config must not create files"


def test_yaml_syntax_error_is_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 12\n")
    proc = subprocess.run([sys.executable, str(REPO / "train_nemoe.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- #
# Field rules: choices (Literal), bounds and resume safety are declared on the fields
# --------------------------------------------------------------------------- #

def bounded_fields(cls=Config, prefix=""):
    """(key, field) for every field of the section tree that declares a bound."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from bounded_fields(hints[f.name], f"{prefix}{f.name}.")
        elif set(f.metadata) & {"ge", "gt", "le", "lt"}:
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("key,field", list(bounded_fields()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_bound_generates_its_check(key, field):
    """Step past each declared bound: the one message names the key, the bound and the value."""
    bound_name = next(b for b in ("ge", "gt", "le", "lt") if b in field.metadata)
    bound = field.metadata[bound_name]
    value = bound - 1 if bound_name in ("ge", "gt") else bound + 1
    section, name = key.rsplit(".", 1)
    raw = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    assert f"{key} must be " in str(err.value) and f"got {value}" in str(err.value)


def test_bound_messages_and_a_cross_field_check():
    with pytest.raises(UserError) as err:
        tiny_config(train={"lr": -1}, model={"dropout": 1.5}, plasticity={"experts": {"crossover_prob": 2}})
    problems = str(err.value).split("\n  - ")[1:]
    assert "train.lr must be > 0, got -1.0" in problems
    assert "model.dropout must be in [0, 1), got 1.5" in problems
    assert "plasticity.experts.crossover_prob must be in [0, 1], got 2.0" in problems
    assert "train.min_lr (2e-05) must be <= train.lr (-1.0)" in problems   # TrainConfig.check
    assert "plasticity.layers.max_dropout (0.1) must be >= model.dropout (1.5)" in problems


@pytest.mark.parametrize("section,key,value,message", [
    ("moe", "top_k", 3, "moe.top_k must be 1 or 2, got 3"),
    ("moe", "top_k", True, "moe.top_k: expected int, got True (bool)"),   # a bool is not 1
    ("train", "precision", "fp8", "train.precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
    ("log", "console", "fancy", "log.console must be one of auto, rich, plain, got 'fancy'"),
    ("data", "on_exhausted", "wait", "data.on_exhausted must be cycle or stop, got 'wait'"),
])
def test_choices_are_checked_against_their_literal(section, key, value, message):
    with pytest.raises(UserError) as err:
        tiny_config(**{section: {key: value}})
    assert message in str(err.value)


def test_choices_accept_yaml_spellings_of_the_same_value():
    assert tiny_config(moe={"top_k": 2.0, "experts_min": 2}).moe.top_k == 2
    heads = tiny_config(plasticity={"heads": {"prune": "random", "mode": "cycle"}}).plasticity.heads
    assert (heads.prune, heads.mode) == ("random", "cycle")


def test_unsafe_keys_are_declared_on_their_fields():
    unsafe = {"model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.seq_len",
              "model.d_expert", "model.activation", "moe.experts_max", "moe.top_k", "moe.balance",
              "plasticity.layers.enabled",
              "data.sources", "data.seed", "data.heldout_fraction", "data.tokenizer", "data.shuffle",
              "data.heldout_doc_tokens", "data.max_doc_chars", "data.mix_blocks"}
    every_key = set(flatten(Config().to_dict()))
    assert {key for key in every_key if is_unsafe(key)} == unsafe
    assert not is_unsafe("world_size") and not is_unsafe("no.such.key")


def test_world_size_is_not_a_setting():
    cfg = tiny_config(train={"batch_size": 4, "grad_accum": 2, "total_tokens": 1000})
    assert "world_size" not in cfg.to_dict()
    assert cfg.tokens_per_step() == 4 * 2 * 16 and cfg.tokens_per_step(3) == 3 * cfg.tokens_per_step()
    assert (cfg.total_steps(), cfg.total_steps(3)) == (math.ceil(1000 / 128), math.ceil(1000 / 384))
    # A config saved before world_size left (config.yaml, checkpoints) still loads, and the key
    # is not reported as a change on resume.
    old = cfg.to_dict() | {"world_size": 2}
    assert config_from_dict(old).to_dict() == cfg.to_dict()
    assert config_changes(old, cfg.to_dict()) == []
    changed = dataclasses.replace(cfg.train, lr=1e-3)
    assert config_changes(old, dataclasses.replace(cfg, train=changed).to_dict()) == [("train.lr", 2e-4, 1e-3)]


def test_a_setting_added_later_counts_at_its_default_on_resume():
    """A run saved before moe.balance existed trained with aux_loss: resuming it is no change, and
    it is refused (unsafe) only when the new run asks for another balance."""
    cfg = tiny_config()
    old = cfg.to_dict()
    del old["moe"]["balance"], old["moe"]["bias_rate"]
    assert config_changes(old, cfg.to_dict()) == []
    biased = tiny_config(moe={"balance": "bias"}).to_dict()
    assert config_changes(old, biased) == [("moe.balance", "aux_loss", "bias")]
