"""Per-stage ODE solvers through diffrax: Dopri5 (adaptive) and Euler (fixed grid).

Dopri5 follows the official sampler (SPEC §4): every stage integrates t from 0
to 1 with the model timestep ``T = T_first + t (T_last - T_first)`` (shift does
not apply), rtol 1e-3 and atol 1e-6, and a step-size controller set to
torchdiffeq's (I-controller with exponent 1/5, safety 0.9, factors in [0.2, 10],
no shrinking after an accepted step, Hairer's initial step). Error control:

- ``"batch"`` (official): one solve for the whole (per-device) batch, the error
  norm an RMS over all of it, so step sizes are shared. By default the state
  also carries the official duplicated half (``duplicate=True``): the official
  code integrates 2B rows, both halves moved by the same guided velocity but
  renoised with their own block noise, and the duplicate's values enter the
  error norm. It costs no model evaluations.
- ``"image"``: each image is solved on its own, one after another (``lax.map``),
  with its own step sizes and batch-1 model evaluations, so an image is
  bit-identical whatever its batch-mates or the device count.

A solve that hits ``max_steps`` is reported in the statistics (``finished``),
never returned silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import diffrax
import jax
import jax.numpy as jnp

from pixelflow_jax.errors import UserError

Conditioning = Mapping[str, jax.Array]

# Dopri5 velocity evaluations (counted in tests/test_solvers.py): 1 to start, then 6 per
# step, accepted or rejected (7 stages, the last reused by the next step).
DOPRI5_INIT_EVALS, DOPRI5_EVALS_PER_STEP = 1, 6


@dataclasses.dataclass(frozen=True)
class Dopri5Config:
    """Options of the adaptive solver (defaults: the published FID recipe)."""

    rtol: float = 1e-3
    atol: float = 1e-6
    max_steps: int = 1000  # per stage
    error_control: Literal["batch", "image"] = "batch"
    duplicate: bool = True  # official 2B-row state in batch mode

    def validate(self) -> None:
        if not (self.rtol > 0 and self.atol > 0):
            raise UserError(f"rtol and atol must be > 0, got {self.rtol}, {self.atol}")
        if self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.error_control not in ("batch", "image"):
            raise UserError(f"error control must be 'batch' or 'image', "
                            f"got {self.error_control!r}")


class SolveStats(NamedTuple):
    """Per-stage statistics of a cascade solve.

    ``evaluations`` [S, B]: velocity evaluations (each is one model pass, two
    under guidance) spent on each image; ``steps`` [S, B]: solver steps, accepted
    and rejected; ``finished`` [B]: every stage of the image reached t = 1.
    """

    evaluations: jax.Array
    steps: jax.Array
    finished: jax.Array


def controller(config: Dopri5Config) -> diffrax.PIDController:
    """torchdiffeq's step-size rule, as a diffrax controller."""
    return diffrax.PIDController(rtol=config.rtol, atol=config.atol, pcoeff=0.0, icoeff=1.0,
                                 dcoeff=0.0, safety=0.9, factormin=0.2, factormax=10.0,
                                 error_order=5)


def dopri5_solve(velocity, y0: Any, config: Dopri5Config):
    """Integrate dy/dt = velocity(t, y) from 0 to 1; returns (y(1), steps, finished)."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: velocity(t, y)), diffrax.Dopri5(), t0=0.0, t1=1.0,
        dt0=None, y0=y0, stepsize_controller=controller(config),
        saveat=diffrax.SaveAt(t1=True), max_steps=config.max_steps, throw=False)
    y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    return y1, sol.stats["num_steps"], sol.result == diffrax.RESULTS.successful


def dopri5_stage(velocity_fn, x: jax.Array, dup: jax.Array | None, T_first: jax.Array,
                 T_last: jax.Array, cond: Conditioning, config: Dopri5Config):
    """One stage. ``velocity_fn(x, T, cond)`` maps a batch to its guided velocity.

    Returns (x, dup, steps [B], finished [B]).
    """
    B = x.shape[0]
    T_of = lambda t: T_first + t * (T_last - T_first)
    if config.error_control == "batch":
        if dup is None:
            x, steps, ok = dopri5_solve(lambda t, y: velocity_fn(y, T_of(t), cond), x, config)
        else:
            def both(t, y):
                v = velocity_fn(y[0], T_of(t), cond)
                return v, v  # the duplicate moves with the same velocity
            (x, dup), steps, ok = dopri5_solve(both, (x, dup), config)
        return x, dup, jnp.full((B,), steps), jnp.full((B,), ok)

    def one(args):
        x_i, cond_i = args
        add = lambda a: a[None]
        vel = lambda t, y: velocity_fn(y[None], T_of(t), jax.tree.map(add, cond_i))[0]
        return dopri5_solve(vel, x_i, config)

    # One image at a time, not vmap: a model evaluation's last bits depend on its batch
    # size (XLA picks the summation order by shape), and adaptive steps amplify them to
    # ~1%. Solved alone, an image is bit-identical in any batch and on any device count.
    x, steps, ok = jax.lax.map(one, (x, cond))
    return x, dup, steps, ok


def euler_stage_diffrax(velocity_fn, x: jax.Array, ts: jax.Array, T: jax.Array,
                        cond: Conditioning) -> jax.Array:
    """Euler through diffrax on the grid ``ts`` [N + 1] with model timesteps ``T`` [N].

    The model timestep of a step is looked up from the step's start time, so
    this is the core sampler's computation, step for step.
    """
    def velocity(t, y, args):
        i = jnp.argmin(jnp.abs(ts[:-1] - t))
        return velocity_fn(y, T[i], cond)

    sol = diffrax.diffeqsolve(diffrax.ODETerm(velocity), diffrax.Euler(), t0=ts[0], t1=ts[-1],
                              dt0=None, y0=x, stepsize_controller=diffrax.StepTo(ts=ts),
                              saveat=diffrax.SaveAt(t1=True), max_steps=ts.shape[0] - 1)
    return sol.ys[-1]


def dopri5_evaluations(steps: jax.Array) -> jax.Array:
    """Velocity evaluations of a Dopri5 solve of ``steps`` steps (see module constants)."""
    return DOPRI5_INIT_EVALS + DOPRI5_EVALS_PER_STEP * steps


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of NHWC images."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def dopri5_cascade(velocity_fn_for_stage, noise, T_first: Sequence[jax.Array],
                   T_last: Sequence[jax.Array], cond: Conditioning, *,
                   alphas: Sequence[float], betas: Sequence[float],
                   config: Dopri5Config, dup_blocks: Sequence[jax.Array] | None = None):
    """All stages with Dopri5; returns (x, SolveStats).

    ``velocity_fn_for_stage(s)`` gives stage s's ``velocity_fn(x, T, cond)``.
    ``dup_blocks``: block noise of the duplicated half (batch mode with
    ``duplicate``); None uses the main half's noise for it.
    """
    x = noise.init.astype(jnp.float32)
    use_dup = config.error_control == "batch" and config.duplicate
    dup = x if use_dup else None
    evaluations, steps_all, finished = [], [], jnp.ones((x.shape[0],), bool)
    for s in range(len(T_first)):
        if s > 0:
            x = alphas[s] * upsample_nearest(x) + betas[s] * noise.blocks[s - 1]
            if use_dup:
                eps = noise.blocks[s - 1] if dup_blocks is None else dup_blocks[s - 1]
                dup = alphas[s] * upsample_nearest(dup) + betas[s] * eps
        x, dup, steps, ok = dopri5_stage(velocity_fn_for_stage(s), x, dup, T_first[s],
                                         T_last[s], cond, config)
        steps_all.append(steps)
        evaluations.append(dopri5_evaluations(steps))
        finished = finished & ok
    return x, SolveStats(jnp.stack(evaluations), jnp.stack(steps_all), finished)
