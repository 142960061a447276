"""What a comparison runs: strategies x seeds on one config, and the phases of the shift protocol.

A strategy is a named set of `--set` overrides (STRATEGIES is the one place they are
defined). Seed s sets train.seed, the run seed, for every strategy (the data, morph
and plasticity seeds derive from it), so one seed gives the same data order, token budget and evaluation batches whatever the
strategy. The shift protocol trains phase after phase on one source each; the
others keep a weight of OFF_PHASE_WEIGHT so every source is still evaluated. The cycles
protocol does the same over many short phases, its sources visited in a fixed cycle
(tools/comparison/cycles.py), with fresh reference runs beside the arms.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from nemoe.config import Config, load_config
from nemoe.errors import UserError
from nemoe.schema import RunPaths
from tools.comparison.declared import Declaration

BASELINE = "static_moe"
# Paired comparisons besides every strategy vs BASELINE, reported when both ran: does growing
# match having the final size from the start, and what does the balancing mode change.
EXTRA_PAIRS = (("morph", "static_max"), ("morph_bias", "morph"), ("morph_bias", "static_max"),
               ("grow", "static_max"), ("grow_grad", "static_max"), ("grow_grad", "grow"))
TARGET_BASELINE = "static_max"   # tokens-to-target aims at its final held-out loss when it is in the grid
GROW_UNTIL = 0.5                 # the growth strategies reach experts_max by this share of the run
OFF_PHASE_WEIGHT = 1e-9  # a source outside its phase: kept (so it is evaluated), never drawn in practice
MECHANISMS = ("neuron", "heads", "layers")
PHASED = ("shift", "cycles")   # protocols that train phase by phase, one source each
FRESH = "fresh"   # cycles: the reference runs' strategy column (BASELINE's settings, one source from init)


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Strategy:
    name: str
    about: str
    overrides: Callable[[Config], list[str]]
    mechanism: str | None = None  # the plasticity mechanism it needs (nemoe.plasticity.REGISTRY)
    in_default_grid: bool = True  # run when --strategies is not given (the growth and plasticity
    #                               studies' arms are named, so the default grid stays the founding one)


def _only_mechanism(name: str | None) -> list[str]:
    """Every plasticity mechanism off except `name`, so a strategy measures one thing at a time."""
    return [f"plasticity.{m}.enabled={str(m == name).lower()}" for m in MECHANISMS]


def _grow(split_by: str) -> Callable[[Config], list[str]]:
    # Births by the schedule only; no pruning (prune_usage 0) and every newborn graduates
    # (probation_min_usage 0), so the pool grows as scheduled and stays at experts_max.
    return lambda cfg: ["plasticity.experts.enabled=true", f"plasticity.experts.grow_until={GROW_UNTIL}",
                        f"plasticity.experts.split_by={split_by}", "plasticity.experts.prune_usage=0",
                        "plasticity.experts.probation_min_usage=0", *_only_mechanism(None)]


def _dense(cfg: Config) -> list[str]:
    # One slot of width top_k * d_expert: the FLOPs and active parameters per token of
    # the top-k MoE, as a plain FFN (a one-slot MoELayer is exactly a dense FFN).
    return ["moe.experts_init=1", "moe.experts_min=1", "moe.experts_max=1", "moe.top_k=1",
            "plasticity.experts.enabled=false", f"model.d_expert={cfg.moe.top_k * cfg.d_expert}",
            *_only_mechanism(None)]


# plasticity.neuron variants (static experts): functional turnover with and without newborn
# protection (maturity_intervals; today's default is 1, so `neuron` = `neuron_protect`), and the
# recyclers of the literature (docs/plasticity_neuron.md).
NEURON_METHODS = [
    ("neuron_protect", "functional turnover, newborns protected for 1 event (maturity_intervals=1, the default)",
     ["method=functional", "maturity_intervals=1"]),
    ("neuron_unprotected", "functional turnover without newborn protection (maturity_intervals=0)",
     ["method=functional", "maturity_intervals=0"]),
    ("redo", "ReDo: recycle tau-dormant neurons (Sokar et al. 2023)", ["method=redo"]),
    ("cbp", "continual backprop: replace low-utility mature neurons (Dohare et al. 2024)", ["method=cbp"]),
    ("shrink_perturb", "Shrink & Perturb of the experts' weights (Ash & Adams 2020)", ["method=shrink_perturb"]),
]

# Every strategy but morph_bias balances as the config says (moe.balance, aux_loss by default).
STRATEGIES = {s.name: s for s in [
    Strategy("dense", "one FFN, same active parameters per token as the MoE", _dense),
    Strategy("static_moe", "the MoE with its initial experts, no morphogenesis",
             lambda cfg: ["plasticity.experts.enabled=false", *_only_mechanism(None)]),
    Strategy("static_max", "the MoE with experts_max experts from step 0 (the final size morphogenesis "
             "may grow to), no morphogenesis",
             lambda cfg: ["plasticity.experts.enabled=false", f"moe.experts_init={cfg.moe.experts_max}",
                          *_only_mechanism(None)]),
    Strategy("morph", "expert morphogenesis: split, prune, crossover, probation",
             lambda cfg: ["plasticity.experts.enabled=true", *_only_mechanism(None)]),
    Strategy("morph_bias", "morphogenesis with auxiliary-loss-free balancing (moe.balance=bias: a selection "
             "bias instead of the load-balance loss)",
             lambda cfg: ["plasticity.experts.enabled=true", "moe.balance=bias", *_only_mechanism(None)]),
    Strategy("grow", f"growth schedule: from experts_init to experts_max experts by {GROW_UNTIL:g} of the run "
             "(plasticity.experts.grow_until), each birth copying the most-used expert (split_by usage); no "
             "pruning, every newborn graduates", _grow("usage"), in_default_grid=False),
    Strategy("grow_grad", f"growth schedule: from experts_init to experts_max experts by {GROW_UNTIL:g} of the run, "
             "each birth copying the expert of largest gradient utility (split_by gradient); no pruning, every "
             "newborn graduates", _grow("gradient"), in_default_grid=False),
    *[Strategy(m, f"plasticity.{m} alone (static experts)",
               (lambda cfg, m=m: ["plasticity.experts.enabled=false", *_only_mechanism(m)]), mechanism=m)
      for m in MECHANISMS],
    Strategy("static_wd0", "static_moe with train.weight_decay=0 (to induce plasticity loss)",
             lambda cfg: ["plasticity.experts.enabled=false", "train.weight_decay=0", *_only_mechanism(None)],
             in_default_grid=False),
    *[Strategy(name, about, (lambda cfg, sets=sets: ["plasticity.experts.enabled=false", *_only_mechanism("neuron"),
                                                      *[f"plasticity.neuron.{x}" for x in sets]]),
               mechanism="neuron", in_default_grid=False) for name, about, sets in NEURON_METHODS],
]}


def available(strategy: Strategy) -> bool:
    from nemoe.plasticity import REGISTRY   # torch: only when a strategy's mechanism is checked
    return strategy.mechanism is None or strategy.mechanism in REGISTRY


def choose_strategies(text: str | None) -> tuple[list[str], list[str]]:
    """(strategies to run, notes). Default: every available one of the default grid; an unavailable
    one named is an error."""
    if text is None:
        names = [n for n, s in STRATEGIES.items() if s.in_default_grid]
        skipped = [n for n in names if not available(STRATEGIES[n])]
        notes = [f"strategy {n} skipped: plasticity.{STRATEGIES[n].mechanism} is not available in this "
                 f"version" for n in skipped]
        return [n for n in names if n not in skipped], notes
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise UserError(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise UserError("--strategies: a strategy is named twice")
    for n in names:
        if not available(STRATEGIES[n]):
            raise UserError(f"--strategies: {n} needs plasticity.{STRATEGIES[n].mechanism}, "
                            f"which is not available in this version")
    return names, []


def seed_overrides(seed: int) -> list[str]:
    """The run seed; morph, data and plasticity.* seeds derive from it (unless the config sets them)."""
    return [f"train.seed={seed}"]


# --------------------------------------------------------------------------- #
# Runs and the plan
# --------------------------------------------------------------------------- #

@dataclass
class Phase:
    end: int                       # the run's step at the end of this phase
    overrides: list[str] = field(default_factory=list)
    source: str | None = None      # shift and cycles protocols: the source trained on


@dataclass
class Run:
    strategy: str
    seed: int
    overrides: list[str]           # --set items common to every phase
    phases: list[Phase]
    tag: str = ""                  # cycles' fresh reference runs: the source, e.g. fresh-docs-s0

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.tag}-s{self.seed}" if self.tag else f"{self.strategy}-s{self.seed}"

    def paths(self, out: Path) -> RunPaths:
        """Its log and checkpoint folders under the comparison's out folder."""
        return RunPaths.of(out, self.name)


@dataclass
class Plan:
    config: str                    # --config as given
    out: Path
    protocol: str
    runs: list[Run]
    base: Config                   # the config with the user's --set items (before strategies)
    notes: list[str]
    jobs: int
    threads: int
    command: str
    within: float = 0.05           # shift: the 'within x of' threshold
    study: Path | None = None      # committed rows (tools/comparison/committed.py), if kept
    rebuild: bool = False          # report only: run nothing
    declared: Declaration = field(default_factory=Declaration)   # set by compare.py (declared.settle)
    target_baseline: str | None = None   # tokens-to-target: the strategy whose final held-out loss is the target
    references: list[Run] = field(default_factory=list)   # cycles: fresh runs, one per source and seed
    k_steps: int = 0               # cycles: the loss after k steps of a phase

    @property
    def record_folder(self) -> Path:
        """Where declared.json lives: the study folder if there is one, else the out folder."""
        return self.study if self.study is not None else self.out

    @property
    def primary_metric(self) -> str:
        """The metric the primary comparisons compare: held-out loss (shift: at the last phase's end;
        cycles: the slope of the adaptation area per visit)."""
        return {"grid": "loss_all", "shift": "end_loss_all", "cycles": "slope_area_all"}[self.protocol]

    @property
    def sources(self) -> list[str]:
        return [s.name for s in self.base.data.sources]


def expected_config(plan: Plan, run: Run) -> Config:
    """The resolved config of the run's last phase (raises UserError for a bad --set)."""
    return load_config(plan.config, run.overrides + run.phases[-1].overrides)


def build_plan(args: argparse.Namespace, argv: list[str] | None) -> Plan:
    """The runs of tools/compare.py's command line; a bad config or --set fails here, before any run."""
    base = load_config(args.config, args.overrides)
    strategies, notes = choose_strategies(args.strategies)
    seeds = parse_seeds(args)
    name = Path(args.config).stem
    study = Path(args.study) if getattr(args, "study", None) else None
    if study is not None:
        name = study.name
    out = Path(args.out) if args.out else Path("compare") / (name + ("" if args.protocol == "grid" else
                                                                     "-" + args.protocol))
    phase_plan = None
    if args.protocol == "shift":
        phase_plan = shift_phases(args, base)
    elif args.protocol == "cycles":
        phase_plan = cycle_phases(args, base)
    if phase_plan is not None:  # the settings every phased run shares, for the report
        base = load_config(args.config, phase_plan[0] + list(args.overrides))
    runs = []
    for strategy in strategies:
        for seed in seeds:
            common = list(args.overrides) + STRATEGIES[strategy].overrides(base) + seed_overrides(seed)
            if phase_plan is None:
                runs.append(Run(strategy, seed, common, [Phase(base.total_steps())]))
            else:
                extra, phases = phase_plan
                runs.append(Run(strategy, seed, extra + common, phases))
    references, k_steps = [], 0
    if args.protocol == "cycles":
        k_steps = check_cadence(args, base, phase_plan[1])
        if not args.no_fresh:
            references = fresh_runs(list(args.overrides), base, seeds, *phase_plan)
    gpu = base.train.device != "cpu" and _cuda_visible()
    jobs = args.jobs or (1 if gpu else max(1, min(len(runs) + len(references), cpu_count() // 2)))
    if jobs < 1 or (args.within is not None and not 0 < args.within < 1):
        raise UserError("--jobs must be >= 1 and --within in (0, 1)")
    command = "python tools/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return Plan(args.config, out, args.protocol, runs, base, notes, jobs, max(1, cpu_count() // jobs), command,
                args.within, study, bool(getattr(args, "rebuild", False)),
                target_baseline=target_baseline(getattr(args, "target_baseline", None), strategies),
                references=references, k_steps=k_steps)


def target_baseline(name: str | None, strategies: list[str]) -> str | None:
    """--target-baseline, checked; default TARGET_BASELINE when it runs, else none."""
    if name is None:
        return TARGET_BASELINE if TARGET_BASELINE in strategies else None
    if name not in strategies:
        raise UserError(f"--target-baseline {name}: not among the strategies run ({', '.join(strategies)})")
    return name


def parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seed-list {args.seed_list!r}: expected integers, e.g. 0,1,2") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError("--seed-list: give distinct seeds")
        return seeds
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    return list(range(args.seeds))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- #
# Domain-shift phases
# --------------------------------------------------------------------------- #

def shift_phases(args: argparse.Namespace, base: Config) -> tuple[list[str], list[Phase]]:
    """(--set items for every phase, the phases) of the shift protocol."""
    sources = [s.name for s in base.data.sources]
    if args.phases is None and len(sources) < 2:
        raise UserError("--protocol shift needs two data sources (or --phases)")
    text = args.phases or f"{sources[0]}:300,{sources[1]}:300,{sources[0]}:300"
    phases, end = [], 0
    for source, steps in parse_phases(text, base):
        end += steps
        phases.append(Phase(end, [phase_sources_override(base, source)], source))
    # One LR schedule over all phases; frequent evaluations so speeds can be read off eval.csv.
    every = max(1, min(p.end - q for p, q in zip(phases, [0] + [p.end for p in phases])) // 15)
    # Before the user's --set items, which therefore win.
    return [f"train.total_tokens={end * base.tokens_per_step()}", f"eval.every_steps={every}"], phases


def parse_phases(text: str, cfg: Config) -> list[tuple[str, int]]:
    sources = [s.name for s in cfg.data.sources]
    phases = []
    for item in text.split(","):
        name, sep, steps = item.strip().partition(":")
        if not sep or not steps.strip().isdigit() or int(steps) < 1:
            raise UserError(f"--phases {item!r}: expected SOURCE:STEPS, e.g. prose:300")
        if name not in sources:
            raise UserError(f"--phases: {name!r} is not a source of this config (its sources: {', '.join(sources)})")
        phases.append((name, int(steps)))
    if len(phases) < 2:
        raise UserError("--phases: give at least two phases, e.g. prose:300,code:300,prose:300")
    return phases


def phase_sources_override(cfg: Config, source: str) -> str:
    """data.sources with all weight on `source`; the others stay (for evaluation) at a negligible weight."""
    items = [dict(dataclasses.asdict(s), weight=1.0 if s.name == source else OFF_PHASE_WEIGHT)
             for s in cfg.data.sources]
    return "data.sources=" + yaml.safe_dump(items, default_flow_style=True, width=10**9).strip()


# --------------------------------------------------------------------------- #
# The cycles protocol's phases and fresh reference runs (tools/comparison/cycles.py: its metrics)
# --------------------------------------------------------------------------- #

def cycle_sources(args: argparse.Namespace, base: Config) -> list[str]:
    sources = [s.name for s in base.data.sources]
    names = [n.strip() for n in args.cycle.split(",") if n.strip()] if args.cycle else sources
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UserError(f"--cycle: {', '.join(map(repr, unknown))} not a source of this config "
                        f"(its sources: {', '.join(sources)})")
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError("--protocol cycles needs two or more distinct sources (the config's, or --cycle A,B,...)")
    return names


def cycle_phases(args: argparse.Namespace, base: Config) -> tuple[list[str], list[Phase]]:
    """(--set items for every phase, the phases): --cycles-repeats cycles over the sources."""
    if args.phase_steps < 1 or args.cycles_repeats < 1 or args.eval_every < 1 or args.k_steps < 1:
        raise UserError("--phase-steps, --cycles-repeats, --eval-every and --k-steps must be >= 1")
    sources = cycle_sources(args, base)
    phases = [Phase(args.phase_steps * (i + 1), [phase_sources_override(base, source)], source)
              for i, source in enumerate(sources * args.cycles_repeats)]
    # Before the user's --set items, which therefore win.
    return [f"train.total_tokens={phases[-1].end * base.tokens_per_step()}",
            f"eval.every_steps={args.eval_every}"], phases


def check_cadence(args: argparse.Namespace, base: Config, phases: list[Phase]) -> int:
    """k (the loss after k steps of a phase), checked against the resolved evaluation cadence."""
    every, steps = base.eval.every_steps, args.phase_steps
    if steps % every or args.k_steps % every or args.k_steps > steps:
        raise UserError(f"--phase-steps ({steps}) and --k-steps ({args.k_steps}) must be multiples of the "
                        f"evaluation interval ({every}: --eval-every or eval.every_steps), k at most a phase")
    return args.k_steps


def fresh_runs(user: list[str], base: Config, seeds: list[int], extra: list[str],
               phases: list[Phase]) -> list[Run]:
    """The reference: per seed and source, BASELINE's model trained from initialisation on that
    source alone for one phase, with the arms' settings (so its schedule is the arms' first phase's)."""
    seen = list(dict.fromkeys(p.source for p in phases))
    common = extra + user + STRATEGIES[BASELINE].overrides(base)
    return [Run(FRESH, seed, common + seed_overrides(seed),
                [Phase(phases[0].end, [phase_sources_override(base, source)], source)], tag=source)
            for seed in seeds for source in seen]
