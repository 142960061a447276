"""The many-shift protocol (tools/compare.py --protocol cycles, tools/comparison/cycles.py): its
phases and fresh runs, its metrics on a synthetic eval.csv, the constant LR schedule, the built-in
corpus splits, and (slow) a tiny run end to end with exact resume mid-phase and at a boundary."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

import nemoe.builtin_corpus
from nemoe.builtin_corpus import builtin_corpus
from nemoe.config import load_config
from nemoe.train_module import lr_at
from tools import compare as cmp
from tools.comparison.cycles import run_trend, slope, trends, visit_rows
from tools.comparison.plan import FRESH, OFF_PHASE_WEIGHT, build_plan
from tools.comparison.run import trainer_command

SOURCES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """Four small local text sources of different kinds, byte tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    words = "the river bends past an old mill where children learn to swim and the miller keeps a ledger".split()
    texts = {
        "a": [f"Note {i}. " + " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(20 + i % 13)) + "."
              for i in range(200)],
        "b": [f"def f{i}(x):\n    y = x * {i % 17} + {i}\n    return [y for _ in range({i % 5})]" for i in range(200)],
        "c": [", ".join(str((i * 37 + k) % 1000) for k in range(30)) for i in range(200)],
        "d": [f"<item id='{i}'><name>n{i % 23}</name><value>{i * 3}</value></item>" for i in range(200)],
    }
    sources = []
    for name, docs in texts.items():
        (folder / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        sources.append({"name": name, "kind": "files", "path": str(folder / f"{name}.txt"), "weight": 1.0})
    path = folder / "four.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": sources, "heldout_fraction": 0.2, "tokenizer": "bytes"},
                                    "model": {"vocab_size": 260}}))
    return str(path)


def plan_of(config, *args):
    return build_plan(cmp.parse_args(["--config", config, "--protocol", "cycles", *args]), None)


# --------------------------------------------------------------------------- #
# The protocol: phases, sources, evaluation cadence, fresh runs
# --------------------------------------------------------------------------- #

def test_phases_visit_the_sources_in_a_fixed_cycle(config):
    plan = plan_of(config, "--seeds", "2", "--strategies", "static_moe,morph")
    phases = plan.runs[0].phases
    assert len(phases) == 32 and [p.end for p in phases] == [60 * (i + 1) for i in range(32)]
    assert [p.source for p in phases] == list(SOURCES) * 8
    assert plan.base.eval.every_steps == 10 and plan.k_steps == 20 and plan.primary_metric == "slope_area_all"
    assert plan.base.total_steps() == 1920 and plan.out.name == "four-cycles"
    for phase in phases[:5]:
        command = trainer_command(plan, plan.runs[0], phase)
        assert command[command.index("--max-steps") + 1] == str(phase.end) and "--allow-config-change" in command
        # --resume only once the run has a checkpoint: with none it would refuse beside the plan's other runs
        assert "--resume" not in command and "--resume" in trainer_command(plan, plan.runs[0], phase, resume=True)
        items = [command[i + 1] for i, c in enumerate(command) if c == "--set"]
        cfg = load_config(config, items)
        weights = {s.name: s.weight for s in cfg.data.sources}
        assert weights == {s: 1.0 if s == phase.source else OFF_PHASE_WEIGHT for s in SOURCES}, "trains its source"
        assert cfg.eval.every_steps == 10 and cfg.total_steps() == 1920
    # Fresh reference: one run per source and seed, one phase on its source, the baseline's settings
    assert [r.name for r in plan.references] == [f"{FRESH}-{s}-s{seed}" for seed in (0, 1) for s in SOURCES]
    fresh = plan.references[5]
    assert [(p.source, p.end) for p in fresh.phases] == [("b", 60)]
    cfg = load_config(config, fresh.overrides + fresh.phases[0].overrides)
    assert cfg.plasticity.experts.enabled is False and cfg.train.seed == 1 and cfg.total_steps() == 1920
    assert not plan_of(config, "--no-fresh").references


def test_cycle_order_and_shape_options(config):
    plan = plan_of(config, "--cycle", "c,a", "--phase-steps", "8", "--cycles-repeats", "3", "--eval-every", "4",
                   "--k-steps", "4", "--seeds", "1", "--strategies", "static_moe")
    assert [(p.source, p.end) for p in plan.runs[0].phases] == [("c", 8), ("a", 16)] * 1 + [
        ("c", 24), ("a", 32), ("c", 40), ("a", 48)]
    assert plan.base.eval.every_steps == 4 and plan.k_steps == 4


@pytest.mark.parametrize("args, message", [
    (["--phase-steps", "55"], "must be multiples of the evaluation interval (10"),
    (["--k-steps", "15"], "must be multiples of the evaluation interval"),
    (["--k-steps", "70"], "k at most a phase"),
    (["--cycle", "a,wiki"], "'wiki' not a source of this config"),
    (["--cycle", "a"], "two or more distinct sources"),
    (["--cycles-repeats", "0"], "must be >= 1"),
])
def test_bad_cycle_options_are_one_clear_error(config, tmp_path, capsys, args, message):
    assert cmp.main(["--config", config, "--protocol", "cycles", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Metrics on a synthetic eval.csv
# --------------------------------------------------------------------------- #

LEVEL = {"a": 3.0, "b": 2.0}
DRIFT = {"a": 0.1, "b": -0.05}   # the true slope of each source's area per visit
FORGET = 0.05                    # an off-phase source's loss grows this much per phase


def synthetic_eval(repeats: int = 4, steps: int = 4):
    """Two sources, phases of `steps` steps, an evaluation every 2 steps: the phase's source reads
    LEVEL + DRIFT * visit + 0.2 two steps in and LEVEL + DRIFT * visit at its end; a source off its
    phase rises by FORGET per phase from where its last visit ended."""
    phases = [(s, i * steps, (i + 1) * steps) for i, s in enumerate(["a", "b"] * repeats)]
    rows, last = [], {"a": 5.0, "b": 5.0}
    visits = {"a": 0, "b": 0}
    for s in last:
        rows.append({"step": 0, "source": s, "loss": last[s]})
    for source, start, end in phases:
        visits[source] += 1
        base = LEVEL[source] + DRIFT[source] * visits[source]
        rows += [{"step": start + 2, "source": source, "loss": base + 0.2},
                 {"step": end, "source": source, "loss": base}]
        for other in last:
            if other != source:
                last[other] += FORGET
                rows += [{"step": start + 2, "source": other, "loss": last[other]},
                         {"step": end, "source": other, "loss": last[other]}]
        last[source] = base
    return pd.DataFrame(rows), phases


def test_visit_metrics_on_a_synthetic_eval_csv():
    evals, phases = synthetic_eval()
    events = pd.DataFrame({"step": [3, 4, 5, 30]})
    rows = pd.DataFrame(visit_rows(evals, events, phases, k=2))
    assert list(rows["source"]) == ["a", "b"] * 4 and list(rows["visit"]) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert list(rows["cycle"]) == [1, 1, 2, 2, 3, 3, 4, 4] and list(rows["end"]) == list(range(4, 33, 4))
    expected = [LEVEL[s] + DRIFT[s] * v for s, v in zip(rows["source"], rows["visit"])]
    assert list(rows["area"]) == pytest.approx([e + 0.1 for e in expected])
    assert list(rows["loss_k"]) == pytest.approx([e + 0.2 for e in expected])
    assert list(rows["events"]) == [2, 1, 0, 0, 0, 0, 0, 1]
    assert math.isnan(rows.loc[0, "forget_b"]) and math.isnan(rows.loc[0, "forget_a"]), "nothing visited before"
    assert list(rows["forget_a"].iloc[1::2]) == pytest.approx([FORGET] * 4)
    assert list(rows["forget_b"].iloc[2::2]) == pytest.approx([FORGET] * 3)

    trend = run_trend(rows, pd.DataFrame({"source": ["a", "b"], "area": [3.5, 2.5], "loss_k": [3.6, 2.6]}))
    for s in ("a", "b"):
        assert trend[f"slope_area_{s}"] == pytest.approx(DRIFT[s])
        assert trend[f"slope_loss_k_{s}"] == pytest.approx(DRIFT[s])
        assert trend[f"slope_area_{s}_n"] == 4
        assert trend[f"forget_mean_{s}"] == pytest.approx(FORGET)
    # overall: the cycle's mean over sources against the cycle number
    assert trend["slope_area_all"] == pytest.approx((DRIFT["a"] + DRIFT["b"]) / 2)
    assert trend["slope_area_all_low"] == pytest.approx(trend["slope_area_all_high"]), "an exact line: CI of width 0"
    assert trend["area_first"] == pytest.approx((3.1 + 1.95) / 2 + 0.1)
    assert trend["area_last"] == pytest.approx((3.4 + 1.8) / 2 + 0.1)
    assert trend["forget_mean_all"] == pytest.approx(FORGET)
    assert trend["area_last_vs_fresh"] == pytest.approx(((3.5 - 3.5) + (1.9 - 2.5)) / 2)
    assert trend["loss_k_last_vs_fresh"] == pytest.approx(((3.6 - 3.6) + (2.0 - 2.6)) / 2)


def test_slope_ci_is_the_regression_t_interval():
    fit = slope([1, 2, 3, 4], [1.0, 1.3, 1.1, 1.6])
    # by hand: Sxx 5, Sxy 0.8 -> slope 0.16; SSE 0.082 -> stderr sqrt(0.082 / 2 / 5); t(0.975, 2) = 4.302653
    stderr = math.sqrt(0.082 / 2 / 5)
    assert fit["slope"] == pytest.approx(0.16) and fit["stderr"] == pytest.approx(stderr)
    assert (fit["low"], fit["high"]) == pytest.approx((0.16 - 4.302653 * stderr, 0.16 + 4.302653 * stderr), rel=1e-6)
    two = slope([1, 2], [1.0, 2.0])
    assert two["slope"] == pytest.approx(1.0) and math.isnan(two["low"]), "no CI from two points"
    assert math.isnan(slope([1], [1.0])["slope"])


def test_trends_pair_each_run_with_its_seeds_fresh_runs():
    evals, phases = synthetic_eval()
    rows = visit_rows(evals, pd.DataFrame({"step": []}), phases, k=2)
    frame = pd.DataFrame([{**r, "strategy": "static_moe", "seed": seed, "run": f"static_moe-s{seed}"}
                          for seed in (0, 1) for r in rows])
    fresh = pd.DataFrame([{"strategy": FRESH, "seed": 1, "run": f"fresh-{s}-s1", "phase": 1, "source": s,
                           "area": 1.0, "loss_k": 1.0} for s in ("a", "b")])
    per_run = trends(pd.concat([frame, fresh], ignore_index=True)).set_index("run")
    assert list(per_run.index) == ["static_moe-s0", "static_moe-s1"]
    assert math.isnan(per_run.loc["static_moe-s0", "area_last_vs_fresh"]), "seed 0 has no fresh runs"
    assert per_run.loc["static_moe-s1", "area_last_vs_fresh"] == pytest.approx((3.5 + 1.9) / 2 - 1.0)


# --------------------------------------------------------------------------- #
# The constant schedule
# --------------------------------------------------------------------------- #

def test_constant_schedule_keeps_lr_after_warmup():
    cosine = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10"]).train
    constant = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10",
                                  "train.schedule=constant"]).train
    assert cosine.schedule == "cosine", "the default is today's schedule"
    for step in range(10):
        assert lr_at(step, constant, 100) == lr_at(step, cosine, 100) == pytest.approx(1e-3 * (step + 1) / 10)
    assert [lr_at(s, constant, 100) for s in (10, 50, 99, 150)] == [1e-3] * 4
    # cosine: unchanged (lr at the end of warm-up, halfway between at the middle, min_lr at the target)
    assert [lr_at(s, cosine, 100) for s in (10, 55, 100)] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    with pytest.raises(Exception, match="train.schedule must be cosine or constant"):
        load_config(None, ["train.schedule=linear"])


# --------------------------------------------------------------------------- #
# The built-in corpus splits
# --------------------------------------------------------------------------- #

# slow: builds the built-in corpora, which parses the standard library (~5 s of CPU)
@pytest.mark.slow
def test_builtin_splits_are_deterministic_disjoint_and_sizeable():
    texts = {n: list(builtin_corpus(n)["text"]) for n in ("prose", "code", "docs", "docstrings", "code_net",
                                                           "code_core")}
    for name in ("docs", "docstrings", "code_net", "code_core"):
        assert sum(len(t.encode()) for t in texts[name]) > 400_000, name
    assert texts["docs"] + texts["docstrings"] == texts["prose"], "prose's two parts, in order"
    assert not set(texts["docs"]) & set(texts["docstrings"])
    assert not set(texts["code_net"]) & set(texts["code_core"])
    assert set(texts["code_net"]) | set(texts["code_core"]) <= set(texts["code"])
    assert any("smtplib" in t or "HTTPConnection" in t for t in texts["code_net"])
    assert not any("# Autogenerated by Sphinx" in t for t in texts["code_core"]), "pydoc_data (the docs' text) is left out"
    nemoe.builtin_corpus._stdlib_files.cache_clear()
    builtin_corpus.cache_clear()
    assert list(builtin_corpus("code_net")["text"]) == texts["code_net"]
    assert load_config(None, ["data.sources=[{name: n, kind: builtin, path: code_net}]"]).data.sources[0].path == "code_net"


# --------------------------------------------------------------------------- #
# End to end: a tiny run, and exact resume mid-phase and at a phase boundary
# --------------------------------------------------------------------------- #

# 2 sources x 2 cycles of 4 steps (16 steps of 4 x 16 bytes), an evaluation every 2 steps, a checkpoint every 2.
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.d_expert=64",
        "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=3", "train.schedule=constant",
        "train.device=cpu", "train.precision=fp32", "log.every_steps=4", "log.sample_every_steps=0",
        "log.console=plain", "eval.batches=1", "eval.batch_size=2", "checkpoint.every_steps=2",
        "checkpoint.every_minutes=0", "checkpoint.keep_last=20"]
ARGS = ["--protocol", "cycles", "--cycle", "a,b", "--phase-steps", "4", "--cycles-repeats", "2", "--eval-every", "2",
        "--k-steps", "2", "--strategies", "static_moe", "--seeds", "1", "--jobs", "2"]


def run_cycles(config, out):
    argv = ["--config", config, "--out", str(out), *ARGS]
    for item in TINY:
        argv += ["--set", item]
    return cmp.main(argv)


@pytest.fixture(scope="module")
def tiny(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("cycles")
    assert run_cycles(config, out) == 0
    return out


def eval_of(out, run):
    return pd.read_csv(out / "logs" / run / "eval.csv")[["step", "source", "loss"]]


@pytest.mark.slow
def test_cycles_end_to_end(tiny):
    results = pd.read_csv(tiny / "results.csv")
    arm = results[results["strategy"] == "static_moe"]
    assert list(arm["source"]) == ["a", "b", "a", "b"] and list(arm["end"]) == [4, 8, 12, 16]
    evals = eval_of(tiny, "static_moe-s0")
    assert sorted(set(evals["step"])) == list(range(0, 17, 2)), "an evaluation every 2 steps"
    assert set(evals["source"]) >= {"a", "b", "c", "d"}, "every source evaluated in every phase"
    loss = {(r.source, r.step): r.loss for r in evals.itertuples()}
    for r in arm.itertuples():
        assert r.area == pytest.approx((loss[(r.source, r.start + 2)] + loss[(r.source, r.end)]) / 2)
        assert r.loss_k == pytest.approx(loss[(r.source, r.start + 2)])
    assert arm["forget_a"].iloc[1] == pytest.approx(loss[("a", 8)] - loss[("a", 4)])
    saved = yaml.safe_load((tiny / "logs" / "static_moe-s0" / "config.yaml").read_text())
    assert [s["weight"] for s in saved["data"]["sources"]] == [OFF_PHASE_WEIGHT, 1.0, OFF_PHASE_WEIGHT,
                                                               OFF_PHASE_WEIGHT], "the last phase trained b"
    # The fresh reference on a is the arm's first phase exactly (same seed, settings, data, schedule)
    fresh = eval_of(tiny, "fresh-a-s0")
    assert fresh["step"].max() == 4
    assert fresh.equals(evals[evals["step"] <= 4].reset_index(drop=True))
    assert set(results.loc[results["strategy"] == FRESH, "run"]) == {"fresh-a-s0", "fresh-b-s0"}
    per_run = pd.read_csv(tiny / "trends.csv")
    assert list(per_run["run"]) == ["static_moe-s0"] and per_run["slope_area_all_n"].iloc[0] == 2
    report = (tiny / "report.md").read_text()
    assert "## Plasticity trends" in report and "| 4 | b |" in report
    assert (tiny / "adaptation.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("keep", [6, 4], ids=["mid-phase", "at-a-boundary"])
def test_cycles_resume_is_exact(tiny, config, tmp_path, keep):
    out = tmp_path / "out"
    shutil.copytree(tiny, out)
    for ckpt in (out / "checkpoints" / "static_moe-s0").glob("nemo_ckpt_step*.pt"):
        if int(ckpt.stem.removeprefix("nemo_ckpt_step")) > keep:
            ckpt.unlink()
    mark = f"resumed from nemo_ckpt_step{keep}.pt"
    before = (out / "console" / "static_moe-s0.txt").read_text().count(mark)
    assert run_cycles(config, out) == 0
    assert (out / "console" / "static_moe-s0.txt").read_text().count(mark) == before + 1
    assert eval_of(out, "static_moe-s0").equals(eval_of(tiny, "static_moe-s0")), "the same losses, bit for bit"
    assert pd.read_csv(out / "results.csv").equals(pd.read_csv(tiny / "results.csv").assign(
        **{c: pd.read_csv(out / "results.csv")[c] for c in ("tokens_per_s", "wall_s")}))


def test_plan_from_a_cycles_folder_reads_the_slopes(tmp_path):
    pd.DataFrame({"strategy": ["static_moe"] * 3 + ["morph"] * 3, "seed": [0, 1, 2] * 2, "phase": [1] * 6,
                  "end_loss_all": [1.0] * 6}).to_csv(tmp_path / "results.csv", index=False)
    pd.DataFrame({"strategy": ["static_moe"] * 3 + ["morph"] * 3, "seed": [0, 1, 2] * 2,
                  "slope_area_all": [0.01, 0.02, 0.03, 0.0, 0.03, 0.01]}).to_csv(tmp_path / "trends.csv", index=False)
    from tools.comparison.seeds import pilot_pairs
    metric, found = pilot_pairs(tmp_path)
    # differences morph - static_moe: -0.01, +0.01, -0.02 -> sd 0.01527525
    assert metric == "slope_area_all" and found[0][:3] == ("morph", "static_moe", 3)
    assert found[0][3] == pytest.approx(0.0152752523)
