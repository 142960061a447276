"""tools/compare.py (tools/comparison/): a tiny grid and a tiny domain shift end to end, checked against the runs' own logs."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch
import yaml

import nemoe.plasticity
from nemoe.config import config_from_dict, load_config
from nemoe.data import TokenStream
from nemoe.errors import UserError
from nemoe.tokenizer import get_tokenizer
from tools import compare as cmp
from tools.comparison.plan import OFF_PHASE_WEIGHT, STRATEGIES, choose_strategies
from tools.comparison.report import data_order_consistent
from tools.comparison.results import meta_model, param_counts

pytestmark = pytest.mark.slow

# 12 steps of 4 x 16 tokens, an evaluation every 4 steps, checkpoints at 6 and 12.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.d_expert=64",
    "moe.experts_init=2", "moe.experts_max=4",
    "plasticity.experts.interval=4", "plasticity.experts.probation_steps=4", "plasticity.experts.split_usage=0.3",
    "plasticity.experts.prune_usage=0.2",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=3", "train.total_tokens=768",
    "train.device=cpu", "train.precision=fp32",
    "log.every_steps=4", "log.sample_every_steps=0", "log.console=plain",
    "eval.every_steps=4", "eval.batches=1", "eval.batch_size=2",
    "checkpoint.every_steps=6", "checkpoint.every_minutes=0", "checkpoint.keep_last=2",
]
SOURCES = ("prose", "code", "all")
GRID = ["--strategies", "static_moe,static_max,morph,morph_bias", "--seeds", "2"]
DECLARE = ["--primary", "morph-static_moe,static_max-static_moe", "--margin", "0.5"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A two-source config on small local text files (starts faster than the built-in corpus)."""
    folder = tmp_path_factory.mktemp("corpus")
    words = "the river bends past an old mill where children learn to swim and the miller keeps a ledger".split()
    (folder / "prose.txt").write_text("".join(
        f"Note {i}. " + " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(20 + i % 13)) + ".\n\n"
        for i in range(400)))
    (folder / "code.txt").write_text("".join(
        f"def f{i}(x):\n    y = x * {i % 17} + {i}\n    return [y for _ in range({i % 5})]\n\n" for i in range(400)))
    sources = [{"name": "prose", "kind": "files", "path": str(folder / "prose.txt"), "weight": 0.6},
               {"name": "code", "kind": "files", "path": str(folder / "code.txt"), "weight": 0.4}]
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": sources, "heldout_fraction": 0.2}}))
    return str(path)


def compare(config, out, *args, tiny=TINY):
    argv = ["--config", config, "--out", str(out), "--jobs", "2", *args]
    for item in tiny:
        argv += ["--set", item]
    return cmp.main(argv)


@pytest.fixture(scope="module")
def grid(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    assert compare(config, out, *GRID, *DECLARE) == 0
    return out


def final_eval(out, run):
    evals = pd.read_csv(out / "logs" / run / "eval.csv")
    last = evals[evals["step"] == evals["step"].max()]
    return int(last["step"].iloc[0]), dict(zip(last["source"], last["loss"]))


# --------------------------------------------------------------------------- #
# Statistics and strategies
# --------------------------------------------------------------------------- #

def test_new_strategies_set_what_they_say():
    base = load_config("local.yaml", TINY)
    static_max = load_config("local.yaml", TINY + STRATEGIES["static_max"].overrides(base))
    assert static_max.moe.experts_init == static_max.moe.experts_max == 4 \
        and not static_max.plasticity.experts.enabled
    morph_bias = load_config("local.yaml", TINY + STRATEGIES["morph_bias"].overrides(base))
    assert morph_bias.moe.balance == "bias" and morph_bias.plasticity.experts.enabled
    assert load_config("local.yaml", TINY + STRATEGIES["morph"].overrides(base)).moe.balance == "aux_loss"


def tiny_flops(train: pd.DataFrame, cfg) -> float:
    """Training FLOPs re-derived from the shapes (not from nemoe.flops): 6 N + 12 L T d per token,
    N = embedding (as the LM head) + attention, norms + top-k experts + the live router rows."""
    V, d, L, T, h, k = (cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers, cfg.model.seq_len,
                        cfg.d_expert, cfg.moe.top_k)
    per_layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d
    expert = d * h + h + h * d + d
    total, before, live = 0.0, 0, [cfg.moe.experts_init] * L
    for _, row in train.iterrows():
        n = V * d + L * per_layer + 2 * d + L * k * expert + d * sum(live)
        total += (row["tokens"] - before) * (6 * n + 12 * L * T * d)
        before, live = row["tokens"], [row[f"experts_L{i}"] for i in range(L)]
    return total


def test_dense_has_the_active_parameters_of_the_moe():
    for top_k, d_expert in [(1, 64), (2, 0)]:
        common = TINY + [f"moe.top_k={top_k}", f"model.d_expert={d_expert}", "moe.experts_min=2"]
        base = load_config("local.yaml", common)
        counts = {}
        for name in ("dense", "static_moe"):
            cfg = load_config("local.yaml", common + STRATEGIES[name].overrides(base))
            counts[name] = param_counts(meta_model(cfg), 0)["params_active"]
        # Identical but for the router (d_model weights per slot and layer) and, at top-2,
        # the second expert's output bias.
        n_layers, d_model = base.model.n_layers, base.model.d_model
        router = n_layers * d_model * (base.moe.experts_max - 1)
        assert counts["dense"] == counts["static_moe"] - router - n_layers * d_model * (top_k - 1)


def test_unavailable_mechanisms_are_skipped_or_refused(monkeypatch):
    monkeypatch.setattr(nemoe.plasticity, "REGISTRY", {})
    names, notes = choose_strategies(None)
    assert names == ["dense", "static_moe", "static_max", "morph", "morph_bias"]
    # neuron, heads, layers: the default grid's; the growth and recycler arms run only when named
    assert len(notes) == 3 and all("not available" in n for n in notes)
    with pytest.raises(UserError, match="not available"):
        choose_strategies("static_moe,heads")
    with pytest.raises(UserError, match="unknown"):
        choose_strategies("static_moe,nonsense")
    monkeypatch.undo()
    assert choose_strategies(None)[0] == ["dense", "static_moe", "static_max", "morph", "morph_bias",
                                          "neuron", "heads", "layers"]
    assert choose_strategies("grow,redo")[0] == ["grow", "redo"]


# --------------------------------------------------------------------------- #
# The grid, end to end
# --------------------------------------------------------------------------- #

def test_grid_numbers_are_the_runs_own(grid):
    results = pd.read_csv(grid / "results.csv")
    summary = pd.read_csv(grid / "summary.csv")
    report = (grid / "report.md").read_text()
    assert sorted(results["run"]) == sorted(f"{s}-s{seed}" for s in ("static_moe", "static_max", "morph", "morph_bias")
                                            for seed in (0, 1))
    finals = {}
    for row in results.itertuples():
        step, losses = final_eval(grid, row.run)
        assert step == row.step == 12
        for source in SOURCES:
            assert getattr(row, f"loss_{source}") == pytest.approx(losses[source], rel=1e-12)
        finals[(row.strategy, row.seed)] = losses
        train_log = pd.read_csv(grid / "logs" / row.run / "training_log.csv")
        train = train_log.iloc[-1]
        assert row.tokens_per_s == pytest.approx(train["tokens"] / train["elapsed_s"])
        assert row.wall_s == train["elapsed_s"]
        cfg = config_from_dict(yaml.safe_load((grid / "logs" / row.run / "config.yaml").read_text()))
        assert row.flops == pytest.approx(tiny_flops(train_log, cfg), rel=1e-12)
        assert row.flops_per_token == pytest.approx(row.flops / train["tokens"], rel=1e-12)
        if row.strategy == "static_max":
            assert (train_log[["experts_L0", "experts_L1"]] == 4).all().all()
        assert cfg.moe.balance == ("bias" if row.strategy == "morph_bias" else "aux_loss")
        assert row.events == len(pd.read_csv(grid / "logs" / row.run / "events.csv"))
    assert results[results["strategy"] == "morph"]["events"].min() > 0, "the tiny morph runs have events"
    for strategy in ("static_moe", "morph"):
        values = [finals[(strategy, s)]["all"] for s in (0, 1)]
        mean, sd = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
        got = summary[(summary["strategy"] == strategy) & (summary["metric"] == "loss_all")].iloc[0]
        assert (got["mean"], got["sd"]) == (pytest.approx(mean, rel=1e-12), pytest.approx(sd, rel=1e-9))
        assert f"| {strategy} | 2 | {mean:.4f} ± {sd:.4f} |" in report
    assert (grid / "curves.png").stat().st_size > 0
    # Equal compute is checkable: top-1 routing costs the same per token whatever the expert count,
    # up to the router rows of the live experts.
    per_token = results.groupby("strategy")["flops_per_token"].mean()
    assert per_token["static_moe"] < per_token["static_max"] < per_token["static_moe"] * 1.01


def cauchy_sf(x):
    """P(T > x) for Student t with 1 degree of freedom (2 seeds)."""
    return 0.5 - math.atan(x) / math.pi


def test_grid_comparisons_are_the_declared_tests_on_the_runs_numbers(grid):
    """Mean difference, 95% CI, p, Holm p and the TOST verdict of the declared primaries, re-derived by
    hand (2 seeds: t with 1 degree of freedom has a closed form); the rest secondary, unadjusted."""
    results = pd.read_csv(grid / "results.csv")
    summary = pd.read_csv(grid / "summary.csv")
    report = (grid / "report.md").read_text()
    loss = results.set_index(["strategy", "seed"])["loss_all"]
    expected = {}
    for arm in ("morph", "static_max"):
        d = [loss[(arm, s)] - loss[("static_moe", s)] for s in (0, 1)]
        mean, se = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
        p = 2 * cauchy_sf(abs(mean) / se)
        tost = max(cauchy_sf((mean + 0.5) / se), cauchy_sf((0.5 - mean) / se))
        expected[arm] = dict(mean=mean, low=mean - 12.7062 * se, high=mean + 12.7062 * se, p=p, tost=tost)
    ps = [expected[a]["p"] for a in ("morph", "static_max")]
    holm = {"morph": min(1, 2 * min(ps)) if ps[0] <= ps[1] else max(min(1, 2 * min(ps)), ps[0]),
            "static_max": min(1, 2 * min(ps)) if ps[1] <= ps[0] else max(min(1, 2 * min(ps)), ps[1])}
    for arm, e in expected.items():
        row = summary[(summary["strategy"] == arm) & (summary["versus"] == "static_moe")
                      & (summary["metric"] == "loss_all")].iloc[0]
        assert row["family"] == "primary"
        assert row["diff"] == pytest.approx(e["mean"], rel=1e-9)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(e["low"], abs=1e-4 * abs(e["high"] - e["mean"])),
                                                   pytest.approx(e["high"], abs=1e-4 * abs(e["high"] - e["mean"])))
        assert row["p"] == pytest.approx(e["p"], rel=1e-6)
        assert row["p_holm"] == pytest.approx(holm[arm], rel=1e-6)
        assert row["margin_p"] == pytest.approx(e["tost"], rel=1e-6)
        verdict = ("better (lower loss)" if e["mean"] < 0 else "worse (higher loss)") if holm[arm] < 0.05 \
            else "not significant"
        assert row["verdict"] == verdict
        tost = ("equivalent within ±0.5" if e["tost"] < 0.05 else "not equivalent (beyond ±0.5)"
                if e["low"] > 0.5 or e["high"] < -0.5 else "inconclusive")
        assert row["margin_verdict"] == tost
        assert (f"| {arm} − static_moe, held-out all loss | primary | 2 | {e['mean']:+.4f} [{row['ci_low']:+.4f}, "
                f"{row['ci_high']:+.4f}] | {row['p']:.4f} | {row['p_holm']:.4f} | **{verdict}** | {tost} (p ") in report
    # Secondary: per-source losses, the baseline pair of morph_bias and the extra pairs; no Holm, no verdict
    secondary = summary[summary["family"] == "secondary, unadjusted"]
    assert secondary["p_holm"].isna().all() and (secondary["verdict"] == "secondary, unadjusted").all()
    assert {("morph_bias", "static_moe"), ("morph", "static_max"), ("morph_bias", "morph")} <= set(
        zip(secondary["strategy"], secondary["versus"]))
    bias = results[results["strategy"] == "morph_bias"].set_index("seed")["loss_all"]
    morph = results[results["strategy"] == "morph"].set_index("seed")["loss_all"]
    pair = secondary[(secondary["strategy"] == "morph_bias") & (secondary["versus"] == "morph")
                     & (secondary["metric"] == "loss_all")].iloc[0]
    assert pair["diff"] == pytest.approx((bias - morph).mean(), rel=1e-9)
    assert f"| morph_bias − morph, held-out all loss | secondary, unadjusted | 2 | {pair['diff']:+.4f}" in report
    assert "## Declared before running" in report and "`morph` − `static_moe`, `static_max` − `static_moe`" in report
    assert "equivalence margin ±0.5 nats" in report
    for text in (report, (grid / "summary.csv").read_text(), (grid / "results.csv").read_text()):
        assert "detectable" not in text.lower()
    for word in ("better", "worse", "equivalent within"):
        for line in report.splitlines():
            if word in line and line.startswith("| "):
                assert "| primary |" in line, f"{word!r} outside a primary row: {line}"


def test_events_and_expert_counts_are_the_runs_own(grid):
    """Per-type event counts, per-layer counts and the expert trajectory: read back from the runs' own logs."""
    results = pd.read_csv(grid / "results.csv", keep_default_na=False)
    summary = pd.read_csv(grid / "summary.csv")
    report = (grid / "report.md").read_text()
    names = ("split", "crossover", "graduate", "failed_probation", "prune")
    for row in results.itertuples():
        events = pd.read_csv(grid / "logs" / row.run / "events.csv")
        expert = events[events["granularity"] == "expert"]
        for name in names:
            column = f"event_expert_{name}"
            assert (float(getattr(row, column)) if column in results else 0) == (expert["event"] == name).sum()
        by_layer = dict(item.split(" ") for item in row.expert_events_by_layer.split("; ") if item)
        assert set(by_layer) == set(expert["event"])
        for name, counts in by_layer.items():
            assert [int(c) for c in counts.split("/")] == [int(((expert["event"] == name) & (expert["layer"] == i)).sum())
                                                           for i in range(2)]
        log = pd.read_csv(grid / "logs" / row.run / "training_log.csv").set_index("step")
        marks = dict(m.split(": ") for m in row.experts_trajectory.split("; "))
        assert [int(s) for s in marks] == [4, 8, 12]    # fifths of 12 steps, logged every 4: 2 has no row yet
        for step, counts in marks.items():
            assert counts == "/".join(str(int(log.loc[int(step), f"experts_L{i}"])) for i in range(2))
    morph = results[results["strategy"] == "morph"]
    splits = morph["event_expert_split"].astype(float)
    got = summary[(summary["strategy"] == "morph") & (summary["metric"] == "event_expert_split")].iloc[0]
    assert got["mean"] == pytest.approx(splits.mean())
    assert "## Structural events and expert counts" in report
    assert "| strategy | n | split |" in report
    assert f"| morph | 2 | {splits.mean():.1f} ± {splits.std():.1f} |" in report
    assert f"| {morph['run'].iloc[0]} | " + " | ".join(
        dict(m.split(": ") for m in morph["experts_trajectory"].iloc[0].split("; ")).values()) + " |" in report
    assert "static_moe-s0 |" not in report.split("## Structural")[1], "a static run's counts do not change"


def test_same_seed_same_data_order(grid):
    """The batches each run's own config reads: equal across strategies, different across seeds."""
    tokenizer = get_tokenizer("gpt2")
    first = {}
    for run in ("static_moe-s0", "morph-s0", "static_moe-s1", "morph-s1"):
        saved = yaml.safe_load((grid / "logs" / run / "config.yaml").read_text())
        cfg = config_from_dict(saved)
        stream = TokenStream(cfg.data, tokenizer, cfg.model.seq_len)
        first[run] = torch.cat([stream.next_batch(cfg.train.batch_size) for _ in range(12)])
        stream.close()
    assert torch.equal(first["static_moe-s0"], first["morph-s0"])
    assert torch.equal(first["static_moe-s1"], first["morph-s1"])
    assert not torch.equal(first["static_moe-s0"], first["static_moe-s1"])
    results = pd.read_csv(grid / "results.csv")
    assert data_order_consistent(results)
    assert results.groupby("seed")["data_fingerprint"].first().nunique() == 2
    assert "identical across strategies" in (grid / "report.md").read_text()
    assert not data_order_consistent(results.assign(data_fingerprint=results["run"]))


def test_changed_settings_are_refused(grid, config, capsys):
    assert compare(config, grid, *GRID, "--set", "train.weight_decay=0.05") == 2
    assert "was made with other settings (train.weight_decay" in capsys.readouterr().err


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(grid, config):
    before = pd.read_csv(grid / "results.csv").set_index("run")
    stamps = {p: p.stat().st_mtime_ns for p in grid.glob("*/*/*") if p.is_file() and "morph-s1" not in str(p)}
    # morph-s1 "interrupted" after its step-6 checkpoint: the final one is gone.
    (grid / "checkpoints" / "morph-s1" / "nemo_ckpt_step12.pt").unlink()
    assert compare(config, grid, *GRID) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "finished runs were not touched"
    console = (grid / "console" / "morph-s1.txt").read_text()
    assert "resumed from nemo_ckpt_step6.pt" in console
    after = pd.read_csv(grid / "results.csv").set_index("run")
    columns = [f"loss_{s}" for s in SOURCES] + ["events"]
    assert after[columns].equals(before[columns]), "the resumed run ends exactly where it ended before"


def without_command(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if not line.startswith("Reproduce:"))


def test_a_rebuild_from_committed_rows_alone_matches_the_run_folders(grid, config, tmp_path, capsys):
    study = tmp_path / "study"
    # Over the finished grid: each run's rows come from its run folder and are committed under the study
    assert compare(config, grid, *GRID, *DECLARE, "--study", str(study)) == 0
    for run in pd.read_csv(grid / "results.csv")["run"]:
        kept = study / "runs" / run
        assert sorted(p.name for p in kept.iterdir()) == ["costs.csv", "eval.csv", "summary.json"]
        assert (kept / "eval.csv").read_bytes() == (grid / "logs" / run / "eval.csv").read_bytes()
        costs, log = pd.read_csv(kept / "costs.csv"), pd.read_csv(grid / "logs" / run / "training_log.csv")
        assert costs.equals(log[["step", "elapsed_s", "expert_param_steps"]].astype({"expert_param_steps": float}))
    assert (study / "declared.json").is_file()
    from_runs = {name: (grid / name).read_text() for name in ("report.md", "results.csv", "summary.csv")}
    assert from_runs["report.md"] == (study / "report.md").read_text()
    # Elsewhere, with the study folder alone (no run folders, no corpus needed for the data-order hashes)
    moved = tmp_path / "moved"
    shutil.copytree(study, moved)
    fresh = tmp_path / "fresh"
    assert compare(config, fresh, *GRID, "--study", str(moved)) == 0   # declares nothing: the recorded one holds
    assert not (fresh / "logs").exists() and not (fresh / "checkpoints").exists(), "no run was run again"
    assert "8 runs, 8 finished earlier, 0 to run" in capsys.readouterr().out
    assert (fresh / "results.csv").read_text() == from_runs["results.csv"]
    assert (fresh / "summary.csv").read_text() == from_runs["summary.csv"]
    assert without_command((fresh / "report.md").read_text()) == without_command(from_runs["report.md"])
    assert (fresh / "curves.png").stat().st_size > 0
    # A rebuild that declares something else is refused; one run short, --rebuild lists it as not run
    assert compare(config, fresh, *GRID, "--study", str(moved), "--primary", "morph-static_moe", "--rebuild") == 2
    assert "records primaries morph − static_moe, static_max − static_moe" in capsys.readouterr().err
    shutil.rmtree(moved / "runs" / "morph-s1")
    assert compare(config, tmp_path / "fresh2", *GRID, "--study", str(moved), "--rebuild") == 1
    report = (tmp_path / "fresh2" / "report.md").read_text()
    assert "- morph-s1: not run (--rebuild runs nothing)" in report
    assert not (tmp_path / "fresh2" / "logs").exists()


def test_a_committed_run_with_other_settings_is_refused(grid, config, tmp_path, capsys):
    study = tmp_path / "study"
    assert compare(config, grid, *GRID, "--study", str(study), "--rebuild") == 0
    assert compare(config, tmp_path / "other", *GRID, "--study", str(study), "--rebuild",
                   "--set", "train.weight_decay=0.05") == 2
    assert "was made with other settings (train.weight_decay" in capsys.readouterr().err
    # The bias step does nothing in a run balanced by the loss: those runs are kept, morph_bias's are not
    aux = ["--strategies", "static_moe,static_max,morph", "--seeds", "2"]
    assert compare(config, tmp_path / "rate", *aux, "--study", str(study), "--rebuild",
                   "--set", "moe.bias_rate=0.05") == 0
    assert compare(config, tmp_path / "rate2", *GRID, "--study", str(study), "--rebuild",
                   "--set", "moe.bias_rate=0.05") == 2
    assert "morph_bias-s0 was made with other settings (moe.bias_rate" in capsys.readouterr().err


def test_the_evaluation_schedule_changes_no_training_so_committed_runs_are_kept(grid, config, tmp_path, capsys):
    # morph (splits, prunes, probation: the usage counts matter) evaluated at other steps trains the same
    out = tmp_path / "often"
    assert compare(config, out, "--strategies", "morph", "--seed-list", "1",
                   tiny=[t for t in TINY if not t.startswith("eval.every_steps")] + ["eval.every_steps=3"]) == 0
    runs = {name: pd.read_csv(folder / "logs" / "morph-s1" / "training_log.csv").drop(
        columns=["tokens_per_s", "elapsed_s", "rss_mb"]) for name, folder in (("often", out), ("grid", grid))}
    assert runs["often"].equals(runs["grid"])
    assert (out / "logs" / "morph-s1" / "events.csv").read_bytes() == (grid / "logs" / "morph-s1" / "events.csv").read_bytes()
    often, every4 = (pd.read_csv(f / "logs" / "morph-s1" / "eval.csv") for f in (out, grid))
    assert sorted(set(often["step"])) == [0, 3, 6, 9, 12] and sorted(set(every4["step"])) == [0, 4, 8, 12]
    assert often[often["step"] == 12]["loss"].tolist() == every4[every4["step"] == 12]["loss"].tolist()
    # so a study may evaluate its new arms more often than the committed runs it reuses
    study = tmp_path / "study"
    assert compare(config, grid, *GRID, "--study", str(study), "--rebuild") == 0
    assert compare(config, tmp_path / "again", *GRID, "--study", str(study), "--rebuild",
                   "--set", "eval.every_steps=3") == 0


# --------------------------------------------------------------------------- #
# Domain shift
# --------------------------------------------------------------------------- #

def test_shift_protocol_end_to_end(config, tmp_path):
    out = tmp_path / "shift"
    study = tmp_path / "study"
    assert compare(config, out, "--protocol", "shift", "--phases", "prose:4,code:4,prose:4",
                   "--strategies", "morph", "--seeds", "1", "--study", str(study),
                   tiny=[t for t in TINY if not t.startswith("eval.every_steps")]) == 0
    committed = json.loads((study / "runs" / "morph-s0" / "summary.json").read_text())
    assert [r["phase"] for r in committed["rows"]] == [1, 2, 3] and committed["protocol"] == "shift"
    results = pd.read_csv(out / "results.csv")
    assert list(results["phase"]) == [1, 2, 3] and list(results["source"]) == ["prose", "code", "prose"]
    evals = pd.read_csv(out / "logs" / "morph-s0" / "eval.csv")
    assert sorted(set(evals["step"])) == list(range(13)), "an evaluation every step"
    loss = {(r.source, r.step): r.loss for r in evals.itertuples()}
    events = pd.read_csv(out / "logs" / "morph-s0" / "events.csv")
    p1, p2, p3 = (results.iloc[i] for i in range(3))
    assert p2["forget_prose"] == pytest.approx(loss[("prose", 8)] / loss[("prose", 4)] - 1)
    assert p3["forget_code"] == pytest.approx(loss[("code", 12)] / loss[("code", 8)] - 1)
    for phase, end in zip((p1, p2, p3), (4, 8, 12)):
        assert [phase[f"end_loss_{s}"] for s in ("prose", "code", "all")] == pytest.approx(
            [loss[(s, end)] for s in ("prose", "code", "all")])
    adapt = next(s for s in range(5, 9) if loss[("code", s)] <= 1.05 * loss[("code", 8)]) - 4
    assert p2["adapt_steps"] == adapt
    recovered = [s for s in range(9, 13) if loss[("prose", s)] <= 1.05 * loss[("prose", 4)]]
    assert (p3["recover_steps"] == recovered[0] - 8) if recovered else math.isnan(p3["recover_steps"])
    for phase, (lo, hi) in zip((p1, p2, p3), [(0, 4), (4, 8), (8, 12)]):
        assert phase["events"] == ((events["step"] > lo) & (events["step"] <= hi)).sum()
    console = (out / "console" / "morph-s0.txt").read_text()
    assert console.count("data settings changed") == 2, "phases 2 and 3 switch the source weights"
    saved = yaml.safe_load((out / "logs" / "morph-s0" / "config.yaml").read_text())
    assert [s["weight"] for s in saved["data"]["sources"]] == [1.0, OFF_PHASE_WEIGHT]
    report = (out / "report.md").read_text()
    assert "forget_prose" in report and "| 3 (prose) | end_loss_code |" in report


def test_shift_rejects_an_unknown_source(config, tmp_path, capsys):
    assert compare(config, tmp_path, "--protocol", "shift", "--phases", "prose:4,wiki:4") == 2
    assert "'wiki' is not a source of this config" in capsys.readouterr().err
