"""Stage solvers of the cascade (see :class:`pixelflow_jax.cascade.StageSolver`).

:class:`Euler` is the official fixed-grid sampler; :class:`EulerDiffrax` the
same steps through diffrax; :class:`Dopri5` the official adaptive sampler
(DESIGN §4), which reproduces torchdiffeq's ``dopri5`` step for step: every
stage integrates t from 0 to 1 with the model timestep
``T = T_first + t (T_last - T_first)`` (shift does not apply), rtol 1e-3 and
atol 1e-6, Hairer's initial step, an I-controller with exponent 1/5, safety
0.9, factors in [0.2, 10] and no shrinking after an accepted step, and no step
clipped at t = 1: the last step overshoots and y(1) is read from its dense
output. Error control:

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
from typing import Any, ClassVar, Literal

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax import progress as progress_lib
from pixelflow_jax.errors import UserError

# Dopri5 velocity evaluations (counted in tests/test_solvers.py): 2 for the initial step
# size, then 6 per step, accepted or rejected (7 stages, the last reused by the next step).
DOPRI5_INIT_EVALS, DOPRI5_EVALS_PER_STEP = 2, 6
# Where diffrax would clip the last step; never reached: a step at most 10x the previous
# one (itself < 1) or, the first, <= (0.01 / 1e-5)^(1/5) < 4 ends before 11.
_NO_END = 16.0


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


def controller(config: Dopri5Config) -> diffrax.PIDController:
    """torchdiffeq's step-size rule, as a diffrax controller."""
    return diffrax.PIDController(rtol=config.rtol, atol=config.atol, pcoeff=0.0, icoeff=1.0,
                                 dcoeff=0.0, safety=0.9, factormin=0.2, factormax=10.0,
                                 error_order=5)


def _rms(y: Any) -> jax.Array:
    leaves = jax.tree.leaves(y)
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in leaves) / sum(a.size for a in leaves))


def initial_step(velocity, y0: Any, f0: Any, config: Dopri5Config) -> jax.Array:
    """Hairer's initial step size for an order-5 error estimate (Hairer, Norsett and
    Wanner, Solving ODEs I, II.4), as torchdiffeq picks it; one velocity evaluation."""
    scale = jax.tree.map(lambda a: config.atol + config.rtol * jnp.abs(a), y0)
    scaled_rms = lambda y: _rms(jax.tree.map(jnp.divide, y, scale))
    d0, d1 = scaled_rms(y0), scaled_rms(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    f1 = velocity(h0, jax.tree.map(lambda a, f: a + h0 * f, y0, f0))
    d2 = scaled_rms(jax.tree.map(jnp.subtract, f1, f0)) / h0
    h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, 1e-3 * h0),
                   (0.01 / jnp.maximum(d1, d2)) ** (1 / 5))
    return jnp.minimum(100 * h0, h1).astype(jax.tree.leaves(y0)[0].dtype)


def dopri5_solve(velocity, y0: Any, config: Dopri5Config):
    """Integrate dy/dt = velocity(t, y) from t = 0 to 1 as torchdiffeq's dopri5 does.

    Returns (y(1), steps taken (accepted and rejected), finished); an unfinished
    solve returns y where it stopped. Velocity evaluations: ``2 + 6 steps``.
    """
    f0 = velocity(jnp.zeros((), jax.tree.leaves(y0)[0].dtype), y0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: velocity(t, y)), diffrax.Dopri5(), t0=0.0,
        t1=_NO_END, dt0=initial_step(velocity, y0, f0, config), y0=y0,
        # diffrax's Dopri5 state (not first step, f at t0): f0 is not evaluated twice
        solver_state=(jnp.array(False), f0),
        stepsize_controller=controller(config), saveat=diffrax.SaveAt(ts=[1.0], t1=True),
        event=diffrax.Event(lambda t, y, args, **kwargs: t >= 1.0),
        max_steps=config.max_steps, throw=False)
    # The first save is y(1) once the solve passed t = 1; else diffrax put its t1 save (the
    # state where the solve stopped) there.
    y1 = jax.tree.map(lambda a: a[0], sol.ys)
    return y1, sol.stats["num_steps"], sol.result == diffrax.RESULTS.event_occurred


def _rows(y: Any) -> int:
    return jax.tree.leaves(y)[0].shape[0]


@dataclasses.dataclass(frozen=True)
class Euler:
    """The official Euler sampler (DESIGN §4): y <- y + dt_i v(y, T_i) over a stage's table.

    One ``lax.fori_loop`` per stage whose trip count is traced, over tables
    padded to ``max_steps`` columns (None: the request's largest step count),
    so step counts up to the width reuse the program. ``report_progress``
    calls :func:`pixelflow_jax.progress.report` after each step.
    """

    max_steps: int | None = None
    report_progress: bool = False
    copies: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False

    def inputs(self, schedule, steps, shift: float) -> dict[str, Any]:
        """The padded tables T, dt [S, M] and step counts n [S] of the request."""
        tables = schedule.euler_tables(steps, shift, self.max_steps)
        return {"T": tables.T, "dt": tables.dt, "n": tables.num_steps}

    def solve_stage(self, velocity, y, cond, stage: int, inputs: dict[str, Any]):
        T, dt, n = inputs["T"][stage], inputs["dt"][stage], inputs["n"][stage]

        def step(i, y):
            v = velocity(y, T[i], cond)
            y = jax.tree.map(lambda a, b: a + dt[i] * b, y, v)
            if self.report_progress:
                jax.debug.callback(progress_lib.report, stage, i)
            return y

        y = jax.lax.fori_loop(0, n, step, y)
        B = _rows(y)
        return y, jnp.full((B,), n), jnp.ones((B,), bool)

    def evaluations(self, steps: jax.Array) -> jax.Array:
        """One velocity evaluation per step."""
        return steps


@dataclasses.dataclass(frozen=True)
class EulerDiffrax:
    """:class:`Euler` through ``diffrax.Euler`` on the stage's time grid t [N + 1].

    The model timestep of a step is looked up from the step's start time, so
    this is the core sampler's computation, step for step. The grids are
    traced with their lengths static: every step count compiles anew.
    """

    copies: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False

    def inputs(self, schedule, steps, shift: float) -> dict[str, Any]:
        """Per stage, the model timesteps T [N] and the time grid ts [N + 1]."""
        steps = schedule.steps_per_stage(steps)
        grids = [schedule.inference_timesteps(s, n, shift) for s, n in enumerate(steps)]
        return {"T": tuple(T.astype(np.float32) for T, _ in grids),
                "ts": tuple(t.astype(np.float32) for _, t in grids)}

    def solve_stage(self, velocity, y, cond, stage: int, inputs: dict[str, Any]):
        ts, T = inputs["ts"][stage], inputs["T"][stage]

        def field(t, y, args):
            return velocity(y, T[jnp.argmin(jnp.abs(ts[:-1] - t))], cond)

        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Euler(), t0=ts[0], t1=ts[-1],
                                  dt0=None, y0=y, stepsize_controller=diffrax.StepTo(ts=ts),
                                  saveat=diffrax.SaveAt(t1=True), max_steps=ts.shape[0] - 1)
        B = _rows(y)
        return (jax.tree.map(lambda a: a[-1], sol.ys), jnp.full((B,), sol.stats["num_steps"]),
                jnp.full((B,), sol.result == diffrax.RESULTS.successful))

    def evaluations(self, steps: jax.Array) -> jax.Array:
        """One velocity evaluation per step."""
        return steps


@dataclasses.dataclass(frozen=True)
class Dopri5:
    """The official adaptive sampler (DESIGN §4) with the error control of ``config``.

    Each stage integrates t from 0 to 1 with the model timestep
    ``T = T_first + t (T_last - T_first)``; ``steps`` and ``shift`` do not apply.
    """

    config: Dopri5Config = Dopri5Config()
    adaptive: ClassVar[bool] = True

    def __post_init__(self):
        self.config.validate()

    @property
    def copies(self) -> int:
        return 2 if self.config.error_control == "batch" and self.config.duplicate else 1

    def inputs(self, schedule, steps, shift: float) -> dict[str, Any]:
        """Every stage's first and last model timestep (steps and shift are ignored)."""
        return {"T_first": np.float32([st.T_first for st in schedule.stages]),
                "T_last": np.float32([st.T_last for st in schedule.stages])}

    def solve_stage(self, velocity, y, cond, stage: int, inputs: dict[str, Any]):
        T_first, T_last = inputs["T_first"][stage], inputs["T_last"][stage]
        T_of = lambda t: T_first + t * (T_last - T_first)
        config, B = self.config, _rows(y)
        if config.error_control == "batch":
            y, steps, ok = dopri5_solve(lambda t, y: velocity(y, T_of(t), cond), y, config)
            return y, jnp.full((B,), steps), jnp.full((B,), ok)

        add, drop = (lambda a: a[None]), (lambda a: a[0])

        def one(args):
            y_i, cond_i = args
            cond_i = jax.tree.map(add, cond_i)
            return dopri5_solve(lambda t, y: jax.tree.map(
                drop, velocity(jax.tree.map(add, y), T_of(t), cond_i)), y_i, config)

        # One image at a time, not vmap: a model evaluation's last bits depend on its batch
        # size (XLA picks the summation order by shape), and adaptive steps amplify them to
        # ~1%. Solved alone, an image is bit-identical in any batch and on any device count.
        return jax.lax.map(one, (y, cond))

    def evaluations(self, steps: jax.Array) -> jax.Array:
        """2 for the initial step size, then 6 per step (see the module constants)."""
        return DOPRI5_INIT_EVALS + DOPRI5_EVALS_PER_STEP * steps
