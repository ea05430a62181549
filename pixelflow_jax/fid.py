"""FID-scale sampling: a class-balanced set of PNGs and the ADM suite's ``.npz``.

``sample.py --fid-samples 50000 --out DIR`` draws image i of class
``i mod num_classes`` (the published protocol: 50 per class for 1000 classes;
as the official script, images past the last whole round get class 0) into
``DIR/{i:06d}.png``, then streams them into ``DIR.npz`` (``arr_0``, uint8
[N, H, W, 3]) without holding the set in memory.

Resuming: ``DIR/run.json`` records the settings; the same command again skips
every batch whose PNGs all exist and draws the rest. Batches are aligned on
image numbers, so the final set is identical to an uninterrupted run. A
different setting (seed, solver, batch size, device count, ...) is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from typing import Any, TextIO

import jax
import numpy as np
from PIL import Image

from pixelflow_jax.errors import UserError
from pixelflow_jax.generate import describe_evaluations, global_batch_size, iter_batches
from pixelflow_jax.images import save_png
from pixelflow_jax.sampling import Sampler

RUN_FILE = "run.json"


def fid_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Class of every image: 0..C-1 repeated, padded with class 0 (the official list)."""
    labels = np.zeros(num_samples, np.int64)
    whole = (num_samples // num_classes) * num_classes
    labels[:whole] = np.arange(whole) % num_classes
    return labels


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def _check_run(folder: str, settings: dict[str, Any]) -> None:
    path = os.path.join(folder, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            try:
                before = json.load(f)
            except json.JSONDecodeError:
                raise UserError(f"{path} is not valid JSON; remove it to start over") from None
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if before.get(k) != v]
        if changed:
            raise UserError(f"{folder} holds a run with other settings ({'; '.join(changed)}); "
                            "use another --out, or the original settings to resume")
    elif jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(tmp, path)


def pending_batches(folder: str, num_samples: int, batch: int,
                    local_only: bool = False) -> list[int]:
    """Batch numbers with at least one missing PNG (process 0's view, sent to every host
    unless ``local_only``)."""
    present = set()
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".png") and name[:6].isdigit() and len(name) == 10:
                present.add(int(name[:6]))
    missing = np.ones(-(-num_samples // batch), bool)
    for b in range(len(missing)):
        missing[b] = any(i not in present for i in range(b * batch,
                                                         min((b + 1) * batch, num_samples)))
    if jax.process_count() > 1 and not local_only:
        from jax.experimental import multihost_utils
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [int(b) for b in np.flatnonzero(missing)]


def write_npz(folder: str, num_samples: int, path: str) -> None:
    """Stream ``folder``'s PNGs 0..N-1 into ``path`` (``arr_0``), one image in memory at a time."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_samples,) + first.shape}
    tmp = path + ".tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for i in range(num_samples):
                    img = np.asarray(Image.open(png_path(folder, i)).convert("RGB"))
                    if img.shape != first.shape:
                        raise UserError(f"{png_path(folder, i)} is {img.shape}, "
                                        f"not {first.shape}")
                    f.write(img.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_fid(sampler: Sampler, folder: str, num_samples: int, *, seed: int, guidance: float,
            steps, shift: float, batch_size: int, settings: dict[str, Any],
            progress: str = "batches", stream: TextIO | None = None) -> dict[str, Any]:
    """Draw (or finish drawing) a FID set into ``folder``; returns a summary.

    ``settings`` (checkpoint, solver options, ...) are recorded in ``run.json``
    together with what this function controls. Images whose solve did not finish
    are not written; they are listed and the ``.npz`` is not made.
    """
    stream = stream or sys.stderr
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    labels = fid_labels(num_samples, sampler.params.num_classes)
    G = global_batch_size(batch_size, sampler, num_samples)
    settings = dict(settings, num_samples=num_samples, seed=seed, guidance=guidance,
                    steps=list(sampler.schedule.steps_per_stage(steps)), shift=shift,
                    solver=sampler.solver, resolution=sampler.resolution, batch=G,
                    devices=sampler.mesh.size)
    _check_run(folder, settings)
    todo = pending_batches(folder, num_samples, G)
    total_batches = -(-num_samples // G)
    if len(todo) < total_batches:
        stream.write(f"resuming: {total_batches - len(todo)} of {total_batches} batches are "
                     f"complete, {len(todo)} to draw\n")
    start, unfinished, evaluations = time.perf_counter(), [], []
    for batch in iter_batches(sampler, labels, seed, batch_size=G, guidance=guidance,
                              steps=steps, shift=shift, batches=todo, progress=progress,
                              stream=stream):
        evaluations.append(batch.evaluations)
        for i, img, ok in zip(batch.indices, batch.images, batch.finished):
            if ok:
                save_png(png_path(folder, int(i)), img)
            else:
                unfinished.append(int(i))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax fid: images written")
    npz = folder.rstrip("/") + ".npz"
    summary = {"drawn": sum(e.shape[1] for e in evaluations), "unfinished": unfinished,
               "seconds": time.perf_counter() - start, "npz": None}
    if evaluations:
        summary["evaluations"] = describe_evaluations(np.concatenate(evaluations, axis=1))
    # Every host's images must be there (a shared filesystem), whoever drew them.
    if jax.process_index() == 0 and not pending_batches(folder, num_samples, G, True):
        write_npz(folder, num_samples, npz)
        summary["npz"] = npz
    return summary
