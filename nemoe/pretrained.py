"""Start from a pretrained GPT-2: take its shape, import and upcycle its weights, export back.

nemoe's blocks are GPT-2's (pre-norm, learned positions, tied embeddings, the same q/k/v
layout and head split, 1/sqrt(head size) attention scale), so a GPT-2-family model maps
onto a nemoe model by name (`transformers`' GPT2LMHeadModel names on the left):

    transformer.wte.weight             tok_emb.weight (= lm_head.weight: tied in both)
    transformer.wpe.weight[:seq_len]   pos_emb.weight (positions beyond model.seq_len are cut)
    transformer.h.<i>.ln_1 / ln_2      blocks.<i>.ln_attn / ln_moe
    transformer.h.<i>.attn.c_attn      blocks.<i>.attn.qkv    (a Conv1D (C, 3C): the Linear's weight transposed)
    transformer.h.<i>.attn.c_proj      blocks.<i>.attn.proj   (transposed)
    transformer.h.<i>.mlp.c_fc         blocks.<i>.moe.experts.w_in / b_in of every live slot (same layout)
    transformer.h.<i>.mlp.c_proj       blocks.<i>.moe.experts.w_out / b_out of every live slot
    transformer.ln_f                   ln_f

Every tensor of the source must be used (else the import stops and names the rest).

Upcycling, and when the source's function is preserved. Each layer's dense FFN F is
copied into the `moe.experts_init` live slots; the router keeps the fresh N(0, 0.02)
rows NemoeLM drew from the global generator right after `Runtime.seed(train.seed)`,
as in every run (the import itself draws no random numbers, so a seed gives the same
router, data order and dropout with or without a source). With identical copies a
token's layer output is sum_i g_i F(x) over its selected experts i, so the MoE layer
equals the dense one exactly when the selected gates sum to one:

    top_k = 2       gates = softmax over the two selected logits: they sum to 1 for any
                    router, at any experts_init >= 2 -> the source's function (to rounding)
    one live expert experts_init = 1, or experts_max = 1 (a dense fine-tune): gate 1 -> exact
    top_k = 1, n>=2 the Switch gate is the chosen expert's router probability p (about 1/n
                    for a small fresh router): the FFN term is scaled by p -> NOT preserved

so an imported model defaults to top-2 (`adopt_source`, nemoe/config/init_from.py). After step 0 the copies
diverge only through what the router gives them (with two experts at top-2 every token
reaches both, weighted differently), and through morphogenesis: a split clones one
expert plus relative noise, entering at routing weight 0, so the output stays unchanged
at each birth (the first splits copy copies: diversity grows from the noise and routing).

Export (tools/export_hf.py): a model with one live expert per layer becomes a
`GPT2LMHeadModel` folder (`config.json` + `model.safetensors`): head gates, layer
influence and attention temperature are folded into the weights (a pruned head is
exported as zeroed q/k/v rows and proj columns), positions are the model's seq_len.
A mixture is written in nemoe's own format instead: `model.safetensors` (the state dict)
and `nemoe.json` (config, progress, expert records), read back without pickle by
`read_nemoe` (tools/generate.py and tools/evaluate.py accept such a folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemoe import checkpoint_layout as layout
from nemoe.config.init_from import (LAYER_NORM_EPS, quiet_transformers, shape_of, source_config, source_location,
                                    source_unavailable)
from nemoe.errors import UserError

# model.activation -> transformers' activation_function, for export (the reverse: nemoe/config/init_from.py).
EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}

NEMOE_JSON, WEIGHTS_FILE, NEMOE_FORMAT = "nemoe.json", "model.safetensors", "nemoe-safetensors-v1"


# --------------------------------------------------------------------------- #
# Reading a source's weights through transformers (its config: nemoe/config/init_from.py)
# --------------------------------------------------------------------------- #

def load_source(source: str):
    """The source as a GPT2LMHeadModel in eval mode; every weight must be in its files."""
    from transformers import GPT2LMHeadModel
    shape_of(source_config(source), source)   # refuses other architectures with a clear message
    try:
        with quiet_transformers():
            # In the files' dtype (fp32 for the GPT-2 releases); copy_gpt2_weights casts to fp32.
            model, info = GPT2LMHeadModel.from_pretrained(source_location(source), output_loading_info=True)
    except (OSError, ValueError) as err:
        raise source_unavailable(source, err) from None
    missing = sorted(k for k in info["missing_keys"] if k != "lm_head.weight")   # lm_head is tied to wte
    if missing or info["mismatched_keys"]:
        raise UserError(f"model.init_from {source!r}: its weight files lack or misshape "
                        f"{', '.join(missing + sorted(map(str, info['mismatched_keys'])))[:300]}")
    # Anything in the files transformers left out would be lost: refuse (causal masks are no loss).
    unknown = sorted(k for k in info["unexpected_keys"] if not is_causal_mask(k))
    if unknown:
        raise UserError(f"model.init_from {source!r}: tensors nemoe has no place for: {', '.join(unknown)[:300]}")
    return model.eval()


def is_causal_mask(name: str) -> bool:
    """Older transformers kept each layer's causal mask (attn.bias, attn.masked_bias) in the state
    dict and in the files they wrote: buffers, not weights, so nothing of the model is lost without them."""
    return name.endswith((".attn.bias", ".attn.masked_bias"))


# --------------------------------------------------------------------------- #
# Import: GPT-2 weights -> a nemoe model
# --------------------------------------------------------------------------- #

def preservation(cfg) -> str:
    """Whether the imported model computes the source's function at step 0, and why (for the log)."""
    e = cfg.moe
    if e.experts_max == 1:
        return "dense fine-tune: the one expert slot is the source's FFN, so the model computes the source's function"
    copies = (f"upcycled: each FFN copied into {e.experts_init} expert(s) of {e.experts_max} slots, "
              f"fresh router N(0, 0.02) from train.seed")
    if e.experts_init == 1:
        return copies + "; one live expert has gate 1, so the model computes the source's function at step 0"
    if e.top_k == 2:
        return copies + "; top-2 gates sum to one over identical copies, so the model computes the source's " \
                        "function at step 0"
    return copies + (f"; the top-1 Switch gate scales each FFN output by the chosen expert's router probability "
                     f"(about 1/{e.experts_init} at step 0), so the model does NOT compute the source's function "
                     f"at step 0 (moe.top_k=2 would)")


def import_weights(model, cfg) -> list[str]:
    """Load cfg.model.init_from into `model` (a NemoeLM built from cfg); notes for the run's log."""
    source = cfg.model.init_from
    hf = load_source(source)
    tensors = hf.state_dict()
    n_positions = hf.config.n_positions
    del hf
    used = copy_gpt2_weights(model, tensors, source)
    return [f"weights from {source}: {len(used)} of its {len(tensors)} tensors mapped onto the model "
            f"(GPT-2, {cfg.model.n_layers} layers x {cfg.model.n_heads} heads, d_model {cfg.model.d_model}, "
            f"FFN {cfg.d_expert}, {cfg.model.activation}); positions 0..{cfg.model.seq_len - 1} of its "
            f"{n_positions} kept", preservation(cfg)]


@torch.no_grad()
def copy_gpt2_weights(model, tensors: dict[str, torch.Tensor], source: str = "the source") -> set[str]:
    """Write GPT2LMHeadModel `tensors` (state-dict names) into `model`; returns the names used.

    Every source tensor must be used: a tied lm_head.weight counts when it equals the embedding,
    and a causal mask (`is_causal_mask`) is not a weight."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"model.init_from {source!r}: no tensor {name} (not a GPT2LMHeadModel?)")
        used.add(name)
        return tensors[name].float()

    def put(dst: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if dst.shape != value.shape:
            raise UserError(f"model.init_from {source!r}: {name} has shape {tuple(value.shape)}, "
                            f"the model's tensor {tuple(dst.shape)}")
        dst.copy_(value)

    put(model.tok_emb.weight, take("transformer.wte.weight"), "transformer.wte.weight")
    put(model.pos_emb.weight, take("transformer.wpe.weight")[:model.seq_len], "transformer.wpe.weight")
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        pairs = [(block.ln_attn.weight, "ln_1.weight"), (block.ln_attn.bias, "ln_1.bias"),
                 (block.attn.qkv.bias, "attn.c_attn.bias"), (block.attn.proj.bias, "attn.c_proj.bias"),
                 (block.ln_moe.weight, "ln_2.weight"), (block.ln_moe.bias, "ln_2.bias")]
        for dst, name in pairs:
            put(dst, take(p + name), p + name)
        for dst, name in ((block.attn.qkv.weight, "attn.c_attn.weight"), (block.attn.proj.weight, "attn.c_proj.weight")):
            put(dst, take(p + name).t(), p + name)   # Conv1D (in, out) -> Linear (out, in)
        experts = block.moe.experts
        ffn = {name: take(p + "mlp." + name) for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")}
        for slot in block.moe.active.nonzero().flatten().tolist():   # the live slots: identical copies
            for dst, name in ((experts.w_in, "c_fc.weight"), (experts.b_in, "c_fc.bias"),
                              (experts.w_out, "c_proj.weight"), (experts.b_out, "c_proj.bias")):
                put(dst[slot], ffn[name], p + "mlp." + name)
    put(model.ln_f.weight, take("transformer.ln_f.weight"), "transformer.ln_f.weight")
    put(model.ln_f.bias, take("transformer.ln_f.bias"), "transformer.ln_f.bias")
    if "lm_head.weight" in tensors:
        if not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"]):
            raise UserError(f"model.init_from {source!r}: lm_head.weight differs from the token embedding; "
                            f"nemoe ties them (GPT-2 does)")
        used.add("lm_head.weight")
    unused = sorted(name for name in set(tensors) - used if not is_causal_mask(name))
    if unused:
        raise UserError(f"model.init_from {source!r}: tensors nemoe has no place for: {', '.join(unused)[:300]}")
    return used


# --------------------------------------------------------------------------- #
# Export: a nemoe model -> a GPT2LMHeadModel folder, or nemoe's own safetensors + JSON
# --------------------------------------------------------------------------- #

def mixture_layers(model) -> list[tuple[int, int]]:
    """(layer, live experts) of every layer that is not a single live expert (a dense FFN)."""
    return [(i, layer.n_active()) for i, layer in enumerate(model.moe_layers) if layer.n_active() != 1]


@torch.no_grad()
def gpt2_state(model) -> dict[str, torch.Tensor]:
    """The model as GPT2LMHeadModel tensors; every layer must have one live expert (gate 1).

    Folded into the weights, exactly: head gates g into proj columns (g = 0: the head's q/k/v rows,
    biases and proj columns are zeroed), layer influence s into both residual branches' output
    projections, attention temperature t into the q rows (q / t)."""
    mixed = mixture_layers(model)
    if mixed:
        raise UserError("a GPT2LMHeadModel has one dense FFN per block, and none of transformers' MoE models "
                        "(Mixtral, Qwen2-MoE, Switch, ...) has GPT-2's blocks (learned positions, LayerNorm, "
                        "GELU experts with biases) with nemoe's router (Switch top-1 / top-2 gates, routing "
                        "offsets of newborns); live experts per layer: "
                        + ", ".join(f"L{i}: {n}" for i, n in mixed) + ". Export with --format nemoe instead.")
    sd = {"transformer.wte.weight": model.tok_emb.weight.clone(), "transformer.wpe.weight": model.pos_emb.weight.clone(),
          "transformer.ln_f.weight": model.ln_f.weight.clone(), "transformer.ln_f.bias": model.ln_f.bias.clone()}
    for i, block in enumerate(model.blocks):
        attn, p = block.attn, f"transformer.h.{i}."
        C = attn.proj.weight.size(0)
        hs, s, t = C // attn.n_heads, block.influence.item(), attn.temperature.item()
        qkv_w, qkv_b = attn.qkv.weight.clone(), attn.qkv.bias.clone()
        qkv_w[:C] /= t
        qkv_b[:C] /= t
        proj_w = attn.proj.weight * s
        gates = attn.head_gate.tolist() if attn.head_gate is not None else [1.0] * attn.n_heads
        for h, g in enumerate(gates):
            proj_w[:, h * hs:(h + 1) * hs] *= g
            if g == 0:
                for part in range(3):
                    rows = slice(part * C + h * hs, part * C + (h + 1) * hs)
                    qkv_w[rows], qkv_b[rows] = 0, 0
        slot = int(block.moe.active.nonzero()[0])
        e = block.moe.experts
        sd.update({p + "ln_1.weight": block.ln_attn.weight, p + "ln_1.bias": block.ln_attn.bias,
                   p + "attn.c_attn.weight": qkv_w.t(), p + "attn.c_attn.bias": qkv_b,
                   p + "attn.c_proj.weight": proj_w.t(), p + "attn.c_proj.bias": attn.proj.bias * s,
                   p + "ln_2.weight": block.ln_moe.weight, p + "ln_2.bias": block.ln_moe.bias,
                   p + "mlp.c_fc.weight": e.w_in[slot], p + "mlp.c_fc.bias": e.b_in[slot],
                   p + "mlp.c_proj.weight": e.w_out[slot] * s, p + "mlp.c_proj.bias": e.b_out[slot] * s})
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]   # tied
    return sd


def write_gpt2(model, cfg, out: Path) -> None:
    """`out` as a GPT2LMHeadModel folder (config.json + model.safetensors) that transformers loads."""
    from transformers import GPT2Config, GPT2LMHeadModel
    sd = gpt2_state(model)
    m = cfg.model
    hf_config = GPT2Config(vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                           n_head=m.n_heads, n_inner=None if cfg.d_expert == 4 * m.d_model else cfg.d_expert,
                           activation_function=EXPORT_ACTIVATION[m.activation], resid_pdrop=m.dropout,
                           embd_pdrop=m.dropout, attn_pdrop=m.dropout, layer_norm_epsilon=LAYER_NORM_EPS,
                           tie_word_embeddings=True)
    with quiet_transformers():
        hf = GPT2LMHeadModel(hf_config)
        hf.load_state_dict(sd, strict=True)
        hf.save_pretrained(out)


def write_nemoe(model, state: dict, out: Path) -> None:
    """`out` as nemoe's own format: model.safetensors (the state dict; lm_head is tied to tok_emb)
    and nemoe.json (format, config, step, tokens, expert records): no pickle to read it back."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": NEMOE_FORMAT})
    meta = {"format": NEMOE_FORMAT, "step": int(layout.step(state)), "tokens": int(layout.tokens(state)),
            "config": layout.config(state), "expert_records": layout.expert_records(state)}
    (out / NEMOE_JSON).write_text(json.dumps(meta, indent=1, allow_nan=False), encoding="utf-8")


def is_nemoe_folder(path: Path) -> bool:
    return path.is_dir() and (path / NEMOE_JSON).is_file()


def read_nemoe(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(nemoe.json's contents, the model's state dict) of a folder written by `write_nemoe`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        meta = json.loads((folder / NEMOE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as err:
        raise UserError(f"{folder}: unreadable nemoe export ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != NEMOE_FORMAT or not all(
            key in meta for key in ("step", "tokens", "config", "expert_records")) or "tok_emb.weight" not in tensors:
        raise UserError(f"{folder}: {NEMOE_JSON} is not a nemoe export (expected format {NEMOE_FORMAT})")
    tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    return meta, tensors
