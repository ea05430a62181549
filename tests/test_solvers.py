"""Dopri5 and Euler through diffrax: against torchdiffeq, the oracle, and the core sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchdiffeq

import torch_dopri5_reference as dref
from conftest import nchw, rel_err
from pixelflow_jax.noise import draw_cascade_noise, draw_duplicate_blocks
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule
from pixelflow_jax.solvers import Dopri5Config, dopri5_evaluations, dopri5_solve

A = np.array([[-0.5, 2.0, 0.1], [-2.0, -0.3, 0.4], [0.2, -0.1, -1.0]])
Y0 = np.array([1.0, -0.5, 2.0])
SCHEDULE = CascadeSchedule()
LABELS = np.array([2, 7, 5])


def exact_toy():
    from scipy.integrate import solve_ivp
    f = lambda t, y: A @ y * (1 + np.sin(3 * t)) + np.cos(5 * t)
    return solve_ivp(f, (0, 1), Y0, method="DOP853", rtol=1e-13, atol=1e-14).y[:, -1]


@pytest.mark.parametrize("rtol, atol", [(1e-3, 1e-6), (1e-6, 1e-9)])
def test_dopri5_agrees_with_torchdiffeq_in_float64(rtol, atol, capsys):
    calls = []

    def velocity(t, y):
        jax.debug.callback(lambda: calls.append(1))
        return (jnp.asarray(A) @ y) * (1 + jnp.sin(3 * t)) + jnp.cos(5 * t)

    with jax.enable_x64(True):
        y1, steps, ok = dopri5_solve(velocity, jnp.asarray(Y0), Dopri5Config(rtol=rtol, atol=atol))
        y1, steps, ok = np.asarray(y1), int(steps), bool(ok)
    torch_calls = []

    def torch_velocity(t, y):
        torch_calls.append(1)
        return torch.tensor(A) @ y * (1 + torch.sin(3 * t)) + torch.cos(5 * t)

    y_ref = torchdiffeq.odeint(torch_velocity, torch.tensor(Y0), torch.tensor([0.0, 1.0]),
                               method="dopri5", rtol=rtol, atol=atol)[-1].numpy()
    exact = exact_toy()
    with capsys.disabled():
        print(f"\n  toy ODE rtol={rtol}: diffrax {steps} steps / {len(calls)} evaluations, "
              f"torchdiffeq {len(torch_calls)} evaluations; errors vs exact "
              f"{np.abs(y1 - exact).max():.1e} and {np.abs(y_ref - exact).max():.1e}")
    assert ok and y1.dtype == np.float64
    assert len(calls) == int(dopri5_evaluations(steps))  # the reported count is the real one
    scale = atol + rtol * np.abs(exact).max()
    assert np.abs(y1 - exact).max() < 10 * scale  # within the tolerances, like the oracle
    assert np.abs(y_ref - exact).max() < 10 * scale
    assert np.abs(y1 - y_ref).max() < 10 * scale
    assert abs(len(calls) - len(torch_calls)) <= 12  # at most two steps apart


def test_max_steps_is_reported():
    with jax.enable_x64(False):
        _, steps, ok = dopri5_solve(lambda t, y: -50.0 * y, jnp.ones(3),
                                    Dopri5Config(max_steps=2))
    assert not bool(ok) and int(steps) == 2


@pytest.fixture(scope="module")
def noise():
    return draw_cascade_noise(4, jnp.arange(3), SCHEDULE.stage_resolutions(32, 2), 3, -1 / 3)


def test_euler_through_diffrax_equals_the_core_sampler(c2i, noise):
    core = Sampler(c2i.model(), SCHEDULE, 32)
    via = Sampler(c2i.model(), SCHEDULE, 32, solver="euler-diffrax")
    kwargs = dict(labels=LABELS, guidance=3.0, steps=[2, 3, 1, 2], shift=2.0)
    a, b = core.sample_from_noise(noise, **kwargs), via.sample_from_noise(noise, **kwargs)
    # Same operations in the same order; two programs may still fuse x + dt v into an FMA
    # differently, so the last bits can differ (measured: 4e-6 of values ~10).
    assert rel_err(a.x, b.x) <= 1e-6
    np.testing.assert_array_equal(np.asarray(a.stats.evaluations),
                                  np.asarray(b.stats.evaluations))


def test_dopri5_cascade_matches_the_official_solver(c2i, noise, capsys):
    sampler = Sampler(c2i.model(), SCHEDULE, 32, solver="dopri5")
    dup = draw_duplicate_blocks(4, jnp.arange(3), sampler.resolutions, 3, -1 / 3)
    out = sampler.sample_from_noise(noise, labels=LABELS, guidance=2.4, dup_blocks=dup)
    blocks_2b = [torch.cat([nchw(b), nchw(d)]) for b, d in zip(noise.blocks, dup)]
    want, torch_evals = dref.dopri5_cascade(c2i.sd, c2i.params, nchw(noise.init), blocks_2b,
                                            guidance=2.4, class_labels=torch.tensor(LABELS))
    ours = np.asarray(out.stats.evaluations)[:, 0].tolist()
    with capsys.disabled():
        print(f"\n  dopri5 cascade, evaluations per stage: ours {ours}, "
              f"torchdiffeq {torch_evals}; relative difference "
              f"{rel_err(nchw(out.x), want.numpy()):.1e}")
    assert bool(np.all(np.asarray(out.stats.finished)))
    assert rel_err(nchw(out.x), want.numpy()) <= 1e-2  # SPEC §6: ~1%
    for a, b in zip(ours, torch_evals):
        assert abs(a - b) <= max(12, 0.25 * b)


def test_per_image_error_control_ignores_batch_mates(c2i, noise):
    sampler = Sampler(c2i.model(), SCHEDULE, 32, solver="dopri5",
                      dopri5=Dopri5Config(error_control="image"))
    both = sampler.sample_from_noise(noise, labels=LABELS, guidance=2.4)
    one = sampler.sample_from_noise(jax.tree.map(lambda a: a[1:2], noise), labels=LABELS[1:2],
                                    guidance=2.4)
    steps = np.asarray(both.stats.steps)
    assert not (steps[:, 0] == steps[:, 2]).all()  # images really took their own steps
    np.testing.assert_array_equal(steps[:, 1], np.asarray(one.stats.steps)[:, 0])
    np.testing.assert_array_equal(np.asarray(both.x)[1], np.asarray(one.x)[0])  # bit for bit


def test_batch_error_control_shares_steps(c2i, noise):
    sampler = Sampler(c2i.model(), SCHEDULE, 32, solver="dopri5")
    out = sampler.sample(0, np.arange(3), labels=LABELS, guidance=2.4)
    steps = np.asarray(out.stats.steps)
    assert (steps == steps[:, :1]).all() and steps.min() > 1
    np.testing.assert_array_equal(out.stats.evaluations, dopri5_evaluations(steps))
