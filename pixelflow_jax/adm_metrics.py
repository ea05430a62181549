"""The ADM evaluation suite's metrics on Inception features (DESIGN §12).

These reproduce OpenAI's guided-diffusion ``evaluations/evaluator.py`` (the suite
behind the published ImageNet numbers), number for number, from the features of
:mod:`pixelflow_jax.inception`:

- :func:`statistics`: the mean and ``np.cov(rowvar=False)`` of a feature set, float64.
- :func:`frechet_distance`: FID (``pool`` features) and sFID (the 2023 ``spatial``
  features), ``|mu1 - mu2|^2 + tr s1 + tr s2 - 2 tr sqrtm(s1 s2)`` with ADM's retry
  (1e-6 I added to both covariances when the square root is not finite) and its
  refusal (an imaginary diagonal above 1e-3).
- :func:`inception_score`: contiguous splits of 5,000, the mean of exp(mean KL).
- :func:`precision_recall`: Kynkaanniemi et al.'s improved precision and recall as
  ADM's ``ManifoldEstimator`` runs it: k = 3, squared distances in float16 (float32
  for a block holding a non-finite value), blocks of 10,000 rows and columns.

Statistics and the matrix square root run on the host in float64 (SciPy); the
distance blocks run jitted on the default device.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import numpy as np

from pixelflow_jax.errors import UserError

FID_EPS = 1e-6            # added to both covariances when sqrtm is not finite (ADM)
IMAGINARY_ATOL = 1e-3     # largest imaginary part tolerated on sqrtm's diagonal (ADM)
IS_SPLIT_SIZE = 5000      # Inception Score: images per split (ADM)
NEIGHBOURHOOD = 3         # precision/recall: the k-th neighbour's distance is the radius
BATCH_SIZE = 10000        # precision/recall: rows and columns per distance block (ADM)
FLOAT16_MAX = 65504.0


class Statistics(NamedTuple):
    """A feature set's mean ``mu`` [D] and covariance ``sigma`` [D, D], float64."""

    mu: np.ndarray
    sigma: np.ndarray


class FIDError(UserError):
    """The Frechet distance is undefined for these statistics (ADM raises here too)."""


class SingularProductWarning(RuntimeWarning):
    """sqrtm(s1 s2) was not finite; the distance used s + 1e-6 I instead (as ADM)."""


def _finite_features(features: np.ndarray, what: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{what} must be [N, D], got shape {features.shape}")
    if not np.isfinite(features).all():
        raise UserError(f"{what} hold NaN or inf values")
    return features


def statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance (``np.cov(rowvar=False)``: divided by N - 1) of ``features``
    [N, D], both float64 (ADM's evaluator; DESIGN §12). Needs N >= 2."""
    features = _finite_features(features, "features")
    if len(features) < 2:
        raise UserError(f"a covariance needs at least 2 images, got {len(features)}")
    x = features.astype(np.float64)
    return Statistics(x.mean(axis=0), np.cov(x, rowvar=False))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's principal square root, without its singular-matrix chatter (ADM passed
    ``disp=False``, an argument SciPy 1.18 removes; the result is the same)."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning "singular"; ADM silenced it too
        return linalg.sqrtm(matrix)


def frechet_distance(a: Statistics, b: Statistics, eps: float = FID_EPS) -> float:
    """The Frechet distance between two Gaussians, as ADM computes it (DESIGN §12).

    ``|mu_a - mu_b|^2 + tr s_a + tr s_b - 2 tr sqrtm(s_a s_b)``. When sqrtm's result is
    not finite (a singular product), ``eps`` I is added to both covariances and the root
    taken again, with a :class:`SingularProductWarning`. A complex root whose diagonal has
    an imaginary part above 1e-3 raises :class:`FIDError`; otherwise its real part is used.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(x.mu, np.float64)) for x in (a, b))
    s1, s2 = (np.atleast_2d(np.asarray(x.sigma, np.float64)) for x in (a, b))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise FIDError(f"statistics of different sizes: mean {mu1.shape} vs {mu2.shape}, "
                       f"covariance {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"the covariance product is singular; added {eps:g} to the diagonal of "
                      "both covariances (as ADM)", SingularProductWarning, stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise FIDError(f"the square root of the covariance product has an imaginary part "
                           f"of up to {np.abs(covmean.imag).max():.3g} (more than "
                           f"{IMAGINARY_ATOL:g} on its diagonal): a covariance is not positive "
                           "semi-definite")
        covmean = covmean.real
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    if not np.isfinite(value):
        raise FIDError("the Frechet distance is not finite (the square root of the "
                       "covariance product failed even with 1e-6 added to the diagonals)")
    return float(value)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score from the 1008 logits of each image [N, 1008] (DESIGN §12).

    Images are cut into contiguous splits ``[0, s), [s, 2s), ...`` of ``split_size``; as
    in ADM the last split holds the remainder (N = 12,000 gives 5,000, 5,000 and 2,000)
    and every split counts equally, so fewer than ``split_size`` images form one split.
    Per split: exp of the mean over images of KL(p(y|x) || p(y)), p(y) the split's mean
    prediction; the score is the mean over splits (no standard deviation). Softmax and
    KL run in float64 (ADM: float32, which moves the score by ~1e-6 relative).
    """
    logits = _finite_features(logits, "logits")
    if len(logits) == 0:
        raise UserError("the Inception Score needs at least 1 image")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0 (a float64 softmax underflows only for logit gaps above ~745)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- precision/recall
# jax is imported inside the functions: importing this module stays light (evaluate.py's
# --help, FID-only callers).


def _round_float16(x):
    """float32 values rounded to the nearest float16 value (ties to even; subnormals kept,
    beyond 65504 -> inf), returned as float32.

    Arithmetic, not a dtype round trip: XLA may drop a ``f32 -> f16 -> f32`` convert pair
    when excess precision is allowed (its default on GPU), which would silently compute
    the "float16" distances in float32.
    """
    import jax.numpy as jnp

    mantissa, exponent = jnp.frexp(x)
    del mantissa
    # float16 keeps 11 significant bits; below 2^-14 (subnormals) the spacing is 2^-24.
    shift = jnp.maximum(exponent, -13) - 11
    rounded = jnp.ldexp(jnp.rint(jnp.ldexp(x, -shift)), shift)
    rounded = jnp.where(jnp.abs(rounded) > FLOAT16_MAX, jnp.copysign(jnp.inf, x), rounded)
    return jnp.where(jnp.isfinite(x), rounded, x)


def _distances_float16(u, v):
    """ADM's distance graph on float16 inputs: every op's result rounded to float16, sums
    and the Gram matrix accumulated in float32 (as TF's float16 GPU kernels)."""
    import jax
    import jax.numpy as jnp

    r = _round_float16
    u, v = r(u), r(v)
    norm_u = r(jnp.sum(r(u * u), axis=1))
    norm_v = r(jnp.sum(r(v * v), axis=1))
    # float16 x float16 products are exact in float32: this is a float16 matmul with float32
    # accumulation, rounded once, on any backend.
    gram = r(jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.maximum(r(r(norm_u[:, None] - r(2.0 * gram)) + norm_v[None, :]), 0.0)


def _distances_float32(u, v):
    import jax
    import jax.numpy as jnp

    norm_u = jnp.sum(u * u, axis=1)
    norm_v = jnp.sum(v * v, axis=1)
    gram = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norm_u[:, None] - 2.0 * gram + norm_v[None, :], 0.0)


def _distance_block(u, v):
    """(squared distances [rows, cols] float32, whether the block fell back to float32):
    float16 unless any value of the block is not finite (ADM's DistanceBlock)."""
    import jax
    import jax.numpy as jnp

    d16 = _distances_float16(u, v)
    finite = jnp.isfinite(d16).all()
    d = jax.lax.cond(finite, lambda: d16, lambda: _distances_float32(u, v))
    return d, ~finite


_jitted: dict[str, object] = {}


def _jit(name: str):
    """The jitted block functions, built once per process."""
    if name not in _jitted:
        import jax
        import jax.numpy as jnp

        def distances(u, v):
            return _distance_block(u, v)

        def radii_step(u, v, num_cols, best):
            d, fell_back = _distance_block(u, v)
            d = jnp.where(jnp.arange(v.shape[0])[None, :] < num_cols, d, jnp.inf)
            merged = jnp.concatenate([best, d], axis=1)
            return -jax.lax.top_k(-merged, best.shape[1])[0], fell_back

        def pr_step(ref, ref_radii, num_ref, sample, sample_radii, num_samples):
            d, fell_back = _distance_block(ref, sample)
            valid = ((jnp.arange(ref.shape[0]) < num_ref)[:, None]
                     & (jnp.arange(sample.shape[0]) < num_samples)[None, :])
            ref_in = jnp.any((d <= sample_radii[None, :]) & valid, axis=1)
            sample_in = jnp.any((d <= ref_radii[:, None]) & valid, axis=0)
            return ref_in, sample_in, fell_back

        _jitted.update(distances=jax.jit(distances), radii_step=jax.jit(radii_step),
                       pr_step=jax.jit(pr_step))
    return _jitted[name]


@dataclasses.dataclass
class BlockCounts:
    """How many distance blocks ran, and how many of them fell back to float32."""

    blocks: int = 0
    float32: int = 0

    def add(self, fell_back) -> None:
        self.blocks += 1
        self.float32 += int(bool(fell_back))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, bool]:
    """One distance block as ADM's ``DistanceBlock``: squared Euclidean distances
    [len(u), len(v)] (float32 holding float16 values), and whether the block held a
    non-finite float16 value and was recomputed in float32."""
    d, fell_back = _jit("distances")(np.asarray(u, np.float32), np.asarray(v, np.float32))
    return np.asarray(d), bool(fell_back)


def _padded(x: np.ndarray, start: int, size: int) -> np.ndarray:
    block = x[start:start + size]
    if len(block) < size:  # the last block: one compiled shape for all of them
        block = np.concatenate([block, np.zeros((size - len(block), x.shape[1]), x.dtype)])
    return block


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, *,
                   row_batch: int = BATCH_SIZE, col_batch: int = BATCH_SIZE,
                   counts: BlockCounts | None = None) -> np.ndarray:
    """Each feature vector's k-NN radius: the (k+1)-th smallest squared distance of its row,
    its own (≈ 0) distance included, so the k-th neighbour's; a duplicate counts as a
    neighbour at distance 0 (ADM's ``manifold_radii``: ``np.partition`` index k). float32
    [N]. Rows and columns go in blocks of ``row_batch`` x ``col_batch``, each block in
    float16 unless it holds a non-finite value (then float32, as ADM)."""
    import jax.numpy as jnp

    features = _finite_features(features, "features").astype(np.float32)
    n = len(features)
    if n < k + 1:
        raise UserError(f"precision and recall need at least {k + 1} images per set (the "
                        f"neighbour number {k} of each), got {n}")
    rb, cb = min(row_batch, n), min(col_batch, n)
    step = _jit("radii_step")
    radii = np.empty(n, np.float32)
    for r0 in range(0, n, rb):
        best = jnp.full((rb, k + 1), jnp.inf, jnp.float32)
        rows = _padded(features, r0, rb)
        for c0 in range(0, n, cb):
            best, fell_back = step(rows, _padded(features, c0, cb), min(cb, n - c0), best)
            if counts is not None:
                counts.add(fell_back)
        radii[r0:r0 + rb] = np.asarray(best[:, k])[:min(rb, n - r0)]
    return radii


class PrecisionRecall(NamedTuple):
    precision: float  # share of samples inside some reference sample's k-NN ball
    recall: float     # share of reference images inside some sample's k-NN ball


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD, *,
                     row_batch: int = BATCH_SIZE, col_batch: int = BATCH_SIZE,
                     counts: BlockCounts | None = None) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them
    (DESIGN §12): radii from :func:`manifold_radii` of each set; a point is inside a ball
    when its squared distance is <= the radius. Reference rows go in blocks of
    ``row_batch``, sample columns in blocks of ``col_batch``, each block float16 unless it
    holds a non-finite value."""
    reference = _finite_features(reference, "reference features").astype(np.float32)
    samples = _finite_features(samples, "sample features").astype(np.float32)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"feature sizes differ: {reference.shape[1]} vs {samples.shape[1]}")
    kw = dict(row_batch=row_batch, col_batch=col_batch, counts=counts)
    ref_radii, sample_radii = manifold_radii(reference, k, **kw), manifold_radii(samples, k, **kw)
    n1, n2 = len(reference), len(samples)
    rb, cb = min(row_batch, n1), min(col_batch, n2)
    ref_in, sample_in = np.zeros(n1, bool), np.zeros(n2, bool)
    step = _jit("pr_step")
    pad = lambda r, start, size: np.pad(r[start:start + size], (0, max(0, start + size - len(r))))
    for r0 in range(0, n1, rb):
        rows, rows_radii = _padded(reference, r0, rb), pad(ref_radii, r0, rb)
        for c0 in range(0, n2, cb):
            a, b, fell_back = step(rows, rows_radii, min(rb, n1 - r0), _padded(samples, c0, cb),
                                   pad(sample_radii, c0, cb), min(cb, n2 - c0))
            ref_in[r0:r0 + rb] |= np.asarray(a)[:min(rb, n1 - r0)]
            sample_in[c0:c0 + cb] |= np.asarray(b)[:min(cb, n2 - c0)]
            if counts is not None:
                counts.add(fell_back)
    return PrecisionRecall(float(sample_in.mean()), float(ref_in.mean()))
