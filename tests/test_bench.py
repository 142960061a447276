"""tools/bench.py end to end on tiny shapes: every section present, its figures plausible.

No timing is asserted (DESIGN §9). What is checked is what could be wrong: the
models compared have the parameters they claim, every dispatch computes the same
function, utilisation stays below the measured peak, the morph overhead falls with
the interval, a checkpoint resumes, the memory plan matches the shapes.
"""

from __future__ import annotations

import json
import math

import pytest

from nemoe.config import find_config, read_yaml
from tools import bench
from tools.bench_slots import VARIANTS, bench_free_slots, free_slot_lines

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def test_every_section_is_reported(report):
    assert set(report["sections"]) == set(bench.SECTIONS)
    assert report["quick"] is True and report["device"] == "cpu"
    assert report["sections"]["gpu"] == {"skipped": "no CUDA device in this run"}


def test_throughput_ratios_and_flops(report):
    r, s = report["sections"]["throughput"], bench.QUICK
    tps = r["tokens_per_s"]
    assert set(tps) == {"moe", "dense", "seed_style"} and all(v > 0 for v in tps.values())
    # Equal active parameters: the two models differ only by the router's extra rows.
    assert r["active_params"]["moe"] - r["active_params"]["dense"] == s.d_model * (s.n_experts - 1) * s.n_layers
    for name in ("moe", "dense"):   # 6 N + 12 L T d, N without the position table
        n_matmul = r["active_params"][name] - s.seq_len * s.d_model
        assert r["flops_per_token"][name] == 6 * n_matmul + 12 * s.n_layers * s.seq_len * s.d_model


def test_mfu_stays_below_the_measured_peak(report):
    r = report["sections"]["mfu"]
    assert r["peak_matmul_flops"] > 0
    for name in ("moe", "dense"):   # a FLOP count too high for the model would push this past 1
        assert 0 < r["mfu"][name] < 1


def test_moe_layer_variants_agree_and_fastest_is_the_minimum(report):
    rows = report["sections"]["moe_layer"]["rows"]
    assert {(r["n_experts"], r["top_k"]) for r in rows} == {(e, k) for e in (2, 4, 8) for k in (1, 2)}
    for row in rows:
        assert set(row["ms"]) == set(bench.DISPATCH) and all(v > 0 for v in row["ms"].values())
        # Every dispatch computes the same function as nemoe's MoELayer.
        assert all(d < 1e-4 for d in row["max_abs_diff"].values()), row["max_abs_diff"]
        assert row["fastest"] == min(row["ms"], key=row["ms"].get)
        assert close(row["sorted_vs_seed"], row["ms"]["seed_all_experts"] / row["ms"]["sorted"])


def test_morph_overhead_falls_with_the_interval(report):
    r, s = report["sections"]["morph"], bench.QUICK
    assert r["steps"] == s.morph_interval * s.morph_intervals
    assert r["evolve_calls"] == s.morph_intervals and r["events"] > 0
    assert 0 < r["probe_s_per_evolve"] <= r["evolve_s"]
    assert 0 < r["share_at_t4_interval"] < r["share_at_timed_interval"] < 1
    assert sum(r["expert_counts"]) > 2 * s.n_layers   # splits happened (t4's 2 experts at start)


def test_checkpoint_holds_model_and_adamw_and_resumes(report):
    r = report["sections"]["checkpoint"]
    # fp32 weights + AdamW's two moments: at least 12 bytes per parameter.
    assert r["size_bytes"] >= 12 * r["model_params"]
    assert r["resumed_step"] == r["saved_step"] > 0
    assert 0 < r["resume_open_s"] <= r["resume_to_first_step_s"]
    assert r["save_s"] > 0 and r["load_s"] > 0
    assert r["blocked_s"] > 0 and r["background_write_s"] > 0 and r["mirror_copy_verify_s"] > 0
    # The snapshot copies weights and AdamW's moments once each (tied embeddings once).
    assert 12 * r["model_params"] <= r["snapshot_bytes"] <= r["size_bytes"]


def test_slow_source_figures_are_ratios_of_the_measured_rates(report):
    r = report["sections"]["prefetch"]
    t = r["tokens_per_s"]
    assert set(t) == {"prefetch_0", "prefetch_0_slow", "prefetch_8", "prefetch_8_slow"} and min(t.values()) > 0
    for depth in (0, 8):
        assert close(r[f"slow_vs_fast_prefetch_{depth}"], t[f"prefetch_{depth}_slow"] / t[f"prefetch_{depth}"])


def test_parquet_resume_is_measured_in_both_layouts(report):
    r = report["sections"]["parquet"]
    assert r["bytes"] >= 4e6 and r["row_groups"] >= 2 and 0 < r["position_rows"] < r["rows"]
    assert r["resume_s_row_groups"] > 0 and r["resume_s_files"] > 0


def test_data_ratio_is_against_the_trainer_figure(report):
    r = report["sections"]["data"]
    assert r["tokens_per_s"] > 0
    assert r["trainer_tokens_per_s"] == report["sections"]["throughput"]["tokens_per_s"]["moe"]


def t4_param_count() -> int:
    """NemoeLM's parameters for configs/t4.yaml, counted by hand from its shapes."""
    raw = read_yaml(find_config("t4.yaml"))
    m, e = raw["model"], raw["moe"]
    d, L, T, V = m["d_model"], m["n_layers"], m["seq_len"], 50257
    H, E = m.get("d_expert") or 4 * d, e["experts_max"]
    block = (2 * 2 * d                 # two LayerNorms
             + 3 * d * d + 3 * d       # qkv
             + d * d + d               # attention projection
             + E * d                   # router (no bias)
             + E * (2 * d * H + H + d))   # expert slots
    return V * d + T * d + L * block + 2 * d   # tied embedding, positions, blocks, final norm


def test_memory_plan_is_consistent(report):
    r = report["sections"]["memory"]
    b, n = r["bytes"], r["params"]
    assert n == t4_param_count()
    assert (b["params"], b["grads"], b["adamw_state"]) == (4 * n, 4 * n, 8 * n)
    act1, act2 = r["activation_bytes_measured"]
    assert 0 < act1 < act2
    b1, b2 = r["measured_at"]
    assert close(r["activation_bytes_per_sequence"], (act2 - act1) / (b2 - b1))
    static = b["params"] + b["grads"] + b["adamw_state"]
    activations = b["activations_at_micro_batch"] + b["transient_at_micro_batch"]
    assert close(b["total_at_micro_batch"], static + activations)
    assert r["fits"] == (b["total_at_micro_batch"] <= r["cap_bytes"])
    # The largest micro-batch is the last one under the cap.
    per_seq = r["activation_bytes_per_sequence"] + b["transient_at_micro_batch"] / r["micro_batch"]
    fixed = b["activations_at_micro_batch"] - r["micro_batch"] * r["activation_bytes_per_sequence"]
    total = lambda m: static + fixed + m * per_seq  # noqa: E731
    assert total(r["largest_micro_batch"]) <= r["cap_bytes"] < total(r["largest_micro_batch"] + 1)
    assert r["micro_batch"] == read_yaml(find_config("t4.yaml"))["train"]["batch_size"]


def test_targets_are_judged_from_the_figures(report):
    rows = {t["target"]: t for t in report["targets"]}
    assert len(rows) == 8
    for t in rows.values():
        assert t["value"] is not None
        ok = {">=": t["value"] >= t["bar"], "<": t["value"] < t["bar"], "==": t["value"] == t["bar"]}[t["op"]]
        assert t["met"] == ok
    assert rows["checkpoint: loop blocked per save (s)"]["value"] == report["sections"]["checkpoint"]["blocked_s"]


def test_only_adds_the_sections_a_section_needs():
    assert bench.selected_sections("mfu") == ["throughput", "mfu"]
    assert bench.selected_sections("data,memory") == ["throughput", "data", "memory"]


def test_unknown_section_is_one_clear_error(capsys):
    assert bench.main(["--only", "speed"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and "throughput" in err


def test_free_slots_cost_no_optimizer_state_and_the_table_has_every_pool():
    results = bench_free_slots(["study_bytes.yaml"], batch=1, steps=1, rounds=1)
    rows = {r["variant"]: r for r in results["study_bytes.yaml"]}
    assert list(rows) == [name for name, *_ in VARIANTS]
    small, free, before, full = (rows[name]["state_bytes"] for name, *_ in VARIANTS)
    assert free == small, "6 free slots add no optimizer state"
    assert before > 3 * small and abs(before - full) < 1024, "before: every slot had moments, as if all were live"
    assert all(r["step_s"] > 0 and r["optim_s"] > 0 for r in rows.values())
    table = free_slot_lines(results, 1, 1, 1)
    assert sum(line.startswith("| 8 slots") for line in table) == 3 and "| 2 slots, 2 live |" in "\n".join(table)
