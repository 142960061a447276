"""The `plasticity` section of the run config: expert morphogenesis (on by default; older files
call the section `morph:`, read as `plasticity.experts`, see ALIASES in nemoe/config/sections.py),
neuron apoptosis, attention-head prune/grow and layer senescence (off by default); the mechanisms
themselves live in nemoe/plasticity/.

Fields follow nemoe/config/lib.py's conventions (see nemoe/config/__init__.py): type, bounds and
resume safety on the field, a docstring under it, and each section's cross-field rules
in its `check(cfg)` (`cfg`: the root Config being validated, nemoe/config/sections.py, which
imports this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nemoe.config.lib import setting


@dataclass
class ExpertPlasticityConfig:
    """Expert morphogenesis (nemoe/plasticity/experts.py): split, crossover, probation, prune and the
    growth schedule. Older files spell the section `morph:` (ALIASES in nemoe/config/sections.py)."""

    enabled: bool = True
    """Run the morphogenesis controller; false gives the static-MoE baseline."""
    interval: int = setting(1000, gt=0)
    """Optimizer steps between controller decisions."""
    split_usage: float = setting(0.35, le=1)
    """An expert whose usage share over the interval exceeds this may split."""
    prune_usage: float = setting(0.02, ge=0)
    """An expert whose usage share over the interval is below this may be pruned."""
    crossover_prob: float = setting(0.1, ge=0, le=1)
    """Chance per layer and interval of a crossover when nothing split and a slot is free."""
    crossover_alpha: float = setting(0.5, ge=0, le=1)
    """Child = alpha * parent A + (1 - alpha) * parent B (parameters and router row)."""
    mutation_std: float = setting(0.01, ge=0)
    """Std of a split child's mutation noise, relative to each parameter's RMS."""
    probation_steps: int = setting(2000, ge=0)
    """Steps a newborn is immune to pruning before its review."""
    probation_min_usage: float = setting(0.05, ge=0, le=1)
    """Usage share a newborn must reach by its review, else it is removed (failed_probation)."""
    cooldown_intervals: int = setting(2, ge=0)
    """After a newborn fails probation, its parents may not split for this many intervals (the
    failing decision included), so a busy parent does not refill the freed slot with a copy of
    the child that just failed; 0: no cool-down."""
    ramp_steps: int = setting(0, ge=0)
    """Steps over which a newborn's routing weight opens from 0 to 1; 0 means probation_steps // 2."""
    usage_ema: float = setting(0.5, ge=0, lt=1)
    """Smoothing of the usage average across intervals (fitness): ema = a * ema + (1 - a) * usage."""
    seed: int | None = None
    """Seed of the controller's own generator (decisions and mutation noise). None (default):
    derived from train.seed when the config is built; an explicit value always wins."""
    grow_until: float | None = setting(None, gt=0, le=1)
    """Growth schedule: the share of the run (train.total_tokens) by which every layer has grown from
    moe.experts_init to moe.experts_max experts; the target rises linearly over the decisions up to
    there, and births follow it only (split_usage and crossover_prob play no part; probation and
    pruning still apply, and the schedule refills what they free). Needs plasticity.experts.enabled
    and moe.experts_max > moe.experts_init. None: no schedule."""
    split_by: Literal["usage", "gradient"] = "usage"
    """Growth schedule: which graduated expert a scheduled birth copies: usage (the most used over
    the last interval) or gradient (the largest gradient utility: the sum over the interval's
    applied steps of the squared norm of its weights' gradient; docs/architecture.md, Growth
    schedule). gradient needs grow_until."""

    def check(self, cfg) -> list[str]:
        problems = []
        key = "plasticity.experts"
        if self.prune_usage >= self.split_usage:
            problems.append(f"{key}.prune_usage ({self.prune_usage}) must be < {key}.split_usage "
                            f"({self.split_usage})")
        if self.grow_until is not None:
            moe = cfg.moe
            if not self.enabled:
                problems.append(f"{key}.grow_until needs {key}.enabled: true (the schedule's births are "
                                "morphogenesis decisions)")
            if moe.experts_max <= moe.experts_init:
                problems.append(f"{key}.grow_until: moe.experts_max ({moe.experts_max}) must be > "
                                f"moe.experts_init ({moe.experts_init}), else there is nothing to grow")
            if 0 < self.grow_until <= 1 and self.grow_until * cfg.total_steps() < self.interval:
                problems.append(f"{key}.grow_until ({self.grow_until}) x {cfg.total_steps()} steps leaves no "
                                f"morph decision ({key}.interval {self.interval}) to grow at: raise grow_until "
                                f"or lower {key}.interval")
        elif self.split_by == "gradient":
            problems.append(f"{key}.split_by: {self.split_by} chooses the parents of scheduled births; "
                            f"set {key}.grow_until too")
        return problems


@dataclass
class NeuronPlasticityConfig:
    enabled: bool = False
    """Neuron apoptosis inside experts: the least fit hidden neurons die and are reborn."""
    method: Literal["functional", "redo", "cbp", "shrink_perturb"] = "functional"
    """functional: fitness-ranked turnover (metric, regrowth, prune_rate below); redo: recycle the
    tau-dormant (Sokar et al. 2023); cbp: continual backprop's utility-ranked replacement (Dohare et
    al. 2024); shrink_perturb: theta <- shrink * theta + perturb * fresh init (Ash & Adams 2020)."""
    interval: int = setting(500, gt=0)
    """Optimizer steps between neuron turnover events."""
    prune_rate: float = setting(0.05, gt=0, lt=1)
    """Share of each live expert's hidden neurons that die per event: int(prune_rate * d_expert)."""
    metric: Literal["grad_activation", "gradient", "weight", "composite"] = "grad_activation"
    """Fitness: grad_activation (sum of |h * dL/dh| over the interval's tokens), gradient (sum of
    the neuron's parameter-gradient norms over the interval's steps), weight (norm of its weights
    at the event), composite (weighted sum of the three, each divided by its mean in the expert)."""
    regrowth: Literal["random", "clone", "mutation", "functional"] = "functional"
    """How the dead are reborn: random (fresh incoming weights), clone (copy of a fittest survivor),
    mutation (fitness-proportional parent + noise), functional (survivors' output weights refit by
    least squares to re-express the dead neurons' contribution, fresh incoming weights)."""
    mutation_std: float = setting(0.1, ge=0)
    """Std of a mutated newborn's noise, relative to the RMS of its parent's incoming weights."""
    composite_taylor: float = setting(0.5, ge=0)
    """Weight of grad_activation in the composite fitness."""
    composite_gradient: float = setting(0.25, ge=0)
    """Weight of gradient in the composite fitness."""
    composite_weight: float = setting(0.25, ge=0)
    """Weight of weight in the composite fitness."""
    record_steps: int = setting(20, ge=0)
    """functional: the last steps of each interval whose hidden activations the refit uses (0: all)."""
    min_age: int = setting(0, ge=0)
    """A neuron younger than this many steps cannot die (founders included)."""
    maturity_intervals: int = setting(1, ge=0)
    """A neuron reborn by turnover cannot die at the next `maturity_intervals` events: it starts
    with zero outgoing weights, so its fitness is near zero until it has learned (0: no protection).
    Neurons of a new expert (a split or crossover copy) are not newborns in this sense."""
    redo_tau: float = setting(0.1, ge=0)
    """redo: a neuron whose mean |h| over the interval is at most tau times its expert's mean over
    neurons is dormant and recycled."""
    cbp_decay: float = setting(0.99, ge=0, lt=1)
    """cbp: decay of the running averages (utility |h| * sum|w_out| and mean h) per step."""
    cbp_replacement_rate: float = setting(1e-4, gt=0, le=1)
    """cbp: share of an expert's mature neurons replaced per step (accumulated; replaced at events)."""
    cbp_maturity: int = setting(100, ge=0)
    """cbp: a neuron is replaceable only when older than this many steps (founders included)."""
    sp_shrink: float = setting(0.4, gt=0, le=1)
    """shrink_perturb: factor on the live experts' weights at each event."""
    sp_perturb: float = setting(0.1, ge=0)
    """shrink_perturb: scale of the added fresh initialisation (the pool's init distributions)."""
    seed: int | None = None
    """Seed of the mechanism's own generator (random / mutation newborns, mutation parents). None
    (default): derived from train.seed when the config is built; an explicit value always wins."""

    def check(self, cfg) -> list[str]:
        """A positive composite weight sum; when enabled, 1..d_expert-1 deaths per expert and event."""
        problems = []
        if self.composite_taylor + self.composite_gradient + self.composite_weight <= 0:
            problems.append("plasticity.neuron.composite_* weights must have a positive sum")
        if self.method != "functional":
            # Keys only the functional method reads: a changed value would silently do nothing.
            unused = [f"{key} ({getattr(self, key)})" for key in ("metric", "regrowth", "prune_rate")
                      if getattr(self, key) != getattr(NeuronPlasticityConfig, key)]
            if unused:
                problems.append(f"plasticity.neuron.{', '.join(unused)}: only method functional reads "
                                f"{'it' if len(unused) == 1 else 'them'}; method {self.method} chooses "
                                f"and regrows neurons by its own rule (docs/plasticity_neuron.md)")
            return problems
        width = cfg.d_expert
        deaths = int(self.prune_rate * width)
        if self.enabled and 0 < self.prune_rate < 1 and not 1 <= deaths <= width - 1:
            problems.append(f"plasticity.neuron.prune_rate ({self.prune_rate}) x d_expert ({width}) = {deaths} "
                            f"deaths per expert; need at least 1 death and 1 survivor")
        return problems


@dataclass
class HeadPlasticityConfig:
    enabled: bool = False
    """Attention-head pruning and regrowth through per-head gates."""
    interval: int = setting(500, gt=0)
    """Optimizer steps between head prune/grow decisions (cycle mode: the train phase before each prune)."""
    mode: Literal["continuous", "cycle"] = "continuous"
    """continuous: every `interval` steps regrow, then prune; cycle: train -> prune -> measure ->
    grow -> learn, `cycles` times in one run, then training goes on with no more head events."""
    prune: Literal["entropy", "magnitude", "importance", "random"] = "entropy"
    """Which live heads die: entropy (most diffuse attention on the probe batch), magnitude
    (smallest q/k/v/proj weight norm), importance (smallest |dL/dgate| over the interval,
    Michel et al. 2019) or random."""
    grow: Literal["gradient_sensitivity", "entropy_gap", "balanced", "random"] = "gradient_sensitivity"
    """Which dead heads are reborn: gradient_sensitivity (largest |dL/dgate| of the reinitialised
    head at gate 0 on the probe batch), entropy_gap (the layer whose live heads attend most
    diffusely), balanced (the layer with the fewest live heads) or random."""
    prune_fraction: float = setting(0.25, gt=0, lt=1)
    """Share of the live heads (all layers together) pruned at each prune event, rounded, >= 1."""
    grow_fraction: float = setting(0.5, gt=0, le=1)
    """Share of the dead heads reborn at each grow event, rounded, >= 1 while any is dead."""
    min_heads: int = setting(1, ge=1)
    """Live heads a layer always keeps (at most model.n_heads; below it when enabled)."""
    warmup_steps: int = setting(100, ge=0)
    """A newborn head's gate rises linearly from 0 (at birth) to 1 over this many steps."""
    new_head_lr_mult: float = setting(1.0, gt=0)
    """Learning-rate multiplier for a newborn head's q/k/v/proj slices while its gate warms up."""
    cycles: int = setting(3, ge=1)
    """Cycle mode: how many train -> prune -> measure -> grow -> learn cycles."""
    recover_steps: int = setting(100, ge=1)
    """Cycle mode: steps trained with the heads pruned, between a prune and its grow."""
    seed: int | None = None
    """Seed of the mechanism's own generator (random criteria, newborn weights). None (default):
    derived from train.seed when the config is built; an explicit value always wins."""

    def check(self, cfg) -> list[str]:
        n_heads = cfg.model.n_heads
        if self.min_heads > n_heads:
            return [f"plasticity.heads.min_heads ({self.min_heads}) must be <= model.n_heads ({n_heads})"]
        if self.enabled and self.min_heads == n_heads:
            return [f"plasticity.heads.min_heads ({self.min_heads}) must be < model.n_heads ({n_heads}), "
                    f"else no head can ever be pruned"]
        return []


@dataclass
class LayerPlasticityConfig:
    enabled: bool = setting(False, unsafe=True)  # per-block optimizer groups (model.param_groups)
    """Layer senescence: per-layer vitality and influence; dying layers are replaced."""
    interval: int = setting(500, gt=0)
    """Optimizer steps between layer vitality reviews."""
    death_zone: int = 1
    """The last `death_zone` blocks (nearest the output) are the only ones that can die."""
    birth_zone: int = 1
    """The first `birth_zone` blocks (nearest the input); a newborn enters at the zone's
    innermost position, birth_zone - 1. The blocks between the zones are the stable core."""
    trigger: float = setting(0.25, ge=0)
    """A death-zone block dies when its vitality falls below this (1.0 = an average block)."""
    min_age: int = setting(1000, ge=0)
    """Steps a block must have lived before it may die (founders are born at step 0)."""
    lifespan: int = setting(5000, ge=0)
    """Senescence time constant: vitality = importance_ema * exp(-age / lifespan); 0 = no ageing."""
    importance_ema: float = setting(0.5, ge=0, lt=1)
    """Weight of the old value in the importance moving average (0 = last review only)."""
    newborn: Literal["copy", "fresh"] = "copy"
    """copy (mutated copy of the most vital block, its optimizer moments too) or fresh
    (new random init, zero moments)."""
    mutation_std: float = setting(0.01, ge=0)
    """Relative noise of a copied newborn: N(0, (mutation_std * RMS(tensor))^2) per parameter."""
    newborn_influence: float = setting(0.0, ge=0, le=1)
    """A newborn's influence at birth (0 = the block starts as the identity)."""
    warmup_steps: int = setting(200, ge=0)
    """Steps over which a newborn's influence rises linearly to 1."""
    max_temperature: float = setting(1.5, ge=1)
    """Attention temperature of a block at vitality 0 (1 at vitality >= 1, linear between)."""
    max_dropout: float = setting(0.1, lt=1)
    """Residual-branch dropout of a block at vitality 0 (model.dropout at vitality >= 1)."""
    min_lr_scale: float = setting(0.5, gt=0, le=1)
    """Learning-rate multiplier of a block at vitality 0 (1 at vitality >= 1)."""
    seed: int | None = None
    """Seed of the mechanism's own generator (a copied newborn's mutation noise). None (default):
    derived from train.seed when the config is built; an explicit value always wins."""

    def check(self, cfg) -> list[str]:
        """Zone sizes (only when enabled) and max_dropout against model.dropout."""
        problems = []
        n_layers, dropout = cfg.model.n_layers, cfg.model.dropout
        if self.enabled and not (self.birth_zone >= 1 and self.death_zone >= 1
                                 and self.birth_zone + self.death_zone < n_layers):
            problems.append(f"plasticity.layers: birth_zone ({self.birth_zone}) and death_zone "
                            f"({self.death_zone}) must be >= 1 and leave a stable core of >= 1 block between "
                            f"them: need birth_zone + death_zone < model.n_layers ({n_layers})")
        if self.max_dropout < dropout:
            problems.append(f"plasticity.layers.max_dropout ({self.max_dropout}) must be >= model.dropout "
                            f"({dropout})")
        return problems


# The class's name before the section moved under `plasticity:` (it was the top-level `morph`).
MorphConfig = ExpertPlasticityConfig


@dataclass
class PlasticityConfig:
    """Structural plasticity at every granularity: experts (on by default), neuron, heads, layers (off)."""

    # The experts section's derived seed keeps the label of its old path, "morph" (derive_seed in
    # lib.py hashes the label): every run seeded before the move reproduces bit-identically.
    experts: ExpertPlasticityConfig = field(default_factory=ExpertPlasticityConfig, metadata={"seed_label": "morph"})
    neuron: NeuronPlasticityConfig = field(default_factory=NeuronPlasticityConfig)
    heads: HeadPlasticityConfig = field(default_factory=HeadPlasticityConfig)
    layers: LayerPlasticityConfig = field(default_factory=LayerPlasticityConfig)
