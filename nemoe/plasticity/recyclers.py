"""The recyclers of the literature, as `plasticity.neuron.method`s beside functional turnover.

Neuron j of expert e: column j of w_in[e], entry j of b_in[e], row j of w_out[e]
(nemoe/plasticity/neuron.py). `NeuronPlasticity` keeps the records, the events and
the optimizer surgery; the rules that differ per method live here as small pure
functions (docs/plasticity_neuron.md has the sources and defaults).

  redo            (Sokar et al. 2023) every `interval` steps, the neurons whose ReDo score
                  (mean |h| over the interval's tokens / the expert's mean over neurons,
                  nemoe.dormancy.activity_scores) is <= redo_tau are recycled: fresh
                  incoming weights, outgoing weights zero, their moments zero.
  cbp             continual backprop (Dohare et al. 2024): per step a running average of
                  the contribution utility u_j <- d u_j + (1-d) mean|h_j| sum_k |w_out_jk|
                  and of the mean activation; replacement_rate x (mature neurons) neurons
                  per step are due (accumulated, replaced at events); the lowest
                  bias-corrected utilities among neurons older than cbp_maturity steps are
                  replaced: fresh incoming, outgoing zero, moments zero, and b_out takes
                  their mean contribution (as the reference implementation does).
  shrink_perturb  (Ash & Adams 2020) at each event every live expert's parameters become
                  sp_shrink * theta + sp_perturb * (a fresh draw of the pool's init).
"""

from __future__ import annotations

import torch

INIT_STD = 0.02   # ExpertPool's init of w_in (and of w_out, divided by sqrt(2 * n_layers))


def corrected(average: torch.Tensor, updates: torch.Tensor, decay: float) -> torch.Tensor:
    """A running average started at 0, divided by 1 - decay^updates (0 where never updated)."""
    scale = 1 - torch.pow(torch.full_like(average, decay), updates.to(average.dtype))
    return torch.where(updates > 0, average / scale.clamp_min(1e-300), torch.zeros_like(average))


@torch.no_grad()
def cbp_update_(util: torch.Tensor, mean_act: torch.Tensor, updates: torch.Tensor, abs_sum: torch.Tensor,
                h_sum: torch.Tensor, tokens: torch.Tensor, w_out: torch.Tensor, decay: float) -> None:
    """One step of continual backprop's running averages for one layer's experts, in place.

    util, mean_act (E, H) float64; updates (E, H) long; abs_sum, h_sum (E, H) the step's sums of
    |h| and h over each expert's tokens (E,); w_out (E, H, C). Experts without tokens this step
    keep their averages (no evidence), so `updates` counts the steps each average has seen.
    """
    seen = (tokens > 0).unsqueeze(-1)                                     # (E, 1)
    n = tokens.clamp_min(1).unsqueeze(-1)
    contribution = abs_sum / n * w_out.detach().abs().sum(-1).to(util.dtype)   # mean|h_j| * sum_k |w_jk|
    util.copy_(torch.where(seen, decay * util + (1 - decay) * contribution, util))
    mean_act.copy_(torch.where(seen, decay * mean_act + (1 - decay) * h_sum / n, mean_act))
    updates += seen.long()


def cbp_due(pending: torch.Tensor, eligible_counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Neurons due per expert after one more step: pending + rate * (mature neurons)."""
    return pending + rate * eligible_counts.to(pending.dtype)


def redo_candidates(scores: torch.Tensor, tau: float, eligible: torch.Tensor) -> torch.Tensor:
    """The eligible neurons with score <= tau, lowest score first (ties: lower index). scores (H,)."""
    masked = torch.where(eligible & (scores <= tau), scores, torch.full_like(scores, float("inf")))
    order = torch.sort(masked, stable=True).indices
    return order[:int(torch.isfinite(masked).sum())]


@torch.no_grad()
def shrink_perturb_(pool, slots: torch.Tensor, shrink: float, perturb: float, out_std: float,
                    generator: torch.Generator) -> None:
    """theta <- shrink * theta + perturb * (fresh init) on the `slots` of an ExpertPool, in place.

    The fresh init is the pool's own: w_in ~ N(0, INIT_STD^2), w_out ~ N(0, out_std^2), biases 0
    (so a bias is only shrunk). Noise is drawn on the CPU: the same on every device.
    """
    for p, std in ((pool.w_in, INIT_STD), (pool.b_in, 0.0), (pool.w_out, out_std), (pool.b_out, 0.0)):
        block = p[slots] * shrink
        if perturb > 0 and std > 0:
            block += (torch.randn(block.shape, generator=generator) * (perturb * std)).to(block)
        p[slots] = block
