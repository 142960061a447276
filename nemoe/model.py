"""Causal decoder-only transformer whose feed-forward layers are MoE pools.

Read top to bottom: attention, block, model. Shapes: B batch, T time, C width,
V vocabulary, E expert slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nemoe.moe import MoELayer


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally with one gate per head.

    With head gates (plasticity.heads), y = proj(concat_h(g_h * attn_h)): a head
    with g_h = 0 contributes exactly nothing and its q/k/v/proj slices receive no
    gradient. Without them the forward pass is the plain one (no extra work) and
    the state dict has no gate keys, so checkpoints of runs without head
    plasticity load unchanged.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)
        # Softmax temperature (layer senescence drives it): scores are divided by it.
        # 1.0 leaves attention exactly as without it (q / 1 is exact in floating point).
        self.register_buffer("temperature", torch.ones(()))
        # (nh,) once enable_head_gates() ran; a None buffer is not in the state dict.
        self.register_buffer("head_gate", None)

    def enable_head_gates(self) -> None:
        """Register the per-head gate buffer (nh,), all heads open (1.0)."""
        self.head_gate = torch.ones(self.n_heads, device=self.proj.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written without head plasticity has no gate: every head was
        # open. A checkpoint with gates loaded into a model without them is fine
        # only while every gate is 1; otherwise dropping them would revive pruned heads.
        key = prefix + "head_gate"
        if self.head_gate is not None and key not in state_dict:
            state_dict[key] = torch.ones_like(self.head_gate)
        elif self.head_gate is None and key in state_dict:
            if not bool((state_dict[key] == 1).all()):
                raise RuntimeError(f"{key}: this checkpoint has pruned attention heads; "
                                   f"keep plasticity.heads.enabled=true to load it")
            state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q, k, v, each (B, nh, T, hs); q carries the temperature:
        softmax(q k^T / (sqrt(hs) * temperature))."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        return q / self.temperature, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_heads(x)                                  # (B, nh, T, hs)
        # is_causal=True: position t attends to positions <= t only. Without it a
        # language model reads the token it must predict (seed bug #1).
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        if self.head_gate is not None:
            y = y * self.head_gate.to(y.dtype).view(1, -1, 1, 1)       # g_h * attn_h
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The causal attention weights (B, nh, T, T), computed explicitly (SDPA does not
        return them); for measurements such as per-head attention entropy."""
        T = x.size(1)
        q, k, _ = self.split_heads(x)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))     # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, dropout, d_expert, n_slots, n_active, top_k, activation="gelu",
                 select_bias=False):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_moe = nn.LayerNorm(d_model)
        self.moe = MoELayer(d_model, d_expert, n_slots, n_active, top_k, activation, select_bias)
        self.moe_drop = nn.Dropout(dropout)
        # Influence s scales both residual branches (layer senescence: a newborn enters
        # at s = 0, where the block is the identity). 1.0 is exact: s * y == y.
        self.register_buffer("influence", torch.ones(()))
        self._register_load_state_dict_pre_hook(_fill_senescence_buffers, with_module=True)

    def forward(self, x: torch.Tensor):
        x = x + self.influence * self.attn(self.ln_attn(x))
        y, aux = self.moe(self.ln_moe(x))
        return x + self.influence * self.moe_drop(y), aux.lb_loss, aux.z_loss, aux.counts, aux.balance


def _fill_senescence_buffers(block, state_dict, prefix, *args) -> None:
    """Checkpoints written before influence/temperature existed load with both at 1."""
    state_dict.setdefault(prefix + "influence", torch.ones(()))
    state_dict.setdefault(prefix + "attn.temperature", torch.ones(()))


def split_block(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed (B, T+1) block -> inputs (B, T) and next-token targets (B, T).

    targets[:, t] == inputs[:, t+1]: the model at position t predicts the token
    after it. Training on unshifted targets (seed bug #2) teaches it to copy.
    """
    return block[:, :-1], block[:, 1:]


@dataclass
class ModelOutput:
    logits: torch.Tensor        # (B, T, V)
    loss_ce: torch.Tensor | None  # () next-token cross-entropy, fp32
    loss_lb: torch.Tensor       # () load-balance loss, mean over layers
    loss_z: torch.Tensor        # () router z-loss, mean over layers
    counts: list[torch.Tensor]  # per layer (E,) token-choices per slot
    balance: torch.Tensor | None = None  # () reported load balance, mean over layers (MoEAux.balance)


class NemoeLM(nn.Module):
    def __init__(self, cfg):
        """cfg: a nemoe.config.Config (model and moe sections are read)."""
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.seq_len = m.seq_len
        self.activation_checkpointing = cfg.train.activation_checkpointing
        # Layer senescence scales learning rates per block: one decay/no-decay pair each.
        self.per_layer_groups = cfg.plasticity.layers.enabled
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        self.pos_emb = nn.Embedding(m.seq_len, m.d_model)
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList(
            Block(m.d_model, m.n_heads, m.dropout, cfg.d_expert, e.experts_max, e.experts_init, e.top_k,
                  m.activation, e.uses_bias)
            for _ in range(m.n_layers))
        if cfg.plasticity.heads.enabled:
            for block in self.blocks:
                block.attn.enable_head_gates()
        self.ln_f = nn.LayerNorm(m.d_model)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("router"):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # GPT-2: scale the residual output projections by 1/sqrt(2 * n_layers).
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * m.n_layers) ** 0.5)
            nn.init.normal_(block.moe.experts.w_out, std=0.02 / (2 * m.n_layers) ** 0.5)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))          # (B, T, C)
        lb, z, counts, balance = [], [], [], []
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x, lb_i, z_i, c_i, b_i = checkpoint(block, x, use_reentrant=False)
            else:
                x, lb_i, z_i, c_i, b_i = block(x)
            lb.append(lb_i), z.append(z_i), counts.append(c_i), balance.append(b_i)
        if self.training:
            # Usage is counted here, outside any checkpointed region, so activation
            # recomputation never counts a token twice; eval and probe passes don't count.
            with torch.no_grad():
                for layer, c in zip(self.moe_layers, counts):
                    layer.usage_counts += c
        logits = self.lm_head(self.ln_f(x))                           # (B, T, V)
        loss_ce = None
        if targets is not None:
            loss_ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return ModelOutput(logits, loss_ce, torch.stack(lb).mean(), torch.stack(z).mean(), counts,
                           torch.stack(balance).mean())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices; not biases, norms, or the position table.

        With layer plasticity on, each block gets its own pair ("block3.decay",
        "block3.no_decay") so a mechanism can set its `lr_scale`; the embeddings and
        final norm stay in the "shared" pair. The order is fixed by the config.
        """
        owners = ["shared"] + ([f"block{i}" for i in range(len(self.blocks))] if self.per_layer_groups else [])
        groups = {(o, kind): [] for o in owners for kind in ("decay", "no_decay")}
        for name, p in self.named_parameters():
            is_matrix = p.dim() >= 2 and not name.endswith(("b_in", "b_out", "pos_emb.weight"))
            owner = "shared"
            if self.per_layer_groups and name.startswith("blocks."):
                owner = f"block{name.split('.')[1]}"
            groups[(owner, "decay" if is_matrix else "no_decay")].append(p)
        return [{"params": params, "weight_decay": weight_decay if kind == "decay" else 0.0,
                 "name": f"{owner}.{kind}"}
                for (owner, kind), params in groups.items() if params]

    def count_params(self, live_experts: int | None = None) -> dict[str, int]:
        """Total parameters, those a token actually uses (active experts, top-k only) and those
        of the live experts: `live_experts` of them over all layers, or (None) as many as the
        model's active masks hold. A model built on the meta device has no mask values: pass a count."""
        total = sum(p.numel() for p in self.parameters())
        per_slot = sum(p[0].numel() for p in self.blocks[0].moe.experts.parameters())
        slots = sum(layer.n_slots for layer in self.moe_layers)
        live = sum(layer.n_active() for layer in self.moe_layers) if live_experts is None else live_experts
        dense = total - per_slot * slots
        top_k = self.blocks[0].moe.top_k
        return {"total": total, "live": dense + per_slot * live,
                "active_per_token": dense + per_slot * top_k * len(self.blocks)}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations. idx: (B, T0) -> (B, T0 + max_new_tokens)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.seq_len:]
            logits = self(context).logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k:
                kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
