"""Sampling the whole PixelFlow cascade as one compiled program (DESIGN §3-4).

The math is :func:`pixelflow_jax.cascade.run_cascade` with a stage solver of
:mod:`pixelflow_jax.solvers`, here given the guided velocity of a model.
:class:`Sampler` splits a model once and compiles one program per input
signature, over a ``data`` mesh of every device: the batch is sharded,
parameters replicated. Fixed-grid solvers run under ``jax.jit`` with
``NamedSharding``; adaptive ones (Dopri5) under ``shard_map``, so each device
integrates its own shard with its own step sizes. Guidance, shift, seed, labels
and step counts (up to the table width) are traced: changing them never recompiles.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixelflow_jax import defaults, distributed
from pixelflow_jax.attention import prefix_lengths
from pixelflow_jax.cascade import SolveStats, StageSolver, StageTrace, run_cascade
from pixelflow_jax.errors import UserError
from pixelflow_jax.model import PixelFlowModel
from pixelflow_jax.noise import CascadeNoise, draw_cascade_noise, draw_duplicate_blocks
from pixelflow_jax.scheduler import CascadeSchedule, EulerTables
from pixelflow_jax.solvers import Dopri5, Dopri5Config, Euler, EulerDiffrax

Conditioning = Mapping[str, jax.Array]
SOLVERS = defaults.SOLVERS


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


def to_images(x: jax.Array) -> jax.Array:
    """Model space -> uint8 NHWC images: round(clip(x/2 + 0.5, 0, 1) * 255)."""
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class Samples(NamedTuple):
    """Final x [B, R, R, C] (model space) and the solver's :class:`SolveStats`; with
    ``Sampler(trace=True)`` also every stage's end x (:class:`StageTrace`, DESIGN §11)."""

    x: jax.Array
    stats: SolveStats
    trace: StageTrace | None = None


def stage_solver(name: str, *, dopri5: Dopri5Config | None = None, max_steps: int | None = None,
                 report_progress: bool = False) -> StageSolver:
    """The :class:`~pixelflow_jax.cascade.StageSolver` called ``name`` (one of ``SOLVERS``)."""
    if name not in SOLVERS:
        raise UserError(f"solver must be one of {', '.join(SOLVERS)}, got {name!r}")
    if name == "euler":
        return Euler(max_steps=max_steps, report_progress=report_progress)
    if name == "euler-diffrax":
        return EulerDiffrax()
    return Dopri5(dopri5 or Dopri5Config())


class Sampler:
    """A model split once, with its cascade compiled for a device mesh.

    Args:
      model: a :class:`PixelFlowModel` (its compute dtype is the sampling dtype).
      schedule: the cascade's :class:`CascadeSchedule`.
      resolution: output side length.
      solver: ``"euler"`` (the core sampler), ``"euler-diffrax"`` (the same steps
        through diffrax), ``"dopri5"``, or any
        :class:`~pixelflow_jax.cascade.StageSolver`.
      dopri5: options of the adaptive solver.
      mesh: devices to shard the batch over (default: all, see
        :func:`pixelflow_jax.distributed.data_mesh`).
      max_steps: Euler table width compiled for; any steps up to it reuse the
        program. None: the largest step count of each call.
      guidance_weights: per-stage class-guidance weights; default the official
        table for class models, constant guidance (all 1) for text models.
      report_progress: (Euler) call :func:`pixelflow_jax.progress.report` after
        each step. JAX never stores programs with host callbacks in its
        persistent compilation cache, so such a sampler compiles in every process.
      trace: also return every stage's end x and solver extras (``Samples.trace``,
        :class:`~pixelflow_jax.cascade.StageTrace`; teacher pairs, DESIGN §11).

    Programs are compiled ahead of time, once per input signature (batch size,
    table width, conditioning shapes); ``compile_seconds`` records each, and
    :meth:`lower` / :meth:`compile` do it for shapes alone.
    """

    def __init__(self, model: PixelFlowModel, schedule: CascadeSchedule, resolution: int, *,
                 solver: str | StageSolver = "euler", dopri5: Dopri5Config | None = None,
                 mesh: jax.sharding.Mesh | None = None, max_steps: int | None = None,
                 guidance_weights: Sequence[float] | None = None,
                 report_progress: bool = False, trace: bool = False):
        dopri5 = dopri5 or Dopri5Config()
        dopri5.validate()
        if isinstance(solver, str):
            self.stage_solver = stage_solver(solver, dopri5=dopri5, max_steps=max_steps,
                                             report_progress=report_progress)
        else:
            self.stage_solver, solver = solver, type(solver).__name__
            dopri5 = getattr(self.stage_solver, "config", dopri5)
        p = model.params
        self.params, self.schedule, self.solver, self.dopri5 = p, schedule, solver, dopri5
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
        self.report_progress = bool(getattr(self.stage_solver, "report_progress", False))
        self.trace = trace
        self.mesh = mesh or distributed.data_mesh()
        self.graphdef, state = nnx.split(model)
        self.state = distributed.replicate(nnx.to_pure_dict(state), self.mesh)
        self._jitted = self._build()
        self._executables: dict[Any, Any] = {}
        self.compile_seconds: list[float] = []

    # ------------------------------------------------------------------ the program

    def set_params(self, params: dict) -> None:
        """Swap in other weights of the same shapes (e.g. the EMA during training); the
        compiled programs are reused."""
        if jax.tree.structure(params) != jax.tree.structure(self.state):
            raise ValueError("set_params needs the parameter tree of this sampler's model")
        if all(isinstance(a, jax.Array) for a in jax.tree.leaves(params)):
            self.state = jax.device_put(params, distributed.replicated(self.mesh))
        else:
            self.state = distributed.replicate(params, self.mesh)

    def _build(self):
        graphdef, schedule, solver = self.graphdef, self.schedule, self.stage_solver
        alphas = tuple(st.alpha for st in schedule.stages)
        betas = tuple(st.beta for st in schedule.stages)
        weights, resolutions = self.guidance_weights, self.resolutions
        channels, gamma = self.params.in_channels, schedule.gamma
        trace = self.trace

        def program(state, per_image, shared):
            model = nnx.merge(graphdef, state)
            if "noise" in per_image:
                noise = per_image["noise"]
            else:
                noise = draw_cascade_noise(shared["seed"], per_image["indices"], resolutions,
                                           channels, gamma)
            blocks = [noise.blocks]
            if solver.copies == 2:  # the official Dopri5 state: its duplicate's own noise
                dup = per_image.get("dup_blocks")
                if dup is None and "indices" in per_image:
                    dup = draw_duplicate_blocks(shared["seed"], per_image["indices"],
                                                resolutions, channels, gamma)
                blocks.append(noise.blocks if dup is None else dup)
            guidance = shared["guidance"]

            def velocity_for_stage(s):
                g_s = None if weights[s] == 0 else stage_guidance(guidance, weights[s])
                return lambda x, T, c: guided_velocity(model, x, T, c["cond"], c["uncond"], g_s)

            cond = {"cond": per_image["cond"], "uncond": per_image["uncond"]}
            return run_cascade(solver, velocity_for_stage, noise.init.astype(jnp.float32),
                               blocks, cond, shared["tables"], alphas=alphas, betas=betas,
                               trace=trace)

        mesh = self.mesh
        batch, stage_batch = P(distributed.AXIS), P(None, distributed.AXIS)
        out_specs = (batch, SolveStats(stage_batch, stage_batch, batch))
        if trace:
            S = len(resolutions)
            out_specs += (StageTrace((batch,) * S, (batch,) * S),)
        if solver.adaptive:  # each device integrates its own shard
            program = jax.shard_map(program, mesh=mesh, in_specs=(P(), batch, P()),
                                    out_specs=out_specs, check_vma=False)
        named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
        return jax.jit(program, in_shardings=(named(P()), named(batch), named(P())),
                       out_shardings=jax.tree.map(named, out_specs))

    def _compile(self, args: tuple) -> tuple[Any, float]:
        """The executable for ``args`` (arrays or ShapeDtypeStructs) and seconds spent."""
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((a.shape, jnp.dtype(a.dtype)) for a in leaves))
        executable = self._executables.get(key)
        if executable is not None:
            return executable, 0.0
        start = time.perf_counter()
        executable = self._jitted.lower(*args).compile()
        self.compile_seconds.append(time.perf_counter() - start)
        self._executables[key] = executable
        return executable, self.compile_seconds[-1]

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far (one per input signature)."""
        return len(self._executables)

    def lower(self, batch_size: int, steps: int | Sequence[int] = defaults.STEPS, *,
              from_noise: bool = False,
              context_length: int | None = None) -> jax.stages.Lowered:
        """The program for ``batch_size`` images per host, lowered from shapes alone.

        Nothing is allocated or drawn (the model's parameters may be abstract too,
        e.g. :func:`pixelflow_jax.model.abstract_model`). ``from_noise``: the
        :meth:`sample_from_noise` program (with Dopri5's duplicate noise where the
        solver carries it), else :meth:`sample`'s. Text models need ``context_length``
        (tokens, of the prompt and of the null prompt alike).
        """
        return self._jitted.lower(*self._abstract_args(batch_size, steps, from_noise,
                                                       context_length))

    def compile(self, batch_size: int, steps: int | Sequence[int] = defaults.STEPS,
                **kwargs) -> float:
        """Compile :meth:`lower`'s program for later calls of these shapes; returns seconds
        (0 if it was compiled already)."""
        return self._compile(self._abstract_args(batch_size, steps, **kwargs))[1]

    def precompile(self, batch_size: int, steps: int | Sequence[int] = defaults.STEPS) -> float:
        """Compile the seeded class-conditional program for ``batch_size``; returns seconds."""
        return self.compile(batch_size, steps)

    # ------------------------------------------------------------------ inputs

    def tables(self, steps: int | Sequence[int], shift: float) -> EulerTables:
        """Euler tables for a request, padded to ``max_steps``."""
        return self.schedule.euler_tables(steps, shift, self.max_steps)

    def _shared_host(self, seed: int, steps, guidance: float, shift: float) -> dict:
        if not np.isfinite(guidance) or guidance < 0:
            raise UserError(f"guidance must be a finite number >= 0, got {guidance}")
        if not 0 <= int(seed) < 2 ** 32:
            raise UserError(f"seed must be in [0, 2^32), got {seed}")
        return {"seed": np.uint32(seed), "guidance": np.float32(guidance),
                "tables": self.stage_solver.inputs(self.schedule, steps, shift)}

    def _shared(self, seed: int, steps, guidance: float, shift: float) -> dict:
        return distributed.replicate(self._shared_host(seed, steps, guidance, shift), self.mesh)

    def conditioning(self, labels: Any = None, context: Any = None, context_mask: Any = None,
                     null_context: Any = None,
                     null_context_mask: Any = None) -> tuple[dict, dict]:
        """(cond, uncond) model inputs (host NumPy) for class labels or text features.

        Text masks that are prefix masks (T5's: tokens and ``</s>``, then padding), in
        both the prompt and the negative prompt, reach the model as ``context_lengths``
        (cuDNN's fused kernel on GPU, the official bias's logits elsewhere; DESIGN §7);
        any other mask as ``context_mask``, the official dense bias.
        """
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
            labels = labels.astype(np.int32)
            return ({"class_labels": labels},
                    {"class_labels": np.full_like(labels, p.num_classes)})
        if context is None or null_context is None:
            raise UserError("this text model needs context and null_context (the empty prompt)")
        context, null_context = np.asarray(context, np.float32), np.asarray(null_context,
                                                                            np.float32)
        B = context.shape[0]
        ones = lambda c: np.ones(c.shape[:2], np.float32)
        mask = ones(context) if context_mask is None else np.asarray(context_mask, np.float32)
        null_mask = ones(null_context) if null_context_mask is None \
            else np.asarray(null_context_mask, np.float32)
        null_context = np.broadcast_to(null_context, (B,) + null_context.shape[1:])
        null_mask = np.broadcast_to(null_mask, (B,) + null_mask.shape[1:])
        # T5 masks are prefix masks: as lengths they keep cuDNN's fused kernel available
        # (the XLA paths rebuild the same bias); any other mask stays a dense bias.
        lengths, null_lengths = prefix_lengths(mask), prefix_lengths(null_mask)
        if lengths is not None and null_lengths is not None:
            return ({"context": context, "context_lengths": lengths},
                    {"context": null_context, "context_lengths": null_lengths})
        return ({"context": context, "context_mask": mask},
                {"context": null_context, "context_mask": null_mask})

    def _check_rows(self, rows: int) -> None:
        devices = self.mesh.size
        if (rows * jax.process_count()) % devices:
            raise UserError(f"the batch ({rows} images) must be a multiple of the number of "
                            f"devices ({devices})")

    def _args(self, per_image: dict, shared: dict) -> tuple:
        self._check_rows(len(jax.tree.leaves(per_image)[0]))
        return self.state, distributed.to_global(per_image, self.mesh), shared

    def _abstract_args(self, batch_size: int, steps, from_noise: bool = False,
                       context_length: int | None = None) -> tuple:
        """:meth:`_args` as ShapeDtypeStructs, for ``batch_size`` rows per host."""
        self._check_rows(batch_size)
        p, B = self.params, batch_size * jax.process_count()
        sharding = distributed.batch_sharding(self.mesh)
        spec = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct((B,) + shape, dtype,
                                                                     sharding=sharding)
        if self.text:
            if context_length is None:
                raise UserError("this text model needs context_length")
            cond = uncond = {"context": spec(context_length, p.cross_attention_dim),
                             "context_lengths": spec(dtype=np.int32)}
        else:
            cond = uncond = {"class_labels": spec(dtype=np.int32)}
        per_image = {"cond": cond, "uncond": uncond}
        if from_noise:
            C = p.in_channels
            per_image["noise"] = CascadeNoise(
                spec(self.resolutions[0], self.resolutions[0], C),
                tuple(spec(r, r, C) for r in self.resolutions[1:]))
            if self.stage_solver.copies == 2:
                per_image["dup_blocks"] = per_image["noise"].blocks
        else:
            per_image["indices"] = spec(dtype=np.int32)
        shared = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                              self._shared_host(0, steps, 1.0, 1.0))
        return self.state, per_image, distributed.replicate(shared, self.mesh)

    # ------------------------------------------------------------------ sampling

    def sample(self, seed: int, indices: Any, *, steps: int | Sequence[int] = defaults.STEPS,
               guidance: float = defaults.GUIDANCE, shift: float = defaults.SHIFT,
               **conditioning) -> Samples:
        """Images ``indices`` (global image numbers; this host's rows) under ``seed``.

        Each image's noise comes from ``(seed, index)`` alone. ``conditioning``:
        ``labels=`` or the text inputs of :meth:`conditioning`. ``steps`` and
        ``shift`` apply to the Euler solvers; Dopri5 ignores them (as the official).
        """
        cond, uncond = self.conditioning(**conditioning)
        per_image = {"indices": np.asarray(indices, np.int32), "cond": cond, "uncond": uncond}
        args = self._args(per_image, self._shared(seed, steps, guidance, shift))
        return Samples(*self._compile(args)[0](*args))

    def sample_from_noise(self, noise: CascadeNoise, *,
                          steps: int | Sequence[int] = defaults.STEPS,
                          guidance: float = defaults.GUIDANCE, shift: float = defaults.SHIFT,
                          dup_blocks: Sequence[Any] | None = None, **conditioning) -> Samples:
        """Like :meth:`sample` with the noise given (NHWC; e.g. another implementation's).

        ``dup_blocks``: Dopri5's duplicated-half block noise (batch error control).
        """
        cond, uncond = self.conditioning(**conditioning)
        per_image = {"noise": jax.tree.map(lambda a: np.asarray(a, np.float32), noise),
                     "cond": cond, "uncond": uncond}
        if dup_blocks is not None:
            per_image["dup_blocks"] = tuple(np.asarray(b, np.float32) for b in dup_blocks)
        args = self._args(per_image, self._shared(0, steps, guidance, shift))
        return Samples(*self._compile(args)[0](*args))

    def generate(self, seed: int, indices: Any, **kwargs) -> jax.Array:
        """:meth:`sample`, returning only x."""
        return self.sample(seed, indices, **kwargs).x

    def generate_from_noise(self, noise: CascadeNoise, **kwargs) -> jax.Array:
        """:meth:`sample_from_noise`, returning only x."""
        return self.sample_from_noise(noise, **kwargs).x
