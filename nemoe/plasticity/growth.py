"""The growth schedule of expert morphogenesis (plasticity.experts.grow_until and .split_by).

A run starts with moe.experts_init experts per layer and reaches moe.experts_max by
`grow_until` x the run's steps. The target rises linearly over the morph decisions up
to there (decision k of D: experts_init + ceil((experts_max - experts_init) * k / D)),
so the births are spread evenly and the last one happens at the last decision at or
before grow_until. At each decision a layer below its target splits as many graduated
experts as it lacks (one birth per free slot, function-preserving as every split is:
the child enters with routing weight 0). Which expert is copied:

  usage     the most used over the interval that just ended (the rule of usage splits)
  gradient  the largest gradient utility: the sum over the interval's applied steps of
            ||g_e||^2, the squared norm of the gradient of expert e's weights (w_in, b_in,
            w_out, b_out; unscaled and clipped, as the optimizer gets it). README, Expert
            morphogenesis, says why this measure.

With more births than candidates in one decision the ranking is used round-robin (the
best expert gets a second child before the third-best gets its first only when fewer
candidates than births remain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemoe.moe import MoELayer


def growth_decisions(morph, total_steps: int) -> int:
    """D: the morph decisions at or before grow_until x total_steps (at least 1)."""
    return max(1, int(morph.grow_until * total_steps) // morph.interval)


def growth_target(step: int, morph, experts_init: int, experts_max: int, total_steps: int) -> int | None:
    """Live experts a layer should have after the decision at `step`; None without a schedule."""
    if morph.grow_until is None:
        return None
    decisions = growth_decisions(morph, total_steps)
    k = min(step // morph.interval, decisions)
    return experts_init + math.ceil((experts_max - experts_init) * k / decisions)


@dataclass
class Growth:
    """One layer's scheduled births at one decision, for plan_layer."""

    target: int                 # live experts after this decision
    experts_max: int
    until_step: int             # the step by which the schedule reaches experts_max
    criterion: str              # usage | gradient
    scores: list[float]         # per slot: the criterion's value over the interval

    def parents(self, candidates: list[int], births: int) -> list[int]:
        """The slots to copy, best first by score (ties: the lower slot), round-robin past the end."""
        ranked = sorted(candidates, key=lambda s: (-self.scores[s], s))
        return [ranked[i % len(ranked)] for i in range(births)]

    @property
    def label(self) -> str:
        return "gradient utility" if self.criterion == "gradient" else "usage"

    def reading(self, parent: int) -> str:
        """The text log's words for a scheduled split's value (the parent's score) and threshold (the target)."""
        return f"Parent's {self.label} {self.scores[parent]:.4g} | Scheduled target {self.target} experts"

    def cause(self, parent: int, n_live: int, n_candidates: int) -> str:
        label = self.label
        return (f"scheduled growth: {n_live} -> {self.target} of {self.experts_max} experts (linear to step "
                f"{self.until_step}); parent by {label} {self.scores[parent]:.4g}, ranked among "
                f"{n_candidates} graduated")


@torch.no_grad()
def slot_grad_sq(layer: MoELayer) -> torch.Tensor:
    """(E,) float64: per slot, the squared norm of the gradient of its expert weights now (0 where a
    parameter has no gradient). The one place per-slot gradients are read."""
    e = layer.experts
    total = torch.zeros(layer.n_slots, dtype=torch.float64, device=e.w_in.device)
    for p in (e.w_in, e.b_in, e.w_out, e.b_out):
        if p.grad is not None:
            total += torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=torch.float64).pow(2)
    return total


# --------------------------------------------------------------------------- #
# What a pool costs
# --------------------------------------------------------------------------- #

def params_per_expert(model) -> int:
    """Parameters of one expert (its MLP: what NemoeLM.count_params counts per live expert)."""
    return model.count_params(live_experts=1)["live"] - model.count_params(live_experts=0)["live"]


class ParamSteps:
    """Live-expert parameter-steps (training_log.csv expert_param_steps): each optimizer step adds
    the parameters of the experts live in it; `live()` gives the live experts per layer."""

    def __init__(self, model, live):
        self.per_expert, self.live, self.total = params_per_expert(model), live, 0

    def add_step(self) -> None:
        self.total += self._per_step()

    def _per_step(self) -> int:
        return self.per_expert * sum(self.live())

    def restore(self, saved: int | None, step: int) -> list[str]:
        """The count a checkpoint holds; one written before the count: its steps at the experts
        live now, and a note saying so."""
        if saved is not None:
            self.total = saved
            return []
        self.total = step * self._per_step()
        return [f"the checkpoint predates expert_param_steps: the steps up to {step} are counted at the "
                f"experts live now ({self.total:,} parameter-steps)"]
