"""FID-scale sampling: a class-balanced set of PNGs and the ADM suite's ``.npz``.

``sample.py --fid-samples 50000 --out DIR`` draws image i of class
``i mod num_classes`` (the published protocol: 50 per class for 1000 classes;
as the official script, images past the last whole round get class 0) into
``DIR/{i:06d}.png``, then streams them into ``DIR.npz`` (``arr_0``, uint8
[N, H, W, 3]) without holding the set in memory. Names have
:func:`name_width` digits (6, more for runs past a million images), so they
sort in image order; a name of any width is read back.

Resuming: ``DIR/run.json`` records the settings; the same command again skips
every batch whose PNGs all exist and are intact, and draws the rest (a damaged
PNG is redrawn). Batches are aligned on image numbers, so the final set is
identical to an uninterrupted run. A different setting (seed, solver, batch
size, device count, ...) is refused. An image whose solve did not finish, or
that holds a non-finite value, is not written.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from typing import Any, Iterable, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pixelflow_jax import distributed
from pixelflow_jax.errors import UserError
from pixelflow_jax.generate import describe_evaluations, global_batch_size, iter_batches
from pixelflow_jax.images import save_png
from pixelflow_jax.sampling import Sampler

RUN_FILE = "run.json"
MIN_NAME_WIDTH = 6


def fid_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Class of every image: 0..C-1 repeated, padded with class 0 (the official list)."""
    labels = np.zeros(num_samples, np.int64)
    whole = (num_samples // num_classes) * num_classes
    labels[:whole] = np.arange(whole) % num_classes
    return labels


def name_width(num_samples: int) -> int:
    """Digits in the PNG names of a run of ``num_samples`` images: 6, or enough for N-1."""
    return max(MIN_NAME_WIDTH, len(str(max(num_samples - 1, 0))))


def png_path(folder: str, index: int, num_samples: int) -> str:
    """Where image ``index`` of a run of ``num_samples`` images is written."""
    return os.path.join(folder, f"{index:0{name_width(num_samples)}d}.png")


def parse_png_name(name: str) -> int | None:
    """The image number of a file name ``DIGITS.png`` of any width; None for other names."""
    stem, ext = os.path.splitext(name)
    return int(stem) if ext == ".png" and stem.isascii() and stem.isdigit() else None


def find_pngs(folder: str, num_samples: int) -> dict[int, str]:
    """Image number -> path of each PNG in ``folder`` named for an image of the run.

    Where two names give one number (the same image under another width), the
    run's own width wins.
    """
    found: dict[int, str] = {}
    if not os.path.isdir(folder):
        return found
    width = name_width(num_samples)
    with os.scandir(folder) as entries:
        for entry in entries:
            index = parse_png_name(entry.name)
            if index is None or index >= num_samples:
                continue
            if index not in found or len(entry.name) == width + 4:
                found[index] = entry.path
    return found


def png_intact(path: str) -> bool:
    """Whether ``path`` is a whole PNG: every chunk present and its CRC right.

    PIL's ``verify`` reads the chunks without decoding pixels (~0.15 ms for a
    256 px image), so a 50,000-image folder is checked in seconds.
    """
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        return False


def pending_batches(present: Iterable[int], num_samples: int, batch: int) -> list[int]:
    """Batch numbers [kB, (k+1)B) with at least one image not in ``present``."""
    have = np.ones(-(-num_samples // batch) * batch, bool)  # padding counts as present
    have[:num_samples] = False
    index = np.fromiter(present, np.int64)
    have[index[(index >= 0) & (index < num_samples)]] = True
    return [int(b) for b in np.flatnonzero(~have.reshape(-1, batch).all(axis=1))]


def _check_run(folder: str, settings: dict[str, Any], num_samples: int) -> None:
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
            # The name width follows from num_samples: recorded for readers, not compared.
            json.dump(dict(settings, name_width=name_width(num_samples)), f, indent=1)
        os.replace(tmp, path)


def _todo(folder: str, num_samples: int, batch: int, stream: TextIO) -> list[int]:
    """Batches to draw: process 0 checks every PNG and tells every host."""
    missing = np.zeros(-(-num_samples // batch), bool)
    if jax.process_index() == 0:
        found = find_pngs(folder, num_samples)
        damaged = sorted(i for i, p in found.items() if not png_intact(p))
        if damaged:
            stream.write(f"redrawing {len(damaged)} damaged PNG(s) (first: "
                         f"{os.path.basename(found[damaged[0]])})\n")
        intact = set(found) - set(damaged)
        missing[pending_batches(intact, num_samples, batch)] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [int(b) for b in np.flatnonzero(missing)]


def write_npz(folder: str, num_samples: int, path: str,
              files: dict[int, str] | None = None) -> None:
    """Stream images 0..N-1 (``files``, default :func:`find_pngs`) into ``path``
    (``arr_0``), one image in memory at a time."""
    files = find_pngs(folder, num_samples) if files is None else files

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


@jax.jit
def _rows_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all(axis=tuple(range(1, x.ndim)))


class _FiniteRows:
    """``sampler`` as :func:`iter_batches` uses it, noting which rows of its latest
    output are finite: the uint8 images it yields cannot show a NaN."""

    def __init__(self, sampler: Sampler):
        self._sampler = sampler
        self.finite: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        out = self._sampler.sample(*args, **kwargs)
        self.finite = distributed.to_local(_rows_finite(out.x))
        return out


def run_fid(sampler: Sampler, folder: str, num_samples: int, *, seed: int, guidance: float,
            steps, shift: float, batch_size: int, settings: dict[str, Any],
            progress: str = "batches", stream: TextIO | None = None) -> dict[str, Any]:
    """Draw (or finish drawing) a FID set into ``folder``; returns a summary.

    ``settings`` (checkpoint, solver options, ...) are recorded in ``run.json``
    together with what this function controls. Images that are not written are
    listed in the summary's ``unfinished``: those whose solve did not finish, and
    those holding a non-finite value (also in ``nonfinite``); the ``.npz`` is then
    not made.
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
    _check_run(folder, settings, num_samples)
    todo = _todo(folder, num_samples, G, stream)
    total_batches = -(-num_samples // G)
    if len(todo) < total_batches:
        stream.write(f"resuming: {total_batches - len(todo)} of {total_batches} batches are "
                     f"complete, {len(todo)} to draw\n")
    start, unfinished, nonfinite, evaluations = time.perf_counter(), [], [], []
    watched = _FiniteRows(sampler)
    for batch in iter_batches(watched, labels, seed, batch_size=G, guidance=guidance,
                              steps=steps, shift=shift, batches=todo, progress=progress,
                              stream=stream):
        evaluations.append(batch.evaluations)
        finite = watched.finite[:len(batch.indices)]
        for i, img, ok, fine in zip(batch.indices, batch.images, batch.finished, finite):
            if not ok:
                unfinished.append(int(i))
            elif not fine:
                nonfinite.append(int(i))
            else:
                save_png(png_path(folder, int(i), num_samples), img)
    if nonfinite:
        stream.write(f"{len(nonfinite)} image(s) came out with NaN or inf values and were not "
                     f"written (first: {nonfinite[:10]})\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax fid: images written")
    npz = folder.rstrip("/") + ".npz"
    summary = {"drawn": sum(e.shape[1] for e in evaluations),
               "unfinished": sorted(unfinished + nonfinite), "nonfinite": nonfinite,
               "seconds": time.perf_counter() - start, "npz": None}
    if evaluations:
        summary["evaluations"] = describe_evaluations(np.concatenate(evaluations, axis=1))
    # Every host's images must be there (a shared filesystem), whoever drew them.
    if jax.process_index() == 0:
        files = find_pngs(folder, num_samples)
        if not pending_batches(files, num_samples, G):
            write_npz(folder, num_samples, npz, files)
            summary["npz"] = npz
    return summary
