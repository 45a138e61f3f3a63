"""CovarianceAccumulator against a float64 numpy oracle of docs/methods.md."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_rs
from lowrank_rs.linalg import CovarianceAccumulator


def oracle(batches, center):
    """float64 covariance of the counted tokens of `batches` = [(x [b, s, d], mask [b, s] or None)]."""
    rows, seq_rows = [], []
    for x, mask in batches:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 2:
            x = x[None]
            mask = None if mask is None else np.asarray(mask)[None]
        for i in range(x.shape[0]):
            keep = np.ones(x.shape[1], bool) if mask is None else np.asarray(mask[i]).astype(bool)
            seq = x[i][keep]
            if len(seq):
                rows.append(seq)
                seq_rows.append(seq - seq.mean(0))
    allx = np.concatenate(rows)
    n = len(allx)
    if center == "none":
        return allx.T @ allx / n, allx.mean(0)
    if center == "global":
        xc = allx - allx.mean(0)
        return xc.T @ xc / n, allx.mean(0)
    sc = np.concatenate(seq_rows)
    return sc.T @ sc / n, allx.mean(0)


def random_batch(rng, b, s, d, pad=True, scale=1.0, offset=0.0):
    x = (rng.standard_normal((b, s, d)) * scale + offset).astype(np.float32)
    if not pad:
        return x, None
    lengths = rng.integers(0, s + 1, size=b)
    lengths[0] = max(lengths[0], 1)
    mask = np.arange(s)[None] < lengths[:, None]
    return x, mask


@pytest.mark.parametrize("center", ["sequence", "global", "none"])
def test_matches_oracle_with_padding(rng, center):
    batches = [random_batch(rng, 4, 17, 24) for _ in range(5)]
    acc = CovarianceAccumulator(24, center=center)
    for x, m in batches:
        acc.update(x, mask=m)
    cov, mean = oracle(batches, center)
    assert acc.count == sum(int(m.sum()) for _, m in batches)
    c = acc.covariance()
    assert c.dtype == np.float64 and c.shape == (24, 24)
    np.testing.assert_array_equal(c, c.T)
    np.testing.assert_allclose(c, cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.mean(), mean, rtol=1e-6, atol=1e-7)


def test_default_center_is_sequence():
    assert CovarianceAccumulator(3).center == "sequence"


def test_two_dimensional_input_is_one_sequence(rng):
    x = rng.standard_normal((50, 8)).astype(np.float32) + 3.0
    acc = CovarianceAccumulator(8, center="sequence")
    acc.update(x)
    cov, _ = oracle([(x[None], None)], "sequence")
    np.testing.assert_allclose(acc.covariance(), cov, rtol=1e-5, atol=1e-6)
    flat_mask = np.ones(50, dtype=np.int64)
    flat_mask[40:] = 0
    acc2 = CovarianceAccumulator(8, center="none")
    acc2.update(x, mask=flat_mask)
    assert acc2.count == 40
    np.testing.assert_allclose(acc2.covariance(), x[:40].astype(np.float64).T @ x[:40] / 40, rtol=1e-5)


def test_padding_rows_may_hold_garbage(rng):
    x, m = random_batch(rng, 3, 10, 6)
    m[1] = False  # an all-padding sequence
    x[~m] = np.nan
    acc = CovarianceAccumulator(6)
    acc.update(x, mask=m)
    clean = np.where(m[..., None], x, 0.0)
    cov, _ = oracle([(clean, m)], "sequence")
    np.testing.assert_allclose(acc.covariance(), cov, rtol=1e-5, atol=1e-6)


def test_fully_masked_batch_changes_nothing(rng):
    acc = CovarianceAccumulator(5, "global")
    acc.update(rng.standard_normal((2, 3, 5)), mask=np.zeros((2, 3), bool))
    assert acc.count == 0
    with pytest.raises(lowrank_rs.EmptyInputError):
        acc.covariance()
    with pytest.raises(lowrank_rs.EmptyInputError):
        acc.mean()


def test_attention_mask_integers_and_torch(rng):
    x, m = random_batch(rng, 2, 9, 7)
    a = CovarianceAccumulator(7)
    a.update(torch.from_numpy(x), mask=torch.from_numpy(m.astype(np.int64)))
    b = CovarianceAccumulator(7)
    b.update(x, mask=m)
    np.testing.assert_array_equal(a.covariance(), b.covariance())


def test_float64_accumulation_beats_float32_running_sum(rng):
    # A large common offset makes the raw second moment cancel catastrophically in float32; the centred f64
    # accumulation (Chan) keeps the small eigenvalues.
    batches = [random_batch(rng, 8, 64, 16, pad=False, scale=1e-2, offset=100.0) for _ in range(20)]
    acc = CovarianceAccumulator(16, "global")
    for x, _ in batches:
        acc.update(x)
    cov, _ = oracle(batches, "global")
    np.testing.assert_allclose(acc.covariance(), cov, rtol=1e-3, atol=1e-9)
    ev = np.linalg.eigvalsh(acc.covariance())
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(cov), rtol=1e-3)


def test_ill_conditioned_and_rank_deficient(rng):
    basis = rng.standard_normal((3, 32))
    scales = np.array([1e2, 1.0, 1e-1])  # eigenvalues span 1e6: within what float32 products resolve
    x = ((rng.standard_normal((500, 3)) * scales) @ basis).astype(np.float32)
    acc = CovarianceAccumulator(32, "none")
    acc.update(x)
    cov, _ = oracle([(x, None)], "none")
    np.testing.assert_allclose(acc.covariance(), cov, rtol=1e-4, atol=1e-6 * np.abs(cov).max())
    ev, ev_true = np.linalg.eigvalsh(acc.covariance())[::-1], np.linalg.eigvalsh(cov)[::-1]
    # The smallest true eigenvalue is 1e-6 of the largest: float32 products resolve it to a few percent.
    np.testing.assert_allclose(ev[:2], ev_true[:2], rtol=1e-3)
    np.testing.assert_allclose(ev[2], ev_true[2], rtol=5e-2)
    # The null space holds only float32 rounding noise: a few ulps of the largest eigenvalue.
    assert np.all(np.abs(ev[3:]) < 3e-7 * ev_true[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_torch_inputs_match_their_float32_values(rng, dtype):
    x = torch.from_numpy(rng.standard_normal((3, 11, 12)).astype(np.float32)).to(dtype)
    m = torch.ones(3, 11, dtype=torch.bool)
    m[2, 5:] = False
    a = CovarianceAccumulator(12)
    a.update(x, mask=m)
    b = CovarianceAccumulator(12)
    b.update(x.float().numpy(), mask=m.numpy())
    np.testing.assert_allclose(a.covariance(), b.covariance(), rtol=1e-6, atol=1e-7)


def test_numpy_float16_and_float64(rng):
    x = rng.standard_normal((40, 6))
    a = CovarianceAccumulator(6, "global")
    a.update(x.astype(np.float16))
    b = CovarianceAccumulator(6, "global")
    b.update(x.astype(np.float16).astype(np.float64))
    np.testing.assert_allclose(a.covariance(), b.covariance(), rtol=1e-6, atol=1e-7)
    c = CovarianceAccumulator(6, "global")
    c.update(x)  # float64 rounds to float32 for the product
    np.testing.assert_allclose(c.covariance(), oracle([(x, None)], "global")[0], rtol=1e-5)


def test_non_contiguous_input(rng):
    x = rng.standard_normal((12, 30)).astype(np.float32)
    a = CovarianceAccumulator(12, "none")
    a.update(x.T)
    b = CovarianceAccumulator(12, "none")
    b.update(np.ascontiguousarray(x.T))
    np.testing.assert_array_equal(a.covariance(), b.covariance())


@settings(max_examples=25, deadline=None)
@given(
    center=st.sampled_from(["sequence", "global", "none"]),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_merge_of_split_streams_equals_one_stream(center, cuts, seed):
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, 2, 7, 9, offset=rng.normal() * 5) for _ in range(sum(cuts))]
    whole = CovarianceAccumulator(9, center)
    for x, m in batches:
        whole.update(x, mask=m)
    parts, i = [], 0
    for c in cuts:
        p = CovarianceAccumulator(9, center)
        for x, m in batches[i : i + c]:
            p.update(x, mask=m)
        parts.append(p)
        i += c
    merged = CovarianceAccumulator(9, center)
    for p in parts:
        merged.merge(p)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-9, atol=1e-12)


def test_merge_with_itself_doubles_the_stream(rng):
    x = rng.standard_normal((20, 4)).astype(np.float32)
    a = CovarianceAccumulator(4, "global")
    a.update(x)
    a.merge(a)
    b = CovarianceAccumulator(4, "global")
    b.update(np.concatenate([x, x]))
    assert a.count == 40
    np.testing.assert_allclose(a.covariance(), b.covariance(), rtol=1e-6)  # float32 products per batch differ


def test_background_thread_feeds_while_main_thread_reads(rng):
    acc = CovarianceAccumulator(64)
    batches = [rng.standard_normal((2, 32, 64)).astype(np.float32) for _ in range(30)]
    seen = []
    t = threading.Thread(target=lambda: [acc.update(b) for b in batches])
    t.start()
    while t.is_alive():
        seen.append(acc.count)
    t.join()
    assert acc.count == 30 * 64
    assert seen == sorted(seen)


def test_errors_leave_accumulator_unchanged(rng):
    acc = CovarianceAccumulator(4, "global")
    x = rng.standard_normal((10, 4)).astype(np.float32)
    acc.update(x)
    before = (acc.count, acc.covariance().copy(), acc.mean().copy())
    bad = x.copy()
    bad[3, 2] = np.inf
    cases = [
        (lowrank_rs.NonFiniteError, bad, None),
        (lowrank_rs.ShapeError, rng.standard_normal((10, 5)).astype(np.float32), None),
        (lowrank_rs.ShapeError, rng.standard_normal(4).astype(np.float32), None),
        (lowrank_rs.ShapeError, rng.standard_normal((1, 2, 3, 4)).astype(np.float32), None),
        (lowrank_rs.ShapeError, x, np.ones(9, bool)),
        (lowrank_rs.DtypeError, x.astype(np.int32), None),
        (lowrank_rs.DtypeError, torch.ones(3, 4, dtype=torch.int64), None),
        (lowrank_rs.DtypeError, [[1.0, 2.0, 3.0, 4.0]], None),
        (lowrank_rs.EmptyInputError, np.zeros((0, 4), np.float32), None),
    ]
    for exc, value, mask in cases:
        with pytest.raises(exc) as info:
            acc.update(value, mask=mask)
        assert isinstance(info.value, lowrank_rs.LowRankError)
        assert str(info.value)
    assert acc.count == before[0]
    np.testing.assert_array_equal(acc.covariance(), before[1])
    np.testing.assert_array_equal(acc.mean(), before[2])


def test_nan_message_names_position():
    x = np.zeros((2, 3, 4), np.float32)
    x[1, 2, 3] = np.nan
    with pytest.raises(lowrank_rs.NonFiniteError, match="NaN|nan|non-finite|finite"):
        CovarianceAccumulator(4).update(x)


def test_constructor_and_merge_errors():
    with pytest.raises(lowrank_rs.LowRankError, match="center|centring|sequence"):
        CovarianceAccumulator(4, center="mean")
    with pytest.raises(lowrank_rs.LowRankError):
        CovarianceAccumulator(0)
    with pytest.raises(lowrank_rs.LowRankError):
        CovarianceAccumulator(-1)
    with pytest.raises(lowrank_rs.ShapeError):
        CovarianceAccumulator(4).merge(CovarianceAccumulator(5))
    with pytest.raises(lowrank_rs.LowRankError):
        CovarianceAccumulator(4, "none").merge(CovarianceAccumulator(4, "global"))
    with pytest.raises(lowrank_rs.LowRankError):
        CovarianceAccumulator(4).merge("not an accumulator")


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_float32_readout_is_the_float64_covariance_rounded_once(rng, backend):
    from lowrank_rs.errors import InvalidArgumentError
    from lowrank_rs.statistics import make_accumulator

    acc = make_accumulator(9, "sequence", backend=backend)
    x, mask = random_batch(rng, 3, 6, 9)
    acc.update(x, mask)
    wide = acc.covariance()
    for spelling in ("float32", np.float32, np.dtype("float32")):
        narrow = acc.covariance(spelling)
        assert narrow.dtype == np.float32
        np.testing.assert_array_equal(narrow, wide.astype(np.float32))
    assert acc.covariance("float64").dtype == np.float64
    with pytest.raises(InvalidArgumentError, match="float64 or float32"):
        acc.covariance("float16")
