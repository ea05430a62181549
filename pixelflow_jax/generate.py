"""Sampling many images in fixed-size batches (what ``sample.py`` runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import TextIO

import jax
import numpy as np

from pixelflow_jax.noise import CascadeNoise
from pixelflow_jax.progress import CascadeProgress
from pixelflow_jax.sampling import Sampler, to_images


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """What to draw: ``num_images`` per class, image i of class k numbered k*num_images + i."""

    classes: tuple[int, ...]
    num_images: int = 4
    seed: int = 42
    guidance: float = 4.0
    steps: int | tuple[int, ...] = 10
    shift: float = 1.0

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.asarray(self.classes, np.int64), self.num_images)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad axis 0 to ``size`` by repeating the last row (padded outputs are discarded)."""
    return a if len(a) == size else np.concatenate([a, np.repeat(a[-1:], size - len(a), 0)])


def sample_class_images(sampler: Sampler, request: ImageRequest, batch_size: int,
                        noise: CascadeNoise | None = None, progress: str = "batches",
                        stream: TextIO | None = None) -> np.ndarray:
    """uint8 images [N, R, R, C] for ``request``, N = len(classes) * num_images.

    Batches have one fixed size (the last is padded), so one compiled program
    serves every batch. With ``noise`` (all N images' noise) the seed is unused.
    ``progress``: ``"stages"`` (live per-stage display; needs a sampler built with
    ``report_progress=True``), ``"batches"`` (a line per batch) or ``"none"``.
    """
    if progress == "stages" and not sampler.report_progress:
        raise ValueError("progress='stages' needs Sampler(report_progress=True)")
    stream = stream or sys.stderr
    start = time.perf_counter()
    labels = request.labels
    n = len(labels)
    steps = sampler.schedule.steps_per_stage(request.steps)
    out = []
    num_batches = -(-n // batch_size)
    for b in range(num_batches):
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        idx = _pad(np.arange(lo, hi), batch_size)
        kwargs = dict(steps=steps, guidance=request.guidance, shift=request.shift,
                      labels=_pad(labels[lo:hi], batch_size))
        label = f"batch {b + 1}/{num_batches}" if num_batches > 1 else "sampling"
        display = CascadeProgress(steps, hi - lo, label, stream) if progress == "stages" \
            else contextlib.nullcontext()
        with display:
            if noise is None:
                x = sampler.generate(request.seed, idx, **kwargs)
            else:
                part = jax.tree.map(lambda a, lo=lo, hi=hi: _pad(np.asarray(a)[lo:hi], batch_size),
                                    noise)
                x = sampler.generate_from_noise(part, **kwargs)
            out.append(np.asarray(to_images(x))[: hi - lo])
        if progress == "batches":
            elapsed = time.perf_counter() - start
            rate = hi / elapsed
            stream.write(f"{label}: {hi}/{n} images, {rate:.2f} images/s, "
                         f"{(n - hi) / rate:.0f} s left\n")
            stream.flush()
    return np.concatenate(out)
