"""Appendix A: the gauge leaves function, σ and norms unchanged, Procrustes finds R, slopes 2 and 1."""
import numpy as np
import torch

from paper_lib import gauge


def test_a_gauge_rotation_changes_only_the_singular_vectors():
    W1, W2 = gauge.chain(seed=1)
    R = gauge.random_orthogonal(W1.shape[1], torch.Generator().manual_seed(2))
    assert torch.allclose(R.T @ R, torch.eye(R.shape[0], dtype=torch.float64), atol=1e-12)
    out = gauge.gauge_invariance(W1, W2, R)
    for key in ("product_change", "sigma_change_W1", "sigma_change_W2", "fro_change", "procrustes_error"):
        assert out[key] < 1e-10, (key, out[key])
    assert out["mean_vector_rotation_deg"] > 30  # the directions did move


def test_procrustes_is_not_trivially_the_identity():
    W1, _ = gauge.chain(seed=3)
    assert torch.allclose(gauge.procrustes(W1, W1), torch.eye(W1.shape[1], dtype=torch.float64), atol=1e-10)
    R = gauge.random_orthogonal(W1.shape[1], torch.Generator().manual_seed(4))
    assert torch.linalg.norm(gauge.procrustes(W1, W1 @ R) - torch.eye(W1.shape[1], dtype=torch.float64)) > 1


def test_measured_slopes_are_two_for_a_gauge_step_and_one_for_a_sigma_step():
    W1, W2 = gauge.chain(seed=0)
    table = gauge.step_scaling(W1, W2, np.logspace(-6, -2, 9))
    slopes = gauge.fitted_slopes(table)
    assert abs(slopes["gauge"] - 2) < 0.05 and abs(slopes["sigma"] - 1) < 0.05, slopes
    small = table[table["eta"] == table["eta"].min()].set_index("kind")["product_change"]
    assert small["gauge"] < 1e-3 * small["sigma"]  # at the same parameter step, rotations are nearly free


def test_sigma_table_shows_the_rotation_leaving_every_singular_value():
    W1, _ = gauge.chain(d_in=12, d_mid=6, d_out=9, seed=3)
    R = gauge.random_orthogonal(W1.shape[1], torch.Generator().manual_seed(5))
    table = gauge.sigma_table(W1, R)
    assert list(table["index"]) == list(range(6))
    assert np.allclose(table["before"], table["after"], atol=1e-10) and (table["before"].diff().dropna() <= 0).all()
