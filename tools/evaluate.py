#!/usr/bin/env python
"""Held-out loss and perplexity of a checkpoint per source and mixed, and expert usage.

    python tools/evaluate.py checkpoints/<run>/nemo_ckpt_step1000.pt
    python tools/evaluate.py checkpoints/<run> --config t4.yaml --batches 20 --json

The held-out text is the run's own (the data section of the config saved in the
checkpoint) unless `--config` names another config, whose data section is used
instead. Expert usage is each live expert's share of the token-choices routed in
its layer on that text, read from the model's returned routing counts.
"""

from __future__ import annotations

import json
import math
import sys

from nemoe import checkpoint_layout as layout
from nemoe.errors import UserError
from tools.checkpoints import checkpoint_parser, load_model
from tools.cli import guard, note


def parse_args(argv):
    p = checkpoint_parser(__doc__)
    p.add_argument("--config", default=None, metavar="NAME",
                   help="take the held-out data from this config (NAME, configs/NAME[.yaml]); "
                        "default: the checkpoint's own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config, e.g. --set data.heldout_fraction=0.05")
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help="held-out batches per source (default: the config's eval.batches)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per batch (default: the config's eval.batch_size)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def evaluate(model, batches_by_source: dict, records: list[list[dict | None]]) -> dict:
    """Loss per source and mixed (token-weighted), and per-layer usage shares."""
    import torch
    from nemoe.model import split_block   # torch: imported once the arguments are checked, as in main

    device = next(model.parameters()).device
    sources, n_layers = {}, len(model.moe_layers)
    counts = torch.zeros(n_layers, model.moe_layers[0].n_slots, dtype=torch.float64)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for source, batches in batches_by_source.items():
            nll, n_tokens = 0.0, 0
            for block in batches:
                inputs, targets = split_block(block.to(device))           # (B, T) each
                out = model(inputs, targets)
                nll += out.loss_ce.item() * targets.numel()               # mean -> sum over tokens
                n_tokens += targets.numel()
                counts += torch.stack(out.counts).double().cpu()          # (L, E) token-choices
            if n_tokens == 0:
                note(f"source {source!r}: no held-out batches, skipped")
                continue
            sources[source] = _loss_entry(nll / n_tokens, n_tokens)
            total_nll, total_tokens = total_nll + nll, total_tokens + n_tokens
    if total_tokens == 0:
        raise UserError("no held-out text to evaluate on (every source came back empty)")
    sources["all"] = _loss_entry(total_nll / total_tokens, total_tokens)

    usage = []
    for layer in range(n_layers):
        share = counts[layer] / counts[layer].sum().clamp_min(1)
        live = sorted(((slot, r) for slot, r in enumerate(records[layer]) if r is not None),
                      key=lambda item: item[1]["id"])
        p = share[share > 0]
        usage.append({
            "layer": layer,
            "experts": [{"id": r["id"], "slot": slot, "origin": r.get("origin", "?"),
                         "share": float(share[slot])} for slot, r in live],
            "entropy": float(-(p * p.log()).sum()) + 0.0,   # + 0.0: no "-0.000" for one expert
            "max_load": float(share.max() * len(live)) if live else 0.0,  # busiest share / mean share
        })
    return {"sources": sources, "usage": usage}


def _loss_entry(loss: float, tokens: int) -> dict:
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    console.print(f"{result['checkpoint']}  (step {result['step']:,}, {result['tokens_trained']:,} tokens "
                  f"trained; {result['batches']} × {result['batch_size']} × {result['seq_len']} tokens "
                  f"per source)")
    losses = Table(title="held-out loss", title_justify="left")
    for name in ("source", "loss", "perplexity", "tokens"):
        losses.add_column(name, justify="left" if name == "source" else "right")
    for source, r in result["sources"].items():
        losses.add_row("mixed" if source == "all" else source, f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
                       f"{r['tokens']:,}", style="bold" if source == "all" else None)
    console.print(losses)
    usage = Table(title="expert usage on this text (share of routed token-choices)", title_justify="left")
    for name in ("layer", "experts (id: share)", "entropy", "max/mean"):
        usage.add_column(name, justify="left" if name.startswith(("layer", "experts")) else "right")
    for u in result["usage"]:
        shares = "  ".join(f"#{e['id']}: {100 * e['share']:.1f}%" for e in u["experts"])
        usage.add_row(str(u["layer"]), shares, f"{u['entropy']:.3f}", f"{u['max_load']:.2f}")
    console.print(usage)


@guard
def main(argv=None):
    args = parse_args(argv)
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1")
    if args.overrides and not args.config:
        raise UserError("--set changes a --config; name one (e.g. --config local.yaml)")
    # torch and datasets only after the arguments are checked: --help and a wrong flag answer at once.
    from nemoe.config import load_config
    from nemoe.data import heldout_batches
    from nemoe.tokenizer import get_tokenizer

    model, cfg, state, path = load_model(args.checkpoint, args.device)
    data_cfg = cfg if args.config is None else load_config(args.config, args.overrides)
    n_batches = args.batches or data_cfg.eval.batches
    batch_size = args.batch_size or data_cfg.eval.batch_size
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    batches = heldout_batches(data_cfg.data, tokenizer, cfg.model.seq_len, n_batches, batch_size)
    result = {"checkpoint": str(path), "step": int(layout.step(state)),
              "tokens_trained": int(layout.tokens(state)),
              "batches": n_batches, "batch_size": batch_size, "seq_len": cfg.model.seq_len,
              **evaluate(model, batches, layout.expert_records(state))}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    sys.exit(main())
