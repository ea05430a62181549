"""Euler sampling of the whole PixelFlow cascade under one ``jax.jit`` (SPEC §3-4).

:func:`euler_cascade` is the pure computation; :class:`Sampler` splits a
model once and jits it. Steps run in ``lax.fori_loop`` with the step count a
traced value, and guidance, shift (through the tables), seed and labels are
traced too: changing any of them never recompiles. The compiled program
depends only on the batch size, the resolution and the table width
``max_steps``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax import progress as progress_lib
from pixelflow_jax.errors import UserError
from pixelflow_jax.model import PixelFlowModel
from pixelflow_jax.noise import CascadeNoise, draw_cascade_noise
from pixelflow_jax.scheduler import CascadeSchedule, EulerTables

Conditioning = Mapping[str, jax.Array]


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of NHWC images."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def stage_guidance(guidance: jax.Array, weight: float) -> jax.Array:
    """g_s = (g - 1) w_s + 1, and exactly 1 when g == 0 (the official 'no guidance')."""
    return jnp.where(guidance == 0, 1.0, (guidance - 1.0) * weight + 1.0)


def guided_velocity(model: PixelFlowModel, x: jax.Array, T: jax.Array, cond: Conditioning,
                    uncond: Conditioning, g_s: jax.Array | None) -> jax.Array:
    """v = u + g_s (c - u); the unconditional pass is skipped where g_s == 1.

    ``g_s=None`` means the stage's guidance is 1 whatever the user's g (stage
    weight 0): only the conditional pass is traced at all.
    """
    B = x.shape[0]
    T = jnp.broadcast_to(T, (B,))

    def conditional():
        return model(x, T, **cond)

    def both():
        # Unconditional rows first, as the official pipeline.
        batch = {k: jnp.concatenate([uncond[k], cond[k]]) for k in cond}
        out = model(jnp.concatenate([x, x]), jnp.concatenate([T, T]), **batch)
        u, c = out[:B], out[B:]
        return u + g_s * (c - u)

    if g_s is None:
        return conditional()
    return jax.lax.cond(g_s == 1.0, conditional, both)


def euler_cascade(model: PixelFlowModel, noise: CascadeNoise, T: jax.Array, dt: jax.Array,
                  num_steps: jax.Array, cond: Conditioning, uncond: Conditioning,
                  guidance: jax.Array, *, alphas: Sequence[float], betas: Sequence[float],
                  guidance_weights: Sequence[float], report_progress: bool = False) -> jax.Array:
    """Run every stage's Euler steps; returns the final x (NHWC, model space).

    Args:
      noise: initial and block noise (:class:`~pixelflow_jax.noise.CascadeNoise`).
      T, dt: [S, M] model timesteps and step sizes; num_steps: [S] steps used per stage.
      cond, uncond: model keyword inputs for the conditional / unconditional rows.
      guidance: scalar g. alphas, betas: renoise coefficients per stage (static).
      guidance_weights: w_s per stage (static); 0 means no unconditional pass there.
    """
    x = noise.init.astype(jnp.float32)
    guidance = jnp.asarray(guidance, jnp.float32)
    for s, weight in enumerate(guidance_weights):
        if s > 0:
            x = alphas[s] * upsample_nearest(x) + betas[s] * noise.blocks[s - 1]
        g_s = None if weight == 0 else stage_guidance(guidance, weight)

        def step(i, x, s=s, g_s=g_s):
            v = guided_velocity(model, x, T[s, i], cond, uncond, g_s)
            x = x + dt[s, i] * v
            if report_progress:
                jax.debug.callback(progress_lib.report, s, i)
            return x

        x = jax.lax.fori_loop(0, num_steps[s], step, x)
    return x


def to_images(x: jax.Array) -> jax.Array:
    """Model space -> uint8 NHWC images: round(clip(x/2 + 0.5, 0, 1) * 255)."""
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class Sampler:
    """A model split once, with its cascade jitted.

    Args:
      model: a :class:`PixelFlowModel` (its compute dtype is the sampling dtype).
      schedule: the cascade's :class:`CascadeSchedule`.
      resolution: output side length.
      max_steps: table width compiled for; any steps up to it reuse the program.
        None: the largest step count of each call (a new width recompiles).
      guidance_weights: per-stage class-guidance weights; default the official
        table for class models, constant guidance (all 1) for text models.
      report_progress: call :func:`pixelflow_jax.progress.report` after each step.
        JAX never stores programs with host callbacks in its persistent
        compilation cache, so such a sampler compiles afresh in every process.

    Programs are compiled ahead of time, once per input signature (batch size,
    table width, conditioning shapes); ``compile_seconds`` records each
    compilation and :meth:`precompile` does it before any sampling.
    """

    def __init__(self, model: PixelFlowModel, schedule: CascadeSchedule, resolution: int, *,
                 max_steps: int | None = None,
                 guidance_weights: Sequence[float] | None = None,
                 report_progress: bool = False):
        p = model.params
        self.params, self.schedule = p, schedule
        self.resolutions = schedule.stage_resolutions(resolution, p.patch_size)
        self.resolution, self.max_steps = resolution, max_steps
        self.text = p.cross_attention_dim is not None
        if guidance_weights is None:
            guidance_weights = (1.0,) * schedule.num_stages if self.text \
                else schedule.guidance_weights()
        if len(guidance_weights) != schedule.num_stages:
            raise ValueError(f"need {schedule.num_stages} guidance weights, "
                             f"got {len(guidance_weights)}")
        self.guidance_weights = tuple(float(w) for w in guidance_weights)
        self.report_progress = report_progress
        self.graphdef, self.state = nnx.split(model)
        static = dict(alphas=tuple(st.alpha for st in schedule.stages),
                      betas=tuple(st.beta for st in schedule.stages),
                      guidance_weights=self.guidance_weights,
                      report_progress=report_progress)
        graphdef, gamma = self.graphdef, schedule.gamma
        resolutions, channels = self.resolutions, p.in_channels

        def from_noise(state, noise, T, dt, n, cond, uncond, guidance):
            model = nnx.merge(graphdef, state)
            return euler_cascade(model, noise, T, dt, n, cond, uncond, guidance, **static)

        def from_seed(state, seed, indices, T, dt, n, cond, uncond, guidance):
            noise = draw_cascade_noise(seed, indices, resolutions, channels, gamma)
            return from_noise(state, noise, T, dt, n, cond, uncond, guidance)

        self._jitted = {"noise": jax.jit(from_noise), "seed": jax.jit(from_seed)}
        self._executables: dict[Any, Any] = {}
        self.compile_seconds: list[float] = []

    def _compile(self, kind: str, args: tuple) -> Callable:
        leaves, treedef = jax.tree.flatten(args)
        key = (kind, treedef, tuple((a.shape, jnp.result_type(a)) for a in leaves))
        executable = self._executables.get(key)
        if executable is None:
            start = time.perf_counter()
            executable = self._jitted[kind].lower(*args).compile()
            self.compile_seconds.append(time.perf_counter() - start)
            self._executables[key] = executable
        return executable

    def _run(self, kind: str, *args) -> jax.Array:
        return self._compile(kind, args)(*args)

    @property
    def num_compilations(self) -> int:
        return len(self._executables)

    def precompile(self, batch_size: int, steps: int | Sequence[int] = 10) -> float:
        """Compile the seeded class-conditional program for ``batch_size``; returns seconds."""
        before = sum(self.compile_seconds)
        self._compile("seed", self._seed_args(0, np.arange(batch_size), steps, 1.0, 1.0,
                                              {"labels": np.zeros(batch_size, np.int64)}))
        return sum(self.compile_seconds) - before

    # ------------------------------------------------------------------ inputs

    def tables(self, steps: int | Sequence[int], shift: float) -> EulerTables:
        """Euler tables for a request, padded to ``max_steps``."""
        return self.schedule.euler_tables(steps, shift, self.max_steps)

    def conditioning(self, labels: Any = None, context: Any = None, context_mask: Any = None,
                     null_context: Any = None,
                     null_context_mask: Any = None) -> tuple[dict, dict]:
        """(cond, uncond) model inputs for class labels or text features."""
        p = self.params
        if not self.text:
            if labels is None:
                raise UserError("this class-conditional model needs class labels")
            labels = np.asarray(labels)
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise UserError(f"class labels must be a 1-D list of integers, got {labels!r}")
            bad = labels[(labels < 0) | (labels > p.num_classes)]
            if bad.size:
                raise UserError(f"class id {int(bad[0])} is outside [0, {p.num_classes}) "
                                f"(or {p.num_classes} for the null label)")
            labels = jnp.asarray(labels, jnp.int32)
            return ({"class_labels": labels},
                    {"class_labels": jnp.full_like(labels, p.num_classes)})
        if context is None or null_context is None:
            raise UserError("this text model needs context and null_context (the empty prompt)")
        B = context.shape[0]
        ones = lambda c: jnp.ones(c.shape[:2], jnp.float32)
        mask = ones(context) if context_mask is None else jnp.asarray(context_mask, jnp.float32)
        null_mask = ones(null_context) if null_context_mask is None \
            else jnp.asarray(null_context_mask, jnp.float32)
        null_context = jnp.broadcast_to(null_context, (B,) + null_context.shape[1:])
        null_mask = jnp.broadcast_to(null_mask, (B,) + null_mask.shape[1:])
        return ({"context": jnp.asarray(context, jnp.float32), "context_mask": mask},
                {"context": jnp.asarray(null_context, jnp.float32), "context_mask": null_mask})

    @staticmethod
    def _check_guidance(guidance: float) -> jax.Array:
        if not np.isfinite(guidance) or guidance < 0:
            raise UserError(f"guidance must be a finite number >= 0, got {guidance}")
        return jnp.float32(guidance)

    # ------------------------------------------------------------------ sampling

    def _seed_args(self, seed: int, indices: Any, steps: int | Sequence[int], guidance: float,
                   shift: float, conditioning: dict) -> tuple:
        tables = self.tables(steps, shift)
        cond, uncond = self.conditioning(**conditioning)
        if not 0 <= int(seed) < 2 ** 32:
            raise UserError(f"seed must be in [0, 2^32), got {seed}")
        return (self.state, jnp.uint32(seed), jnp.asarray(indices, jnp.int32),
                jnp.asarray(tables.T), jnp.asarray(tables.dt), jnp.asarray(tables.num_steps),
                cond, uncond, self._check_guidance(guidance))

    def generate(self, seed: int, indices: Any, *, steps: int | Sequence[int] = 10,
                 guidance: float = 4.0, shift: float = 1.0, **conditioning) -> jax.Array:
        """Final x [B, R, R, C] for images ``indices`` (global numbers) under ``seed``.

        Each image's noise comes from ``(seed, index)`` alone, so an image is the
        same in any batch. ``conditioning``: ``labels=`` or the text inputs of
        :meth:`conditioning`.
        """
        return self._run("seed", *self._seed_args(seed, indices, steps, guidance, shift,
                                                  conditioning))

    def generate_from_noise(self, noise: CascadeNoise, *, steps: int | Sequence[int] = 10,
                            guidance: float = 4.0, shift: float = 1.0,
                            **conditioning) -> jax.Array:
        """Like :meth:`generate` with the noise given (e.g. another implementation's)."""
        tables = self.tables(steps, shift)
        cond, uncond = self.conditioning(**conditioning)
        noise = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), noise)
        return self._run("noise", self.state, noise, jnp.asarray(tables.T),
                         jnp.asarray(tables.dt), jnp.asarray(tables.num_steps), cond, uncond,
                         self._check_guidance(guidance))
