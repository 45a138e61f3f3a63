"""randomized_svd and task_aware_basis against numpy's exact SVD."""

import numpy as np
import pytest
import torch

import lowrank_rs
from lowrank_rs.linalg import randomized_svd, task_aware_basis


def power_law(rng, m, n, decay=1.0, dtype=np.float64):
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.arange(1, k + 1, dtype=np.float64) ** -decay
    return ((u * s) @ v.T).astype(dtype), s


def spd_with_outliers(rng, d, n_tokens=None, outliers=3):
    n_tokens = n_tokens or 2 * d
    x = rng.standard_normal((n_tokens, d))
    x[:, rng.choice(d, outliers, replace=False)] *= 30.0
    return x.T @ x / n_tokens


def captured_energy(m, vt):
    """‖M Vᵀ‖²_F relative to the best rank-k subspace's."""
    k = vt.shape[0]
    s = np.linalg.svd(m, compute_uv=False)
    return np.linalg.norm(m @ vt.T.astype(np.float64)) ** 2 / np.sum(s[:k] ** 2)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (200, 200)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_randomized_svd_matches_exact(rng, shape, dtype):
    a, s_true = power_law(rng, *shape, decay=1.5, dtype=dtype)
    u, s, vt = randomized_svd(a, 10)
    assert u.shape == (shape[0], 10) and s.shape == (10,) and vt.shape == (10, shape[1])
    assert u.dtype == dtype and s.dtype == dtype and vt.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-8
    np.testing.assert_allclose(s, s_true[:10], rtol=tol * 10)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(u.T @ u, np.eye(10), atol=tol)
    np.testing.assert_allclose(vt @ vt.T, np.eye(10), atol=tol)
    # Randomized: within 0.1% of the best rank-10 approximation's error (Eckart–Young), not equal to it.
    a64 = a.astype(np.float64)
    err = np.linalg.norm(a64 - (u.astype(np.float64) * s) @ vt)
    assert err <= 1.001 * np.linalg.norm(a64 - _best(a64, 10)) + tol


def _best(a, k):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_ill_conditioned_and_rank_deficient(rng):
    a, _ = power_law(rng, 150, 100, decay=4.0)  # σ spans 1 … 1e-8
    u, s, vt = randomized_svd(a, 5)
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False)[:5], rtol=1e-8)
    low = rng.standard_normal((90, 3)) @ rng.standard_normal((3, 60))
    u, s, vt = randomized_svd(low, 6)
    assert np.all(s[3:] < 1e-10 * s[0])
    np.testing.assert_allclose(u[:, :3] @ np.diag(s[:3]) @ vt[:3], low, atol=1e-9)


def test_deterministic_for_a_seed(rng):
    a = rng.standard_normal((100, 70))
    r1 = randomized_svd(a, 5, seed=7)
    r2 = randomized_svd(a, 5, seed=7)
    for x, y in zip(r1, r2):
        np.testing.assert_array_equal(x, y)
    lowrank_rs.set_num_threads(1)
    try:
        r3 = randomized_svd(a, 5, seed=7)
    finally:
        lowrank_rs.set_num_threads(0)
    for x, y in zip(r1, r3):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_exact_fallback_when_sketch_is_not_smaller(rng):
    a = rng.standard_normal((30, 12))
    u, s, vt = randomized_svd(a, 12, oversample=10)  # 22 >= min(m, n): exact
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(u @ np.diag(s) @ vt, a, atol=1e-12)
    u, s, vt = randomized_svd(np.array([[3.0]]), 1)
    assert s[0] == pytest.approx(3.0) and abs(u[0, 0] * vt[0, 0]) == pytest.approx(1.0)


def test_accepts_torch_and_sixteen_bit(rng):
    a = torch.from_numpy(rng.standard_normal((60, 40)).astype(np.float32))
    _, s, _ = randomized_svd(a.to(torch.bfloat16), 4)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, np.linalg.svd(a.to(torch.bfloat16).float().numpy(), compute_uv=False)[:4], rtol=1e-3)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160), (160, 64)])
def test_task_aware_basis_spans_exact_top_subspace(rng, shape):
    d_out, d_in = shape
    w, _ = power_law(rng, d_out, d_in, decay=0.7)
    c = spd_with_outliers(rng, d_in)
    vt, s = task_aware_basis(w, c, 16)
    m = w @ c
    s_exact = np.linalg.svd(m, compute_uv=False)
    assert vt.shape == (16, d_in) and s.shape == (16,)
    np.testing.assert_allclose(s, s_exact[:16], rtol=1e-3)
    assert captured_energy(m, vt) >= 0.995
    np.testing.assert_allclose(vt.astype(np.float64) @ vt.T, np.eye(16), atol=1e-5)


def test_task_aware_basis_float32_rows_orthonormal_and_float64_exact(rng):
    w, _ = power_law(rng, 128, 256, decay=0.5)
    c = spd_with_outliers(rng, 256)
    vt32, _ = task_aware_basis(w.astype(np.float32), c, 32)  # f64 covariance, f32 weight → float32 compute
    assert vt32.dtype == np.float32
    np.testing.assert_allclose(vt32.astype(np.float64) @ vt32.T.astype(np.float64), np.eye(32), atol=1e-5)
    vt64, s64 = task_aware_basis(w, c, 32)
    assert vt64.dtype == np.float64
    s_exact = np.linalg.svd(w @ c, compute_uv=False)
    np.testing.assert_allclose(s64[:3], s_exact[:3], rtol=1e-10)  # the outlier directions: well separated
    np.testing.assert_allclose(s64, s_exact[:32], rtol=1e-2)  # the flat tail: approximate, as randomized SVD is
    assert captured_energy(w @ c, vt64) >= 0.999
    # A clear spectral gap makes the subspace itself exact.
    w2, _ = power_law(rng, 128, 256, decay=3.0)
    vt2, _ = task_aware_basis(w2, np.eye(256), 8)
    v_exact = np.linalg.svd(w2)[2][:8]
    np.testing.assert_allclose(vt2 @ v_exact.T @ v_exact, vt2, atol=1e-8)


def test_task_aware_basis_accepts_bf16_weight(rng):
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    c = spd_with_outliers(rng, 64)
    vt, s = task_aware_basis(w, c, 8)
    assert vt.dtype == np.float32 and vt.shape == (8, 64)


def test_errors(rng):
    a = rng.standard_normal((20, 10))
    with pytest.raises(lowrank_rs.RankError, match="10"):
        randomized_svd(a, 11)
    with pytest.raises(lowrank_rs.RankError):
        randomized_svd(a, 0)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(lowrank_rs.NonFiniteError):
        randomized_svd(bad, 2)
    with pytest.raises(lowrank_rs.ShapeError):
        randomized_svd(a[0], 1)
    with pytest.raises(lowrank_rs.DtypeError):
        randomized_svd(a.astype(np.int64), 1)
    with pytest.raises(lowrank_rs.EmptyInputError):
        randomized_svd(np.zeros((0, 5)), 1)
    with pytest.raises(lowrank_rs.LowRankError):
        randomized_svd(a, 2, seed=-1)
    w = rng.standard_normal((8, 6))
    c = np.eye(6)
    with pytest.raises(lowrank_rs.ShapeError, match="6|7"):
        task_aware_basis(w, np.eye(7), 2)
    with pytest.raises(lowrank_rs.ShapeError):
        task_aware_basis(w, np.ones((6, 5)), 2)
    with pytest.raises(lowrank_rs.LowRankError, match="symmetric"):
        task_aware_basis(w, np.triu(np.ones((6, 6))), 2)
    cn = c.copy()
    cn[1, 1] = np.inf
    with pytest.raises(lowrank_rs.NonFiniteError):
        task_aware_basis(w, cn, 2)
    with pytest.raises(lowrank_rs.RankError):
        task_aware_basis(w, c, 7)
