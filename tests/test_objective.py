"""The training batch construction and loss against an oracle written from DESIGN §5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from pixelflow_jax.config import ModelParams
from pixelflow_jax.objective import draw, loss_fn, split_stages, stage_batch
from pixelflow_jax.scheduler import CascadeSchedule

S, K, R, C = 4, 1000, 32, 3
SCHEDULE = CascadeSchedule(S, K)


def block_mean(x, k):
    """Mean over k x k blocks (NHWC, float64): successive 2x2 halvings, done at once."""
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


def oracle(images, labels, t_index, noise, drop, stage, num_classes):
    """x_t, target, T, labels of DESIGN §5 for images in [-1, 1] (float64)."""
    st = ref.stage_schedule(S, K)[stage]
    level = 2 ** (S - 1 - stage)
    x_end = block_mean(images, level)
    x_start = np.kron(block_mean(images, 2 * level), np.ones((1, 2, 2, 1)))  # nearest up
    r = x_end.shape[1]
    n = noise[:, :r, :r]
    x_end = st["end_t"] * x_end + (1 - st["end_t"]) * n
    x_start = st["start_t"] * x_start + (1 - st["start_t"]) * n
    t = (t_index / K)[:, None, None, None]
    # T slice: K values from T_first; the last stage ends on T_last, the others one step short.
    span = (st["T_last"] - st["T_first"]) * (K if stage < S - 1 else K - 1) / (K - 1)
    T = st["T_first"] + span * t_index / (K if stage < S - 1 else K - 1)
    return (t * x_end + (1 - t) * x_start, x_end - x_start, T,
            np.where(drop, num_classes, labels))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, R, R, C), dtype=np.uint8)
    labels = rng.integers(0, 10, 8)
    draws = draw(jax.random.key(3), jnp.arange(8), R, C, K, 0.3)
    return images, labels, draws


@pytest.mark.parametrize("stage", range(S))
def test_stage_batch_matches_oracle(batch, stage):
    images, labels, draws = batch
    x = images.astype(np.float64) / 255 * 2 - 1
    got = stage_batch(jnp.asarray(x, jnp.float32), jnp.asarray(labels), draws, stage, SCHEDULE,
                      10)
    want = oracle(x, labels, np.asarray(draws.t_index), np.asarray(draws.noise, np.float64),
                  np.asarray(draws.drop), stage, 10)
    side = R // 2 ** (S - 1 - stage)
    assert got.x_t.shape == (8, side, side, C)
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(got.labels, want[3])


def test_draws_are_per_sample(batch):
    _, _, draws = batch
    again = draw(jax.random.key(3), jnp.array([5, 2]), R, C, K, 0.3)
    for a, b in zip(draws, again):
        np.testing.assert_array_equal(np.asarray(a)[[5, 2]], b)
    big = draw(jax.random.key(0), jnp.arange(4000), 2, 1, K, 0.1)
    assert 0.07 < float(big.drop.mean()) < 0.13  # label dropout 0.1
    assert int(big.t_index.min()) >= 0 and int(big.t_index.max()) == K - 1


def test_rows_go_round_robin_to_stages():
    x = jnp.arange(8)
    assert [list(np.asarray(p)) for p in split_stages(x, 4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


class Stub:
    """A 'model' with a known, input-dependent output (the loss is then checkable)."""

    params = ModelParams(num_attention_heads=1, attention_head_dim=4, in_channels=3,
                         out_channels=3, depth=1, patch_size=1, num_classes=10)

    def __call__(self, x, T, labels):
        return 0.5 * x + (T / 1000.0 + labels / 10.0)[:, None, None, None]


def test_loss_is_the_mean_of_per_sample_mse(batch):
    images, labels, _ = batch
    key = jax.random.key(11)
    loss = float(loss_fn(Stub(), jnp.asarray(images), jnp.asarray(labels), key, SCHEDULE, 0.1))
    draws = draw(key, jnp.arange(8), R, C, K, 0.1)
    x = images.astype(np.float64) / 255 * 2 - 1
    per_sample = []
    for j in range(8):
        s = j % S
        d = [np.asarray(a)[j:j + 1] for a in draws]
        x_t, target, T, lab = oracle(x[j:j + 1], labels[j:j + 1], d[0], d[1].astype(np.float64),
                                     d[2], s, 10)
        pred = 0.5 * x_t + (T / 1000 + lab / 10)[:, None, None, None]
        per_sample.append(np.mean((pred - target) ** 2))
    assert loss == pytest.approx(np.mean(per_sample), rel=1e-5)
