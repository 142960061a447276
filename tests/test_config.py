"""Configs: every shipped YAML validates; bad input gets one clear message and exit 2."""

import subprocess
import sys

import pytest

from nemoe.config import CONFIG_DIR, load_config
from nemoe.errors import UserError
from tests.conftest import REPO, tiny_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {"local.yaml", "t4.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem
    assert cfg.total_steps > 0


def test_t4_is_the_seed_card():
    cfg = load_config("t4")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len) == (384, 6, 6, 64)
    assert (cfg.moe.experts_init, cfg.moe.experts_max) == (2, 4)
    assert cfg.train.batch_size * cfg.train.grad_accum == 16 and cfg.train.lr == 2e-4
    assert cfg.morph.interval == 1000 and cfg.checkpoint.every_steps == 2000
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert weights == {"fineweb": 0.6, "alpaca": 0.2, "wikitext": 0.2}


def test_set_overrides_are_parsed_and_type_checked():
    cfg = load_config("local", ["train.lr=3e-4", "moe.top_k=2", "morph.enabled=false"])
    assert cfg.train.lr == 3e-4 and cfg.moe.top_k == 2 and cfg.morph.enabled is False
    with pytest.raises(UserError, match="train.batch_size: expected int"):
        load_config("local", ["train.batch_size=big"])


@pytest.mark.parametrize("sections,message", [
    ({"train": {"lrr": 1.0}}, "train.lrr: unknown key (valid keys: batch_size, grad_accum, lr"),
    ({"bogus": {}}, "bogus: unknown section"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"moe": {"experts_min": 5, "experts_max": 4, "experts_init": 4}}, "experts_min (5) must be <= moe.experts_max (4)"),
    ({"moe": {"top_k": 2, "experts_min": 1, "experts_init": 2}}, "moe.top_k (2) must be <= moe.experts_min (1)"),
    ({"model": {"seq_len": 0}}, "model.seq_len must be > 0"),
    ({"model": {"n_heads": 5}}, "must be > 0 and divide model.d_model"),
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
    (["--config", "local", "--set", "moe.experts_min=5"], "experts_min (5) must be <= moe.experts_max"),
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
