"""tools/bench.py's verdicts and its printed tables: each target against its measured figure,
one line per figure, grouped by section, and (--flops) the training FLOPs split per token."""

from __future__ import annotations

from nemoe.config import load_config
from nemoe.flops import flops_split
from tools.comparison.results import meta_model


def targets(results: dict) -> list[dict]:
    """Each issue target: measured value, the bar, met or not (None: section not run)."""
    def get(section, *keys):
        value = results.get(section)
        for key in keys:
            if not isinstance(value, (dict, list)):
                return None
            value = value[key] if isinstance(value, list) else value.get(key)
        return value

    def e4k1():
        for row in get("moe_layer", "rows") or []:
            if row["n_experts"] == 4 and row["top_k"] == 1:
                return row["sorted_vs_seed"]
        return None

    checks = [("MoE / dense tokens/s (equal active params)", get("throughput", "moe_vs_dense"), ">=", 0.85),
              ("MoE layer: sorted vs seed-style, E=4 k=1", e4k1(), ">=", 3.0),
              ("morph overhead share at interval 1000", get("morph", "share_at_t4_interval"), "<", 0.01),
              ("data pipeline / trainer consumption", get("data", "ratio"), ">=", 10.0),
              ("checkpoint: loop blocked per save (s)", get("checkpoint", "blocked_s"), "<", 0.5),
              ("resume to first step (s)", get("checkpoint", "resume_to_first_step_s"), "<", 10.0),
              ("t4 micro-batch fits 15 GB (plan)", get("memory", "fits"), "==", True),
              ("slow source, read-ahead: tokens/s vs no delay", get("prefetch", "slow_vs_fast_prefetch_8"), ">=", 0.95)]
    rows = []
    for name, value, op, bar in checks:
        met = None if value is None else {">=": value >= bar, "<": value < bar, "==": value == bar}[op]
        rows.append({"target": name, "value": value, "op": op, "bar": bar, "met": met})
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def table_lines(results: dict) -> list[str]:
    """The human-readable table: one line per figure."""
    lines = []
    add = lambda section, what, value: lines.append(f"{section:<11} {what:<48} {value}")  # noqa: E731
    if "throughput" in results:
        r = results["throughput"]
        for name, tps in r["tokens_per_s"].items():
            add("throughput", f"{name} tokens/s (fwd+bwd+AdamW)", f"{tps:,.0f}")
        add("throughput", "MoE / dense (equal active params)", f"{r['moe_vs_dense']:.2f}x")
        add("throughput", "MoE / seed-style (all experts, masked)", f"{r['moe_vs_seed_style']:.2f}x")
    if "mfu" in results:
        r = results["mfu"]
        add("mfu", f"peak matmul fp32 ({r['matmul_n']}^2)", f"{r['peak_matmul_flops'] / 1e9:,.1f} GFLOP/s")
        for name, value in r["mfu"].items():
            add("mfu", f"{name} MFU", f"{100 * value:.1f} %")
    if "moe_layer" in results:
        for row in results["moe_layer"]["rows"]:
            times = " ".join(f"{k} {v:.1f}" for k, v in row["ms"].items())
            add("moe_layer", f"E={row['n_experts']} k={row['top_k']} ms: fastest {row['fastest']}",
                f"{times} | sorted vs seed {row['sorted_vs_seed']:.2f}x")
    if "morph" in results:
        r = results["morph"]
        add("morph", f"step / evolve ({r['events']} events in {r['evolve_calls']} calls)",
            f"{r['step_s'] * 1e3:.0f} ms / {r['evolve_s'] * 1e3:.0f} ms "
            f"(probe {r['probe_s_per_evolve'] * 1e3:.0f} ms)")
        add("morph", f"overhead at interval {r['interval_timed']} (measured)",
            f"{100 * r['share_at_timed_interval']:.1f} %")
        add("morph", f"overhead at interval {r['t4_interval']} (extrapolated)",
            f"{100 * r['share_at_t4_interval']:.3f} %")
    if "checkpoint" in results:
        r = results["checkpoint"]
        add("checkpoint", f"size ({r['model_params']:,} params + AdamW)", human_bytes(r["size_bytes"]))
        add("checkpoint", "save on the loop (synchronous) / load", f"{r['save_s']:.2f} s / {r['load_s']:.2f} s")
        add("checkpoint", "loop blocked per background save (first) / its write",
            f"{r['blocked_s']:.2f} s ({r['blocked_s_first_save']:.2f} s) / {r['background_write_s']:.2f} s")
        peak = r["peak_extra_rss_bytes"]
        add("checkpoint", "snapshot size / peak extra resident memory",
            f"{human_bytes(r['snapshot_bytes'])} / {human_bytes(peak) if peak is not None else 'n/a'}")
        during = r["step_s_during_write"]
        add("checkpoint", f"step quiet / during a write ({r['steps_during_write']} steps)",
            f"{r['step_s_quiet']:.2f} s / " + (f"{during:.2f} s" if during is not None else "-"))
        add("checkpoint", "mirror copy + read-back verification", f"{r['mirror_copy_verify_s']:.2f} s")
        add("checkpoint", "resume to first step (open + restore + step)", f"{r['resume_to_first_step_s']:.2f} s")
    if "data" in results:
        r = results["data"]
        add("data", "text -> packed blocks tokens/s",
            f"{r['tokens_per_s']:,.0f} (start-up {r['startup_s']:.2f} s)")
        add("data", "data / trainer consumption", f"{r['ratio']:,.0f}x")
    if "prefetch" in results:
        r = results["prefetch"]
        t = r["tokens_per_s"]
        for depth in (0, 8):
            add("prefetch", f"read-ahead {depth}: tokens/s, {r['delay_s'] * 1e3:.0f} ms/doc vs none "
                            f"({r['documents_per_step']:.1f} docs/step)",
                f"{t[f'prefetch_{depth}_slow']:,.0f} vs {t[f'prefetch_{depth}']:,.0f} "
                f"({r[f'slow_vs_fast_prefetch_{depth}']:.3f}x)")
    if "parquet" in results:
        r = results["parquet"]
        add("parquet", f"file: {human_bytes(r['bytes'])}, {r['rows']:,} rows, {r['row_groups']} row groups",
            f"written in {r['write_s']:.0f} s")
        add("parquet", f"resume at row {r['position_rows']:,}: row-group shards / per file",
            f"{r['resume_s_row_groups']:.2f} s / {r['resume_s_files']:.2f} s")
    if "memory" in results:
        r, b = results["memory"], results["memory"]["bytes"]
        add("memory", f"t4 params ({r['params']:,}) / grads / AdamW",
            f"{human_bytes(b['params'])} / {human_bytes(b['grads'])} / {human_bytes(b['adamw_state'])}")
        add("memory", f"activations + logits transient at micro-batch {r['micro_batch']}",
            f"{human_bytes(b['activations_at_micro_batch'])} + {human_bytes(b['transient_at_micro_batch'])}")
        add("memory", "total / largest micro-batch under 15 GB",
            f"{human_bytes(b['total_at_micro_batch'])} / {r['largest_micro_batch']}")
    if "gpu" in results:
        r = results["gpu"]
        if "skipped" in r:
            add("gpu", "skipped", r["skipped"])
        else:
            t = r["t4_fp16"]
            add("gpu", f"t4 fp16+GradScaler tokens/s ({r['device_name']})",
                f"{t['tokens_per_s']:,.0f}, MFU {100 * t['mfu_fp16']:.1f} %, scale {t['scale']:g}")
            add("gpu", "t4 peak memory / largest micro-batch (15 GB cap)",
                f"{human_bytes(t['peak_bytes'])} / {r['largest_micro_batch_measured']}")
            c = r["compile"]
            add("gpu", "torch.compile", f"{c['speedup']:.2f}x" if "speedup" in c else c["error"])
    lines.append("")
    for t in targets(results):
        if t["met"] is not None:
            value = t["value"] if isinstance(t["value"], bool) else f"{t['value']:.4g}"
            lines.append(f"target  {t['target']:<46} {value} {t['op']} {t['bar']}: "
                         f"{'met' if t['met'] else 'NOT MET'}")
    return lines


def flops_split_lines(configs: list[str]) -> list[str]:
    """A markdown table: per config, training FLOPs per token and each part's share (nemoe.flops)."""
    lines = ["| config | tokenizer | FLOPs/token | LM head | attention | experts | router | rest |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in configs:
        cfg = load_config(name.strip())
        parts = flops_split(meta_model(cfg), cfg.model.seq_len, [cfg.moe.experts_init] * cfg.model.n_layers)
        total = sum(parts.values())
        lines.append(f"| {cfg.name} | {cfg.data.tokenizer} | {total / 1e6:.2f} M | "
                     + " | ".join(f"{parts[k] / total:.1%}" for k in ("lm_head", "attention", "experts", "router", "other"))
                     + " |")
    return lines
