"""FID-scale sampling: a class-balanced set of PNGs and the ADM suite's ``.npz``.

``sample.py --fid-samples 50000 --out DIR`` draws image i of class
``i mod num_classes`` (the published protocol, DESIGN §4: 50 per class for 1000
classes; as the official script, images past the last whole round get class 0)
into ``DIR/{i:06d}.png``, then streams them into ``DIR.npz`` (``arr_0``, uint8
[N, H, W, 3]) without holding the set in memory. The folder is a resumable run
(:mod:`pixelflow_jax.resumable`): ``run.json`` records the settings, and the
same command again draws only what is missing (damaged PNGs included).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zipfile
from typing import TYPE_CHECKING, Any, Sequence, TextIO

import jax
import numpy as np
from PIL import Image

from pixelflow_jax.errors import UserError
from pixelflow_jax.generate import RoundRobin, global_batch_size
from pixelflow_jax.resumable import (ImageFolder, Plan, RunSummary, draw_run, pending_batches,
                                     plan_run)

if TYPE_CHECKING:
    from pixelflow_jax.sampling import Sampler


def fid_labels(num_samples: int, num_classes: int) -> RoundRobin:
    """Class of every image, computed per batch: 0..C-1 repeated, then class 0 (the
    official list)."""
    return RoundRobin(num_samples, num_classes)


def fid_folder(folder: str, num_samples: int) -> ImageFolder:
    """The PNGs of a FID run: ``folder/INDEX.png``."""
    return ImageFolder(os.path.abspath(folder), num_samples)


def npz_path(folder: str) -> str:
    """The ADM suite's ``.npz`` of a run in ``folder``: beside it, ``FOLDER.npz``."""
    return os.path.abspath(folder).rstrip("/" + os.sep) + ".npz"


def fid_settings(num_samples: int, *, seed: int, guidance: float, steps: Sequence[int],
                 shift: float, solver: str, resolution: int, batch: int, devices: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` records: ``settings`` (checkpoint, solver options, ...) and what
    the run itself controls (``steps``: one count per stage)."""
    return dict(settings, num_samples=num_samples, seed=seed, guidance=guidance,
                steps=list(steps), shift=shift, solver=solver, resolution=resolution,
                batch=batch, devices=devices)


def write_npz(folder: str, num_samples: int, path: str,
              files: dict[int, str] | None = None) -> None:
    """Stream images 0..N-1 (``files``, default the folder's PNGs) into ``path``
    (``arr_0``), one image in memory at a time."""
    files = fid_folder(folder, num_samples).find() if files is None else files

    def read(i: int) -> np.ndarray:
        if i not in files:
            raise UserError(f"{folder} has no PNG of image {i}; rerun the same command to "
                            "draw it")
        try:
            with Image.open(files[i]) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as e:  # PIL raises many types for damaged files
            raise UserError(f"{files[i]} is damaged ({type(e).__name__}: {e}); delete it and "
                            "rerun the same command to redraw it") from None

    first = read(0)
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_samples,) + first.shape}
    tmp = path + ".tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for i in range(num_samples):
                    img = first if i == 0 else read(i)
                    if img.shape != first.shape:
                        raise UserError(f"{files[i]} is {img.shape}, not {first.shape}")
                    f.write(img.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def finish_fid(plan: Plan) -> str | None:
    """Write the ``.npz`` once every image is in the folder (process 0; every host's
    images must be there, a shared filesystem). Returns its path, or None."""
    images = plan.images
    if jax.process_index() != 0:
        return None
    files = images.find()
    if len(pending_batches(files, images.num_images, plan.batch)):
        return None
    path = npz_path(images.folder)
    write_npz(images.folder, images.num_images, path, files)
    return path


def plan_fid(sampler: Sampler, folder: str, num_samples: int, *, seed: int, guidance: float,
             steps, shift: float, batch_size: int, settings: dict[str, Any],
             stream: TextIO | None = None) -> Plan:
    """Plan (or plan the rest of) a FID run into ``folder``, writing nothing yet."""
    G = global_batch_size(batch_size, sampler, num_samples)
    recorded = fid_settings(num_samples, seed=seed, guidance=guidance,
                            steps=sampler.schedule.steps_per_stage(steps), shift=shift,
                            solver=sampler.solver, resolution=sampler.resolution, batch=G,
                            devices=sampler.mesh.size, settings=settings)
    return plan_run(fid_folder(folder, num_samples), recorded, G, stream=stream)


def run_fid(sampler: Sampler, folder: str, num_samples: int, *, seed: int, guidance: float,
            steps, shift: float, batch_size: int, settings: dict[str, Any],
            progress: str = "batches", stream: TextIO | None = None) -> dict[str, Any]:
    """Draw (or finish drawing) a FID set into ``folder``; returns a summary.

    The summary is :class:`~pixelflow_jax.resumable.RunSummary`'s fields and ``npz``
    (its path, or None when some image is missing: those whose solve did not finish,
    listed in ``unfinished``, and those holding a non-finite value, in ``nonfinite``).
    """
    stream = stream or sys.stderr
    plan = plan_fid(sampler, folder, num_samples, seed=seed, guidance=guidance, steps=steps,
                    shift=shift, batch_size=batch_size, settings=settings, stream=stream)
    summary = draw_run(sampler, plan, fid_labels(num_samples, sampler.params.num_classes),
                       seed=seed, guidance=guidance, steps=steps, shift=shift,
                       progress=progress, stream=stream)
    return fid_summary(summary, finish_fid(plan))


def fid_summary(summary: RunSummary, npz: str | None) -> dict[str, Any]:
    """A run's summary as a dict with the ``.npz`` path."""
    return dict(dataclasses.asdict(summary), npz=npz)
