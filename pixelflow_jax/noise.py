"""Per-image random noise for the cascade: initial Gaussian noise and block noise.

Every image draws from its own key ``fold_in(key(seed), image_index)``, so an
image is the same whatever batch, device or host it is generated on. Block
noise (DESIGN §3) is drawn vectorised: one correlated 4-vector per 2x2 block per
channel, filling the block row-major.

Arrays are NHWC inside this package; files from other implementations are NCHW
and are transposed by :func:`load_noise_npz`.
"""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax.errors import UserError


class CascadeNoise(NamedTuple):
    """All the randomness of one cascade run (NHWC, float32).

    ``init`` [B, h, w, C] at the first stage's resolution; ``blocks[s - 1]``
    [B, H_s, W_s, C] the correlated block noise added on entering stage s.
    """

    init: jax.Array
    blocks: tuple[jax.Array, ...]


def block_covariance(gamma: float, eps: float = 1e-6) -> np.ndarray:
    """Covariance of one 2x2 block: (1 - gamma) I + gamma 1 1^T + eps I (float64)."""
    return (1.0 - gamma) * np.eye(4) + gamma * np.ones((4, 4)) + eps * np.eye(4)


def block_noise_factor(gamma: float, eps: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor L (float32) with L L^T = :func:`block_covariance`.

    Factorised in float64: the matrix is nearly singular (its smallest eigenvalue
    is ~eps), and float64 keeps L's last diagonal entry accurate (0.0020).
    """
    return np.linalg.cholesky(block_covariance(gamma, eps)).astype(np.float32)


def image_key(seed: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """The key of image ``index`` under ``seed`` (both may be traced)."""
    return jax.random.fold_in(jax.random.key(seed), index)


def correlate_blocks(z: jax.Array, factor: jax.Array) -> jax.Array:
    """Block noise [H, W, C] from standard normals z [H/2, W/2, C, 4].

    Each 4-vector gets covariance L L^T (L = ``factor``) and fills its 2x2 block
    row-major: top-left, top-right, bottom-left, bottom-right.
    """
    h, w, c, _ = z.shape
    eps = (z @ factor.T).reshape(h, w, c, 2, 2)          # [..., p, q]
    return eps.transpose(0, 3, 1, 4, 2).reshape(2 * h, 2 * w, c)


def draw_cascade_noise(seed: jax.Array | int, indices: jax.Array,
                       resolutions: Sequence[int], channels: int,
                       gamma: float) -> CascadeNoise:
    """Noise for the images ``indices`` [B] (global image numbers) of a cascade.

    Image i's noise is one standard-normal draw from ``image_key(seed, i)``, cut
    into the initial noise and each stage's block-noise normals, so no value
    depends on the batch. (One draw, not one per stage: Threefry compiles
    slowly on CPU, and one call of it compiles ten times faster than four.)
    """
    factor = jnp.asarray(block_noise_factor(gamma))
    r0 = resolutions[0]
    sizes = [r0 * r0 * channels] + [r * r * channels for r in resolutions[1:]]
    offsets = np.cumsum([0] + sizes)

    def one(index):
        z = jax.random.normal(image_key(seed, index), (int(offsets[-1]),), jnp.float32)
        init = z[:sizes[0]].reshape(r0, r0, channels)
        blocks = tuple(
            correlate_blocks(z[offsets[s]:offsets[s + 1]].reshape(r // 2, r // 2, channels, 4),
                             factor)
            for s, r in enumerate(resolutions) if s > 0)
        return CascadeNoise(init, blocks)

    return jax.vmap(one)(jnp.asarray(indices))


def draw_duplicate_blocks(seed: jax.Array | int, indices: jax.Array,
                          resolutions: Sequence[int], channels: int,
                          gamma: float) -> tuple[jax.Array, ...]:
    """Block noise for the official Dopri5 sampler's duplicated half of the batch.

    The official solver integrates 2B rows, and the second B draw their own block
    noise; here image i's comes from ``fold_in(image_key(seed, i), 1)``.
    """
    factor = jnp.asarray(block_noise_factor(gamma))

    def one(index):
        key = jax.random.fold_in(image_key(seed, index), 1)
        z = jax.random.normal(key, (sum(r * r * channels for r in resolutions[1:]),))
        out, start = [], 0
        for r in resolutions[1:]:
            size = r * r * channels
            out.append(correlate_blocks(z[start:start + size].reshape(r // 2, r // 2, channels,
                                                                      4), factor))
            start += size
        return tuple(out)

    return jax.vmap(one)(jnp.asarray(indices))


def load_noise_npz(path: str | os.PathLike, batch: int, resolutions: Sequence[int],
                   channels: int) -> tuple[CascadeNoise, tuple[jax.Array, ...] | None]:
    """Read noise written by another implementation (NCHW float32) as NHWC.

    The file holds ``init`` [B, C, r_0, r_0] and ``block1`` ... ``block{S-1}``
    [B, C, r_s, r_s] (the correlated epsilon of DESIGN §3). Block arrays may have
    2B rows, as the official Dopri5 sampler draws them: the second B are its
    duplicated half's, returned separately (else None). Every problem is a
    :class:`UserError` naming the array.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"noise file {path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"noise file {path}: not a readable .npz file ({e})") from None
    names = ["init"] + [f"block{s}" for s in range(1, len(resolutions))]
    problems = []
    missing = [n for n in names if n not in arrays]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    extra = sorted(set(arrays) - set(names))
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    rows = {batch} if not names[1:] or names[1] not in arrays \
        else {batch, 2 * batch} if arrays[names[1]].shape[:1] == (2 * batch,) else {batch}
    out = []
    for name, r in zip(names, resolutions):
        if name not in arrays:
            continue
        a = arrays[name]
        n = batch if name == "init" else max(rows)
        want = (n, channels, r, r)
        if a.shape != want:
            problems.append(f"{name} has shape {list(a.shape)}, expected {list(want)} (NCHW)")
        elif not np.issubdtype(a.dtype, np.floating):
            problems.append(f"{name} has dtype {a.dtype}, expected float32")
        elif not np.all(np.isfinite(a)):
            problems.append(f"{name} has non-finite values")
        else:
            out.append(np.ascontiguousarray(a.astype(np.float32).transpose(0, 2, 3, 1)))
    if problems:
        raise UserError(f"noise file {path}: " + "; ".join(problems))
    blocks = tuple(jnp.asarray(a[:batch]) for a in out[1:])
    dup = tuple(jnp.asarray(a[batch:]) for a in out[1:]) if max(rows) == 2 * batch else None
    return CascadeNoise(jnp.asarray(out[0]), blocks), dup


def save_noise_npz(path: str | os.PathLike, noise: CascadeNoise) -> None:
    """Write ``noise`` in the NCHW layout that :func:`load_noise_npz` reads."""
    arrays = {"init": np.asarray(noise.init).transpose(0, 3, 1, 2)}
    for s, b in enumerate(noise.blocks, start=1):
        arrays[f"block{s}"] = np.asarray(b).transpose(0, 3, 1, 2)
    np.savez(path, **arrays)
