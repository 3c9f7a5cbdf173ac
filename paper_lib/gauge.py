"""Appendix A, the orthogonal gauge, as PAPER_SPEC 7 states it (with its correction).

Row convention, as the appendix's toy code: out = x W1 W2. For any orthogonal R, W1 -> W1 R and
W2 -> Rᵀ W2 leave the product W1 W2, every singular value and every ‖W‖F (so weight decay) unchanged,
while the singular vectors rotate. Procrustes (R̂ = U Vᵀ from the SVD of W1ᵀ W1') recovers R.

The sound form of the appendix's cost argument: for parameter steps of the same size η, a first-order
gauge step W1(I + ηA), (I − ηA)W2 with A skew changes the product by O(η²), while a change of σ of the
same size changes it by O(η). `step_scaling` measures both; the slopes are fitted, not drawn.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    Q, Rr = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rr))


def chain(d_in: int = 32, d_mid: int = 16, d_out: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, d_mid, generator=g, dtype=torch.float64) / d_in ** 0.5,
            torch.randn(d_mid, d_out, generator=g, dtype=torch.float64) / d_mid ** 0.5)


def procrustes(W1: torch.Tensor, W1_rotated: torch.Tensor) -> torch.Tensor:
    """The orthogonal R̂ closest to mapping W1 onto W1_rotated: U Vᵀ from the SVD of W1ᵀ W1_rotated."""
    U, _, Vh = torch.linalg.svd(W1.T @ W1_rotated)
    return U @ Vh


def gauge_invariance(W1: torch.Tensor, W2: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
    """What a gauge rotation changes: nothing functional, only the singular vectors."""
    W1r, W2r = W1 @ R, R.T @ W2
    sv = torch.linalg.svdvals
    V1, V1r = torch.linalg.svd(W1, full_matrices=False)[2], torch.linalg.svd(W1r, full_matrices=False)[2]
    # per-index angle between the old and new right singular vectors of W1 (sign-free)
    cos = (V1 * V1r).sum(1).abs().clamp(max=1.0)
    return {
        "product_change": float(torch.linalg.norm(W1r @ W2r - W1 @ W2)),
        "sigma_change_W1": float((sv(W1r) - sv(W1)).abs().max()),
        "sigma_change_W2": float((sv(W2r) - sv(W2)).abs().max()),
        "fro_change": float(abs(torch.linalg.norm(W1r) ** 2 + torch.linalg.norm(W2r) ** 2
                                - torch.linalg.norm(W1) ** 2 - torch.linalg.norm(W2) ** 2)),
        "procrustes_error": float(torch.linalg.norm(procrustes(W1, W1r) - R)),
        "mean_vector_rotation_deg": float(torch.rad2deg(torch.arccos(cos)).mean()),
    }


def sigma_table(W1: torch.Tensor, R: torch.Tensor) -> pd.DataFrame:
    """W1's singular values before and after the rotation W1 -> W1 R, one row per index (equal columns)."""
    return pd.DataFrame({"index": np.arange(min(W1.shape)), "before": torch.linalg.svdvals(W1).numpy(),
                         "after": torch.linalg.svdvals(W1 @ R).numpy()})


def step_scaling(W1: torch.Tensor, W2: torch.Tensor, etas: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """‖Δ(W1 W2)‖F after parameter steps of size η (‖ΔW1‖F² + ‖ΔW2‖F² = η²) of two kinds:
    "gauge": W1(I + ηA), (I − ηA)W2 with A skew; "sigma": W1's singular values moved along a unit
    direction, its singular vectors fixed. One row per (kind, η)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(W1.shape[1], W1.shape[1], generator=g, dtype=torch.float64)
    A = M - M.T
    A = A / torch.sqrt(torch.linalg.norm(W1 @ A) ** 2 + torch.linalg.norm(A @ W2) ** 2)  # unit step at η = 1
    U, _, Vh = torch.linalg.svd(W1, full_matrices=False)
    d = torch.randn(U.shape[1], generator=g, dtype=torch.float64)
    D = (U * (d / torch.linalg.norm(d))) @ Vh  # ‖D‖F = 1
    base = W1 @ W2
    eye = torch.eye(W1.shape[1], dtype=torch.float64)
    rows = []
    for eta in etas:
        gauge = W1 @ (eye + eta * A) @ (eye - eta * A) @ W2
        sigma = (W1 + eta * D) @ W2
        rows.append({"eta": eta, "kind": "gauge", "product_change": float(torch.linalg.norm(gauge - base))})
        rows.append({"eta": eta, "kind": "sigma", "product_change": float(torch.linalg.norm(sigma - base))})
    return pd.DataFrame(rows)


def fitted_slopes(table: pd.DataFrame) -> dict[str, float]:
    """Least-squares slope of log ‖Δ(W1 W2)‖F against log η, per kind."""
    return {kind: float(np.polyfit(np.log(g["eta"]), np.log(g["product_change"]), 1)[0])
            for kind, g in table.groupby("kind")}
