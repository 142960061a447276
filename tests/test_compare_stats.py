"""tools/comparison statistics on hand-computed numbers: the paired t interval and p, Holm, TOST and
non-inferiority verdicts, the seed plan's power (noncentral t), and what a study declares."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest

from nemoe.errors import UserError
from tools import compare as cmp
from tools.comparison import declared
from tools.comparison.comparisons import compare
from tools.comparison.stats import equivalence, holm, noninferiority, paired_difference, power, sd_upper, \
    seeds_needed, t_quantile, tost_p

T975 = {1: 12.7062, 2: 4.302653, 4: 2.776445}   # Student t tables
T95 = {2: 2.919986, 4: 2.131847}


def test_t_quantile_matches_the_table():
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-4)


def test_paired_ci_and_p_on_hand_numbers():
    # diffs 0.5, 1.0, 0.5: mean 2/3, sd sqrt(1/12), half-width t(0.975, 2) * sd / sqrt(3); seed 7 is unpaired
    p = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 2.5})
    se = math.sqrt(1 / 12) / math.sqrt(3)
    assert p.n == 3 and p.mean == pytest.approx(2 / 3) and p.sd == pytest.approx(math.sqrt(1 / 12))
    assert (p.low, p.high) == (pytest.approx(2 / 3 - T975[2] * se, abs=1e-6), pytest.approx(2 / 3 + T975[2] * se, abs=1e-6))
    # t = 4 at df 2: two-sided p = 1 - t / sqrt(t^2 + 2) (the t(2) CDF in closed form)
    assert p.p == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-9)
    # df 1 (Cauchy): p = 1 - 2 atan(|t|) / pi; diffs 1, 3: t = 2 / (sqrt(2) / sqrt(2)) = 2
    assert paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0}).p == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    assert math.isnan(paired_difference({0: 1.0}, {0: 0.0}).p)
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert (same.mean, same.p) == (0.0, 1.0)
    assert paired_difference({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0}).p == 0.0   # the same +0.5 in both seeds


def test_holm_on_a_hand_computed_family():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]), "capped at 1"
    # morph_bias's p ~ 0.023 among 24 comparisons: no longer below 0.05
    assert holm([0.023] + [0.5] * 23)[0] == pytest.approx(0.552)
    adjusted = holm([0.01, math.nan, 0.02])      # a primary that did not run still counts: m = 3
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def test_equivalence_and_noninferiority_verdicts():
    # diffs with mean 0.005, sd 0.01, n 5: se 0.01/sqrt(5); 90% CI 0.005 +- 2.1318 se = [-0.0045, 0.0145]
    diffs = np.array([0.015, -0.005, 0.015, -0.005, 0.005])
    p = paired_difference(dict(enumerate(diffs)), dict.fromkeys(range(5), 0.0))
    assert p.sd == pytest.approx(0.01)
    se = 0.01 / math.sqrt(5)
    assert p.high == pytest.approx(0.005 + T975[4] * se, abs=1e-9)
    # TOST p: the larger one-sided p; at margin 0.02 the upper test binds: t = (0.005 - 0.02) / se
    import scipy.stats
    assert tost_p(p, 0.02) == pytest.approx(scipy.stats.t.cdf((0.005 - 0.02) / se, 4))
    assert equivalence(p, 0.02) == "equivalent within ±0.02"          # 90% upper 0.0145 < 0.02
    assert equivalence(p, 0.014) == "inconclusive"                    # 0.0145 > 0.014 > 95% lower
    shifted = paired_difference(dict(enumerate(diffs + 0.1)), dict.fromkeys(range(5), 0.0))
    assert equivalence(shifted, 0.02) == "not equivalent (beyond ±0.02)"   # 95% CI [0.0926, 0.1174]
    assert equivalence(paired_difference(dict(enumerate(-diffs - 0.1)), dict.fromkeys(range(5), 0.0)),
                       0.02).startswith("not equivalent")
    # non-inferiority at +m: the 95% CI's upper bound 0.005 + 2.7764 se = 0.01742
    assert noninferiority(p, 0.02).startswith("non-inferior")
    assert noninferiority(p, 0.017) == "inconclusive"
    assert noninferiority(shifted, 0.02).startswith("inferior")
    assert equivalence(paired_difference({0: 1.0}, {0: 0.0}), 0.02) == "inconclusive (n=1)"


def test_power_matches_a_simulation_and_the_plan_is_the_first_n_reaching_80_percent():
    # Monte Carlo of the two-sided paired t-test: 5 seeds, effect 0.02, sd 0.03
    rng = np.random.default_rng(0)
    d = rng.normal(0.02, 0.03, size=(40_000, 5))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(5))
    simulated = (np.abs(t) > T975[4]).mean()
    assert power(0.02, 0.03, 5) == pytest.approx(simulated, abs=0.01)
    n = seeds_needed(0.02, 0.03)
    assert power(0.02, 0.03, n) >= 0.8 > power(0.02, 0.03, n - 1)
    assert n == 20          # the normal approximation: (1.96 + 0.84)^2 (0.03 / 0.02)^2 + ~2 = 19.6
    # a huge effect at 2 seeds (df 1): scipy's far tail is NaN there; the power is still the near tail's
    import scipy.stats
    nc = 0.02 * math.sqrt(2) / 0.001
    assert power(0.02, 0.001, 2) == pytest.approx(scipy.stats.nct.sf(T975[1], 1, nc), abs=1e-4)
    assert seeds_needed(0.02, 0.001) == 2
    # 80% upper bound of an sd from 3 values: sqrt(2 / chi2_{0.2}(2)); chi2_{0.2}(2) = -2 ln 0.8
    assert sd_upper(0.03, 3) == pytest.approx(0.03 * math.sqrt(2 / (-2 * math.log(0.8))))


def test_plan_prints_seeds_from_a_given_sd_and_from_a_pilot_folder(tmp_path, capsys):
    assert cmp.main(["--plan", "--pilot-sd", "0.03", "--effect", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "pilot sd 0.03: 20 seeds (power at 3: 0.11, 5: 0.21, 8: 0.37, 10: 0.47)" in out
    rows = [{"strategy": s, "seed": k, "loss_all": 4.0 + shift + noise}
            for s, shift, noises in [("static_moe", 0.0, (0, 0, 0)), ("dense", 0.01, (0.01, -0.02, 0.01)),
                                     ("static_max", -0.02, (0.0, 0.0, 0.0))] for k, noise in zip(range(3), noises)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    assert cmp.main(["--plan", "--from", str(tmp_path), "--effect", "0.02"]) == 0
    out = capsys.readouterr().out
    sd = float(np.std([0.02, -0.01, 0.02], ddof=1))
    assert f"dense − static_moe: sd {sd:.4f} over 3 seeds -> {seeds_needed(0.02, sd)} seeds" in out
    assert "static_max − static_moe: sd 0 over 3 seeds" in out
    # with a declaration, only its primaries
    (tmp_path / declared.DECLARED_JSON).write_text(json.dumps(
        {"primaries": [["static_max", "dense"]], "margin": 0.02, "noninferiority": None, "metric": "loss_all"}))
    assert cmp.main(["--plan", "--from", str(tmp_path), "--effect", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "static_max − dense" in out and "dense − static_moe" not in out
    assert cmp.main(["--plan", "--effect", "0.02"]) == 2
    assert "--pilot-sd" in capsys.readouterr().err
    assert cmp.main(["--plan", "--pilot-sd", "0.03"]) == 2
    assert "--effect" in capsys.readouterr().err


def args(**kw):
    return argparse.Namespace(**{"primary": None, "margin": None, "noninferiority": None, **kw})


def test_a_declaration_is_recorded_once_and_later_ones_must_match(tmp_path):
    names = ["dense", "static_moe", "static_max"]
    given = declared.from_args(args(primary="static_moe-dense,static_max-dense", margin=0.02), names, "loss_all", "cmd")
    settled = declared.settle(tmp_path, given, ["dense-s0"])
    assert settled.primaries == [("static_moe", "dense"), ("static_max", "dense")]
    saved = json.loads((tmp_path / declared.DECLARED_JSON).read_text())
    assert saved["margin"] == 0.02 and saved["finished_before"] == ["dense-s0"] and saved["command"] == "cmd"
    # a rebuild that declares nothing uses the recorded declaration
    again = declared.settle(tmp_path, declared.from_args(args(), names, "loss_all", "other"), [])
    assert again.primaries == settled.primaries and again.margin == 0.02 and again.command == "cmd"
    with pytest.raises(UserError, match="records primaries static_moe − dense, static_max − dense; equivalence"):
        declared.settle(tmp_path, declared.from_args(args(primary="static_max-dense", margin=0.02), names,
                                                     "loss_all", "x"), [])
    with pytest.raises(UserError, match="this command declares"):
        declared.settle(tmp_path, declared.from_args(args(primary="static_moe-dense,static_max-dense", margin=0.05),
                                                     names, "loss_all", "x"), [])
    assert "declared after 1 run(s) had finished" in "\n".join(declared.declared_lines(again))
    # nothing declared, nothing recorded: nothing written
    assert declared.settle(tmp_path / "empty", declared.from_args(args(), names, "loss_all", "x"), []).empty
    assert not (tmp_path / "empty").exists()
    for bad, match in [(dict(primary="dense"), "ARM-BASELINE"), (dict(primary="morph-dense"), "not among"),
                       (dict(primary="dense-static_moe,static_moe-dense"), "each pair once"),
                       (dict(margin=0.02), "--primary"), (dict(primary="dense-static_moe", margin=-1), "positive"),
                       (dict(primary="dense-static_moe", margin=0.02, noninferiority=0.01), "not both")]:
        with pytest.raises(UserError, match=match):
            declared.from_args(args(**bad), names, "loss_all", "x")


def test_only_primaries_get_holm_and_verdict_words():
    # 3 seeds; static_max 0.05 below static_moe (sd 0.001), dense 0.05 above with noise; primaries vs static_moe
    base = [4.0, 4.1, 4.2]
    rows = [*[("static_moe", k, v) for k, v in enumerate(base)],
            *[("static_max", k, v - 0.05 + e) for k, (v, e) in enumerate(zip(base, (0.001, -0.001, 0)))],
            *[("dense", k, v + e) for k, (v, e) in enumerate(zip(base, (0.03, -0.02, 0.0)))]]
    results = pd.DataFrame(rows, columns=["strategy", "seed", "loss_all"]).assign(loss_code=lambda f: f["loss_all"])
    d = declared.Declaration([("static_max", "static_moe"), ("dense", "static_moe")], margin=0.02)
    comps = compare(results, ["loss_all", "loss_code"], d, ["dense", "static_moe", "static_max"])
    primary = comps[comps["family"] == "primary"].set_index("strategy")
    assert list(comps["family"][:2]) == ["primary", "primary"], "primaries first"
    assert list(primary["p_holm"]) == pytest.approx(holm(list(primary["p"])))
    assert primary.loc["static_max", "verdict"] == "better (lower loss)"     # t = -0.05/(0.001/sqrt 3): p tiny
    assert primary.loc["static_max", "margin_verdict"] == "not equivalent (beyond ±0.02)"
    assert primary.loc["dense", "verdict"] == "not significant"
    assert primary.loc["dense", "margin_verdict"] == "inconclusive"
    secondary = comps[comps["family"] != "primary"]
    assert set(secondary["metric"]) == {"loss_code"} and (secondary["verdict"] == "secondary, unadjusted").all()
    assert secondary["p_holm"].isna().all()
    # a primary whose arm did not run stays in the family
    d2 = declared.Declaration([("static_max", "static_moe"), ("morph", "static_moe")], margin=0.02)
    comps = compare(results, ["loss_all"], d2, ["dense", "static_moe", "static_max"])
    missing = comps[comps["strategy"] == "morph"].iloc[0]
    assert missing["verdict"] == "not run" and missing["family"] == "primary"
    got = comps[(comps["strategy"] == "static_max") & (comps["family"] == "primary")].iloc[0]
    assert got["p_holm"] == pytest.approx(min(1.0, 2 * got["p"]))


def test_shift_primaries_are_on_the_last_phase_only():
    rows = [(s, k, phase, 4.0 + 0.1 * k + (0.05 if s == "morph" else 0) + 0.001 * k * (s == "morph"))
            for s in ("static_moe", "morph") for k in range(3) for phase in (1, 2)]
    results = pd.DataFrame(rows, columns=["strategy", "seed", "phase", "end_loss_all"])
    d = declared.Declaration([("morph", "static_moe")], noninferiority=0.01, metric="end_loss_all")
    comps = compare(results, ["end_loss_all"], d, ["static_moe", "morph"], by=("phase",), primary_where={"phase": 2})
    by_phase = comps.set_index("phase")
    assert by_phase.loc[2, "family"] == "primary" and by_phase.loc[1, "family"] == "secondary, unadjusted"
    assert by_phase.loc[2, "verdict"] == "worse (higher loss)"        # +0.05, +0.051, +0.052: p tiny
    assert by_phase.loc[2, "margin_verdict"] == "inferior (lower bound > +0.01)"
    assert by_phase.loc[2, "p_holm"] == pytest.approx(by_phase.loc[2, "p"])   # a family of one
