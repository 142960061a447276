"""Neuron turnover's small pure functions (nemoe/plasticity/neuron.py): fitness, selection, refit.

Shapes: w_in (E, C, H), b_in (E, H), w_out (E, H, C); neuron j of expert e is column j of
w_in[e], entry j of b_in[e] and row j of w_out[e].
"""

from __future__ import annotations

import math

import torch

RIDGE = 1e-6      # functional refit: Tikhonov term relative to the mean activation energy


def neuron_norms(w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """||theta_j|| per neuron. w_in (E, C, H), b_in (E, H), w_out (E, H, C) -> (E, H)."""
    sq = w_in.double().pow(2).sum(1) + b_in.double().pow(2) + w_out.double().pow(2).sum(2)
    return sq.sqrt()


def composite_fitness(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_m c_m * F_m / mean_j(F_m), per expert row. parts: name -> (E, H)."""
    total = 0
    for name, f in parts.items():
        if weights[name] > 0:
            total = total + weights[name] * f / f.mean(dim=-1, keepdim=True).clamp_min(1e-30)
    return total


def select_dead(fitness: torch.Tensor, n_deaths: int, eligible: torch.Tensor) -> torch.Tensor:
    """The n_deaths eligible neurons of lowest fitness, worst first (ties: lower index)."""
    masked = torch.where(eligible, fitness, torch.full_like(fitness, math.inf))
    order = torch.sort(masked, stable=True).indices
    return order[:min(n_deaths, int(eligible.sum()))]


def refit_outgoing(gram: torch.Tensor, w_out: torch.Tensor, dead: torch.Tensor):
    """Survivors' outgoing rows that re-express the dead neurons' output (least squares).

    gram: (H+1, H+1) sum over recorded tokens of a a^T, a = [h, 1]; w_out: (H, C);
    dead: (k,) indices. Solves min ||[H_s, 1] X - H W||^2 (+ ridge) through the
    normal equations, which need only the Gram matrix. Returns the survivors' new
    rows (H-k, C, in index order), the shift of b_out (C,) and the relative RMS
    residual ||[H_s, 1] X - H W|| / ||H W|| on the recorded tokens.
    """
    width = w_out.shape[0]
    keep_mask = torch.ones(width + 1, dtype=torch.bool, device=gram.device)
    keep_mask[dead] = False
    keep = keep_mask.nonzero().squeeze(1)                 # survivors, then the constant
    A, W = gram.double(), w_out.double()
    cross = A[keep][:, :width] @ W                        # (S+1, C) sum a_S (h W)
    A_kk = A[keep][:, keep]                               # (S+1, S+1)
    ridge = RIDGE * A_kk.diagonal().mean()
    X = torch.linalg.solve(A_kk + ridge * torch.eye(len(keep), dtype=A.dtype, device=A.device), cross)
    target = (W.T @ A[:width, :width] @ W).trace()        # ||H W||^2
    error = (X.T @ A_kk @ X).trace() - 2 * (X.T @ cross).trace() + target
    relative = float((error.clamp_min(0) / target).sqrt()) if target > 0 else 0.0
    return X[:-1], X[-1], relative
