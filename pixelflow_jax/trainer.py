"""Training PixelFlow: sharded steps, EMA, orbax checkpoints, exact resume (what train.py runs).

The state ``{step, params, ema, opt_state}`` lives on a mesh with a ``data``
and an ``fsdp`` axis: batches are split over both, parameters (and their EMA
and optimizer moments) over ``fsdp`` (one axis of each array; replicated when
``train.fsdp`` is 1). One jitted step, with the old state donated, computes the
loss of :mod:`pixelflow_jax.objective`, clips the gradient's global norm,
applies AdamW and updates the EMA. A step with a non-finite loss or gradient
leaves the state untouched and stops training.

Checkpoints (orbax ``CheckpointManager``, saved asynchronously every
``train.save_every`` steps, at the end and on SIGTERM) hold the state and the
data loader's position. Everything random derives from (seed, step, sample)
and the loader's order from (seed, epoch), so a run killed at any moment and
started again with the same command logs the same losses, step for step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pixelflow_jax import runtime
from pixelflow_jax.checkpoint import save_checkpoint
from pixelflow_jax.config import PixelFlowConfig, load_config, save_config
from pixelflow_jax.errors import UserError
from pixelflow_jax.flops import forward_flops
from pixelflow_jax.model import abstract_model, init_model
from pixelflow_jax.objective import loss_fn
from pixelflow_jax.scheduler import CascadeSchedule, schedule_from_config

BATCH_AXES = ("data", "fsdp")
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
    kind = getattr(device, "device_kind", "").lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


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
    step: int
    status: str  # "done", "preempted", "stopped" (train.steps reached by --stop-after), "nan"
    last_loss: float | None
    export: str | None = None


class Trainer:
    """Build with a config and an output folder; :meth:`run` trains (or resumes)."""

    def __init__(self, cfg: PixelFlowConfig, out_dir: str, *, stream: TextIO | None = None,
                 devices: list | None = None):
        self.cfg, self.out = cfg, os.path.abspath(out_dir)
        self.stream = stream or sys.stderr
        tc = cfg.train
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

    # ------------------------------------------------------------------ data

    def open_loader(self, state: dict | None):
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

    def global_batch_arrays(self, batch: dict) -> dict:
        def put(a):
            if jax.process_count() == 1:
                return jax.device_put(a, self.batch_sharding)
            return jax.make_array_from_process_local_data(self.batch_sharding, a)
        return {"images": put(batch["images"]),
                "labels": put(batch["labels"].astype(np.int32))}

    # ------------------------------------------------------------------ state

    def _abstract_state(self, tx) -> tuple[Any, dict]:
        graphdef, abstract = nnx.split(abstract_model(self.cfg.params, dtype=self.dtype,
                                                      remat=self.cfg.train.remat))
        params = nnx.to_pure_dict(abstract)
        opt_state = jax.eval_shape(tx.init, params)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                 "ema": params, "opt_state": opt_state}
        return graphdef, state

    def shardings(self, abstract_state: dict) -> dict:
        fsdp = self.cfg.train.fsdp
        return jax.tree.map(lambda a: NamedSharding(self.mesh, param_spec(a.shape, fsdp)),
                            abstract_state)

    def init_state(self, tx, shardings: dict) -> dict:
        def make():
            model = init_model(self.cfg.params, seed=self.cfg.seed, dtype=self.dtype,
                               remat=self.cfg.train.remat)
            params = nnx.to_pure_dict(nnx.state(model))
            return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
                    "opt_state": tx.init(params)}
        return jax.jit(make, out_shardings=shardings)()

    def make_step(self, graphdef, tx, lr: optax.Schedule, shardings: dict) -> Callable:
        tc, schedule, seed = self.cfg.train, self.schedule, self.cfg.seed

        def step_fn(state, batch):
            key = jax.random.fold_in(jax.random.key(seed), state["step"])

            def loss_of(params):
                return loss_fn(nnx.merge(graphdef, params), batch["images"], batch["labels"],
                               key, schedule, tc.label_dropout)

            loss, grads = jax.value_and_grad(loss_of)(state["params"])
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            d = tc.ema_decay
            ema = jax.tree.map(lambda e, q: d * e + (1 - d) * q, state["ema"], params)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new = {"step": state["step"] + 1, "params": params, "ema": ema,
                   "opt_state": opt_state}
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
            return new, {"loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]),
                         "ok": ok}

        metrics = {k: self.replicated for k in ("loss", "grad_norm", "lr", "ok")}
        return jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                       out_shardings=(shardings, metrics), donate_argnums=(0,))

    # ------------------------------------------------------------------ run

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
                 "data.batch_size": (before.data.batch_size, self.cfg.data.batch_size)}
        changed = [k for k, (a, b) in fixed.items() if a != b]
        if changed:
            raise UserError(f"{self.out} holds a run with another {', '.join(changed)}; use a "
                            "new output folder (or the original settings to resume)")

    def _record_config(self) -> None:
        """Written once everything is set up, so a failed start leaves no run behind."""
        if jax.process_index() == 0:
            os.makedirs(self.out, exist_ok=True)
            save_config(self.cfg, os.path.join(self.out, "config.yaml"))  # e.g. longer steps

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or the epochs), resuming from the latest checkpoint.

        ``stop_after``: stop (with a checkpoint) once this many steps are done.
        """
        import orbax.checkpoint as ocp

        cfg, tc = self.cfg, self.cfg.train
        self._check_resume_config()
        source, loader = self.open_loader(None)  # data problems surface before any writing
        ckpt_dir = os.path.join(self.out, "checkpoints")
        manager = ocp.CheckpointManager(
            ckpt_dir, item_names=("state", "loader"),
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True,
                                                 enable_async_checkpointing=True))
        latest = manager.latest_step()
        steps_per_epoch = len(source) // self.global_batch
        if steps_per_epoch == 0:
            raise UserError(f"the data ({len(source)} images) is smaller than one global batch "
                            f"({self.global_batch})")
        total = tc.steps or tc.epochs * steps_per_epoch
        lr = learning_rate_schedule(tc, total)
        tx = optimizer(tc, lr)
        graphdef, abstract = self._abstract_state(tx)
        shardings = self.shardings(abstract)
        if latest is None:
            state = self.init_state(tx, shardings)
            start = 0
        else:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()))
            state, start = restored["state"], latest
            loader.close()
            source, loader = self.open_loader(restored["loader"])
            self._say(f"resumed from step {start} ({ckpt_dir})")
        self._record_config()
        metrics_log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), start)
        step_fn = self.make_step(graphdef, tx, lr, shardings)
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
        self._say(f"training {n_params:,} parameters on {self.mesh.size} device(s) "
                  f"(mesh {dict(self.mesh.shape)}), global batch {self.global_batch}, "
                  f"{total} steps, {np.dtype(self.dtype).name} compute")

        preempted = []
        previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) \
            if _main_thread() else None
        step_flops = flops_per_step(cfg, self.global_batch)
        peak = peak_flops(jax.devices()[0])
        pending, result, t_log, samples_since = [], None, time.perf_counter(), 0
        sampler = None
        end = total if stop_after is None else min(total, stop_after)
        step = start
        try:
            while step < end:
                batch = self.global_batch_arrays(loader.next())
                state, metrics = step_fn(state, batch)
                step += 1
                samples_since += self.global_batch
                pending.append((step, metrics))
                last = step == end
                if step % tc.log_every == 0 or last or preempted:
                    rows = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()})
                            for s, m in pending]
                    pending = []
                    bad = [r for r in rows if not r["ok"]]
                    if bad:
                        saved = manager.latest_step()
                        self._say(f"non-finite loss at step {bad[0]['step']} (loss "
                                  f"{bad[0]['loss']}, grad norm {bad[0]['grad_norm']}); "
                                  f"training stopped. The last checkpoint (step {saved}) is "
                                  "intact; lower train.lr or check the data.")
                        rows = [r for r in rows if r["ok"]]
                        self._write_rows(metrics_log, rows, 0.0, None)
                        result = TrainResult(step - len(bad), "nan", None)
                        break
                    elapsed = time.perf_counter() - t_log
                    rate = samples_since / elapsed
                    mfu = (step_flops * rate / self.global_batch) / (peak * self.mesh.size) \
                        if peak else None
                    self._write_rows(metrics_log, rows, rate, mfu)
                    self._progress(step, total, rows[-1], rate, mfu, loader.skipped)
                    t_log, samples_since = time.perf_counter(), 0
                if step % tc.save_every == 0 or last or preempted:
                    manager.save(step, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        loader=ocp.args.JsonSave(loader.state())), force=True)
                if tc.sample_every and step % tc.sample_every == 0:
                    sampler = self._sample_grid(graphdef, state["ema"], step, sampler)
                if preempted:
                    manager.wait_until_finished()
                    self._say(f"SIGTERM: saved step {step}; the same command resumes")
                    result = TrainResult(step, "preempted", rows[-1]["loss"])
                    break
            else:
                manager.wait_until_finished()
                status = "done" if step >= total else "stopped"
                last_loss = None
                result = TrainResult(step, status, last_loss)
                if status == "done":
                    result.export = self.export_ema(state["ema"])
        finally:
            manager.wait_until_finished()
            manager.close()
            loader.close()
            metrics_log.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return result

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

    def _sample_grid(self, graphdef, ema: dict, step: int, sampler):
        """One image per class (at most 10) from the EMA weights, as a PNG grid."""
        from pixelflow_jax.images import make_grid, save_png
        from pixelflow_jax.sampling import Sampler, to_images

        if sampler is None:
            sampler = Sampler(nnx.merge(graphdef, ema), self.schedule, self.cfg.data.resolution)
        sampler.set_params(ema)
        n = min(10, self.cfg.params.num_classes)
        n = -(-n // sampler.mesh.size) * sampler.mesh.size
        labels = np.arange(n) % self.cfg.params.num_classes
        x = sampler.generate(self.cfg.seed, np.arange(n), labels=labels, steps=10, guidance=4.0)
        if jax.process_index() == 0:
            folder = os.path.join(self.out, "samples")
            os.makedirs(folder, exist_ok=True)
            save_png(os.path.join(folder, f"step_{step:07d}.png"),
                     make_grid(np.asarray(to_images(_gather(x))), rows=1))
        return sampler


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
