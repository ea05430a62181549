"""Dopri5 and Euler through diffrax: against torchdiffeq, the oracle, and the core sampler.

Evaluations are counted where they happen (a host callback in the velocity, a counter in
torchdiffeq's), and Dopri5's steps are read back from the times of those evaluations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchdiffeq

import torch_dopri5_reference as dref
from conftest import nchw, rel_err
from pixelflow_jax.cascade import run_cascade
from pixelflow_jax.noise import draw_cascade_noise, draw_duplicate_blocks
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule
from pixelflow_jax.solvers import Dopri5, Dopri5Config, dopri5_solve

A = np.array([[-0.5, 2.0, 0.1], [-2.0, -0.3, 0.4], [0.2, -0.1, -1.0]])
Y0 = np.array([1.0, -0.5, 2.0])
SCHEDULE = CascadeSchedule()
LABELS = np.array([2, 7, 5])
C_NODES = np.array([1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])  # Dopri5's stages 2..7


@pytest.fixture
def x64():
    """Float64 for one test. Global, not ``jax.enable_x64()``: that is thread-local, and host
    callbacks may run on another thread, which would see the values as float32."""
    previous = jax.config.jax_enable_x64
    # JAX's in-memory caches may hold programs traced before the switch (their Python-scalar
    # constants canonicalised to float32; measured: ~1e-9 off after a float32 Dopri5 run).
    jax.clear_caches()
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
        jax.clear_caches()


def dopri5_steps(times, start, end):
    """(step starts, step ends, accepted) of one Dopri5 solve from the times of its
    velocity evaluations: ``start``, a probe for the initial step size, then for every
    step, accepted or rejected, 6 evaluations at t0 + c h (Dormand-Prince's nodes)."""
    times = np.asarray(times)
    assert times[0] == start and (len(times) - 2) % 6 == 0, len(times)
    nodes = times[2:].reshape(-1, 6)
    t0 = (5 * nodes[:, 0] - nodes[:, 5]) / 4  # from t0 + h/5 and t0 + h
    h = nodes[:, 5] - t0
    tol = 1e-9 * abs(end - start)
    np.testing.assert_allclose(nodes, t0[:, None] + C_NODES * h[:, None], rtol=0, atol=tol)
    accepted = np.append(np.abs(t0[1:] - nodes[:-1, 5]) < tol, nodes[-1, 5] >= end)
    rejected_next = np.abs(t0[1:] - t0[:-1]) < tol  # a rejected step is retried from t0
    assert (accepted[:-1] ^ rejected_next).all() and accepted[-1]
    assert abs(t0[0] - start) < tol
    return t0, nodes[:, 5], accepted


@pytest.mark.parametrize("rtol, atol", [(1e-3, 1e-6), (1e-6, 1e-9)])
def test_dopri5_agrees_with_torchdiffeq_in_float64(rtol, atol, x64, capsys):
    calls = []

    def velocity(t, y):
        jax.debug.callback(lambda t: calls.append(float(t)), t, ordered=True)
        return (jnp.asarray(A) @ y) * (1 + jnp.sin(3 * t)) + jnp.cos(5 * t)

    y1, steps, ok = jax.jit(lambda y: dopri5_solve(velocity, y, Dopri5Config(
        rtol=rtol, atol=atol)))(jnp.asarray(Y0))
    y1, steps, ok = np.asarray(y1), int(steps), bool(ok)
    torch_calls = []

    def torch_velocity(t, y):
        torch_calls.append(float(t))
        return torch.tensor(A) @ y * (1 + torch.sin(3 * t)) + torch.cos(5 * t)

    y_ref = torchdiffeq.odeint(torch_velocity, torch.tensor(Y0),
                               torch.tensor([0.0, 1.0], dtype=torch.float64),
                               method="dopri5", rtol=rtol, atol=atol)[-1].numpy()
    ours, theirs = dopri5_steps(calls, 0, 1), dopri5_steps(torch_calls, 0, 1)
    with capsys.disabled():
        print(f"\n  toy ODE rtol={rtol}: {len(ours[2])} steps ({(~ours[2]).sum()} rejected), "
              f"{len(calls)} evaluations on both sides; |y - y_torchdiffeq| "
              f"{np.abs(y1 - y_ref).max():.1e}")
    assert ok and y1.dtype == np.float64
    assert steps == len(ours[2])  # the reported count is the real one
    np.testing.assert_array_equal(ours[2], theirs[2])  # same accepted / rejected sequence
    np.testing.assert_allclose(calls, torch_calls, rtol=0, atol=1e-9)
    assert ours[1][-1] > 1  # the last step overshoots t = 1, as torchdiffeq's
    np.testing.assert_allclose(y1, y_ref, rtol=0, atol=1e-12)


def test_max_steps_is_reported():
    with jax.enable_x64(False):
        y, steps, ok = dopri5_solve(lambda t, y: -50.0 * y, jnp.ones(3),
                                    Dopri5Config(max_steps=2))
    assert not bool(ok) and int(steps) == 2
    assert np.isfinite(np.asarray(y)).all()  # where it stopped, not a placeholder


# A guided velocity field with the shape of the model's: stage-dependent guidance g_s,
# a label term, nonlinear in x and in T; one copy in JAX and one in PyTorch.
M = np.array([[0.8, -0.5, 0.2], [0.3, 0.6, -0.7], [-0.4, 0.1, 0.9]])


def field_jax(x, T, g_s, labels):
    u = -(0.6 + 0.3 * jnp.sin(T / 15)) * x + 2.0 * jnp.tanh(x @ jnp.asarray(M))
    c = u + (labels[:, None, None, None] / 10 - 0.4) * jnp.cos(T / 8) + 0.5 * jnp.sin(3 * x)
    return u + g_s * (c - u)


def field_torch(x, T, g_s, labels):  # NCHW
    u = -(0.6 + 0.3 * torch.sin(T / 15)) * x \
        + 2.0 * torch.tanh(torch.einsum("bchw,cd->bdhw", x, torch.tensor(M)))
    c = u + (labels[:, None, None, None] / 10 - 0.4) * torch.cos(T / 8) \
        + 0.5 * torch.sin(3 * x)
    return u + g_s * (c - u)


@pytest.mark.parametrize("error_control, rtol", [("batch", 1e-3), ("batch", 1e-5),
                                                 ("image", 1e-4)])
def test_dopri5_cascade_step_for_step_with_torchdiffeq_in_float64(error_control, rtol, x64,
                                                                  capsys):
    """The whole cascade (renoising, the duplicated half, stage times, guidance) in float64:
    the same steps as torchdiffeq, accepted and rejected, and the same result."""
    B, guidance, atol = 2, 2.4, 1e-6
    rng = np.random.default_rng(0)
    resolutions = SCHEDULE.stage_resolutions(32, 2)  # 4, 8, 16, 32
    rows = B if error_control == "image" else 2 * B
    init = rng.standard_normal((B, resolutions[0], resolutions[0], 3))
    blocks = [rng.standard_normal((rows, r, r, 3)) for r in resolutions[1:]]
    labels = np.array([3.0, 8.0])
    solver = Dopri5(Dopri5Config(rtol=rtol, atol=atol, error_control=error_control))
    weights = SCHEDULE.guidance_weights()
    times = [[] for _ in weights]

    def velocity_for_stage(s):
        g_s = (guidance - 1) * weights[s] + 1

        def velocity(x, T, cond):
            jax.debug.callback(lambda T: times[s].append(float(T)), T, ordered=True)
            return field_jax(x, T, g_s, cond)
        return velocity

    stages = SCHEDULE.stages
    inputs = {"T_first": np.array([st.T_first for st in stages]),
              "T_last": np.array([st.T_last for st in stages])}
    row_blocks = [[b[:B] for b in blocks], [b[B:] for b in blocks]][:solver.copies]
    x, stats = jax.jit(lambda init, blocks, labels, inputs: run_cascade(
        solver, velocity_for_stage, init, blocks, labels, inputs,
        alphas=[st.alpha for st in stages], betas=[st.beta for st in stages]))(
        init, row_blocks, labels, inputs)
    x, stats = np.asarray(x), jax.tree.map(np.asarray, stats)
    want, torch_times = dref.dopri5_cascade_of(
        field_torch, nchw(init), [nchw(b) for b in blocks], guidance=guidance,
        labels=torch.tensor(labels), rtol=rtol, atol=atol, per_image=error_control == "image")
    assert x.dtype == np.float64 and stats.finished.all()
    summary = []
    for s, st in enumerate(stages):
        # per image, one solve after another; in batch mode one solve
        ours, theirs = np.asarray(times[s]), np.asarray(torch_times[s])
        assert ours.shape == theirs.shape, (s, ours.shape, theirs.shape)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9)
        starts = np.flatnonzero(ours == st.T_first)  # every solve starts at T_first
        assert len(starts) == (B if error_control == "image" else 1)
        for i, (a, b) in enumerate(zip(starts, list(starts[1:]) + [len(ours)])):
            _, ends, accepted = dopri5_steps(ours[a:b], st.T_first, st.T_last)
            np.testing.assert_array_equal(
                accepted, dopri5_steps(theirs[a:b], st.T_first, st.T_last)[2])
            assert ends[-1] > st.T_last  # no step is clipped at the stage's end
            image = i if error_control == "image" else slice(None)
            assert (stats.steps[s, image] == len(accepted)).all()  # reported = taken
            assert (stats.evaluations[s, image] == b - a).all()  # reported = counted
            summary.append(f"{len(accepted)}/{(~accepted).sum()}")
    with capsys.disabled():
        print(f"\n  float64 cascade ({error_control}, rtol {rtol}): steps/rejected per solve "
              f"{' '.join(summary)}; relative difference {rel_err(nchw(x), want.numpy()):.1e}")
    assert rel_err(nchw(x), want.numpy()) <= 1e-9


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
    assert rel_err(nchw(out.x), want.numpy()) <= 1e-2  # DESIGN §6: ~1%
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
    evaluations = np.asarray(out.stats.evaluations)
    assert (evaluations == evaluations[:, :1]).all()
