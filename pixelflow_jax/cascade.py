"""The PixelFlow cascade as one stage loop, with the solver of a stage pluggable (DESIGN §3-4).

:func:`run_cascade` renoises on entering every stage after the first
(``x <- alpha up(x) + beta eps``) and hands the stage to a :class:`StageSolver`.
A solver is one small class (:mod:`pixelflow_jax.solvers` holds Euler, Euler
through diffrax and Dopri5): adding one changes nothing else.

The state of a stage is a tuple of row blocks, each [B, h, w, C]: ``x`` first,
then any copies (the official Dopri5 sampler's duplicated half) that are moved
by x's velocity but renoised with their own block noise. Solvers treat the
state as an opaque pytree; only x is returned.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp

# velocity(x, T, cond) -> dx/dt, for x [B, ...], model timestep T (a scalar), and
# ``cond`` a pytree of per-row inputs (leading axis B) that solvers may slice with x.
Velocity = Callable[[Any, jax.Array, Any], Any]


class SolveStats(NamedTuple):
    """Per-stage statistics of a cascade solve.

    ``evaluations`` [S, B]: velocity evaluations (each is one model pass, two
    under guidance) spent on each image; ``steps`` [S, B]: solver steps, accepted
    and rejected; ``finished`` [B]: every stage of the image reached t = 1.
    """

    evaluations: jax.Array
    steps: jax.Array
    finished: jax.Array


class StageTrace(NamedTuple):
    """What every stage of a cascade solve ended with (``run_cascade(..., trace=True)``).

    ``ends[s]`` [B, R_s, R_s, C]: x at the end of stage s, before the next stage's
    renoise (the last is the final x); ``aux[s]``: the per-image extras stage s's
    solver returned (a pytree with leading axis B, ``()`` for solvers that return
    none). Teacher pairs and the straightness measure read them (DESIGN §11).
    """

    ends: tuple
    aux: tuple


class StageSolver(Protocol):
    """Integrates one stage of the cascade.

    Attributes:
      copies: rows of the state (1, or 2 for the official Dopri5 duplicated half).
      adaptive: step sizes depend on the state, so a sharded batch is solved
        per device (``shard_map``) rather than as one global array.
    """

    copies: int
    adaptive: bool

    def inputs(self, schedule, steps: Any, shift: float) -> dict[str, Any]:
        """Host-side per-request tables (NumPy); traced, so new values never recompile."""
        ...

    def solve_stage(self, velocity: Velocity, y: Any, cond: Any, stage: int,
                    inputs: dict[str, Any]) -> tuple[Any, jax.Array, jax.Array]:
        """Integrate stage ``stage`` from its start to its end.

        ``y``: the state pytree (leaves [B, ...]); ``velocity(y, T, cond)`` its
        derivative. Returns (y at the end, steps [B] int, finished [B] bool), and
        optionally a fourth item, per-image extras that :class:`StageTrace` carries.
        """
        ...

    def evaluations(self, steps: jax.Array) -> jax.Array:
        """Velocity evaluations spent on a stage solved in ``steps`` steps."""
        ...


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of NHWC images."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def halve(x: jax.Array) -> jax.Array:
    """2x2 mean downsampling of NHWC images (the official bilinear halving)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def renoise(x: jax.Array, alpha: float, beta: float, eps: jax.Array) -> jax.Array:
    """Entering a stage: alpha up(x) + beta eps, with eps the stage's block noise (DESIGN §3)."""
    return alpha * upsample_nearest(x) + beta * eps


def run_cascade(solver: StageSolver, velocity_for_stage: Callable[[int], Velocity],
                init: jax.Array, blocks: Sequence[Sequence[jax.Array]], cond: Any,
                inputs: dict[str, Any], *, alphas: Sequence[float],
                betas: Sequence[float], trace: bool = False) -> tuple:
    """Every stage of the cascade; returns (x at the end, :class:`SolveStats`), and with
    ``trace`` a third item, the :class:`StageTrace` (every stage's end x and solver extras).

    Args:
      solver: the :class:`StageSolver` of every stage.
      velocity_for_stage: ``velocity_for_stage(s)`` is stage s's :data:`Velocity` of x.
      init: [B, h, w, C] stage-0 noise; every row block of the state starts from it.
      blocks: ``blocks[c][s - 1]`` the block noise of row block c entering stage s;
        ``solver.copies`` row blocks (c = 0 is x).
      cond: per-row inputs passed to the velocity.
      inputs: the solver's traced tables (see :meth:`StageSolver.inputs`).
      alphas, betas: renoise coefficients per stage (static; index 0 unused).
      trace: also return the :class:`StageTrace`; x and the statistics are unchanged.
    """
    if len(blocks) != solver.copies:
        raise ValueError(f"the solver carries {solver.copies} row blocks, got block noise "
                         f"for {len(blocks)}")
    y = (init,) * solver.copies
    B = init.shape[0]
    evaluations, steps_all, finished = [], [], jnp.ones((B,), bool)
    ends, aux = [], []
    for s in range(len(alphas)):
        if s > 0:
            y = tuple(renoise(row, alphas[s], betas[s], eps[s - 1]) for row, eps in zip(y, blocks))
        velocity = velocity_for_stage(s)

        def state_velocity(y, T, cond, velocity=velocity):
            v = velocity(y[0], T, cond)
            return (v,) * len(y)  # the copies move with x's velocity

        out = solver.solve_stage(state_velocity, y, cond, s, inputs)
        y, steps, ok = out[:3]
        ends.append(y[0])
        aux.append(out[3] if len(out) > 3 else ())
        steps_all.append(steps)
        evaluations.append(solver.evaluations(steps))
        finished = finished & ok
    stats = SolveStats(jnp.stack(evaluations), jnp.stack(steps_all), finished)
    if trace:
        return y[0], stats, StageTrace(tuple(ends), tuple(aux))
    return y[0], stats

