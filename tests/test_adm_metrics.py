"""ADM's metrics (pixelflow_jax.adm_metrics) against an independent NumPy/SciPy oracle.

The oracle below is written from the facts of DESIGN §12 (guided-diffusion's
evaluations/evaluator.py), not from the package: FID/sFID with the 1e-6 retry, IS over
contiguous splits of the split size, and precision/recall with float16 distance blocks
(float32 for a block holding a non-finite value). Batch sizes are smaller than N so that
full and partial row and column blocks all run.
"""

import warnings

import numpy as np
import pytest
from scipy import linalg

from pixelflow_jax import adm_metrics as m

# --------------------------------------------------------------------------- the oracle


def oracle_stats(x):
    x = np.asarray(x, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def oracle_fid(x1, x2, eps=1e-6):
    (mu1, s1), (mu2, s2) = oracle_stats(x1), oracle_stats(x2)
    return oracle_fid_from_stats(mu1, s1, mu2, s2, eps)


def oracle_fid_from_stats(mu1, s1, mu2, s2, eps=1e-6):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(root).all():
            root = linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s2))))
    if np.iscomplexobj(root):
        assert np.abs(np.diag(root).imag).max() <= 1e-3
        root = root.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def oracle_is(logits, split):
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        q = p[i:i + split]
        py = q.mean(0)
        scores.append(np.exp(np.mean([np.sum(r * np.log(r / py)) for r in q])))
    return float(np.mean(scores))


def oracle_block(u, v):
    """Squared distances of one block: float16 arithmetic (NumPy rounds each float16 op),
    norms and Gram matrix accumulated wider then rounded; float32 if anything is inf/nan."""
    with np.errstate(over="ignore", invalid="ignore"):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = (u16 * u16).astype(np.float64).sum(1).astype(np.float16)
        nv = (v16 * v16).astype(np.float64).sum(1).astype(np.float16)
        g = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
        d = np.maximum((nu[:, None] - np.float16(2) * g) + nv[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32), False
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    d = (u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32), True


def oracle_radii(x, k, rb, cb):
    n = len(x)
    radii = np.zeros(n, np.float32)
    fallbacks = 0
    for r in range(0, n, rb):
        row = np.zeros((min(rb, n - r), n), np.float32)
        for c in range(0, n, cb):
            row[:, c:c + cb], fb = oracle_block(x[r:r + rb], x[c:c + cb])
            fallbacks += fb
        radii[r:r + rb] = np.sort(row, axis=1)[:, k]
    return radii, fallbacks


def oracle_pr(ref, smp, k, rb, cb):
    r1, f1 = oracle_radii(ref, k, rb, cb)
    r2, f2 = oracle_radii(smp, k, rb, cb)
    ref_in, smp_in = np.zeros(len(ref), bool), np.zeros(len(smp), bool)
    fallbacks = f1 + f2
    for i in range(0, len(ref), rb):
        for j in range(0, len(smp), cb):
            d, fb = oracle_block(ref[i:i + rb], smp[j:j + cb])
            fallbacks += fb
            ref_in[i:i + rb] |= (d <= r2[None, j:j + cb]).any(1)
            smp_in[j:j + cb] |= (d <= r1[i:i + rb, None]).any(0)
    return smp_in.mean(), ref_in.mean(), (r1, r2), fallbacks


def features(seed, n, d, shift=0.0, scale=1.0):
    """Non-negative features of normal scale, like averaged ReLU activations."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(shift, scale, (n, d))) + rng.uniform(0, 0.5, (1, d))
    return x.astype(np.float32)


# --------------------------------------------------------------------------- FID


def test_statistics_are_float64_mean_and_unbiased_covariance():
    x = features(0, 40, 6)
    mu, sigma = m.statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.sum(0) / 40, rtol=1e-13)
    c = x64 - x64.mean(0)
    np.testing.assert_allclose(sigma, c.T @ c / 39, rtol=1e-12)


def test_fid_matches_the_oracle_and_a_closed_form():
    a, b = features(1, 300, 24), features(2, 250, 24, shift=0.3, scale=1.2)
    got = m.frechet_distance(m.statistics(a), m.statistics(b))
    assert got == pytest.approx(oracle_fid(a, b), rel=1e-9)
    assert got > 0.1
    # Diagonal covariances commute: the distance is |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = m.frechet_distance(m.Statistics(mu1, np.diag(v1)), m.Statistics(mu2, np.diag(v2)))
    assert got == pytest.approx(exact, rel=1e-10)
    # A set against itself: 0 up to sqrtm's rounding.
    s = m.statistics(a)
    assert abs(m.frechet_distance(s, s)) < 1e-8


# Integer features with constant columns: the covariance product is singular in a way that
# makes SciPy's sqrtm return inf/nan (found by search; SciPy 1.17, requirements-test.txt).
SINGULAR_X = np.array([[2, 1, 2, 2, 2, 2], [1, 0, 2, 1, 0, 1], [2, 1, 2, 0, 1, 1],
                       [1, 1, 2, 2, 2, 1], [0, 0, 2, 2, 1, 2], [1, 1, 2, 2, 0, 2]], np.float32)
SINGULAR_Y = np.array([[2, 2, 2, 1, 2, 0], [2, 0, 0, 1, 2, 1]], np.float32)


def test_fid_retries_with_1e6_on_the_diagonals_when_sqrtm_is_not_finite():
    (mu1, s1), (mu2, s2) = oracle_stats(SINGULAR_X), oracle_stats(SINGULAR_Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()  # the retry really runs
    with pytest.warns(m.SingularProductWarning):
        got = m.frechet_distance(m.statistics(SINGULAR_X), m.statistics(SINGULAR_Y))
    want = oracle_fid_from_stats(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-9)
    # and the retry's eps matters: with a larger one the value moves
    with pytest.warns(m.SingularProductWarning):
        other = m.frechet_distance(m.statistics(SINGULAR_X), m.statistics(SINGULAR_Y), eps=1e-2)
    assert other != pytest.approx(got, rel=1e-6)


def test_fid_refuses_a_root_with_an_imaginary_diagonal():
    # A "covariance" with a negative eigenvalue (a damaged reference file): sqrt(-1) = i.
    bad = m.Statistics(np.zeros(2), np.diag([-1.0, 1.0]))
    good = m.Statistics(np.zeros(2), np.eye(2))
    with pytest.raises(m.FIDError, match="imaginary"):
        m.frechet_distance(bad, good)
    with pytest.raises(m.FIDError, match="different sizes"):
        m.frechet_distance(good, m.Statistics(np.zeros(3), np.eye(3)))


# --------------------------------------------------------------------------- Inception Score


@pytest.mark.parametrize("n, split", [(23, 10), (30, 10), (7, 10), (1, 5000)])
def test_inception_score_matches_the_oracle(n, split):
    """23 / 10: two whole splits and a last one of 3 (ADM's range(0, N, split)); 7 / 10:
    fewer images than a split, one split of all of them."""
    logits = np.random.default_rng(n).normal(0, 3, (n, 1008)).astype(np.float32)
    got = m.inception_score(logits, split_size=split)
    assert got == pytest.approx(oracle_is(logits, split), rel=1e-10)
    if n == 23:  # the short last split counts as a whole one, not weighted by its size
        whole = oracle_is(logits[:20], split)
        last = oracle_is(logits[20:], split)
        assert got == pytest.approx((2 * whole + last) / 3, rel=1e-10)


def test_inception_score_extremes():
    assert m.inception_score(np.zeros((12, 1008), np.float32)) == pytest.approx(1.0)
    # confident, evenly spread over 8 classes: IS -> 8
    logits = np.full((64, 1008), -50.0, np.float32)
    logits[np.arange(64), np.arange(64) % 8] = 50.0
    assert m.inception_score(logits) == pytest.approx(8.0, rel=1e-6)


# --------------------------------------------------------------------------- precision/recall


def test_float16_rounding_is_bit_exact():
    import jax
    rng = np.random.default_rng(0)
    x = (rng.normal(size=200_000) * 10.0 ** rng.uniform(-9, 6, 200_000)).astype(np.float32)
    x = np.concatenate([x, np.float32([65504, 65519.99, 65520, -7e4, 2 ** -24, 2 ** -25,
                                       3 * 2 ** -26, np.inf, -np.inf, -0.0])])
    got = np.asarray(jax.jit(m._round_float16)(x))
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[-1])


def test_distance_block_is_float16_not_float32():
    u, v = features(4, 30, 64, scale=2.0), features(5, 20, 64, scale=2.0)
    got, fell_back = m.pairwise_distances(u, v)
    want, oracle_fell_back = oracle_block(u, v)
    assert not fell_back and not oracle_fell_back
    # float32 accumulation order can move a value across a float16 rounding boundary
    ulp = np.spacing(want.astype(np.float16)).astype(np.float32)
    assert (np.abs(got - want) <= ulp).all() and (got == want).mean() > 0.99
    exact = ((u[:, None].astype(np.float64) - v[None].astype(np.float64)) ** 2).sum(-1)
    assert np.abs(got - exact).max() > 1e-3  # float16 rounding is visible ...
    assert np.abs(got - exact).max() < 0.01 * exact.max()  # ... and only that


def test_precision_recall_match_the_oracle_with_partial_blocks():
    ref = features(6, 37, 32)
    smp = features(7, 53, 32, shift=0.2, scale=0.9)
    counts = m.BlockCounts()
    got = m.precision_recall(ref, smp, row_batch=16, col_batch=10, counts=counts)
    p, r, (r1, r2), fallbacks = oracle_pr(ref, smp, 3, 16, 10)
    np.testing.assert_array_equal(m.manifold_radii(ref, row_batch=16, col_batch=10), r1)
    np.testing.assert_array_equal(m.manifold_radii(smp, row_batch=16, col_batch=10), r2)
    assert (got.precision, got.recall) == (p, r)
    assert 0 < got.precision < 1 and 0 < got.recall < 1  # not a trivial answer
    # blocks: radii 3x4 (ref) + 4x6 (samples), then 3 x 6 ref-by-sample blocks
    assert counts.blocks == 12 + 24 + 18 and counts.float32 == fallbacks == 0
    # one block of everything gives the same answer here
    assert m.precision_recall(ref, smp) == got


def test_radius_is_the_kth_neighbour_counting_duplicates():
    x = np.float32([[0, 0], [1, 0], [3, 0], [6, 0], [10, 0]])
    # squared distances to the 3rd neighbour (self excluded)
    np.testing.assert_array_equal(m.manifold_radii(x, row_batch=2, col_batch=3),
                                  [36, 25, 9, 25, 81])
    dup = np.concatenate([x[:1], x])  # a duplicate is a neighbour at distance 0
    assert m.manifold_radii(dup)[0] == 9
    with pytest.raises(m.UserError, match="at least 4 images"):
        m.manifold_radii(x[:3])


def test_float16_overflow_falls_back_to_float32_per_block():
    """Rows whose squared norm passes 65504 overflow float16: their blocks (only) are
    recomputed in float32, as ADM's tf.cond does per block."""
    ref = features(8, 40, 16)
    smp = features(9, 45, 16, shift=0.3)
    ref[[3, 35]] *= 90.0    # norms ~ 1e5 > 65504: row blocks 0 and 2 of the reference
    smp[[20]] *= 120.0      # and the samples' row block 1 / column block 2
    counts = m.BlockCounts()
    got = m.precision_recall(ref, smp, row_batch=16, col_batch=10, counts=counts)
    p, r, (r1, r2), fallbacks = oracle_pr(ref, smp, 3, 16, 10)
    assert fallbacks > 0 and counts.float32 == fallbacks and counts.float32 < counts.blocks
    np.testing.assert_allclose(m.manifold_radii(ref, row_batch=16, col_batch=10), r1, rtol=1e-5)
    np.testing.assert_allclose(m.manifold_radii(smp, row_batch=16, col_batch=10), r2, rtol=1e-5)
    assert (got.precision, got.recall) == (p, r)
    # the overflowing rows' own radii are finite (float32), not inf
    assert np.isfinite(m.manifold_radii(ref, row_batch=16, col_batch=10)).all()
    _, fell_back = m.pairwise_distances(ref[:16], smp[:10])
    assert fell_back
