"""Sinusoidal projection and 2-D RoPE tables against SPEC §2 and the oracle."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from pixelflow_jax.embeddings import (apply_rope, rope_tables, sinusoidal_frequencies,
                                      sinusoidal_projection)


def test_frequency_table_is_correctly_rounded():
    k = np.arange(128)
    exact = np.exp(-math.log(10000) * k / 127)
    f = sinusoidal_frequencies()
    assert f.dtype == np.float32 and f[0] == 1.0
    np.testing.assert_array_equal(f, exact.astype(np.float32))


@pytest.mark.parametrize("values", [[0.0, 1.0, 8.0, 64.0], [174.825, 425.749, 998.9, 999.0]])
def test_sinusoidal_projection_matches_oracle(values):
    got = np.asarray(sinusoidal_projection(jnp.array(values)))
    assert got.shape == (len(values), 256)
    # Cosines first, of the float32 product x * f (as the official model).
    arg = (np.float32(values)[:, None] * sinusoidal_frequencies()).astype(np.float64)
    np.testing.assert_allclose(got[:, :128], np.cos(arg), atol=1e-6)
    np.testing.assert_allclose(got[:, 128:], np.sin(arg), atol=1e-6)
    # The oracle's table comes from torch's float32 exp, which is not correctly rounded:
    # a one-ulp difference in f_k moves the argument by up to x * 2^-23 (SPEC §6).
    want = ref.sinusoid(torch.tensor(values), torch.float64).numpy()
    np.testing.assert_allclose(got, want, atol=max(values) * 2.0 ** -23 + 1e-6)


@pytest.mark.parametrize("grid, head_dim", [(4, 8), (8, 16), (64, 72)])
def test_rope_tables_match_oracle(grid, head_dim):
    cos, sin = rope_tables(grid, head_dim)
    cos_ref, sin_ref = ref.rope_tables(grid, head_dim, torch.float64)
    assert cos.shape == (grid * grid, head_dim)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)


def test_rope_layout_columns_then_rows():
    cos, _ = rope_tables(4, 8)
    half = 4
    token = lambda y, x: y * 4 + x
    # First half rotates with the column x only, the second half with the row y only.
    assert np.all(cos[token(0, 2), :half] == cos[token(3, 2), :half])
    assert np.all(cos[token(2, 0), half:] == cos[token(2, 3), half:])
    assert not np.allclose(cos[token(0, 1), :half], cos[token(0, 2), :half])
    # Pairs share a frequency: w_0 = 1, w_1 = 10000^(-2/4) = 0.01.
    angle = np.arccos(np.clip(cos[token(0, 1), :half], -1, 1))
    np.testing.assert_allclose(angle, [1, 1, 0.01, 0.01], atol=1e-6)


def test_apply_rope_matches_oracle_and_is_relative():
    rng = np.random.default_rng(0)
    grid, D = 4, 8
    x = rng.standard_normal((2, grid * grid, 3, D))
    cos, sin = rope_tables(grid, D)
    got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(cos), jnp.asarray(sin)))
    c, s = ref.rope_tables(grid, D, torch.float64)
    want = ref.apply_rope(torch.tensor(x).transpose(1, 2), c, s).transpose(1, 2).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Rotation preserves norms, and q.k depends only on the position difference.
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = rng.standard_normal(D), rng.standard_normal(D)
    rot = lambda v, tok: np.asarray(apply_rope(jnp.asarray(np.tile(v, (1, 16, 1, 1)), jnp.float32),
                                               jnp.asarray(cos), jnp.asarray(sin)))[0, tok, 0]
    assert rot(q, 1 * 4 + 1) @ rot(k, 0) == pytest.approx(rot(q, 3 * 4 + 2) @ rot(k, 2 * 4 + 1),
                                                          rel=1e-5)
