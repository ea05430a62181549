"""Block noise statistics and layout, per-image keys, and noise files."""

import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.errors import UserError
from pixelflow_jax.noise import (CascadeNoise, block_covariance, block_noise_factor,
                                 correlate_blocks, draw_cascade_noise, load_noise_npz,
                                 save_noise_npz)

GAMMA = -1 / 3
RES = (4, 8, 16, 32)
# DESIGN §3: (1 - gamma) I + gamma 1 1^T + 1e-6 I at gamma = -1/3: variance 1 (+1e-6) on the
# diagonal, covariance -1/3 between any two pixels of a block.
COV = np.array([[1 + 1e-6, -1 / 3, -1 / 3, -1 / 3],
                [-1 / 3, 1 + 1e-6, -1 / 3, -1 / 3],
                [-1 / 3, -1 / 3, 1 + 1e-6, -1 / 3],
                [-1 / 3, -1 / 3, -1 / 3, 1 + 1e-6]])


def test_covariance_and_factor_check_values():
    np.testing.assert_allclose(block_covariance(GAMMA), COV, rtol=0, atol=1e-15)
    L = block_noise_factor(GAMMA)
    assert L.dtype == np.float32
    assert np.all(np.triu(L, 1) == 0)                     # lower triangular
    L = L.astype(np.float64)
    np.testing.assert_allclose(L @ L.T, COV, atol=1e-6)
    # L_00 = sqrt(1 + 1e-6). L_33^2 = det(Sigma) / det(Sigma_3x3): Sigma's eigenvalues are
    # 4/3 + eps (x3) and eps; its leading 3x3 block's are 4/3 + eps (x2) and 1/3 + eps, so
    # L_33 = sqrt((4/3 + eps) eps / (1/3 + eps)) = 0.00199999775 (nearly singular).
    assert L[0, 0] == pytest.approx(1.0000005, abs=1e-7)
    assert L[3, 3] == pytest.approx(0.0019999977500054844, abs=2e-9)


def test_blocks_fill_row_major():
    z = jnp.arange(1.0, 9.0).reshape(1, 2, 1, 4)  # two blocks side by side, one channel
    out = np.asarray(correlate_blocks(z, jnp.eye(4)))[..., 0]
    np.testing.assert_array_equal(out, [[1, 2, 5, 6], [3, 4, 7, 8]])


def test_block_noise_statistics():
    noise = draw_cascade_noise(0, jnp.arange(4), (8, 128), 3, GAMMA)
    eps = np.asarray(noise.blocks[0], np.float64)           # [4, 128, 128, 3]
    blocks = eps.reshape(4, 64, 2, 64, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
    cov = blocks.T @ blocks / len(blocks)                   # 49,152 blocks
    np.testing.assert_allclose(cov, COV, atol=0.03)
    # Each 2x2 block sums to ~0 (variance 4e-6); a wrong placement would not.
    assert np.abs(blocks.sum(1)).max() < 0.02
    shifted = eps[:, 1:-1, 1:-1].reshape(4, 63, 2, 63, 2, 3).sum(axis=(2, 4))
    assert np.abs(shifted).mean() > 0.5
    init = np.asarray(noise.init)
    assert abs(init.mean()) < 0.1 and abs(init.std() - 1) < 0.1


def test_noise_depends_only_on_seed_and_index():
    a = draw_cascade_noise(7, jnp.arange(6), RES, 3, GAMMA)
    b = draw_cascade_noise(7, jnp.array([4, 1]), RES, 3, GAMMA)
    for x, y in zip(jnp.asarray(a.init)[jnp.array([4, 1])], b.init):
        np.testing.assert_array_equal(x, y)
    for xa, xb in zip(a.blocks, b.blocks):
        np.testing.assert_array_equal(np.asarray(xa)[[4, 1]], xb)
    c = draw_cascade_noise(8, jnp.arange(6), RES, 3, GAMMA)
    assert not np.allclose(a.init, c.init)
    assert not np.allclose(a.init[0], a.init[1])


def test_noise_file_round_trip_and_errors(tmp_path):
    noise = draw_cascade_noise(0, jnp.arange(2), RES, 3, GAMMA)
    path = tmp_path / "noise.npz"
    save_noise_npz(path, noise)
    with np.load(path) as f:
        assert f["init"].shape == (2, 3, 4, 4) and f["block3"].shape == (2, 3, 32, 32)  # NCHW
    back, dup = load_noise_npz(path, 2, RES, 3)
    assert dup is None
    np.testing.assert_array_equal(back.init, noise.init)
    np.testing.assert_array_equal(back.blocks[2], noise.blocks[2])

    arrays = {"init": np.zeros((2, 3, 4, 4), np.float32),
              "block1": np.zeros((2, 3, 9, 9), np.float32),
              "block2": np.zeros((2, 3, 16, 16), np.int32), "junk": np.zeros(1)}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as e:
        load_noise_npz(tmp_path / "bad.npz", 2, RES, 3)
    assert str(e.value) == (f"noise file {tmp_path / 'bad.npz'}: missing block3; unexpected junk; "
                            "block1 has shape [2, 3, 9, 9], expected [2, 3, 8, 8] (NCHW); "
                            "block2 has dtype int32, expected float32")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError) as e:
        load_noise_npz(tmp_path / "text.npz", 2, RES, 3)
    # the rest of the line is the zip reader's own reason
    want = f"noise file {tmp_path / 'text.npz'}: not a readable .npz file ("
    assert str(e.value).startswith(want)
    with pytest.raises(UserError) as e:
        load_noise_npz(path, 3, RES, 3)  # the file holds 2 images, 3 asked for
    assert str(e.value) == (f"noise file {path}: "
                            "init has shape [2, 3, 4, 4], expected [3, 3, 4, 4] (NCHW); "
                            "block1 has shape [2, 3, 8, 8], expected [3, 3, 8, 8] (NCHW); "
                            "block2 has shape [2, 3, 16, 16], expected [3, 3, 16, 16] (NCHW); "
                            "block3 has shape [2, 3, 32, 32], expected [3, 3, 32, 32] (NCHW)")
    assert isinstance(back, CascadeNoise)
    # Blocks with 2B rows: the official Dopri5 sampler's duplicated half comes back apart.
    doubled = {"init": np.asarray(noise.init).transpose(0, 3, 1, 2)}
    for s, b in enumerate(noise.blocks, start=1):
        b = np.asarray(b).transpose(0, 3, 1, 2)
        doubled[f"block{s}"] = np.concatenate([b, -b])
    np.savez(tmp_path / "doubled.npz", **doubled)
    back, dup = load_noise_npz(tmp_path / "doubled.npz", 2, RES, 3)
    np.testing.assert_array_equal(back.blocks[1], noise.blocks[1])
    np.testing.assert_array_equal(dup[1], -np.asarray(noise.blocks[1]))
