"""Starting from a pretrained GPT-2 (nemoe/pretrained.py; the shape: nemoe/config/init_from.py): shape
from the source, import and upcycling with the source's function, export back to transformers, the
run's resume. Offline: every source is a tiny random GPT2LMHeadModel written by save_pretrained into
a temporary folder."""

import shutil

import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nemoe import checkpoint_layout as layout
from nemoe.config import Config, config_changes, load_config
from nemoe.config.init_from import adopt_source, import_defaults
from nemoe.errors import UserError
from nemoe.model import NemoeLM
from nemoe.pretrained import copy_gpt2_weights, import_weights, write_gpt2, write_nemoe
from train_nemoe import main

SMALL = {"vocab_size": 96, "n_positions": 24, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0,
         "eos_token_id": 0}


def make_source(folder, seed=0, **config):
    """A random GPT-2 saved by save_pretrained; every tensor perturbed (LayerNorms and biases too),
    so a parameter mapped to the wrong place cannot go unnoticed."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**SMALL, **config})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "tiny"
    return folder, make_source(folder)


def imported(folder, *overrides, seq_len=16):
    """(model with the source's weights, its Config) for the default config of an import + overrides."""
    cfg = load_config("pretrained.yaml", [f"model.init_from={folder}", f"model.seq_len={seq_len}",
                                          "model.dropout=0.0", *overrides])
    model = NemoeLM(cfg)
    notes = import_weights(model, cfg)
    return model.eval(), cfg, notes


def max_logit_diff(model, hf, vocab=96, T=16, seed=1):
    tokens = torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((model(tokens).logits - hf(tokens).logits).abs().max())


# --------------------------------------------------------------------------- #
# Import and upcycling: the source's function at step 0
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("recipe", [
    [],                                                         # the default: 2 copies, 4 slots, top-2
    ["moe.experts_init=3", "moe.experts_min=3"],               # 3 copies, top-2
    ["moe.experts_max=1"],                                      # a dense fine-tune (one slot)
    ["moe.experts_init=1", "moe.experts_min=1"],               # one live expert of 4 slots (top-1)
])
def test_imported_logits_equal_the_source(source, recipe, capsys):
    folder, hf = source
    model, cfg, notes = imported(folder, *recipe)
    assert cfg.model.activation == "gelu_tanh" and (cfg.model.d_model, cfg.model.n_layers) == (32, 2)
    diff = max_logit_diff(model, hf)
    with capsys.disabled():
        print(f"\n  import {recipe or 'default'}: top_k {cfg.moe.top_k}, max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert "computes the source's function" in notes[-1] and "NOT" not in notes[-1]


def test_exact_gelu_source(tmp_path):
    hf = make_source(tmp_path / "exact", seed=3, activation_function="gelu")
    model, cfg, _ = imported(tmp_path / "exact", "moe.experts_max=1")
    assert cfg.model.activation == "gelu"
    assert max_logit_diff(model, hf) < 1e-4


def test_top1_switch_gate_scales_the_copies_by_the_router_probability(source):
    folder, hf = source
    model, cfg, notes = imported(folder, "moe.top_k=1")
    assert cfg.moe.top_k == 1 and "NOT" in notes[-1]
    layer = model.blocks[0].moe
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        y, _ = layer(x)
        flat = x.reshape(-1, 32)
        dense = layer.experts.expert(0, flat)
        p_chosen = (flat @ layer.router.weight.t() + layer.route_offset).softmax(-1).max(-1).values
    torch.testing.assert_close(y.reshape(-1, 32), p_chosen[:, None] * dense, rtol=1e-5, atol=1e-6)
    assert float(p_chosen.max()) < 0.9, "a fresh router: about 1/2 for two copies"
    assert max_logit_diff(model, hf) > 1e-3, "so the logits are not the source's"


def test_the_import_draws_no_random_numbers_the_router_comes_from_the_seed(source):
    folder, _ = source
    torch.manual_seed(5)
    first, _, _ = imported(folder)
    after = torch.rand(3)
    torch.manual_seed(5)
    second, _, _ = imported(folder)
    assert torch.equal(after, torch.rand(3))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    router = first.blocks[0].moe.router.weight.detach()
    assert 0.01 < float(router.std()) < 0.03, "fresh N(0, 0.02) rows"


def test_every_source_tensor_is_accounted_for(source):
    folder, hf = source
    model, _, _ = imported(folder)
    tensors = dict(hf.state_dict())
    with pytest.raises(UserError, match="no place for: transformer.extra"):
        copy_gpt2_weights(model, {**tensors, "transformer.extra": torch.zeros(3)})
    untied = {**tensors, "lm_head.weight": tensors["lm_head.weight"] + 1}
    with pytest.raises(UserError, match="differs from the token embedding"):
        copy_gpt2_weights(model, untied)
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(UserError, match="no tensor transformer.h.1.mlp.c_fc.bias"):
        copy_gpt2_weights(model, missing)


# --------------------------------------------------------------------------- #
# The config: shape from the source, conflicts, defaults
# --------------------------------------------------------------------------- #

def test_shape_comes_from_the_source_and_conflicts_name_both_values(source):
    folder, _ = source
    raw = adopt_source({"model": {"init_from": str(folder), "d_model": 32, "d_expert": 0, "seq_len": 24}})
    assert raw["model"] == {"init_from": str(folder), "seq_len": 24, "vocab_size": 96, "d_model": 32, "n_layers": 2,
                            "n_heads": 4, "d_expert": 128, "activation": "gelu_tanh"}
    assert raw["moe"] == {"top_k": 2}
    with pytest.raises(UserError) as err:
        adopt_source({"model": {"init_from": str(folder), "d_model": 128, "activation": "gelu", "seq_len": 64}})
    message = str(err.value)
    assert "model.d_model: 128 in the config, but the source" in message and "has 32" in message
    assert "model.activation: 'gelu' in the config" in message and "'gelu_tanh'" in message
    assert "model.seq_len: 64 in the config" in message and "has 24 positions" in message


def test_import_defaults_dense_and_top1():
    for given, wanted in [({}, {"top_k": 2}),
                          ({"experts_max": 1}, {"experts_max": 1, "experts_init": 1, "experts_min": 1, "top_k": 1}),
                          ({"top_k": 1}, {"top_k": 1}),
                          ({"experts_init": 1, "experts_min": 1}, {"experts_init": 1, "experts_min": 1, "top_k": 1})]:
        moe = dict(given)
        import_defaults(moe)
        assert moe == wanted


def test_conflict_through_the_cli_is_one_message(source, tmp_path, capsys):
    folder, _ = source
    assert main(["--config", "local.yaml", "--init-from", str(folder), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config:") and "Traceback" not in err
    assert "model.d_model: 128 in the config, but the source" in err and "has 32" in err
    assert not (tmp_path / "logs").exists()


def test_a_hub_name_offline_is_one_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import time
    assert main(["--init-from", "nemoe-tests/no-such-model", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init_from 'nemoe-tests/no-such-model': no folder of that name")
    assert "HF_HUB_OFFLINE=1" in err and "save_pretrained" in err and "Traceback" not in err


def test_a_folder_that_is_not_a_model_is_one_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--init-from", str(tmp_path / "empty"), "--run-dir", str(tmp_path)]) == 2
    assert "not a model folder written by save_pretrained" in capsys.readouterr().err


def test_a_setting_added_later_counts_as_its_default_on_resume():
    saved = Config().to_dict()
    del saved["model"]["activation"], saved["model"]["init_from"]
    assert config_changes(saved, Config().to_dict()) == []


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #

def test_import_export_round_trip(source, tmp_path, capsys):
    folder, hf = source
    model, cfg, _ = imported(folder, "moe.experts_max=1")
    write_gpt2(model, cfg, tmp_path / "out")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert again.config.n_positions == 16 and again.config.activation_function == "gelu_new"
    diff_source, diff_nemoe = max_logit_diff(again, hf), max_logit_diff(again, model)
    with capsys.disabled():
        print(f"\n  export round trip: max |logit diff| vs source {diff_source:.2e}, vs nemoe {diff_nemoe:.2e}")
    assert diff_source < 1e-4 and diff_nemoe < 1e-4


def test_pruned_heads_influence_and_temperature_fold_into_the_export(source, tmp_path):
    folder, _ = source
    model, cfg, _ = imported(folder, "moe.experts_max=1", "plasticity.heads.enabled=true")
    with torch.no_grad():
        model.blocks[0].attn.head_gate.copy_(torch.tensor([1.0, 0.0, 0.4, 1.0]))   # h1 pruned, h2 warming up
        model.blocks[1].attn.head_gate[3] = 0.0
        model.blocks[1].influence.fill_(0.7)
        model.blocks[0].attn.temperature.fill_(1.3)
    write_gpt2(model, cfg, tmp_path / "out")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert max_logit_diff(again, model) < 1e-4
    c_attn = again.transformer.h[0].attn.c_attn.weight.detach()    # (C, 3C): head 1 is columns 8..15 of q, k and v
    assert all(float(c_attn[:, part * 32 + 8:part * 32 + 16].abs().max()) == 0 for part in range(3))
    assert float(again.transformer.h[0].attn.c_proj.weight.detach()[8:16].abs().max()) == 0


def test_a_mixture_is_refused_as_gpt2_and_exported_as_nemoe(source, tmp_path):
    from tools.checkpoints import load_model
    folder, _ = source
    model, cfg, _ = imported(folder)
    with pytest.raises(UserError, match="live experts per layer: L0: 2, L1: 2.*--format nemoe"):
        write_gpt2(model, cfg, tmp_path / "gpt2")
    state = layout.for_reading(step=7, tokens=70, config=cfg.to_dict(),
                               expert_records=[[{"id": 0, "parents": [], "origin": "init"}]])
    write_nemoe(model, state, tmp_path / "moe")
    again, cfg2, state2, _ = load_model(tmp_path / "moe", "cpu")
    assert cfg2 == cfg and layout.step(state2) == 7 and layout.expert_records(state2)[0][0]["id"] == 0
    assert max_logit_diff(again, model) == 0
    assert b"pickle" not in (tmp_path / "moe" / "model.safetensors").read_bytes()[:200]


# --------------------------------------------------------------------------- #
# Through the trainer: head cycles on an imported model, resume without the source
# --------------------------------------------------------------------------- #

TINY = ["model.seq_len=16", "train.batch_size=4", "train.total_tokens=896", "train.warmup_steps=2",
        "train.lr=1e-3", "train.device=cpu", "train.precision=fp32",
        "plasticity.experts.interval=6", "plasticity.experts.probation_steps=4",
        "plasticity.experts.probation_min_usage=0.0",
        "plasticity.heads.interval=3", "plasticity.heads.recover_steps=2",
        "log.every_steps=1", "log.sample_every_steps=0", "log.console=plain",
        "eval.every_steps=0", "eval.batches=1", "eval.batch_size=2",
        "checkpoint.every_steps=7", "checkpoint.every_minutes=0"]


def train(run_dir, source_dir, *extra):
    args = ["--init-from", str(source_dir), "--cycles", "2", "--run-dir", str(run_dir), "--run-name", "up"]
    for item in TINY:
        args += ["--set", item]
    return main(args + list(extra))


@pytest.fixture(scope="module")
def vocab_source(tmp_path_factory):
    """A tiny GPT-2 with the tokenizer's vocabulary (the trainer needs it)."""
    folder = tmp_path_factory.mktemp("gpt2v") / "tiny"
    make_source(folder, seed=2, vocab_size=50257)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory, vocab_source):
    run_dir = tmp_path_factory.mktemp("up")
    assert train(run_dir, vocab_source) == 0
    return run_dir


@pytest.mark.slow
def test_head_cycles_on_an_imported_model_log_each_phase(straight, capsys):
    log_dir = straight / "logs" / "up"
    text = (log_dir / "training_log.txt").read_text()
    assert "initialised from" in text and "Note | weights from" in text and "top-2 gates sum to one" in text
    events = pd.read_csv(log_dir / "events.csv")
    measures = events[(events["granularity"] == "head") & (events["event"] == "measure")]
    assert list(measures["unit"]) == ["cycle1 prune", "cycle1 grow", "cycle2 prune", "cycle2 grow", "cycle2 learn"]
    assert measures[["probe_loss_before", "probe_loss_after"]].notna().all().all()
    assert {"prune", "grow"} <= set(events[events["granularity"] == "head"]["event"])
    assert "split" in set(events[events["granularity"] == "expert"]["event"]), "the copies split"
    with capsys.disabled():
        print("\n  --cycles 2 on an imported tiny GPT-2: held-out probe loss before -> after each phase")
        for _, m in measures.iterrows():
            print(f"    step {m['step']:>2} {m['unit']:<13} {m['probe_loss_before']:.4f} -> {m['probe_loss_after']:.4f}")
        evals = pd.read_csv(log_dir / "eval.csv")
        print("    eval.csv:", ", ".join(f"step {r.step} {r.loss:.4f}" for r in evals[evals.source == "all"].itertuples()))


@pytest.mark.slow
def test_resume_is_bit_exact_without_the_source(straight, vocab_source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(vocab_source, copy)
    assert train(tmp_path, copy, "--max-steps", "7") == 0
    shutil.rmtree(copy)                                      # the resume must not need it
    assert train(tmp_path, copy, "--resume") == 0
    a = pd.read_csv(straight / "logs" / "up" / "training_log.csv")
    b = pd.read_csv(tmp_path / "logs" / "up" / "training_log.csv")
    assert list(b["step"]) == list(range(1, 15))
    assert b["loss_ce"].tolist() == a["loss_ce"].tolist()      # bit for bit
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "logs" / "up" / "events.csv"),
                                  pd.read_csv(straight / "logs" / "up" / "events.csv"))
    text = (tmp_path / "logs" / "up" / "training_log.txt").read_text()
    assert "resumed from nemo_ckpt_step7.pt" in text and text.count("Note | weights from") == 1


@pytest.mark.slow
def test_resume_from_the_mirror_alone_with_the_source_gone(straight, vocab_source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(vocab_source, copy)
    mirror = ["--mirror-dir", str(tmp_path / "mirror")]
    assert train(tmp_path / "vm1", copy, "--max-steps", "7", *mirror) == 0
    shutil.rmtree(copy)                                      # the source folder is gone,
    shutil.rmtree(tmp_path / "vm1")                          # and so is the VM's disk: only the mirror is left
    assert train(tmp_path / "vm2", copy, "--resume", *mirror) == 0
    a = pd.read_csv(straight / "logs" / "up" / "training_log.csv")
    b = pd.read_csv(tmp_path / "vm2" / "logs" / "up" / "training_log.csv")
    assert list(b["step"]) == list(range(1, 15))
    assert b["loss_ce"].tolist() == a["loss_ce"].tolist()      # bit for bit
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "vm2" / "logs" / "up" / "events.csv"),
                                  pd.read_csv(straight / "logs" / "up" / "events.csv"))
    text = (tmp_path / "vm2" / "logs" / "up" / "training_log.txt").read_text()
    assert "using the mirror's verified copy" in text and "resumed from nemo_ckpt_step7.pt" in text


def test_export_tool_writes_a_dense_model_as_gpt2(source, tmp_path, capsys):
    from tools import export_hf
    folder, _ = source
    model, cfg, _ = imported(folder, "moe.experts_max=1", "plasticity.heads.enabled=true")
    with torch.no_grad():
        model.blocks[1].attn.head_gate[0] = 0.0
    state = layout.for_reading(step=3, tokens=30, config=cfg.to_dict(), expert_records=[[{"id": 0}], [{"id": 1}]])
    write_nemoe(model, state, tmp_path / "dense")
    assert export_hf.main([str(tmp_path / "dense"), "-o", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "(gpt2: config.json + model.safetensors)" in out and "reproduces the checkpoint's logits" in out
    assert max_logit_diff(GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval(), model) < 1e-4
    assert export_hf.main([str(tmp_path / "dense"), "-o", str(tmp_path / "hf")]) == 2, "not over a written folder"


@pytest.mark.slow
def test_export_tool_on_a_mixture_run_and_the_tools_that_read_it(straight, tmp_path, capsys):
    from tools import evaluate, export_hf, generate
    checkpoints = straight / "checkpoints" / "up"
    assert export_hf.main([str(checkpoints), "-o", str(tmp_path / "gpt2"), "--format", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "live experts per layer" in err and "Traceback" not in err
    assert export_hf.main([str(checkpoints), "-o", str(tmp_path / "moe")]) == 0
    assert "(nemoe: model.safetensors + nemoe.json)" in capsys.readouterr().out
    assert generate.main([str(tmp_path / "moe"), "--max-new-tokens", "3", "--device", "cpu", "--json"]) == 0
    assert '"step": 14' in capsys.readouterr().out
    assert evaluate.main([str(tmp_path / "moe"), "--device", "cpu", "--json"]) == 0
    assert '"all"' in capsys.readouterr().out
