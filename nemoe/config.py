"""Run configuration: nested dataclasses, YAML files, `--set` overrides, validation.

A config is built in three layers: the dataclass defaults below, a YAML file that
overrides some of them, and `--set section.key=value` overrides from the command
line. Every problem found on the way (unknown keys, wrong types, impossible
values) is collected and raised once as a `UserError`, so a user fixes them all in
one go (litgpt style).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nemoe.data import DataConfig, SourceConfig
from nemoe.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    """Token vocabulary size; 50257 is GPT-2 BPE (the only tokenizer shipped)."""
    d_model: int = 384
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks; every block has one MoE layer."""
    n_heads: int = 6
    """Attention heads per block; must divide d_model."""
    seq_len: int = 64
    """Context length in tokens (also the packed block length minus one)."""
    d_expert: int = 0
    """Hidden width of one expert's feed-forward network; 0 means 4 * d_model."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""


@dataclass
class MoEConfig:
    experts_init: int = 2
    """Active experts per layer at the start of a run."""
    experts_min: int = 2
    """Floor: pruning never takes a layer below this many active experts."""
    experts_max: int = 4
    """Cap and number of parameter slots per layer (inactive slots cost memory, not compute)."""
    top_k: int = 1
    """Experts each token is routed to (1 or 2)."""
    lb_coef: float = 0.01
    """Weight of the Switch load-balance loss (equals 1.0 under perfectly even routing)."""
    z_coef: float = 0.001
    """Weight of the router z-loss (mean squared log-sum-exp of router logits)."""


@dataclass
class MorphConfig:
    enabled: bool = True
    """Run the morphogenesis controller; false gives the static-MoE baseline."""
    interval: int = 1000
    """Optimizer steps between controller decisions."""
    split_usage: float = 0.35
    """An expert whose usage share over the interval exceeds this may split."""
    prune_usage: float = 0.02
    """An expert whose usage share over the interval is below this may be pruned."""
    crossover_prob: float = 0.1
    """Chance per layer and interval of a crossover when nothing split and a slot is free."""
    crossover_alpha: float = 0.5
    """Child = alpha * parent A + (1 - alpha) * parent B (parameters and router row)."""
    mutation_std: float = 0.01
    """Std of a split child's mutation noise, relative to each parameter's RMS."""
    probation_steps: int = 2000
    """Steps a newborn is immune to pruning before its review."""
    probation_min_usage: float = 0.05
    """Usage share a newborn must reach by its review, else it is removed (failed_probation)."""
    ramp_steps: int = 0
    """Steps over which a newborn's routing weight opens from 0 to 1; 0 means probation_steps // 2."""
    usage_ema: float = 0.5
    """Smoothing of the usage average across intervals (fitness): ema = a * ema + (1 - a) * usage."""
    seed: int = 0
    """Seed of the controller's own generator (decisions and mutation noise)."""


@dataclass
class TrainConfig:
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 2e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on biases, norms or position tables)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    total_tokens: int = 10_000_000
    """Token target (target tokens trained on); sets the number of steps and the LR schedule."""
    precision: str = "auto"
    """auto | fp32 | fp16 | bf16. auto: fp32 on CPU; bf16 on GPUs with native bf16 (sm >= 8.0); else fp16 + GradScaler."""
    seed: int = 1337
    """Seed for model init, dropout and sampling."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto picks CUDA when present."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    compile: bool = False
    """Wrap the model in torch.compile (CUDA only)."""
    max_bad_steps: int = 20
    """Consecutive steps with a non-finite loss or gradient (update skipped) before the run saves and stops."""


@dataclass
class LogConfig:
    every_steps: int = 100
    """Steps between rows of training_log.csv / lines of training_log.txt."""
    console: str = "auto"
    """auto | rich | plain. auto: a rich progress display on a terminal, plain lines otherwise."""
    sample_every_steps: int = 2000
    """Steps between generated samples in the text log (0 disables)."""
    sample_prompt: str = "The quick brown fox"
    """Prompt of the generated sample."""
    sample_tokens: int = 32
    """New tokens in a generated sample."""


@dataclass
class EvalConfig:
    every_steps: int = 1000
    """Steps between held-out evaluations (0 disables all but the first and last)."""
    batches: int = 4
    """Fixed held-out batches per source."""
    batch_size: int = 16
    """Sequences per evaluation batch."""


@dataclass
class CheckpointConfig:
    every_steps: int = 2000
    """Steps between checkpoints (0 disables step-based saving)."""
    every_minutes: float = 30.0
    """Also save when this many minutes passed since the last save (0 disables)."""
    keep_last: int = 3
    """Checkpoints of this run to keep; older ones are deleted after a successful save."""
    max_failures: int = 3
    """Failed saves in a row (full disk, read-only folder) after which the run stops."""


NEURON_METRICS = ("grad_activation", "gradient", "weight", "composite")
NEURON_REGROWTH = ("random", "clone", "mutation", "functional")


@dataclass
class NeuronPlasticityConfig:
    enabled: bool = False
    """Neuron apoptosis inside experts: the least fit hidden neurons die and are reborn."""
    interval: int = 500
    """Optimizer steps between neuron turnover events."""
    prune_rate: float = 0.05
    """Share of each live expert's hidden neurons that die per event: int(prune_rate * d_expert)."""
    metric: str = "grad_activation"
    """Fitness: grad_activation (sum of |h * dL/dh| over the interval's tokens), gradient (sum of
    the neuron's parameter-gradient norms over the interval's steps), weight (norm of its weights
    at the event), composite (weighted sum of the three, each divided by its mean in the expert)."""
    regrowth: str = "functional"
    """How the dead are reborn: random (fresh incoming weights), clone (copy of a fittest survivor),
    mutation (fitness-proportional parent + noise), functional (survivors' output weights refit by
    least squares to re-express the dead neurons' contribution, fresh incoming weights)."""
    mutation_std: float = 0.1
    """Std of a mutated newborn's noise, relative to the RMS of its parent's incoming weights."""
    composite_taylor: float = 0.5
    """Weight of grad_activation in the composite fitness."""
    composite_gradient: float = 0.25
    """Weight of gradient in the composite fitness."""
    composite_weight: float = 0.25
    """Weight of weight in the composite fitness."""
    record_steps: int = 20
    """functional: the last steps of each interval whose hidden activations the refit uses (0: all)."""
    min_age: int = 0
    """A neuron younger than this many steps cannot die (a newborn gets time to learn)."""
    seed: int = 0
    """Seed of the mechanism's own generator (random / mutation newborns, mutation parents)."""


@dataclass
class HeadPlasticityConfig:
    enabled: bool = False
    """Attention-head pruning and regrowth through per-head gates."""
    interval: int = 500
    """Optimizer steps between head prune/grow decisions (cycle mode: the train phase before each prune)."""
    mode: str = "continuous"
    """continuous: every `interval` steps regrow, then prune; cycle: train -> prune -> measure ->
    grow -> learn, `cycles` times in one run, then training goes on with no more head events."""
    prune: str = "entropy"
    """Which live heads die: entropy (most diffuse attention on the probe batch), magnitude
    (smallest q/k/v/proj weight norm), importance (smallest |dL/dgate| over the interval,
    Michel et al. 2019) or random."""
    grow: str = "gradient_sensitivity"
    """Which dead heads are reborn: gradient_sensitivity (largest |dL/dgate| of the reinitialised
    head at gate 0 on the probe batch), entropy_gap (the layer whose live heads attend most
    diffusely), balanced (the layer with the fewest live heads) or random."""
    prune_fraction: float = 0.25
    """Share of the live heads (all layers together) pruned at each prune event, rounded, >= 1."""
    grow_fraction: float = 0.5
    """Share of the dead heads reborn at each grow event, rounded, >= 1 while any is dead."""
    min_heads: int = 1
    """Live heads a layer always keeps."""
    warmup_steps: int = 100
    """A newborn head's gate rises linearly from 0 (at birth) to 1 over this many steps."""
    new_head_lr_mult: float = 1.0
    """Learning-rate multiplier for a newborn head's q/k/v/proj slices while its gate warms up."""
    cycles: int = 3
    """Cycle mode: how many train -> prune -> measure -> grow -> learn cycles."""
    recover_steps: int = 100
    """Cycle mode: steps trained with the heads pruned, between a prune and its grow."""
    seed: int = 0
    """Seed of the mechanism's own generator (random criteria, newborn weights)."""


@dataclass
class LayerPlasticityConfig:
    enabled: bool = False
    """Layer senescence: per-layer vitality and influence; dying layers are replaced."""
    interval: int = 500
    """Optimizer steps between layer vitality reviews."""
    death_zone: int = 1
    """The last `death_zone` blocks (nearest the output) are the only ones that can die."""
    birth_zone: int = 1
    """The first `birth_zone` blocks (nearest the input); a newborn enters at the zone's
    innermost position, birth_zone - 1. The blocks between the zones are the stable core."""
    trigger: float = 0.25
    """A death-zone block dies when its vitality falls below this (1.0 = an average block)."""
    min_age: int = 1000
    """Steps a block must have lived before it may die (founders are born at step 0)."""
    lifespan: int = 5000
    """Senescence time constant: vitality = importance_ema * exp(-age / lifespan); 0 = no ageing."""
    importance_ema: float = 0.5
    """Weight of the old value in the importance moving average (0 = last review only)."""
    newborn: str = "copy"
    """copy (mutated copy of the most vital block, its optimizer moments too) or fresh
    (new random init, zero moments)."""
    mutation_std: float = 0.01
    """Relative noise of a copied newborn: N(0, (mutation_std * RMS(tensor))^2) per parameter."""
    newborn_influence: float = 0.0
    """A newborn's influence at birth (0 = the block starts as the identity)."""
    warmup_steps: int = 200
    """Steps over which a newborn's influence rises linearly to 1."""
    max_temperature: float = 1.5
    """Attention temperature of a block at vitality 0 (1 at vitality >= 1, linear between)."""
    max_dropout: float = 0.1
    """Residual-branch dropout of a block at vitality 0 (model.dropout at vitality >= 1)."""
    min_lr_scale: float = 0.5
    """Learning-rate multiplier of a block at vitality 0 (1 at vitality >= 1)."""


@dataclass
class PlasticityConfig:
    """Structural plasticity at granularities other than whole experts (all off by default)."""

    neuron: NeuronPlasticityConfig = field(default_factory=NeuronPlasticityConfig)
    heads: HeadPlasticityConfig = field(default_factory=HeadPlasticityConfig)
    layers: LayerPlasticityConfig = field(default_factory=LayerPlasticityConfig)


@dataclass
class Config:
    name: str = "nemoe"
    """Run name used when --run-name is not given (set from the config file's name)."""
    world_size: int = 1
    """Data-parallel processes; set by the trainer from torchrun's WORLD_SIZE (not a setting to edit)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all data-parallel ranks (the effective batch)."""
        return self.train.batch_size * self.train.grad_accum * self.model.seq_len * self.world_size

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.train.total_tokens / self.tokens_per_step))

    @property
    def d_expert(self) -> int:
        return self.model.d_expert or 4 * self.model.d_model

    @property
    def ramp_steps(self) -> int:
        return self.morph.ramp_steps or max(1, self.morph.probation_steps // 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- #
# Building a Config from nested dicts, with type checks
# --------------------------------------------------------------------------- #

_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value, tp, where: str, problems: list[str]):
    """Return `value` as type `tp`, or record a problem and return None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return None


def _build_section(cls, raw, where: str, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"{where}.{key}: unknown key (valid keys: {', '.join(valid)})")
            continue
        if dataclasses.is_dataclass(hints[key]):  # a nested section (plasticity.neuron)
            kwargs[key] = _build_section(hints[key], value, f"{where}.{key}", problems)
            continue
        out = _coerce(value, hints[key], f"{where}.{key}", problems)
        if out is not None or value is None:
            kwargs[key] = out
    return cls(**kwargs)


def _build_data(raw, problems: list[str]) -> DataConfig:
    if raw is None:
        return DataConfig()
    if not isinstance(raw, dict):
        problems.append(f"data: expected a mapping of keys, got {raw!r}")
        return DataConfig()
    raw = dict(raw)
    sources_raw = raw.pop("sources", None)
    cfg = _build_section(DataConfig, raw, "data", problems)
    if sources_raw is None:
        return cfg
    if not isinstance(sources_raw, list):
        problems.append("data.sources: expected a list of sources")
        return cfg
    sources = []
    for i, item in enumerate(sources_raw):
        if isinstance(item, SourceConfig):
            sources.append(item)
        else:
            sources.append(_build_section(SourceConfig, item, f"data.sources[{i}]", problems))
    cfg.sources = sources
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (YAML shape)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise UserError(f"config: expected a mapping of sections, got {raw!r}")
    kwargs = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            problems.append(f"{key}: unknown section (valid: {', '.join(_SECTIONS)})")
        elif key == "name":
            kwargs["name"] = _coerce(value, str, "name", problems) or "nemoe"
        elif key == "world_size":
            kwargs["world_size"] = _coerce(value, int, "world_size", problems) or 1
        elif key == "data":
            kwargs["data"] = _build_data(value, problems)
        else:
            kwargs[key] = _build_section(_SECTIONS[key].default_factory, value, key, problems)
    cfg = Config(**kwargs)
    if not problems:
        problems += validate(cfg)
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


def _layer_plasticity_checks(lp: LayerPlasticityConfig, n_layers: int, dropout: float,
                             heads_enabled: bool = False) -> list:
    """plasticity.layers: zone sizes (only checked when it is on) and value ranges."""
    zones_fit = not lp.enabled or (lp.birth_zone >= 1 and lp.death_zone >= 1
                                   and lp.birth_zone + lp.death_zone < n_layers)
    return [
        (zones_fit, f"plasticity.layers: birth_zone ({lp.birth_zone}) and death_zone ({lp.death_zone}) "
                    f"must be >= 1 and leave a stable core of >= 1 block between them: need "
                    f"birth_zone + death_zone < model.n_layers ({n_layers})"),
        (lp.trigger >= 0, "plasticity.layers.trigger must be >= 0"),
        (lp.min_age >= 0 and lp.lifespan >= 0 and lp.warmup_steps >= 0,
         "plasticity.layers.min_age, lifespan and warmup_steps must be >= 0"),
        (0 <= lp.importance_ema < 1, "plasticity.layers.importance_ema must be in [0, 1)"),
        (lp.newborn in ("copy", "fresh"), f"plasticity.layers.newborn must be copy or fresh, got {lp.newborn!r}"),
        (lp.mutation_std >= 0, "plasticity.layers.mutation_std must be >= 0"),
        (0 <= lp.newborn_influence <= 1, "plasticity.layers.newborn_influence must be in [0, 1]"),
        (lp.max_temperature >= 1, "plasticity.layers.max_temperature must be >= 1"),
        (dropout <= lp.max_dropout < 1,
         f"plasticity.layers.max_dropout must be in [model.dropout ({dropout}), 1)"),
        (0 < lp.min_lr_scale <= 1, "plasticity.layers.min_lr_scale must be in (0, 1]"),
    ]


def _head_plasticity_checks(cfg: Config) -> list[tuple[bool, str]]:
    h, n_heads = cfg.plasticity.heads, cfg.model.n_heads
    return [
        (h.mode in ("continuous", "cycle"), f"plasticity.heads.mode must be continuous or cycle, got {h.mode!r}"),
        (h.prune in ("entropy", "magnitude", "importance", "random"),
         f"plasticity.heads.prune must be entropy, magnitude, importance or random, got {h.prune!r}"),
        (h.grow in ("gradient_sensitivity", "entropy_gap", "balanced", "random"),
         f"plasticity.heads.grow must be gradient_sensitivity, entropy_gap, balanced or random, got {h.grow!r}"),
        (0 < h.prune_fraction < 1, f"plasticity.heads.prune_fraction must be in (0, 1), got {h.prune_fraction}"),
        (0 < h.grow_fraction <= 1, f"plasticity.heads.grow_fraction must be in (0, 1], got {h.grow_fraction}"),
        (1 <= h.min_heads <= n_heads,
         f"plasticity.heads.min_heads ({h.min_heads}) must be in 1..model.n_heads ({n_heads})"),
        (not h.enabled or h.min_heads < n_heads,
         f"plasticity.heads.min_heads ({h.min_heads}) must be < model.n_heads ({n_heads}), "
         f"else no head can ever be pruned"),
        (h.warmup_steps >= 0, "plasticity.heads.warmup_steps must be >= 0"),
        (h.new_head_lr_mult > 0, "plasticity.heads.new_head_lr_mult must be > 0"),
        (h.cycles >= 1, "plasticity.heads.cycles must be >= 1"),
        (h.recover_steps >= 1, "plasticity.heads.recover_steps must be >= 1"),
    ]


def validate(cfg: Config) -> list[str]:
    """Every impossible value in one list (empty when the config is usable)."""
    m, e, mo, t = cfg.model, cfg.moe, cfg.morph, cfg.train
    checks = [
        (cfg.world_size >= 1, "world_size must be >= 1"),
        (m.vocab_size > 0, "model.vocab_size must be > 0"),
        (m.d_model > 0, "model.d_model must be > 0"),
        (m.n_layers > 0, "model.n_layers must be > 0"),
        (m.n_heads > 0 and m.d_model % max(m.n_heads, 1) == 0,
         f"model.n_heads ({m.n_heads}) must be > 0 and divide model.d_model ({m.d_model})"),
        (m.seq_len > 0, "model.seq_len must be > 0"),
        (m.d_expert >= 0, "model.d_expert must be >= 0 (0 = 4 * d_model)"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (e.top_k in (1, 2), f"moe.top_k must be 1 or 2, got {e.top_k}"),
        (e.experts_min >= 1, "moe.experts_min must be >= 1"),
        (e.experts_min <= e.experts_max,
         f"moe.experts_min ({e.experts_min}) must be <= moe.experts_max ({e.experts_max})"),
        (e.experts_min <= e.experts_init <= e.experts_max,
         f"moe.experts_init ({e.experts_init}) must lie in experts_min..experts_max "
         f"({e.experts_min}..{e.experts_max})"),
        (e.top_k <= e.experts_min,
         f"moe.top_k ({e.top_k}) must be <= moe.experts_min ({e.experts_min})"),
        (e.lb_coef >= 0 and e.z_coef >= 0, "moe.lb_coef and moe.z_coef must be >= 0"),
        (mo.interval > 0, "morph.interval must be > 0"),
        (0 <= mo.prune_usage < mo.split_usage <= 1,
         f"need 0 <= morph.prune_usage ({mo.prune_usage}) < morph.split_usage ({mo.split_usage}) <= 1"),
        (0 <= mo.crossover_prob <= 1, "morph.crossover_prob must be in [0, 1]"),
        (0 <= mo.crossover_alpha <= 1, "morph.crossover_alpha must be in [0, 1]"),
        (mo.mutation_std >= 0, "morph.mutation_std must be >= 0"),
        (mo.probation_steps >= 0, "morph.probation_steps must be >= 0"),
        (0 <= mo.probation_min_usage <= 1, "morph.probation_min_usage must be in [0, 1]"),
        (mo.ramp_steps >= 0, "morph.ramp_steps must be >= 0"),
        (0 <= mo.usage_ema < 1, "morph.usage_ema must be in [0, 1)"),
        *((section.interval > 0, f"plasticity.{name}.interval must be > 0")
          for name, section in vars(cfg.plasticity).items()),
        *_neuron_checks(cfg),
        *_layer_plasticity_checks(cfg.plasticity.layers, m.n_layers, m.dropout, cfg.plasticity.heads.enabled),
        *_head_plasticity_checks(cfg),
        (t.batch_size > 0, "train.batch_size must be > 0"),
        (t.grad_accum > 0, "train.grad_accum must be > 0"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be in [0, train.lr]"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)"),
        (t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables)"),
        (t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (t.total_tokens > 0, "train.total_tokens must be > 0"),
        (t.precision in ("auto", "fp32", "fp16", "bf16"),
         f"train.precision must be auto, fp32, fp16 or bf16, got {t.precision!r}"),
        (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}"),
        (cfg.log.every_steps > 0, "log.every_steps must be > 0"),
        (cfg.log.console in ("auto", "rich", "plain"), "log.console must be auto, rich or plain"),
        (cfg.log.sample_every_steps >= 0 and cfg.log.sample_tokens >= 0,
         "log.sample_every_steps and log.sample_tokens must be >= 0"),
        (cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0"),
        (cfg.eval.batches > 0 and cfg.eval.batch_size > 0, "eval.batches and eval.batch_size must be > 0"),
        (cfg.checkpoint.every_steps >= 0 and cfg.checkpoint.every_minutes >= 0,
         "checkpoint.every_steps and checkpoint.every_minutes must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (cfg.checkpoint.max_failures >= 1, "checkpoint.max_failures must be >= 1"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    return problems + cfg.data.validate()


def _neuron_checks(cfg: Config) -> list[tuple[bool, str]]:
    """plasticity.neuron: names, weights, and a per-expert death count in 1..d_expert-1."""
    n, width = cfg.plasticity.neuron, cfg.d_expert
    deaths = int(n.prune_rate * width)
    return [
        (0 < n.prune_rate < 1, f"plasticity.neuron.prune_rate must be in (0, 1), got {n.prune_rate}"),
        (not n.enabled or not 0 < n.prune_rate < 1 or 1 <= deaths <= width - 1,
         f"plasticity.neuron.prune_rate ({n.prune_rate}) x d_expert ({width}) = {deaths} deaths per "
         f"expert; need at least 1 death and 1 survivor"),
        (n.metric in NEURON_METRICS,
         f"plasticity.neuron.metric must be one of {', '.join(NEURON_METRICS)}, got {n.metric!r}"),
        (n.regrowth in NEURON_REGROWTH,
         f"plasticity.neuron.regrowth must be one of {', '.join(NEURON_REGROWTH)}, got {n.regrowth!r}"),
        (n.mutation_std >= 0, "plasticity.neuron.mutation_std must be >= 0"),
        (min(n.composite_taylor, n.composite_gradient, n.composite_weight) >= 0
         and n.composite_taylor + n.composite_gradient + n.composite_weight > 0,
         "plasticity.neuron.composite_* weights must be >= 0 with a positive sum"),
        (n.record_steps >= 0, "plasticity.neuron.record_steps must be >= 0 (0: the whole interval)"),
        (n.min_age >= 0, "plasticity.neuron.min_age must be >= 0"),
    ]


# --------------------------------------------------------------------------- #
# Files and command-line overrides
# --------------------------------------------------------------------------- #

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def find_config(name: str) -> Path:
    """`NAME`, `configs/NAME` or `configs/NAME.yaml` (relative to cwd, then to the repo)."""
    candidates = []
    for base in (Path.cwd(), CONFIG_DIR.parent):
        candidates += [base / name, base / "configs" / name, base / "configs" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config {name!r} not found (looked for {name}, configs/{name}, "
                    f"configs/{name}.yaml); shipped configs: {', '.join(shipped)}")


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"--set {key}: {part} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    if problems:
        raise UserError("invalid --set:\n  - " + "\n  - ".join(problems))
    return raw


def load_config(name: str | None, overrides: list[str] = ()) -> Config:
    """Resolve, read, override and validate a config; `None` means local.yaml."""
    path = find_config(name or "local.yaml")
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    return config_from_dict(apply_overrides(raw, list(overrides)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- #
# Resuming under a changed config
# --------------------------------------------------------------------------- #

# Keys whose change would make a checkpoint mean something else: parameter shapes,
# the routing rule, or which documents the data stream yields.
UNSAFE_ON_RESUME = ("world_size", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                    "model.seq_len", "model.d_expert", "moe.experts_max", "moe.top_k",
                    "plasticity.layers.enabled",  # per-block optimizer groups (model.param_groups)
                    "data.sources", "data.seed", "data.heldout_fraction")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value  # lists (data.sources) compare whole
    return out


def config_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs; `name` is ignored."""
    a, b = _flatten(saved), _flatten(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k != "name" and a.get(k) != b.get(k)]


def is_unsafe(key: str) -> bool:
    return key in UNSAFE_ON_RESUME
