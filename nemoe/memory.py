"""The memory plan: how much device memory one training step needs, and whether it fits.

    static       bytes per parameter: fp32 weights 4, fp32 gradients 4, AdamW's two
                 fp32 moments 8 (autocast keeps fp32 master weights); under fp16 / bf16
                 autocast also its cached half copies of the weights, 2; under DDP the
                 gradient buckets, 4
    activations  the tensors autograd keeps for backward in one training forward,
                 counted through saved-tensor hooks (each storage once, parameters
                 excluded) on a CPU copy of the model at two micro-batch sizes and
                 extended linearly. Measured in fp32, an upper bound for autocast (which
                 saves half copies where fp32 saves full ones); with activation
                 checkpointing, plus one block's activations recomputed in backward
    transient    the logits (B, T, V), alive through backward, and two fp32 gradients of
                 that shape in the loss's backward: 12 bytes per position and vocabulary
                 entry (stated, not measured)

`plan_memory` builds the plan, `fit_problem` judges it against the free memory (pure:
tested on CPU with injected numbers), `guard` is what the trainer calls on CUDA before
its first step. tools/bench.py's memory section and tools/gpu_check.py use the same plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nemoe.errors import UserError
from nemoe.model import NemoeLM, split_block

HEADROOM = 0.9        # use at most this share of the free memory: allocator slack, cuBLAS workspaces
TRANSIENT_BYTES = 12  # per sequence position and vocabulary entry (module docstring)


@dataclass
class MemoryPlan:
    params: int                         # parameters of the model
    static: dict[str, float]            # bytes: params, grads, adamw_state[, autocast_weights, ddp_buckets]
    fixed_activation_bytes: float       # activations that do not grow with the micro-batch
    activation_bytes_per_sequence: float
    transient_bytes_per_sequence: float
    micro_batch: int                    # train.batch_size
    grad_accum: int
    seq_len: int
    precision: str
    measured_at: tuple[int, int]        # micro-batches the activations were measured at
    activation_bytes_measured: tuple[int, int]

    @property
    def static_bytes(self) -> float:
        return sum(self.static.values())

    def activations(self, micro_batch: int | None = None) -> float:
        b = self.micro_batch if micro_batch is None else micro_batch
        return self.fixed_activation_bytes + b * self.activation_bytes_per_sequence

    def transient(self, micro_batch: int | None = None) -> float:
        return (self.micro_batch if micro_batch is None else micro_batch) * self.transient_bytes_per_sequence

    def total(self, micro_batch: int | None = None) -> float:
        """Predicted peak bytes of one training step at `micro_batch` (default: the config's)."""
        return self.static_bytes + self.activations(micro_batch) + self.transient(micro_batch)

    def largest_micro_batch(self, available: float) -> int:
        """The largest micro-batch whose step fits in `available` bytes (0: not even one)."""
        per_sequence = self.activation_bytes_per_sequence + self.transient_bytes_per_sequence
        room = available - self.static_bytes - self.fixed_activation_bytes
        return max(0, int(room // per_sequence))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total()}


def activation_bytes(model: NemoeLM, batch_size: int, seq_len: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward of `model` (CPU).

    Counted through saved-tensor hooks, each storage once, parameters excluded: the
    activation memory that grows with the micro-batch. Random tokens; the model's
    usage counters are left as they were.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    counts = [layer.usage_counts.clone() for layer in model.moe_layers]
    idx = torch.randint(0, model.tok_emb.num_embeddings, (batch_size, seq_len + 1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*split_block(idx))
    del out
    for layer, c in zip(model.moe_layers, counts):
        layer.usage_counts.copy_(c)
    return sum(seen.values())


def plan_memory(cfg, precision: str = "fp32", world_size: int = 1,
                batches: tuple[int, int] = (1, 2)) -> MemoryPlan:
    """The plan of `cfg` at its micro-batch, measured on a CPU copy of its model.

    Leaves every random generator as it was (the copy's initialisation draws from them).
    """
    with torch.random.fork_rng(devices=[]):
        model = NemoeLM(cfg)   # built on the CPU
        n = sum(p.numel() for p in model.parameters())
        static = {"params": 4 * n, "grads": 4 * n, "adamw_state": 8 * n}
        if precision in ("fp16", "bf16"):
            static["autocast_weights"] = 2 * n
        if world_size > 1:
            static["ddp_buckets"] = 4 * n
        b1, b2 = batches
        seq_len = cfg.model.seq_len
        act1, act2 = (activation_bytes(model, b, seq_len) for b in batches)
        per_sequence = (act2 - act1) / (b2 - b1)          # activations grow linearly with the micro-batch
        fixed = act1 - per_sequence * b1
        if cfg.train.activation_checkpointing:
            # Backward recomputes one block at a time: its activations come back for a moment.
            model.activation_checkpointing = False
            full = (activation_bytes(model, b2, seq_len) - activation_bytes(model, b1, seq_len)) / (b2 - b1)
            per_sequence += full / cfg.model.n_layers
    return MemoryPlan(params=n, static=static, fixed_activation_bytes=fixed,
                      activation_bytes_per_sequence=per_sequence,
                      transient_bytes_per_sequence=TRANSIENT_BYTES * seq_len * cfg.model.vocab_size,
                      micro_batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, seq_len=seq_len,
                      precision=precision, measured_at=batches, activation_bytes_measured=(act1, act2))


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def fit_problem(plan: MemoryPlan, free: float, device_name: str) -> str | None:
    """Why the plan cannot run in `free` bytes (None: it fits within HEADROOM of them)."""
    usable = HEADROOM * free
    if plan.total() <= usable:
        return None
    need = (f"this config needs about {gb(plan.total())} of GPU memory per step (weights, gradients and "
            f"optimizer state {gb(plan.static_bytes)}, activations and logits at micro-batch {plan.micro_batch}: "
            f"{gb(plan.activations() + plan.transient())}), but {device_name} has {gb(free)} free (nemoe plans "
            f"with {HEADROOM:.0%} of it)")
    largest = plan.largest_micro_batch(usable)
    if largest == 0:
        return (f"{need}. Not even a micro-batch of one sequence fits: make the model smaller "
                f"(model.d_model, model.n_layers, moe.experts_max) or use a larger GPU.")
    effective = plan.micro_batch * plan.grad_accum
    # The fewest accumulation steps that split the effective batch into micro-batches that fit.
    accum = next(a for a in range(-(-effective // largest), effective + 1) if effective % a == 0)
    return (f"{need}. Lower train.batch_size to {largest} or less and raise train.grad_accum to keep the "
            f"effective batch ({plan.micro_batch} x {plan.grad_accum} = {effective} sequences per step; e.g. "
            f"--set train.batch_size={effective // accum} --set train.grad_accum={accum}), or shorten "
            f"model.seq_len ({plan.seq_len}), or set train.activation_checkpointing=true.")


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (no guard on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def guard(cfg, runtime) -> str:
    """Before the first step: refuse a config whose step cannot fit the device (UserError, exit 2),
    else the Start line's note on the plan ("" where there is no device memory to check)."""
    free = free_bytes(runtime.device)
    if free is None:
        return ""
    plan = plan_memory(cfg, runtime.precision, runtime.dist.world_size)
    name = str(runtime.device) + (f" ({torch.cuda.get_device_name(runtime.device)})"
                                  if runtime.device.type == "cuda" else "")
    problem = fit_problem(plan, free, name)
    if problem:
        raise UserError(problem)
    return f" | memory plan {gb(plan.total())} of {gb(free)} free"
