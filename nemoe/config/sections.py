"""The run config's sections and its root, `Config`: what each setting may hold, and validation.

Fields follow nemoe/config/lib.py's conventions (see nemoe/config/__init__.py). The
`plasticity` and `data` sections have their own modules (plasticity.py, data.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from nemoe.config import lib as configlib
from nemoe.config.data import DataConfig
from nemoe.config.lib import setting
from nemoe.config.plasticity import PlasticityConfig
from nemoe.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = setting(50257, gt=0, unsafe=True)
    """Token vocabulary size (LM head rows): at least the tokenizer's, 50257 for GPT-2 BPE, 257 or a
    little more for data.tokenizer bytes (padding rows are never targets)."""
    d_model: int = setting(384, gt=0, unsafe=True)
    """Width of the residual stream."""
    n_layers: int = setting(6, gt=0, unsafe=True)
    """Number of transformer blocks; every block has one MoE layer."""
    n_heads: int = setting(6, gt=0, unsafe=True)
    """Attention heads per block; must divide d_model."""
    seq_len: int = setting(64, gt=0, unsafe=True)
    """Context length in tokens (also the packed block length minus one)."""
    d_expert: int = setting(0, ge=0, unsafe=True)
    """Hidden width of one expert's feed-forward network; 0 means 4 * d_model."""
    dropout: float = setting(0.0, ge=0, lt=1)
    """Dropout on attention weights and residual branches."""
    activation: Literal["gelu", "gelu_tanh"] = setting("gelu", unsafe=True)
    """The experts' activation: gelu (exact) or gelu_tanh (the tanh approximation the released
    GPT-2 checkpoints use; imported GPT-2 models get it from their source)."""
    init_from: str | None = None
    """Start from a pretrained GPT-2-family model instead of random weights: a Hugging Face Hub name
    (gpt2, distilgpt2, gpt2-medium) or a folder written by save_pretrained (--init-from). The model's
    shape comes from the source (nemoe/config/init_from.py); each FFN is upcycled into moe.experts_init
    experts. Read on a fresh start only: a resumed run's weights come from its checkpoint."""

    def check(self, cfg: Config) -> list[str]:
        if self.n_heads > 0 and self.d_model % self.n_heads:
            return [f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})"]
        return []


@dataclass
class MoEConfig:
    experts_init: int = 2
    """Active experts per layer at the start of a run."""
    experts_min: int = setting(2, ge=1)
    """Floor: pruning never takes a layer below this many active experts."""
    experts_max: int = setting(4, unsafe=True)
    """Cap and number of parameter slots per layer (inactive slots cost memory, not compute)."""
    top_k: Literal[1, 2] = setting(1, unsafe=True)
    """Experts each token is routed to (1 or 2)."""
    lb_coef: float = setting(0.01, ge=0)
    """Weight of the Switch load-balance loss (equals 1.0 under perfectly even routing)."""
    z_coef: float = setting(0.001, ge=0)
    """Weight of the router z-loss (mean squared log-sum-exp of router logits)."""
    balance: Literal["aux_loss", "bias", "both"] = setting("aux_loss", unsafe=True)
    """How expert load is balanced: aux_loss (the Switch load-balance loss, weight lb_coef), bias
    (auxiliary-loss-free, DeepSeek-V3: a per-expert bias added to the router logits for top-k
    selection only, moved by bias_rate after each step against the expert's load; lb_coef is
    ignored) or both. Unsafe on resume: the bias is part of what the router's choices mean."""
    bias_rate: float = setting(0.001, ge=0)
    """bias / both: the bias update per optimizer step, b_i += bias_rate * sign(mean load - load_i)
    (DeepSeek-V3's u), in logit units (e^u: the factor an update changes an expert's odds by)."""

    def check(self, cfg: Config) -> list[str]:
        rules = [
            (self.experts_min <= self.experts_max,
             f"moe.experts_min ({self.experts_min}) must be <= moe.experts_max ({self.experts_max})"),
            (self.experts_min <= self.experts_init <= self.experts_max,
             f"moe.experts_init ({self.experts_init}) must lie in experts_min..experts_max "
             f"({self.experts_min}..{self.experts_max})"),
            (self.top_k <= self.experts_min,
             f"moe.top_k ({self.top_k}) must be <= moe.experts_min ({self.experts_min})"),
        ]
        return [message for ok, message in rules if not ok]

    @property
    def uses_bias(self) -> bool:
        """The router carries a selection bias (balance: bias or both)."""
        return self.balance != "aux_loss"

    @property
    def aux_coef(self) -> float:
        """The load-balance loss weight the optimizer sees: lb_coef, or 0 under balance: bias."""
        return 0.0 if self.balance == "bias" else self.lb_coef


@dataclass
class TrainConfig:
    batch_size: int = setting(16, gt=0)
    """Sequences per micro-batch."""
    grad_accum: int = setting(1, gt=0)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = setting(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr: float = setting(2e-5, ge=0)
    """Learning rate at the end of the cosine decay (at most lr; unused by schedule constant)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """The learning rate after warm-up: cosine (decay from lr to min_lr at the token target) or
    constant (lr to the end, no decay: every phase of a many-shift protocol trains at the same rate)."""
    warmup_steps: int = setting(200, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = setting(0.1, ge=0)
    """AdamW decoupled weight decay on matrices (not on biases, norms or position tables)."""
    beta1: float = setting(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = setting(0.95, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float = setting(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    total_tokens: int = setting(10_000_000, gt=0)
    """Token target (target tokens trained on); sets the number of steps and the LR schedule."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: fp32 on CPU; bf16 on GPUs with native bf16 (sm >= 8.0); else fp16 + GradScaler.
    fp16 / bf16 also run on CPU through CPU autocast: correct but slow (to test the T4 path)."""
    seed: int = 1337
    """The run seed: model init, dropout and sampling, and every other section's seed left at
    None (data, plasticity.experts / neuron / heads / layers) is derived from it."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto picks CUDA when present."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    compile: bool = False
    """Wrap the model in torch.compile (CUDA only)."""
    loss_scale_init: float = setting(65536.0, gt=0)
    """fp16: the GradScaler's first loss scale (2^16, torch's default)."""
    loss_scale_growth_interval: int = setting(2000, ge=1)
    """fp16: the GradScaler doubles its scale after this many clean steps in a row (torch's default);
    an overflow halves it and skips the step. A resume keeps the checkpoint's scale and counts."""
    max_bad_steps: int = setting(20, ge=1)
    """Consecutive skipped steps (non-finite loss or gradient) before the run saves and stops; under
    fp16 the run also stops when the loss scale backs off below 1 (nemoe/train_module.py)."""

    def check(self, cfg: Config) -> list[str]:
        rules = [
            (self.min_lr <= self.lr, f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
        ]
        return [message for ok, message in rules if not ok]


@dataclass
class LogConfig:
    every_steps: int = setting(100, gt=0)
    """Steps between rows of training_log.csv / lines of training_log.txt."""
    console: Literal["auto", "rich", "plain"] = "auto"
    """auto: a rich progress display on a terminal, plain lines otherwise."""
    sample_every_steps: int = setting(2000, ge=0)
    """Steps between generated samples in the text log (0 disables)."""
    sample_prompt: str = "The quick brown fox"
    """Prompt of the generated sample."""
    sample_tokens: int = setting(32, ge=0)
    """New tokens in a generated sample."""
    tensorboard: bool = True
    """TensorBoard event files in <log dir>/tensorboard (the main process writes them, at log
    intervals and events only; `tensorboard --logdir <run-dir>/logs`)."""


@dataclass
class EvalConfig:
    every_steps: int = setting(1000, ge=0)
    """Steps between held-out evaluations (0 disables all but the first and last)."""
    batches: int = setting(4, gt=0)
    """Fixed held-out batches per source."""
    batch_size: int = setting(16, gt=0)
    """Sequences per evaluation batch."""


@dataclass
class CheckpointConfig:
    every_steps: int = setting(2000, ge=0)
    """Steps between checkpoints (0 disables step-based saving)."""
    every_minutes: float = setting(30.0, ge=0)
    """Also save when this many minutes passed since the last save (0 disables)."""
    keep_last: int = setting(3, ge=1)
    """Checkpoints of this run to keep; older ones are deleted after a successful save."""
    max_failures: int = setting(3, ge=1)
    """Failed saves in a row (full disk, read-only folder) after which the run stops."""
    background: bool = True
    """Write checkpoints on a background thread: training waits only for a copy of the state in CPU
    memory (and for the previous write, if still going). false: write on the training thread."""
    mirror_dir: str | None = None
    """A second folder (e.g. on Google Drive) that receives a verified copy of every checkpoint and of
    the logs, in the background (`--mirror-dir`); --resume takes the newest valid checkpoint of the
    run folder and the mirror. None: no mirror."""


@dataclass
class Config:
    name: str = "nemoe"
    """Run name used when --run-name is not given (set from the config file's name)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        """Seeds left at None become concrete: derived from train.seed (see configlib.derive_seed)."""
        self.name = self.name or "nemoe"
        configlib.resolve_seeds(self, self.train.seed)

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens per optimizer step over `world_size` data-parallel ranks (the effective batch)."""
        return self.train.batch_size * self.train.grad_accum * self.model.seq_len * world_size

    def total_steps(self, world_size: int = 1) -> int:
        """Optimizer steps to the token target with `world_size` data-parallel ranks."""
        return max(1, math.ceil(self.train.total_tokens / self.tokens_per_step(world_size)))

    @property
    def d_expert(self) -> int:
        return self.model.d_expert or 4 * self.model.d_model

    @property
    def ramp_steps(self) -> int:
        experts = self.plasticity.experts
        return experts.ramp_steps or max(1, experts.probation_steps // 2)

    def to_dict(self) -> dict:
        return asdict(self)


# Keys older configs and checkpoints may hold that are no longer settings: read and ignored.
# world_size: the trainer takes it from torchrun and keeps it in the checkpoint's "trainer" state.
RETIRED_KEYS = ("world_size",)

# Old spelling -> the section's path now. Read wherever a config dict enters (config_from_dict,
# `--set` in files.py, config_changes), so a YAML file, a run's config.yaml, a checkpoint's config
# or a committed study summary written with the old spelling means what it meant.
ALIASES = {"morph": "plasticity.experts"}


def alias_key(key: str) -> str:
    """A dotted key with an old section spelling replaced: morph.interval -> plasticity.experts.interval."""
    for old, new in ALIASES.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def normalise(raw: dict) -> dict:
    """`raw` (nested dicts, YAML shape) with every aliased section moved to its path now; a copy
    where anything moved. Both spellings of one section at once is a UserError naming both."""
    if not isinstance(raw, dict) or not any(old in raw for old in ALIASES):
        return raw
    raw = dict(raw)
    for old, new in ALIASES.items():
        if old not in raw:
            continue
        *parents, name = new.split(".")
        node, where = raw, []
        for part in parents:
            where.append(part)
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise UserError(f"config: {old} is read as {new}, but {'.'.join(where)} is not a section "
                                f"(got {child!r})")
            node[part] = child = dict(child)
            node = child
        if name in node:
            raise UserError(f"config: both {old} (the old spelling) and {new} are given; they are one "
                            f"section: keep {new} only")
        node[name] = raw.pop(old)
    return raw


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (YAML shape; old spellings in ALIASES are read
    as their sections now); every problem in one UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"config: expected a mapping of sections, got {raw!r}")
    raw = normalise(raw)
    problems: list[str] = []
    cfg = configlib.build(Config, {k: v for k, v in raw.items() if k not in RETIRED_KEYS}, "", problems)
    if not problems:  # wrong types first: values replaced by defaults would mislead the checks
        problems = configlib.validate(cfg)
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


# --------------------------------------------------------------------------- #
# Resuming under a changed config
# --------------------------------------------------------------------------- #

def config_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs; `name` and retired keys are ignored.
    A key the saved config lacks (a setting added after it was written) counts as its default; old
    section spellings (ALIASES) compare as their sections now."""
    return configlib.changes(normalise(saved), normalise(now), ignore=("name", *RETIRED_KEYS),
                             defaults=configlib.flatten(Config().to_dict()))


def is_unsafe(key: str) -> bool:
    """Would changing `key` make a checkpoint mean something else (parameter shapes, the routing
    rule, which documents the data stream yields)? Declared by `setting(unsafe=True)` on the field;
    a list (data.sources) compares as a whole."""
    found = configlib.field_at(Config, key)
    return found is not None and found.metadata.get("unsafe", False)
