"""Sinusoidal projection and 2-D RoPE tables against hand-derived check values (DESIGN §2)
and the independent oracle (tests/torch_reference.py).

Check values are the definitions of DESIGN §2 evaluated in 30-digit arithmetic (mpmath), then
written here as literals: f_k = 10000^(-k/127); RoPE w_k = 10000^(-2k/(D/2)).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from pixelflow_jax.embeddings import (apply_rope, rope_tables, sinusoidal_frequencies,
                                      sinusoidal_projection)

# f_k = 10000^(-k/127) = exp(-ln(10000) k / 127)
F_CHECK = {
    0: 1.0,
    1: 0.93004494584813918237,     # 10000^(-1/127)
    2: 0.86498360129766814415,     # f_1^2
    64: 0.0096438837915444583729,  # 10000^(-64/127)
    126: 0.00010752168531898922984,
    127: 0.0001,                   # 10000^(-1): the slowest frequency is exactly 1e-4
}


def test_frequency_table_check_values():
    f = sinusoidal_frequencies()
    assert f.shape == (128,) and f.dtype == np.float32
    for k, want in F_CHECK.items():
        # Correctly rounded: the float32 nearest to the exact value, not just close to it.
        assert f[k] == np.float32(want), (k, f[k], want)
    # A geometric progression with ratio f_1 (each entry within float32 rounding).
    np.testing.assert_allclose(f[1:].astype(np.float64) / f[:-1], F_CHECK[1], rtol=2.0 ** -22)


# (x, k, cos(x f_k), sin(x f_k)), exact; x is a float32 value.
PROJ_CHECK = [
    (0.0, 0, 1.0, 0.0),
    (0.0, 127, 1.0, 0.0),
    (1.0, 0, 0.5403023058681397174, 0.84147098480789650665),     # cos 1, sin 1
    (1.0, 1, 0.59779795219533110511, 0.80164681022946048193),    # cos f_1, sin f_1
    (999.0, 1, 0.69919562452947326211, -0.71493040125514305054),  # arg 929.1149009022910
    (999.0, 64, -0.97814293562617650114, -0.20793363721294718241),  # arg 9.634239907752914
    (999.0, 127, 0.99501414364465298776, 0.099733915731299100939),  # arg 0.0999
]


def test_sinusoidal_projection_check_values():
    xs = sorted({x for x, *_ in PROJ_CHECK})
    got = np.asarray(sinusoidal_projection(jnp.array(xs, jnp.float32)))
    assert got.shape == (len(xs), 256) and got.dtype == np.float32
    for x, k, cos, sin in PROJ_CHECK:
        # The float32 argument x * f_k carries two roundings (f_k's and the product's), each at
        # most 2^-24 relative: |d arg| <= x f_k 2^-23; plus float32 cos/sin error (~1e-7).
        tol = x * F_CHECK[k] * 2.0 ** -23 + 2e-7
        row = xs.index(x)
        assert abs(got[row, k] - cos) <= tol, (x, k, "cos")          # cosines first
        assert abs(got[row, 128 + k] - sin) <= tol, (x, k, "sin")    # then sines


@pytest.mark.parametrize("values", [[0.0, 1.0, 8.0, 64.0], [174.825, 425.749, 998.9, 999.0]])
def test_sinusoidal_projection_matches_oracle(values):
    got = np.asarray(sinusoidal_projection(jnp.array(values)))
    # The oracle's table comes from torch's float32 exp, which is not correctly rounded:
    # a one-ulp difference in f_k moves the argument by up to x * 2^-23 (DESIGN §6).
    want = ref.sinusoid(torch.tensor(values), torch.float64).numpy()
    np.testing.assert_allclose(got, want, atol=max(values) * 2.0 ** -23 + 1e-6)


def test_rope_table_check_values_small():
    """head_dim 8: w = [1, 1, 0.01, 0.01] (w_1 = 10000^(-2/4)); token (y=2, x=3) of a 4x4 grid."""
    cos, sin = rope_tables(4, 8)
    assert cos.shape == sin.shape == (16, 8) and cos.dtype == np.float32
    tok = 2 * 4 + 3  # row-major
    # angles: x * w for the first half, y * w for the second: [3, 3, .03, .03, 2, 2, .02, .02]
    c3, s3 = -0.98999249660044545727, 0.1411200080598672221
    c03, s03 = 0.99955003374898751627, 0.029995500202495660769
    c2, s2 = -0.416146836547142387, 0.9092974268256816954
    c02, s02 = 0.99980000666657777841, 0.019998666693333079366
    np.testing.assert_allclose(cos[tok], [c3, c3, c03, c03, c2, c2, c02, c02], atol=1e-7)
    np.testing.assert_allclose(sin[tok], [s3, s3, s03, s03, s2, s2, s02, s02], atol=1e-7)
    # Token (0, 0) has angle 0 everywhere.
    assert np.all(cos[0] == 1) and np.all(sin[0] == 0)


def test_rope_table_check_values_xl():
    """head_dim 72 (XL), 64x64 tokens (256 px): w_k = 10000^(-k/18), w_1 = 0.599484250318941."""
    cos, sin = rope_tables(64, 72)
    assert cos.shape == (4096, 72)
    tok = 63 * 64 + 5  # y = 63, x = 5
    checks = [  # (channel, cos, sin): channel 2 = pair 1 (w_1), 34 = pair 17 (w_17); +36 for y
        (2, -0.98962529231285970764, 0.14367247758247568012),     # 5 w_1 = 2.997421251594705
        (3, -0.98962529231285970764, 0.14367247758247568012),     # its pair partner
        (34, 0.99999965218009488723, 0.00083405017190026537328),  # 5 w_17
        (38, 0.99766191026292633918, 0.068342613430631349101),    # 63 w_1 = 37.76750777009328
        (70, 0.99994478061686739529, 0.010508839949534671847),    # 63 w_17
    ]
    for ch, c, s in checks:
        assert abs(cos[tok, ch] - c) <= 1e-7 and abs(sin[tok, ch] - s) <= 1e-7, ch


@pytest.mark.parametrize("grid, head_dim", [(4, 8), (8, 16), (64, 72)])
def test_rope_tables_match_oracle(grid, head_dim):
    cos, sin = rope_tables(grid, head_dim)
    cos_ref, sin_ref = ref.rope_tables(grid, head_dim, torch.float64)
    assert cos.shape == (grid * grid, head_dim)
    np.testing.assert_allclose(cos, cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_ref.numpy(), atol=1e-6)


def test_apply_rope_check_value():
    """Pair (x_0, x_1) = (1, 2) rotated by angle 1 (token x = 1, w_0 = 1):
    (cos 1 - 2 sin 1, 2 cos 1 + sin 1) = (-1.1426396637476533, 1.9220755965441759)."""
    cos, sin = rope_tables(4, 8)
    x = np.zeros((1, 16, 1, 8), np.float32)
    x[0, 1, 0, :2] = [1.0, 2.0]
    x[0, 1, 0, 4:6] = [1.0, 2.0]  # second half: rotated by y = 0, so unchanged
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
    np.testing.assert_allclose(out[0, 1, 0], [-1.1426396637476533, 1.9220755965441759, 0, 0,
                                              1, 2, 0, 0], atol=1e-6)


def test_apply_rope_matches_oracle_and_is_relative():
    rng = np.random.default_rng(0)
    grid, D = 4, 8
    x = rng.standard_normal((2, grid * grid, 3, D))
    cos, sin = rope_tables(grid, D)
    got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(cos), jnp.asarray(sin)))
    c, s = ref.rope_tables(grid, D, torch.float64)
    want = ref.apply_rope(torch.tensor(x).transpose(1, 2), c, s).transpose(1, 2).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # q.k depends only on the position difference: offset (1, 1) twice, from different places.
    q, k = rng.standard_normal(D), rng.standard_normal(D)
    rot = lambda v, tok: np.asarray(apply_rope(jnp.asarray(np.tile(v, (1, 16, 1, 1)), jnp.float32),
                                               jnp.asarray(cos), jnp.asarray(sin)))[0, tok, 0]
    s1 = rot(q, 1 * 4 + 1) @ rot(k, 0)
    assert s1 == pytest.approx(rot(q, 3 * 4 + 2) @ rot(k, 2 * 4 + 1), rel=1e-5)
    # and it does depend on it (a table of zero angles would pass the line above)
    assert abs(s1 - rot(q, 2 * 4 + 1) @ rot(k, 0)) > 1e-3
