"""The PixelFlow cascade: stage bounds, model-timestep slices, renoising (DESIGN §3).

Everything here is host-side NumPy in float64 and is computed once per
(steps, shift) request; the sampler receives the resulting tables as traced
arrays, so new values never trigger a recompilation. Where the official code
rounds through float32 (the train-time grid), this module does the same.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pixelflow_jax.errors import UserError

# Class-guidance stage weights of the official 4-stage sampler: g_s = (g - 1) w_s + 1.
OFFICIAL_GUIDANCE_WEIGHTS = (0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the cascade.

    Attributes:
      index: stage number s (0 = lowest resolution, most noise).
      original_start_t, end_t: nominal bounds s/S and (s+1)/S (float32-rounded).
      start_t: rectified start (equals original_start_t for s = 0).
      T_first, T_last: first and last model timestep of this stage's slice of [0, 999].
      alpha, beta: renoise coefficients x <- alpha x + beta eps applied on entry
        (1 and 0 for stage 0).
      downscale: the stage works at resolution R / downscale.
    """

    index: int
    original_start_t: float
    start_t: float
    end_t: float
    T_first: float
    T_last: float
    alpha: float
    beta: float
    downscale: int


@dataclasses.dataclass(frozen=True)
class EulerTables:
    """Per-stage Euler tables, padded to ``max_steps`` columns.

    ``T[s, i]`` is the model timestep of step i, ``dt[s, i]`` its step size
    (float32 difference of float32-rounded t values, as the official scheduler),
    ``num_steps[s]`` how many columns are used. Padding columns are zero.
    """

    T: np.ndarray          # [S, M] float32
    dt: np.ndarray         # [S, M] float32
    num_steps: np.ndarray  # [S] int32


def rectify_ratio(start_t: float, gamma: float) -> float:
    """1 / (sqrt(1 - 1/gamma) (1 - t) + t): the start-time correction for renoising."""
    return 1.0 / (math.sqrt(1.0 - 1.0 / gamma) * (1.0 - start_t) + start_t)


class CascadeSchedule:
    """The stage table and timestep maps of a PixelFlow cascade.

    Args:
      num_stages: S.
      num_train_timesteps: size of the model-timestep grid (1000 officially).
      gamma: block-noise correlation (-1/3 officially).
    """

    def __init__(self, num_stages: int = 4, num_train_timesteps: int = 1000,
                 gamma: float = -1.0 / 3.0):
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self.num_train_timesteps = ntt = num_train_timesteps
        self.gamma = gamma
        # The official grid is float32: T = 0..ntt-1 and t = T / ntt.
        grid_T = np.arange(ntt, dtype=np.float32)
        grid_t = grid_T / np.float32(ntt)

        bounds = []
        for s in range(num_stages):
            start_idx = max(int(ntt * (s / num_stages)), 0)
            end_idx = min(int(ntt * ((s + 1) / num_stages)), ntt)
            ost = float(grid_t[start_idx])
            end_t = float(grid_t[end_idx]) if end_idx < ntt else 1.0
            start_t = ost * rectify_ratio(ost, gamma) if s > 0 else ost
            bounds.append((ost, start_t, end_t))

        distance = [end - start for _, start, end in bounds]
        total = sum(distance)
        stages = []
        self._train_T = []
        for s, (ost, start_t, end_t) in enumerate(bounds):
            start_ratio = 0.0 if s == 0 else sum(distance[:s]) / total
            end_ratio = 1.0 if s == num_stages - 1 else sum(distance[:s + 1]) / total
            T_start = float(grid_T[int(ntt * start_ratio)])
            T_end = float(grid_T[min(int(ntt * end_ratio), ntt - 1)])
            if s == num_stages - 1:  # the last slice includes its end
                slice_T = np.linspace(T_start, T_end, ntt, dtype=np.float64)
            else:  # the others stop one grid step before the next stage
                slice_T = np.linspace(T_start, T_end, ntt + 1, dtype=np.float64)[:-1]
            self._train_T.append(slice_T)
            if s > 0:
                alpha = rectify_ratio(ost, gamma)
                beta = alpha * (1.0 - ost) / math.sqrt(-gamma)
            else:
                alpha, beta = 1.0, 0.0
            stages.append(Stage(index=s, original_start_t=ost, start_t=start_t, end_t=end_t,
                                T_first=float(slice_T[0]), T_last=float(slice_T[-1]),
                                alpha=alpha, beta=beta, downscale=2 ** (num_stages - 1 - s)))
        self.stages: tuple[Stage, ...] = tuple(stages)
        # Per-stage time t runs over i / ntt, i = 0..ntt-1 (float64, as the official code).
        self.t_first = 0.0
        self.t_last = (ntt - 1) / ntt

    # ------------------------------------------------------------------ training

    def train_timesteps(self, stage: int) -> np.ndarray:
        """The stage's model-timestep slice, float64 [num_train_timesteps]."""
        return self._train_T[stage]

    # ------------------------------------------------------------------ inference

    def inference_timesteps(self, stage: int, num_steps: int,
                            shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Model timesteps ``T`` [N] and times ``t`` [N + 1] for N Euler steps of a stage.

        ``t = linspace(0, 0.999, N)`` shifted by ``t / (shift + (1 - shift) t)``, then
        1.0 appended; ``T`` maps t linearly from [0, 0.999] onto [T_first, T_last].
        """
        if num_steps < 1:
            raise UserError(f"steps per stage must be >= 1, got {num_steps}")
        if not shift > 0:
            raise UserError(f"shift must be > 0, got {shift}")
        st = self.stages[stage]
        t = np.linspace(self.t_first, self.t_last, num_steps, dtype=np.float64)
        t = t / (shift + (1.0 - shift) * t)
        k = (st.T_last - st.T_first) / (self.t_last - self.t_first)
        T = k * t + (st.T_first - self.t_first * k)
        return T, np.append(t, 1.0)

    def euler_tables(self, steps: int | Sequence[int], shift: float = 1.0,
                     max_steps: int | None = None) -> EulerTables:
        """Padded float32 tables for :class:`pixelflow_jax.solvers.Euler`."""
        steps = self.steps_per_stage(steps)
        width = max(steps) if max_steps is None else max_steps
        if width < max(steps):
            raise UserError(f"steps {max(steps)} exceed the compiled maximum {width}")
        T = np.zeros((self.num_stages, width), np.float32)
        dt = np.zeros((self.num_stages, width), np.float32)
        for s, n in enumerate(steps):
            Ts, ts = self.inference_timesteps(s, n, shift)
            t32 = ts.astype(np.float32)
            T[s, :n] = Ts.astype(np.float32)
            dt[s, :n] = t32[1:] - t32[:-1]
        return EulerTables(T=T, dt=dt, num_steps=np.asarray(steps, np.int32))

    def steps_per_stage(self, steps: int | Sequence[int]) -> list[int]:
        """One int for every stage, or a list of one int per stage, each >= 1."""
        if isinstance(steps, (int, np.integer)):
            steps = [int(steps)] * self.num_stages
        steps = [int(n) for n in steps]
        if len(steps) != self.num_stages:
            raise UserError(f"give one step count or one per stage ({self.num_stages}), "
                            f"got {len(steps)}")
        if min(steps) < 1:
            raise UserError(f"steps per stage must be >= 1, got {min(steps)}")
        return steps

    # ------------------------------------------------------------------ guidance

    def guidance_weights(self) -> tuple[float, ...]:
        """Stage weights w_s of class guidance, g_s = (g - 1) w_s + 1.

        The official table [0, 1/6, 2/3, 1] for 4 stages; for other stage counts
        that table read piecewise-linearly at s / (S - 1) (full guidance for S = 1).
        """
        S = self.num_stages
        if S == len(OFFICIAL_GUIDANCE_WEIGHTS):
            return OFFICIAL_GUIDANCE_WEIGHTS
        if S == 1:
            return (1.0,)
        xs = np.linspace(0.0, 1.0, len(OFFICIAL_GUIDANCE_WEIGHTS))
        return tuple(float(w) for w in np.interp(np.arange(S) / (S - 1), xs,
                                                 OFFICIAL_GUIDANCE_WEIGHTS))

    # ------------------------------------------------------------------ resolutions

    def stage_resolutions(self, resolution: int, patch_size: int) -> tuple[int, ...]:
        """Side length of every stage; raises UserError if the cascade cannot halve R."""
        factor = 2 ** (self.num_stages - 1) * patch_size
        if resolution < 1 or resolution % factor:
            raise UserError(
                f"resolution {resolution} does not work with {self.num_stages} stages at patch "
                f"size {patch_size}: it must be a positive multiple of "
                f"2^{self.num_stages - 1} x {patch_size} = {factor}")
        return tuple(resolution // st.downscale for st in self.stages)


def schedule_from_config(scheduler_cfg) -> CascadeSchedule:
    """A :class:`CascadeSchedule` for a :class:`~pixelflow_jax.config.SchedulerConfig`."""
    return CascadeSchedule(scheduler_cfg.num_stages, scheduler_cfg.num_train_timesteps,
                           scheduler_cfg.gamma)
