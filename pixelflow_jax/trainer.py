"""Training PixelFlow: sharded steps, EMA, orbax checkpoints, exact resume (what train.py runs).

The state ``{step, params, ema, opt_state}`` lives on a mesh with a ``data``
and an ``fsdp`` axis: batches are split over both, parameters (and their EMA
and optimizer moments) over ``fsdp`` (one axis of each array; replicated when
``train.fsdp`` is 1). One jitted step, with the old state donated, computes the
loss of :mod:`pixelflow_jax.objective`, clips the gradient's global norm,
applies AdamW and updates the EMA. A step with a non-finite loss or gradient
leaves the state untouched and stops training.

``train.objective`` picks the loss: ``flow`` (DESIGN §5, on images) or ``reflow`` /
``distill`` (DESIGN §11, on a teacher's pair folder, ``data.pairs``, read by
:class:`pixelflow_jax.pair_data.PairLoader`); ``train.init_from`` starts the
parameters and EMA from a checkpoint. A pair run's saved config carries its
sampling defaults (``sample:``: 2 steps per stage for reflow, 1 for distill,
guidance 1), which ``sample.py`` uses.

Checkpoints (orbax ``CheckpointManager``, saved asynchronously every
``train.save_every`` steps, at the end and on SIGTERM) hold the state and the
data loader's position. Everything random derives from (seed, step, sample)
and the loader's order from (seed, epoch), so a run killed at any moment and
started again with the same command logs the same losses, step for step.

Benchmarks and tests build the pieces themselves: :meth:`Trainer.create_train_state`
(concrete, or abstract for compiling without allocating), :meth:`Trainer.make_train_step`
(the jitted, sharded :func:`train_step`) and :meth:`Trainer.abstract_batch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pixelflow_jax import runtime
from pixelflow_jax.checkpoint import save_checkpoint
from pixelflow_jax.config import PixelFlowConfig, TrainConfig, load_config, save_config
from pixelflow_jax.errors import UserError
from pixelflow_jax.flops import forward_flops
from pixelflow_jax.model import abstract_model, init_model
from pixelflow_jax.objective import PerceptualLoss, loss_fn, pair_loss_fn
from pixelflow_jax.scheduler import CascadeSchedule, schedule_from_config

BATCH_AXES = ("data", "fsdp")
# What orbax appends to a step folder until its save is committed (atomic rename).
INCOMPLETE_SAVE = ".orbax-checkpoint-tmp"
# Peak dense bf16 FLOP/s per device, for MFU (matched in the device kind, lower case).
PEAK_FLOPS = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("4090", 165e12),
              ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5", 197e12), ("tpu v4", 275e12))


# ----------------------------------------------------------------------------- pieces


def train_mesh(fsdp: int, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over every device, ``fsdp`` devices per parameter shard."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size % fsdp:
        raise UserError(f"train.fsdp = {fsdp} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(-1, fsdp), BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis divisible by ``fsdp`` (the last of equals); else replicate."""
    if fsdp == 1 or not shape:
        return P()
    best = max((n, axis) for axis, n in enumerate(shape) if n % fsdp == 0) \
        if any(n % fsdp == 0 for n in shape) else None
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best[1]] = "fsdp"
    return P(*spec)


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 0 at ``total_steps``."""
    warm = cfg.warmup_steps
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps - warm))
    else:
        after = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8)."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=cfg.weight_decay))


def flops_per_step(cfg: PixelFlowConfig, global_batch: int) -> float:
    """Model FLOPs of one training step: 3x the forward of B/S samples at every stage."""
    p, S = cfg.params, cfg.scheduler.num_stages
    sides = schedule_from_config(cfg.scheduler).stage_resolutions(cfg.data.resolution,
                                                                  p.patch_size)
    return 3.0 * (global_batch // S) * sum(forward_flops(p, (r // p.patch_size) ** 2)
                                           for r in sides)


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one ``device`` where its kind is known (for MFU), else None."""
    kind = getattr(device, "device_kind", "").lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def train_step(state: dict, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, lr: optax.Schedule,
               schedule: CascadeSchedule, train: TrainConfig,
               seed: int, shift: float = 1.0, starts_fn: Callable | None = None,
               perceptual_loss: PerceptualLoss | None = None) -> tuple[dict, dict]:
    """One optimizer step on a global batch (pure: :meth:`Trainer.make_train_step` jits it).

    ``state``: ``{step, params, ema, opt_state}``. ``batch``, for ``train.objective`` flow:
    uint8 ``images`` [B, R, R, C] and int ``labels`` [B]; for reflow and distill (DESIGN
    §11): ``labels`` and ``indices`` (pair numbers) [G] and ``ends`` (per stage
    [G, R_s, R_s, C] float32, G = B / S); ``starts_fn(indices, ends)`` rebuilds the stage
    starts. ``shift``: the sampling shift that fixes distillation's timesteps;
    ``perceptual_loss``: distillation's last-stage hook (:data:`objective.PerceptualLoss`).
    Returns the new state and ``{loss, grad_norm, lr, ok}``: ``grad_norm`` before clipping,
    ``lr`` the rate this step applied. When ``ok`` is false (a non-finite loss or gradient)
    the state comes back unchanged.
    """
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def loss_of(params):
        model = nnx.merge(graphdef, params)
        if train.objective == "flow":
            return loss_fn(model, batch["images"], batch["labels"], key, schedule,
                           train.dropout)
        return pair_loss_fn(model, starts_fn(batch["indices"], batch["ends"]), batch["ends"],
                            batch["labels"], key,
                            schedule, objective=train.objective, label_dropout=train.dropout,
                            t_density=train.t_density, distill_loss=train.distill_loss,
                            shift=shift, perceptual_loss=perceptual_loss)

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d = train.ema_decay
    ema = jax.tree.map(lambda e, q: d * e + (1 - d) * q, state["ema"], params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {"step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}
    # Chosen inside the step: the caller's old state is donated, so only here can it survive.
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return new, {"loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]), "ok": ok}


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step. Reopened on resume, rows after the
    restored step are dropped, so the file always reads like an uninterrupted run."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if row.get("step", 0) <= resume_step:
                        rows.append(row)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, rows: list[dict]) -> None:
        self.file.writelines(json.dumps(r) + "\n" for r in rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class TrainResult:
    """How :meth:`Trainer.run` ended: steps done, status, the last logged loss, the EMA export."""

    step: int
    status: str  # "done", "preempted", "stopped" (train.steps reached by --stop-after), "nan"
    last_loss: float | None
    export: str | None = None


@dataclasses.dataclass
class _Run:
    """One call of :meth:`Trainer.run`: what it opened and where it stands."""

    manager: Any  # orbax CheckpointManager
    loader: Any
    log: MetricsLog
    graphdef: nnx.GraphDef
    state: dict
    step_fn: Callable
    step: int  # steps done
    total: int  # the run's steps (train.steps, or its epochs)
    end: int  # where this call stops: total, or --stop-after
    flops: float  # per step, for MFU
    preempted: list  # SIGTERM appends to it
    pending: list = dataclasses.field(default_factory=list)  # (step, metrics) not yet logged
    logged: tuple[int, float] = (0, 0.0)  # step and clock of the last log, for samples/s
    last_loss: float | None = None
    sampler: Any = None

    def due(self, every: int, preempted: bool) -> bool:
        """Whether a periodic action (log, save) runs now: every N steps, last or preempted."""
        return self.step % every == 0 or self.step == self.end or preempted


class Trainer:
    """Build with a config and an output folder; :meth:`run` trains (or resumes)."""

    def __init__(self, cfg: PixelFlowConfig, out_dir: str, *, stream: TextIO | None = None,
                 devices: list | None = None, perceptual_loss: PerceptualLoss | None = None):
        """``perceptual_loss``: a per-sample loss added on distillation's last stage
        (:data:`pixelflow_jax.objective.PerceptualLoss`; none is built in)."""
        cfg = with_sampling_defaults(cfg)
        self.cfg, self.out = cfg, os.path.abspath(out_dir)
        self.stream = stream or sys.stderr
        self.perceptual_loss = perceptual_loss
        tc = cfg.train
        self.pairs_mode = tc.objective != "flow"
        p = cfg.params
        if p.num_classes == 0:
            raise UserError("training text-to-image models is not supported yet (no text data "
                            "pipeline); train a class-conditional model")
        self.schedule: CascadeSchedule = schedule_from_config(cfg.scheduler)
        self.schedule.stage_resolutions(cfg.data.resolution, p.patch_size)  # validates R
        S = self.schedule.num_stages
        if cfg.data.batch_size % S:
            raise UserError(f"data.batch_size (per device) = {cfg.data.batch_size} must be a "
                            f"multiple of the {S} stages")
        self.mesh = train_mesh(tc.fsdp, devices)
        self.global_batch = cfg.data.batch_size * self.mesh.size
        self.host_batch = cfg.data.batch_size * sum(
            d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        self.dtype = runtime.compute_dtype(tc.dtype)
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        self.replicated = NamedSharding(self.mesh, P())
        # Pair objectives: G = B / S pair groups per step, each trained at every stage.
        self.groups = self.global_batch // S
        self.teacher_seed = 0  # the pairs' (read when they are opened)
        self._pairs = None

    # ------------------------------------------------------------------ data

    def open_loader(self, state: dict | None) -> tuple[Any, Any]:
        """The data source and this host's loader (from its saved ``state``, or the start):
        images, or for reflow / distill the pair folder and a :class:`PairLoader`."""
        if self.pairs_mode:
            return self._open_pairs(state)
        from pixelflow_jax.data import Loader, open_source

        d = self.cfg.data
        source = open_source(d.source, d.root, d.tfds_name, d.tfds_data_dir, d.split)
        if source.num_classes > self.cfg.params.num_classes:
            raise UserError(f"the data has {source.num_classes} classes, the model's "
                            f"num_classes is {self.cfg.params.num_classes}")
        loader = Loader(source, self.host_batch, d.resolution, expand_ratio=d.expand_ratio,
                        center_crop=d.center_crop, seed=self.cfg.seed,
                        num_workers=d.num_workers, process_index=jax.process_index(),
                        process_count=jax.process_count(), state=state, hflip=d.hflip)
        return source, loader

    def _open_pairs(self, state: dict | None) -> tuple[Any, Any]:
        """The pair folder (checked against the model) and this host's :class:`PairLoader`."""
        from pixelflow_jax.pair_data import PairLoader
        from pixelflow_jax.pairs import open_pairs

        d, p = self.cfg.data, self.cfg.params
        if self._pairs is not None:  # a resume reopens the loader only
            return self._pairs, PairLoader(self._pairs, self.groups, self.host_groups(),
                                           seed=self.cfg.seed, state=state)
        pairs = open_pairs(d.pairs)
        sides = tuple(self.schedule.stage_resolutions(d.resolution, p.patch_size))
        if tuple(pairs.resolutions) != sides or pairs.channels != p.in_channels:
            raise UserError(f"the pairs in {d.pairs} have stages of {tuple(pairs.resolutions)} "
                            f"px and {pairs.channels} channels; this model's cascade is {sides} "
                            f"px with {p.in_channels} (data.resolution, scheduler.num_stages, "
                            "model.params)")
        if not (np.isclose(pairs.gamma, self.schedule.gamma, rtol=1e-12) and np.allclose(
                pairs.alphas, [st.alpha for st in self.schedule.stages], rtol=1e-12)):
            raise UserError(f"the pairs in {d.pairs} were drawn with another block-noise gamma "
                            f"({pairs.gamma}) than this model's scheduler.gamma "
                            f"({self.schedule.gamma}); the student must renoise as the teacher")
        labels = np.asarray(pairs.labels)
        if labels.size and not 0 <= labels.min() <= labels.max() < p.num_classes:
            raise UserError(f"the pairs in {d.pairs} have labels up to {labels.max()}; the "
                            f"model's num_classes is {p.num_classes}")
        self.teacher_seed, self._pairs = pairs.seed, pairs
        return pairs, PairLoader(pairs, self.groups, self.host_groups(), seed=self.cfg.seed,
                                 state=state)

    def host_groups(self) -> np.ndarray:
        """The pair groups (rows of a stage's [G, ...] batch) this host's devices hold."""
        index_map = self.batch_sharding.addressable_devices_indices_map((self.groups,))
        rows = sorted({i for sl in index_map.values()
                       for i in range(*sl[0].indices(self.groups))})
        return np.asarray(rows, np.int64)

    def stage_starts(self, indices: jax.Array, ends: tuple) -> tuple:
        """Every stage's start of pairs ``indices`` [G] (traced), rebuilt as the teacher
        made it: stage 0 its noise, stage s ``alpha_s up(ends[s-1]) + beta_s eps_s``
        (``pairs.stage_starts_jax``, with the pairs' seed and this cascade's stages)."""
        from pixelflow_jax.pairs import stage_starts_jax

        st = self.schedule.stages
        sides = self.schedule.stage_resolutions(self.cfg.data.resolution,
                                                self.cfg.params.patch_size)
        args = dict(resolutions=tuple(sides), channels=self.cfg.params.in_channels,
                    gamma=self.schedule.gamma, alphas=tuple(s.alpha for s in st),
                    betas=tuple(s.beta for s in st))
        return tuple(stage_starts_jax(np.uint32(self.teacher_seed), indices, s,
                                      ends[s - 1] if s else None, **args)
                     for s in range(self.schedule.num_stages))

    def global_batch_arrays(self, batch: dict) -> dict:
        """This host's rows of a batch -> the global batch, sharded over the mesh."""
        def put(a):
            if jax.process_count() == 1:
                return jax.device_put(a, self.batch_sharding)
            return jax.make_array_from_process_local_data(self.batch_sharding, a)
        if self.pairs_mode:
            return {"labels": put(batch["labels"].astype(np.int32)),
                    "indices": put(batch["indices"].astype(np.int32)),
                    "ends": tuple(put(a) for a in batch["ends"])}
        return {"images": put(batch["images"]),
                "labels": put(batch["labels"].astype(np.int32))}

    def abstract_batch(self) -> dict:
        """The global batch as sharded ``jax.ShapeDtypeStruct`` (to lower the step)."""
        B, R, C = self.global_batch, self.cfg.data.resolution, self.cfg.params.in_channels
        spec = functools.partial(jax.ShapeDtypeStruct, sharding=self.batch_sharding)
        if self.pairs_mode:
            G = self.groups
            sides = self.schedule.stage_resolutions(R, self.cfg.params.patch_size)
            return {"labels": spec((G,), jnp.int32), "indices": spec((G,), jnp.int32),
                    "ends": tuple(spec((G, r, r, C), jnp.float32) for r in sides)}
        return {"images": spec((B, R, R, C), jnp.uint8), "labels": spec((B,), jnp.int32)}

    # ------------------------------------------------------------------ state and step

    def create_train_state(self, tx: optax.GradientTransformation, *,
                           abstract: bool = False) -> tuple[nnx.GraphDef, dict]:
        """The model's graphdef and the state ``{step, params, ema, opt_state}`` on the mesh.

        ``abstract``: sharded ``jax.ShapeDtypeStruct`` leaves, nothing allocated (to compile
        or restore into); else freshly initialised arrays (the EMA a copy of the parameters).
        """
        graphdef, model = nnx.split(abstract_model(self.cfg.params, dtype=self.dtype,
                                                   remat=self.cfg.train.remat))
        params = nnx.to_pure_dict(model)
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                  "ema": params, "opt_state": jax.eval_shape(tx.init, params)}
        shardings = self.state_shardings(shapes)
        if abstract:
            return graphdef, jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                shapes, shardings)

        if self.cfg.train.init_from:
            loaded = jax.device_put(self.init_params(params), shardings["params"])

            def start(params):
                return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
                        "opt_state": tx.init(params)}
            return graphdef, jax.jit(start, out_shardings=shardings)(loaded)

        def make():
            model = init_model(self.cfg.params, seed=self.cfg.seed, dtype=self.dtype,
                               remat=self.cfg.train.remat)
            params = nnx.to_pure_dict(nnx.state(model))
            return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
                    "opt_state": tx.init(params)}
        return graphdef, jax.jit(make, out_shardings=shardings)()

    def init_params(self, abstract_params: dict) -> dict:
        """``train.init_from``'s parameters (float32 NumPy), checked against this model.

        The folder (or a short name: ``digits``) must hold a model of the same
        ``model.params``; otherwise one :class:`UserError` names the differences.
        """
        from pixelflow_jax.checkpoint import _flatten, load_param_tree

        folder = self._check_init_from()
        tree, _ = load_param_tree(folder)
        got, want = _flatten(tree), _flatten(abstract_params)
        bad = [k for k in want if k not in got or got[k].shape != want[k].shape]
        if bad or len(got) != len(want):  # only a damaged or foreign folder gets here
            raise UserError(f"train.init_from {folder}: its parameters do not fit this model "
                            f"(first: {(bad or sorted(set(got) - set(want)))[0]})")
        return tree

    def _check_init_from(self) -> str:
        """``train.init_from``'s folder, refused (one line) when it holds no checkpoint or
        another model; reads only its config.yaml."""
        from pixelflow_jax.default_model import resolve_checkpoint

        folder = resolve_checkpoint(self.cfg.train.init_from)
        path = os.path.join(folder, "config.yaml")
        if not os.path.isfile(path):
            raise UserError(f"train.init_from {folder}: not a checkpoint folder (no "
                            "config.yaml there)")
        theirs, ours = load_config(path).params, self.cfg.params
        if theirs != ours:
            diff = [f"{f.name} {getattr(theirs, f.name)} (here {getattr(ours, f.name)})"
                    for f in dataclasses.fields(theirs)
                    if getattr(theirs, f.name) != getattr(ours, f.name)]
            raise UserError(f"train.init_from {folder} holds another model: {', '.join(diff)}; "
                            "set model.params as in its config.yaml")
        return folder

    def state_shardings(self, state: dict) -> dict:
        """Each leaf's ``NamedSharding``: split over ``fsdp`` by :func:`param_spec`."""
        fsdp = self.cfg.train.fsdp
        return jax.tree.map(lambda a: NamedSharding(self.mesh, param_spec(a.shape, fsdp)),
                            state)

    def make_train_step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                        lr: optax.Schedule, state: dict) -> Callable:
        """:func:`train_step` jitted for this mesh, ``(state, batch) -> (state, metrics)``.

        ``state`` (concrete or abstract) gives the layout only. The old state is donated.
        """
        step = functools.partial(train_step, graphdef=graphdef, tx=tx, lr=lr,
                                 schedule=self.schedule, train=self.cfg.train, seed=self.cfg.seed,
                                 shift=sampling_setting(self.cfg, "shift"),
                                 starts_fn=self.stage_starts if self.pairs_mode else None,
                                 perceptual_loss=self.perceptual_loss)
        shardings = self.state_shardings(state)
        metrics = {k: self.replicated for k in ("loss", "grad_norm", "lr", "ok")}
        return jax.jit(step, in_shardings=(shardings, self.batch_sharding),
                       out_shardings=(shardings, metrics), donate_argnums=(0,))

    # ------------------------------------------------------------------ run

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or the epochs), resuming from the latest checkpoint.

        ``stop_after``: stop (with a checkpoint) once this many steps are done.
        """
        tc = self.cfg.train
        with self._open_run(stop_after) as run:
            while run.step < run.end:
                batch = self.global_batch_arrays(run.loader.next())
                run.state, metrics = run.step_fn(run.state, batch)
                run.step += 1
                run.pending.append((run.step, metrics))
                preempted = bool(run.preempted)  # one answer for the whole step
                save = run.due(tc.save_every, preempted)
                # Saving logs first: a checkpoint must never hold a state from past a NaN.
                if (save or run.due(tc.log_every, preempted)) and not self._log(run):
                    return TrainResult(run.step, "nan", None)
                if save:
                    self._save(run)
                if tc.sample_every and run.step % tc.sample_every == 0:
                    self._sample(run)
                if preempted:
                    run.manager.wait_until_finished()
                    self._say(f"SIGTERM: saved step {run.step}; the same command resumes")
                    return TrainResult(run.step, "preempted", run.last_loss)
            run.manager.wait_until_finished()
            if run.step < run.total:
                return TrainResult(run.step, "stopped", run.last_loss)
            return TrainResult(run.step, "done", run.last_loss,
                               export=self.export_ema(run.state["ema"]))

    @contextlib.contextmanager
    def _open_run(self, stop_after: int | None) -> Iterator[_Run]:
        """Check, open the data and the checkpoints (resume or initialise); close on exit."""
        import orbax.checkpoint as ocp

        with contextlib.ExitStack() as stack:
            self._check_resume_config()
            if self.cfg.train.init_from and not _saved_steps(os.path.join(self.out,
                                                                          "checkpoints")):
                self._check_init_from()  # before anything is written (a resume ignores it)
            source, loader = self.open_loader(None)  # data problems surface before any writing
            stack.callback(loader.close)
            total = self._total_steps(source.num if self.pairs_mode else len(source))
            lr = learning_rate_schedule(self.cfg.train, total)
            tx = optimizer(self.cfg.train, lr)
            manager = self._open_checkpoints()
            stack.callback(manager.close)
            stack.callback(manager.wait_until_finished)
            graphdef, abstract = self.create_train_state(tx, abstract=True)
            start = manager.latest_step()
            if start is None:
                state, start = self.create_train_state(tx)[1], 0
            else:
                restored = manager.restore(start, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
                state = restored["state"]
                loader.close()
                loader = self.open_loader(restored["loader"])[1]
                stack.callback(loader.close)
                self._say(f"resumed from step {start} ({manager.directory})")
            self._record_config()
            log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), start)
            stack.callback(log.close)
            n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
            what = "" if not self.pairs_mode else (
                f"{self.cfg.train.objective} on {source.num:,} teacher pairs "
                f"({self.groups} per step, each at all {self.schedule.num_stages} stages), ")
            self._say(f"training {n_params:,} parameters on {self.mesh.size} device(s) "
                      f"(mesh {dict(self.mesh.shape)}), {what}global batch {self.global_batch}, "
                      f"{total} steps, {np.dtype(self.dtype).name} compute")
            step_fn = self.make_train_step(graphdef, tx, lr, abstract)
            preempted = stack.enter_context(_sigterm_flag())
            yield _Run(manager, loader, log, graphdef, state, step_fn, step=start, total=total,
                       end=total if stop_after is None else min(total, stop_after),
                       flops=flops_per_step(self.cfg, self.global_batch), preempted=preempted,
                       logged=(start, time.perf_counter()))

    def _total_steps(self, num_images: int) -> int:
        """The run's length: ``train.steps``, or its epochs of the data; warns when the
        warm-up outlasts it (the user may mean it, e.g. a smoke run of a long recipe).
        A pair step reads G = B / S images of the pair folder (each at every stage)."""
        tc = self.cfg.train
        per_step = self.groups if self.pairs_mode else self.global_batch
        steps_per_epoch = num_images // per_step
        if steps_per_epoch == 0:
            raise UserError(f"the data ({num_images} images) is smaller than one global batch "
                            f"({per_step})")
        total = tc.steps or tc.epochs * steps_per_epoch
        if tc.warmup_steps >= total:
            last = float(learning_rate_schedule(tc, total)(total - 1))
            self._say(f"warning: train.warmup_steps = {tc.warmup_steps} is not below the run's "
                      f"{total} steps: the learning rate never leaves warm-up (it ends at "
                      f"{last:.2e}, not train.lr = {tc.lr:g})")
        return total

    def _open_checkpoints(self) -> Any:
        """The run's orbax ``CheckpointManager``, rid of saves a kill interrupted."""
        import orbax.checkpoint as ocp

        ckpt_dir = os.path.join(self.out, "checkpoints")
        incomplete = _incomplete_saves(ckpt_dir)
        # Orbax removes these itself (quietly, before the first save); left there, re-saving
        # one of those steps logs an alarming absl warning about the leftover folder.
        manager = ocp.CheckpointManager(
            ckpt_dir, item_names=("state", "loader"),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))
        if incomplete:
            self._say(f"removed an incomplete checkpoint from an interrupted save "
                      f"(step{'s' * (len(incomplete) > 1)} {', '.join(incomplete)})")
        return manager

    def _log(self, run: _Run) -> bool:
        """Fetch and write the pending metrics and the progress line. On a non-finite loss:
        False, rows from that step on dropped, ``run.step`` back to the last good step."""
        rows = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()})
                for s, m in run.pending]
        run.pending = []
        bad = next((r for r in rows if not r["ok"]), None)
        if bad is not None:
            saved = run.manager.latest_step()
            kept = "No checkpoint was saved yet" if saved is None else \
                f"The last checkpoint (step {saved}) is intact"
            self._say(f"non-finite loss at step {bad['step']} (loss {bad['loss']}, grad norm "
                      f"{bad['grad_norm']}); training stopped. {kept}; lower train.lr or check "
                      "the data.")
            # Later steps of the batch started from the kept state under the wrong step number.
            self._write_rows(run.log, rows[:rows.index(bad)], 0.0, None)
            run.step = bad["step"] - 1
            return False
        now = time.perf_counter()
        rate = (run.step - run.logged[0]) * self.global_batch / (now - run.logged[1])
        peak = peak_flops(jax.devices()[0])
        mfu = run.flops * rate / self.global_batch / (peak * self.mesh.size) if peak else None
        self._write_rows(run.log, rows, rate, mfu)
        self._progress(run.step, run.total, rows[-1], rate, mfu, run.loader.skipped)
        run.logged, run.last_loss = (run.step, time.perf_counter()), rows[-1]["loss"]
        return True

    def _save(self, run: _Run) -> None:
        """Start an asynchronous checkpoint of the state and the loader's position."""
        import orbax.checkpoint as ocp

        run.manager.save(run.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(run.state),
            loader=ocp.args.JsonSave(run.loader.state())), force=True)

    def _say(self, text: str) -> None:
        if jax.process_index() == 0:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _check_resume_config(self) -> None:
        """Refuse to continue a run in ``out`` with settings that change its meaning."""
        path = os.path.join(self.out, "config.yaml")
        if not os.path.exists(path):
            return
        before = load_config(path)
        fixed = {"model": (before.model, self.cfg.model),
                 "scheduler": (before.scheduler, self.cfg.scheduler),
                 "seed": (before.seed, self.cfg.seed),
                 "data.resolution": (before.data.resolution, self.cfg.data.resolution),
                 "data.batch_size": (before.data.batch_size, self.cfg.data.batch_size),
                 "train.objective": (before.train.objective, self.cfg.train.objective),
                 "data.pairs": (before.data.pairs, self.cfg.data.pairs)}
        changed = [k for k, (a, b) in fixed.items() if a != b]
        if changed:
            raise UserError(f"{self.out} holds a run with another {', '.join(changed)}; use a "
                            "new output folder (or the original settings to resume)")

    def _record_config(self) -> None:
        """Written once everything is set up, so a failed start leaves no run behind."""
        if jax.process_index() == 0:
            os.makedirs(self.out, exist_ok=True)
            save_config(self.cfg, os.path.join(self.out, "config.yaml"))  # e.g. longer steps

    def _write_rows(self, log: MetricsLog, rows: list[dict], rate: float,
                    mfu: float | None) -> None:
        if jax.process_index() != 0:
            return
        for r in rows:
            r.pop("ok", None)
        if rows:
            rows[-1]["samples_per_s"] = rate
            if mfu is not None:
                rows[-1]["mfu"] = mfu
        log.write(rows)

    def _progress(self, step: int, total: int, row: dict, rate: float, mfu: float | None,
                  skipped: int) -> None:
        width = 20
        bar = "#" * int(width * step / total)
        text = (f"[{bar:<{width}}] step {step}/{total}  loss {row['loss']:.4f}  "
                f"grad {row['grad_norm']:.3f}  lr {row['lr']:.2e}  {rate:.1f} samples/s")
        text += f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
        text += f"  ({skipped} corrupt images skipped)" if skipped else ""
        self._say(text)

    # ------------------------------------------------------------------ outputs

    def export_ema(self, ema: dict, directory: str | None = None) -> str:
        """Write the EMA weights as a sampling checkpoint folder (``sample.py --ckpt``)."""
        directory = directory or os.path.join(self.out, "ema")
        host = jax.tree.map(lambda a: np.asarray(jax.device_get(_gather(a))), ema)
        if jax.process_index() == 0:
            save_checkpoint(directory, host, self.cfg, overwrite=True)
            self._say(f"wrote the EMA weights to {directory} (python sample.py --ckpt "
                      f"{directory})")
        return directory

    def _sample(self, run: _Run) -> None:
        """One image per class (at most 10) from the EMA weights, as a PNG grid."""
        from pixelflow_jax.images import make_grid, save_png
        from pixelflow_jax.sampling import Sampler, to_images

        ema = run.state["ema"]
        if run.sampler is None:
            run.sampler = Sampler(nnx.merge(run.graphdef, ema), self.schedule,
                                  self.cfg.data.resolution)
        sampler = run.sampler
        sampler.set_params(ema)
        n = min(10, self.cfg.params.num_classes)
        n = -(-n // sampler.mesh.size) * sampler.mesh.size
        labels = np.arange(n) % self.cfg.params.num_classes
        x = sampler.generate(self.cfg.seed, np.arange(n), labels=labels,
                             steps=sampling_setting(self.cfg, "steps"),
                             guidance=sampling_setting(self.cfg, "guidance"),
                             shift=sampling_setting(self.cfg, "shift"))
        if jax.process_index() == 0:
            folder = os.path.join(self.out, "samples")
            os.makedirs(folder, exist_ok=True)
            save_png(os.path.join(folder, f"step_{run.step:07d}.png"),
                     make_grid(np.asarray(to_images(_gather(x))), rows=1))


# What a reflow / distill run's checkpoint samples with unless its config says otherwise
# (DESIGN §11): guidance is baked into the pairs, so the student samples unguided.
OBJECTIVE_SAMPLING = {"reflow": dict(steps=2, guidance=1.0, solver="euler"),
                      "distill": dict(steps=1, guidance=1.0, solver="euler")}


def with_sampling_defaults(cfg: PixelFlowConfig) -> PixelFlowConfig:
    """``cfg`` with its objective's sampling defaults in the unset ``sample`` keys."""
    fill = OBJECTIVE_SAMPLING.get(cfg.train.objective)
    if not fill:
        return cfg
    changes = {k: v for k, v in fill.items() if getattr(cfg.sample, k) is None}
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **changes))


def sampling_setting(cfg: PixelFlowConfig, name: str) -> Any:
    """``cfg.sample.<name>``, or the package default (``pixelflow_jax.defaults``)."""
    from pixelflow_jax import defaults

    value = getattr(cfg.sample, name)
    if value is not None:
        return value
    return {"steps": defaults.STEPS, "guidance": defaults.GUIDANCE, "shift": defaults.SHIFT,
            "solver": defaults.SOLVERS[0]}[name]


def _saved_steps(ckpt_dir: str) -> list[str]:
    """The step folders of committed checkpoints in ``ckpt_dir`` (none if it is missing)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [name for name in os.listdir(ckpt_dir) if name.isdigit()]


def _incomplete_saves(ckpt_dir: str) -> list[str]:
    """The steps whose save a kill interrupted (folders orbax never committed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(name.split(".")[0] for name in os.listdir(ckpt_dir) if INCOMPLETE_SAVE in name)


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list]:
    """A list SIGTERM appends to (read between steps); the old handler is restored after."""
    flag: list = []
    if not _main_thread():  # signal handlers can only be set from the main thread
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _gather(a: jax.Array) -> jax.Array:
    """A fully replicated copy (for reading on the host)."""
    if a.is_fully_addressable:
        return a
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(a, tiled=True)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def export_checkpoint_ema(out_dir: str, directory: str) -> str:
    """Export the EMA weights of ``out_dir``'s latest training checkpoint to ``directory``."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    config_path = os.path.join(out_dir, "config.yaml")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if not os.path.exists(config_path) or not os.path.isdir(ckpt_dir):
        raise UserError(f"{out_dir} is not a training folder (no config.yaml and checkpoints/)")
    cfg = load_config(config_path)
    with ocp.CheckpointManager(ckpt_dir, item_names=("state", "loader")) as manager:
        step = manager.latest_step()
    if step is None:
        raise UserError(f"{ckpt_dir} holds no checkpoint yet")
    path = os.path.join(ckpt_dir, str(step), "state")
    ema_meta = ocp.StandardCheckpointer().metadata(path).item_metadata.tree["ema"]
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), ema_meta)
    with ocp.PyTreeCheckpointer() as checkpointer:  # the EMA alone, not the whole state
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item={"ema": ema_meta}, restore_args={"ema": args}, partial_restore=True))
    save_checkpoint(directory, restored["ema"], cfg, overwrite=True)
    return directory
