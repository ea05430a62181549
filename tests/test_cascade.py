"""The cascade driver: a new stage solver is one class (here Heun's method, defined in this
file), checked against independent implementations of the same cascade."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_dopri5_reference as dref
import torch_reference as ref
from conftest import nchw, rel_err
from pixelflow_jax.cascade import renoise, run_cascade
from pixelflow_jax.noise import draw_cascade_noise
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule

SCHEDULE = CascadeSchedule()


@dataclasses.dataclass(frozen=True)
class Heun:
    """Heun's method, ``steps`` uniform steps per stage in t from 0 to 1."""

    copies: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False

    def inputs(self, schedule, steps, shift):
        return {"n": np.int32(schedule.steps_per_stage(steps)),
                "T_first": np.float32([st.T_first for st in schedule.stages]),
                "T_last": np.float32([st.T_last for st in schedule.stages])}

    def solve_stage(self, velocity, y, cond, stage, inputs):
        n, T0, T1 = (inputs[k][stage] for k in ("n", "T_first", "T_last"))
        h = 1.0 / n

        def step(i, y):
            k1 = velocity(y, T0 + i * h * (T1 - T0), cond)
            k2 = velocity(jax.tree.map(lambda a, k: a + h * k, y, k1),
                          T0 + (i + 1) * h * (T1 - T0), cond)
            return jax.tree.map(lambda a, p, q: a + h / 2 * (p + q), y, k1, k2)

        B = jax.tree.leaves(y)[0].shape[0]
        return jax.lax.fori_loop(0, n, step, y), jnp.full((B,), n), jnp.ones((B,), bool)

    def evaluations(self, steps):
        return 2 * steps


def test_heun_through_the_driver_matches_numpy():
    steps, rng = [3, 1, 2, 4], np.random.default_rng(0)
    resolutions = (2, 4, 8, 16)
    init = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    blocks = [rng.standard_normal((2, r, r, 3)).astype(np.float32) for r in resolutions[1:]]
    scale = np.array([1.0, -0.5])  # a per-row input

    def field(x, T, cond, s, xp):  # stage-dependent, nonlinear, uses the row input
        return -0.7 * x + xp.sin(T / 50 + s) * cond[:, None, None, None] + 0.3 * xp.tanh(x) ** 2

    def numpy_cascade():
        x = init.astype(np.float64)
        for s, st in enumerate(SCHEDULE.stages):
            if s:
                x = st.alpha * x.repeat(2, axis=1).repeat(2, axis=2) + st.beta * blocks[s - 1]
            T = np.linspace(st.T_first, st.T_last, steps[s] + 1)
            h = 1.0 / steps[s]
            for i in range(steps[s]):
                k1 = field(x, T[i], scale, s, np)
                k2 = field(x + h * k1, T[i + 1], scale, s, np)
                x = x + h / 2 * (k1 + k2)
        return x

    solver = Heun()
    alphas = [st.alpha for st in SCHEDULE.stages]
    betas = [st.beta for st in SCHEDULE.stages]
    x, stats = jax.jit(lambda init, blocks, cond, inputs: run_cascade(
        solver, lambda s: lambda x, T, c: field(x, T, c, s, jnp), init, [blocks], cond, inputs,
        alphas=alphas, betas=betas))(init, blocks, scale.astype(np.float32),
                                     solver.inputs(SCHEDULE, steps, 1.0))
    assert rel_err(x, numpy_cascade()) < 1e-5  # float32 against float64
    np.testing.assert_array_equal(stats.evaluations, 2 * np.array([steps, steps]).T)
    assert stats.finished.all()


def test_heun_plugs_into_the_sampler(c2i):
    """The same class, given to Sampler, against Heun over the oracle network."""
    sampler = Sampler(c2i.model(), SCHEDULE, 32, solver=Heun())
    labels, guidance, steps = np.array([3, 6]), 3.0, 2
    noise = draw_cascade_noise(1, jnp.arange(2), sampler.resolutions, 3, SCHEDULE.gamma)
    got = sampler.sample_from_noise(noise, labels=labels, guidance=guidance, steps=steps)

    velocity = dref.guided_velocity(c2i.sd, c2i.params)
    x = nchw(noise.init)
    for s, st in enumerate(ref.stage_schedule(4)):
        if s:
            x = st["alpha"] * F.interpolate(x, scale_factor=2, mode="nearest") \
                + st["beta"] * nchw(noise.blocks[s - 1])
        g_s = (guidance - 1) * st["weight"] + 1
        T = np.linspace(st["T_first"], st["T_last"], steps + 1)
        v = lambda x, i: velocity(x, float(T[i]), g_s, torch.tensor(labels))
        for i in range(steps):
            k1 = v(x, i)
            x = x + (k1 + v(x + k1 / steps, i + 1)) / (2 * steps)
    assert rel_err(nchw(got.x), x.numpy()) <= 1e-4
    np.testing.assert_array_equal(got.stats.evaluations, np.full((4, 2), 2 * steps))


def test_renoise_is_alpha_upsampled_plus_beta_noise():
    x = jnp.arange(8.0).reshape(2, 2, 2, 1)
    eps = jnp.ones((2, 4, 4, 1))
    out = np.asarray(renoise(x, 0.5, 2.0, eps))
    want = 0.5 * np.kron(np.arange(8.0).reshape(2, 2, 2), np.ones((2, 2)))[..., None] + 2.0
    np.testing.assert_array_equal(out, want)


def test_block_noise_must_match_the_solver_copies():
    with pytest.raises(ValueError, match="carries 1 row blocks, got block noise for 2"):
        run_cascade(Heun(), lambda s: None, jnp.zeros((1, 2, 2, 1)), [[], []], None, {},
                    alphas=[1.0], betas=[0.0])
