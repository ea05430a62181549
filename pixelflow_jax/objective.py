"""The PixelFlow training objective (DESIGN §5) on stage-grouped batches.

The official trainer packs samples of all resolutions into one sequence. Here
sample j of a global batch of B trains stage ``j mod S``, so every stage gets
B / S samples of one fixed shape (one compiled step) and every device's rows
hold all stages equally. For sample j at stage s (resolution R_s):

    x_end   = the image halved (2x2 means) down to R_s
    x_start = x_end halved once more, then nearest-upsampled back to R_s
    n ~ N(0, I);  x_end <- end_t x_end + (1 - end_t) n;  x_start <- start_t x_start + (1 - start_t) n
    i ~ U{0..999};  t = i / 1000;  T = the stage's T slice at i
    x_t = t x_end + (1 - t) x_start;  target = x_end - x_start
    loss = mean over samples of the per-sample mean squared error of model(x_t, T, label)

with the label replaced by the null label with probability 0.1. All randomness
of sample j comes from ``fold_in(fold_in(key(seed), step), j)``: the loss of a
global batch does not depend on the number of devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax.cascade import halve, upsample_nearest
from pixelflow_jax.scheduler import CascadeSchedule


class StageBatch(NamedTuple):
    """Model inputs and targets of one stage's sub-batch (NHWC, float32)."""

    x_t: jax.Array
    target: jax.Array
    T: jax.Array
    labels: jax.Array


class Draws(NamedTuple):
    """The randomness of a batch, per sample: timestep index, noise, label dropout."""

    t_index: jax.Array   # [B] int32 in [0, num_train_timesteps)
    noise: jax.Array     # [B, R, R, C]: noise at full resolution; stage s uses its top-left R_s
    drop: jax.Array      # [B] bool


def to_model_space(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    return images.astype(jnp.float32) / 255.0 * 2.0 - 1.0


def draw(key: jax.Array, global_rows: jax.Array, resolution: int, channels: int,
         num_train_timesteps: int, label_dropout: float) -> Draws:
    """Per-sample randomness for global row numbers ``global_rows`` [B]."""
    def one(row):
        k_t, k_n, k_d = jax.random.split(jax.random.fold_in(key, row), 3)
        return Draws(jax.random.randint(k_t, (), 0, num_train_timesteps, jnp.int32),
                     jax.random.normal(k_n, (resolution, resolution, channels), jnp.float32),
                     jax.random.uniform(k_d) < label_dropout)
    return jax.vmap(one)(global_rows)


def stage_batch(images: jax.Array, labels: jax.Array, draws: Draws, stage: int,
                schedule: CascadeSchedule, null_label: int) -> StageBatch:
    """Inputs of stage ``stage`` for images [n, R, R, C] in [-1, 1] (all of this stage)."""
    st = schedule.stages[stage]
    x_end = images
    for _ in range(schedule.num_stages - 1 - stage):
        x_end = halve(x_end)
    x_start = upsample_nearest(halve(x_end))
    r = x_end.shape[1]
    noise = draws.noise[:, :r, :r]  # one draw per sample (the official randn_like(x_end))
    x_end = st.end_t * x_end + (1.0 - st.end_t) * noise
    x_start = st.start_t * x_start + (1.0 - st.start_t) * noise
    t = (draws.t_index.astype(jnp.float32) / schedule.num_train_timesteps)[:, None, None, None]
    x_t = t * x_end + (1.0 - t) * x_start
    T = jnp.asarray(schedule.train_timesteps(stage).astype(np.float32))[draws.t_index]
    return StageBatch(x_t, x_end - x_start, T, jnp.where(draws.drop, null_label, labels))


def split_stages(x: jax.Array, num_stages: int) -> list[jax.Array]:
    """Rows j with j mod S == s, for every s (a reshape: device-local when sharded)."""
    grouped = x.reshape(x.shape[0] // num_stages, num_stages, *x.shape[1:])
    return [grouped[:, s] for s in range(num_stages)]


def loss_fn(model, images: jax.Array, labels: jax.Array, key: jax.Array,
            schedule: CascadeSchedule, label_dropout: float) -> jax.Array:
    """The mean of per-sample MSEs over a global batch (B a multiple of S).

    ``images``: uint8 [B, R, R, C]; ``labels``: int [B].
    """
    S = schedule.num_stages
    B, R, _, C = images.shape
    draws = draw(key, jnp.arange(B), R, C, schedule.num_train_timesteps, label_dropout)
    x = to_model_space(images)
    total = 0.0
    parts = zip(split_stages(x, S), split_stages(labels, S),
                *[split_stages(d, S) for d in draws])
    for s, (xs, ls, t_index, noise, drop) in enumerate(parts):
        sb = stage_batch(xs, ls, Draws(t_index, noise, drop), s, schedule,
                         model.params.num_classes)
        pred = model(sb.x_t, sb.T, sb.labels)
        total = total + jnp.mean(jnp.square(pred - sb.target), axis=(1, 2, 3)).sum()
    return total / B
