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

:func:`pair_loss_fn` holds the reflow and distillation objectives on a teacher's
(start, end) pairs of every stage (DESIGN §11), on the same stage grouping.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

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


# ----------------------------------------------------------------------------- reflow, distill
#
# DESIGN §11. Each stage s of the teacher's cascade is a rectified-flow segment: the pair
# (start_s, end_s) is the x the teacher entered stage s with (after the renoise) and the x it
# left it with. Batches keep the stage grouping of the flow objective: row j of a global batch
# of B trains stage j mod S, on pair group g = j // S (all S stages of one group share a pair
# index), so a batch holds G = B / S pairs and each stage's sub-batch is [G, R_s, R_s, C].

U_SHAPE_A = 4.0  # arXiv 2405.20320: p(t) proportional to cosh(a (t - 1/2)), a = 4
# arXiv 2310.14189: pseudo-Huber c = 0.00054 sqrt(d) for d-dimensional data.
PSEUDO_HUBER_C = 0.00054


def u_shaped_time(u: jax.Array, a: float = U_SHAPE_A) -> jax.Array:
    """The U-shaped density's t for uniform ``u`` in [0, 1) (inverse CDF).

    p(t) = a cosh(a (t - 1/2)) / (2 sinh(a/2)) on [0, 1]: the mixture of exp(a t) and
    exp(a (1 - t)) that arXiv 2405.20320 samples, heavier at both ends of the segment.
    """
    return 0.5 + jnp.arcsinh((2.0 * u - 1.0) * np.sinh(a / 2.0)) / a


def draw_pair_rows(key: jax.Array, global_rows: jax.Array, num_train_timesteps: int,
                   t_density: str, label_dropout: float) -> tuple[jax.Array, jax.Array]:
    """Per-row randomness of a pair batch: (timestep index [B] int32, label dropped [B]).

    Row j's draws come from ``fold_in(key, j)`` alone, as in :func:`draw`. ``uniform``
    draws the index as the flow objective does; ``u_shaped`` draws t from
    :func:`u_shaped_time` and takes its grid cell ``floor(K t)``, so T always comes from
    the stage's training slice.
    """
    K = num_train_timesteps

    def one(row):
        k_t, k_d = jax.random.split(jax.random.fold_in(key, row))
        if t_density == "u_shaped":
            t = u_shaped_time(jax.random.uniform(k_t, (), jnp.float32))
            i = jnp.clip(jnp.floor(t * K).astype(jnp.int32), 0, K - 1)
        else:
            i = jax.random.randint(k_t, (), 0, K, jnp.int32)
        return i, jax.random.uniform(k_d) < label_dropout
    return jax.vmap(one)(global_rows)


def reflow_inputs(start: jax.Array, end: jax.Array, t_index: jax.Array, stage: int,
                  schedule: CascadeSchedule) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_t, target, T) of the reflow objective for one stage's pairs [n, R_s, R_s, C].

    x_t = t end + (1 - t) start with t = i / K, target end - start, and T the stage's
    training slice at i: exactly the flow objective's map from t to T (DESIGN §5).
    """
    t = (t_index.astype(jnp.float32) / schedule.num_train_timesteps)[:, None, None, None]
    x_t = t * end + (1.0 - t) * start
    T = jnp.asarray(schedule.train_timesteps(stage).astype(np.float32))[t_index]
    return x_t, end - start, T


def distill_timesteps(schedule: CascadeSchedule, shift: float = 1.0) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(T [S], dt [S]) float32: each stage's one Euler step, from the sampler's own tables.

    The student is trained where :class:`pixelflow_jax.solvers.Euler` queries it at one step
    per stage: T = the table's first timestep (T_first at any shift), step length dt
    (1 for a one-step stage).
    """
    tables = schedule.euler_tables(1, shift)
    return tables.T[:, 0].copy(), tables.dt[:, 0].copy()


def distill_prediction(start: jax.Array, velocity: jax.Array, dt: float) -> jax.Array:
    """The student's end of a stage after one Euler step: start + dt v."""
    return start + dt * velocity


def per_sample_loss(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """[n] per-sample losses of images [n, ...]: ``l2`` or ``pseudo_huber``.

    ``l2``: the mean squared error. ``pseudo_huber``: sqrt(||e||^2 + c^2) - c with
    c = 0.00054 sqrt(d) (arXiv 2310.14189), divided by sqrt(d) so that stages of different
    sizes weigh alike: sqrt(mse + c'^2) - c' with c' = 0.00054.
    """
    mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    if kind == "pseudo_huber":
        return jnp.sqrt(mse + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C
    return mse


# A perceptual loss hook for distillation's last stage: f(pred, end) -> [n] per-sample
# losses of [n, R, R, C] images in [-1, 1], added to that stage's loss. None is built in
# (LPIPS needs downloaded VGG weights); pass one to Trainer(..., perceptual_loss=f).
PerceptualLoss = Callable[[jax.Array, jax.Array], jax.Array]


def pair_loss_fn(model, starts: Sequence[jax.Array], ends: Sequence[jax.Array],
                 labels: jax.Array, key: jax.Array, schedule: CascadeSchedule, *,
                 objective: str, label_dropout: float = 0.0, t_density: str = "uniform",
                 distill_loss: str = "l2", shift: float = 1.0,
                 perceptual_loss: PerceptualLoss | None = None) -> jax.Array:
    """The reflow or distill loss of a pair batch (DESIGN §11): the mean of per-sample losses.

    ``starts[s]``, ``ends[s]``: [G, R_s, R_s, C] float32, stage s of pair groups 0..G-1;
    ``labels`` [G]. Row j = g S + s draws from ``fold_in(key, j)``, so the loss of a global
    batch does not depend on the device count.
    """
    S = schedule.num_stages
    G = labels.shape[0]
    rows = jnp.arange(G * S).reshape(G, S)
    t_index, drop = draw_pair_rows(key, rows.reshape(-1), schedule.num_train_timesteps,
                                   t_density, label_dropout)
    t_index, drop = t_index.reshape(G, S), drop.reshape(G, S)
    null = model.params.num_classes
    T_one, dt_one = distill_timesteps(schedule, shift)
    total = 0.0
    for s in range(S):
        cls = jnp.where(drop[:, s], null, labels)
        if objective == "reflow":
            x_t, target, T = reflow_inputs(starts[s], ends[s], t_index[:, s], s, schedule)
            pred = model(x_t, T, cls)
            losses = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        elif objective == "distill":
            T = jnp.full((G,), T_one[s], jnp.float32)
            x_end = distill_prediction(starts[s], model(starts[s], T, cls), float(dt_one[s]))
            losses = per_sample_loss(x_end, ends[s], distill_loss)
            if perceptual_loss is not None and s == S - 1:
                losses = losses + perceptual_loss(x_end, ends[s])
        else:
            raise ValueError(f"unknown pair objective {objective!r}")
        total = total + losses.sum()
    return total / (G * S)
