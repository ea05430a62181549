"""Fixed (parameter-free) embeddings: the sinusoidal projection and 2-D RoPE (DESIGN §2).

Tables are computed on the host in float64 and rounded once to float32, so
they are platform-independent; they differ from a float32 chain of ops (the
official code's) by at most one ulp per entry.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

PROJ_DIM = 256


@functools.lru_cache(maxsize=None)
def sinusoidal_frequencies(dim: int = PROJ_DIM, max_period: float = 10000.0) -> np.ndarray:
    """f_k = exp(-ln(max_period) k / (dim/2 - 1)), k = 0..dim/2-1, float32."""
    half = dim // 2
    k = np.arange(half, dtype=np.float64)
    return np.exp(-math.log(max_period) * k / (half - 1)).astype(np.float32)


def sinusoidal_projection(x: jax.Array, dim: int = PROJ_DIM) -> jax.Array:
    """proj(x) = [cos(x f), sin(x f)] (cosines first), float32 [..., dim].

    The argument ``x f`` is a float32 product, as in the official model.
    """
    arg = jnp.asarray(x, jnp.float32)[..., None] * jnp.asarray(sinusoidal_frequencies(dim))
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


@functools.lru_cache(maxsize=None)
def rope_tables(grid: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [grid * grid, head_dim] (float32) of the 2-D rotary embedding.

    Tokens are row-major (y, x). Channels [0, D/2) rotate by the column x,
    channels [D/2, D) by the row y. Within each half the frequency
    w_k = theta^(-2k / (D/2)), k = 0..D/4-1, is shared by the pair (2k, 2k+1).
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4, got {head_dim}")
    half = head_dim // 2
    w = theta ** (-np.arange(0, half, 2, dtype=np.float64) / half)   # [D/4]
    w = np.repeat(w, 2)                                               # [D/2], pairs share
    pos = np.arange(grid, dtype=np.float64)
    y, x = np.meshgrid(pos, pos, indexing="ij")                       # row-major tokens
    angles = np.concatenate([x.reshape(-1, 1) * w, y.reshape(-1, 1) * w], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) of ``x`` [B, N, H, D] by the tables [N, D] (float32).

    out_{2i} = x_{2i} cos - x_{2i+1} sin;  out_{2i+1} = x_{2i+1} cos + x_{2i} sin.
    """
    x = x.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
