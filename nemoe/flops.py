"""Training FLOPs of a NemoeLM: the one formula tools/bench.py (MFU) and tools/compare.py (compute
per run) use.

Per trained token (PaLM, Chowdhery et al. 2022, appendix B):

    6 N + 12 L T d

N: the parameters a token multiplies by: every non-expert parameter (the tied embedding once,
as the LM head; not the position table, a lookup), the top-k experts it is routed to per layer,
and the router rows of the experts live at that step (each live expert's logit is computed).
12 L T d: attention scores and weighted values, forward + backward, not halved for the causal
mask (PaLM's convention). Held-out evaluation and probe passes are not training FLOPs.

With top-k routing the expert term does not depend on how many experts live: k experts run per
token however many there are. The live count moves only the router term, 6 d per live expert
and layer, so a static MoE with experts_max experts costs about what one with experts_init
costs (its extra cost is memory and optimizer time, which FLOPs do not count). The
implementation computes the logits of every slot (free ones are masked); counted here are the
live ones, what a model holding only its live experts would compute.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def matmul_params_per_token(model, live: Sequence[int]) -> int:
    """N above for `live[i]` live experts in layer i (a model on the meta device works)."""
    active = model.count_params(live_experts=sum(live))["active_per_token"]   # every slot's router row
    router_row = model.moe_layers[0].router.weight.size(1)                        # d_model
    unused_rows = sum(layer.n_slots - n for layer, n in zip(model.moe_layers, live))
    return active - model.pos_emb.weight.numel() - router_row * unused_rows


def flops_per_token(model, seq_len: int, live: Sequence[int] | None = None) -> float:
    """Training FLOPs per token, 6 N + 12 L T d, with `live` experts per layer (None: as the
    model's active masks say; a model on the meta device needs them given)."""
    if live is None:
        live = [layer.n_active() for layer in model.moe_layers]
    d_model = model.tok_emb.weight.size(1)
    return 6 * matmul_params_per_token(model, live) + 12 * len(model.blocks) * seq_len * d_model


def training_flops(model, seq_len: int, rows: Iterable[tuple[int, Sequence[int]]],
                   initial: Sequence[int]) -> float:
    """Training FLOPs of a run from its training_log.csv: the sum over log intervals of the
    interval's tokens times flops_per_token at the experts live during it.

    rows: (tokens, live experts per layer) of each row, in step order; `initial`: live experts
    per layer at step 0. A row's interval ran with the previous row's count (events happen
    after a step's update, and that step's row shows the count after them). Exact when every
    event step has a row (log.every_steps divides the mechanisms' intervals); otherwise the
    steps between an event and the next row are counted at the count before the event.
    """
    total, before, live = 0.0, 0, list(initial)
    for tokens, now in rows:
        total += (tokens - before) * flops_per_token(model, seq_len, live)
        before, live = tokens, list(now)
    return total


def flops_split(model, seq_len: int, live: Sequence[int]) -> dict[str, float]:
    """flops_per_token's parts per trained token: the LM head (the tied embedding), attention
    (its projections and 12 L T d), the experts a token is routed to, the routers' live rows, and
    the rest (layer norms, biases outside the experts). They add up to flops_per_token."""
    d_model = model.tok_emb.weight.size(1)
    head = model.lm_head.weight.numel()
    attention = sum(p.numel() for block in model.blocks for p in block.attn.parameters())
    experts = sum(layer.top_k * sum(p[0].numel() for p in layer.experts.parameters())
                  for layer in model.moe_layers)
    router = d_model * sum(live)
    parts = {"lm_head": 6 * head, "attention": 6 * attention + 12 * len(model.blocks) * seq_len * d_model,
             "experts": 6 * experts, "router": 6 * router}
    parts["other"] = flops_per_token(model, seq_len, live) - sum(parts.values())
    return parts
