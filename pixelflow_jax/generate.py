"""Drawing many images in fixed-size batches (what ``sample.py`` runs).

Images are numbered 0..N-1 and cut into aligned global batches [kG, (k+1)G)
(the last padded), so the same image always lands in the same batch: a run
resumed after an interruption repeats exactly the computations of an
uninterrupted one. On several hosts each host draws its own slice of every
batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Iterator, Sequence, TextIO

import jax
import numpy as np

from pixelflow_jax import distributed
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


@dataclasses.dataclass
class Batch:
    """One finished batch, this host's rows: image numbers, uint8 images, solver stats."""

    indices: np.ndarray          # [b]
    images: np.ndarray           # [b, R, R, C] uint8
    evaluations: np.ndarray      # [S, b] velocity evaluations per stage
    finished: np.ndarray         # [b] bool: the solver reached t = 1 in every stage


def global_batch_size(requested: int, sampler: Sampler, total: int) -> int:
    """The compiled batch: ``requested`` (at most ``total``) rounded up to a multiple of
    the device count."""
    devices = sampler.mesh.size
    size = max(1, min(requested, total))
    return -(-size // devices) * devices


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad axis 0 to ``size`` by repeating the last row (padded outputs are discarded)."""
    return a if len(a) == size else np.concatenate([a, np.repeat(a[-1:], size - len(a), 0)])


def host_rows(lo: int, hi: int, batch: int) -> tuple[np.ndarray, int]:
    """(this host's image numbers of the global batch starting at ``lo``, how many are
    real rather than padding). Hosts take equal consecutive slices."""
    per_host = batch // jax.process_count()
    start = lo + jax.process_index() * per_host
    rows = np.arange(start, start + per_host)
    real = int(np.clip(hi - start, 0, per_host))
    return np.minimum(rows, max(hi - 1, lo)), real


def iter_batches(sampler: Sampler, labels: np.ndarray, seed: int, *, batch_size: int,
                 guidance: float, steps, shift: float, batches: Sequence[int] | None = None,
                 noise: CascadeNoise | None = None, dup_blocks=None,
                 progress: str = "batches", stream: TextIO | None = None) -> Iterator[Batch]:
    """Draw images 0..len(labels)-1 batch by batch, yielding this host's rows of each.

    ``batches`` restricts the run to those batch numbers (resuming). With
    ``noise`` (every image's, NHWC) the seed is unused. ``progress``:
    ``"stages"`` (live per-stage display; Euler with ``report_progress``),
    ``"batches"`` (a line per batch with images/s and time left) or ``"none"``.
    """
    if progress == "stages" and not sampler.report_progress:
        progress = "batches"
    stream = stream or sys.stderr
    n = len(labels)
    G = batch_size
    todo = list(range(-(-n // G))) if batches is None else list(batches)
    step_counts = sampler.schedule.steps_per_stage(steps)
    done_images, start = 0, time.perf_counter()
    for count, b in enumerate(todo):
        lo, hi = b * G, min((b + 1) * G, n)
        rows, real = host_rows(lo, hi, G)
        kwargs = dict(steps=step_counts, guidance=guidance, shift=shift, labels=labels[rows])
        label = f"batch {count + 1}/{len(todo)}"
        display = CascadeProgress(step_counts, hi - lo, label, stream) if progress == "stages" \
            else contextlib.nullcontext()
        with display:
            if noise is None:
                out = sampler.sample(seed, rows, **kwargs)
            else:
                take = lambda a, rows=rows: np.asarray(a)[rows]
                out = sampler.sample_from_noise(
                    jax.tree.map(take, noise), **kwargs,
                    dup_blocks=None if dup_blocks is None else [take(d) for d in dup_blocks])
            x, stats = distributed.to_local((to_images(out.x), out.stats))
        done_images += hi - lo
        if progress == "batches":
            rate = done_images / (time.perf_counter() - start)
            left = sum(min((t + 1) * G, n) - t * G for t in todo[count + 1:])
            stream.write(f"{label}: images {lo}-{hi - 1}, {rate:.2f} images/s, "
                         f"{left / rate:.0f} s left\n")
            stream.flush()
        yield Batch(rows[:real], x[:real], stats.evaluations[:, :real], stats.finished[:real])


def sample_class_images(sampler: Sampler, request: ImageRequest, batch_size: int,
                        noise: CascadeNoise | None = None, dup_blocks=None,
                        progress: str = "batches",
                        stream: TextIO | None = None) -> tuple[np.ndarray, Batch]:
    """All images of ``request`` on this host: (uint8 [N, R, R, C], merged statistics).

    The statistics' ``indices``/``evaluations``/``finished`` cover every image.
    """
    labels = request.labels
    G = global_batch_size(batch_size, sampler, len(labels))
    parts = list(iter_batches(sampler, labels, request.seed, batch_size=G,
                              guidance=request.guidance, steps=request.steps,
                              shift=request.shift, noise=noise, dup_blocks=dup_blocks,
                              progress=progress, stream=stream))
    merged = Batch(np.concatenate([p.indices for p in parts]),
                   np.concatenate([p.images for p in parts]),
                   np.concatenate([p.evaluations for p in parts], axis=1),
                   np.concatenate([p.finished for p in parts]))
    return merged.images, merged


def describe_evaluations(evaluations: np.ndarray) -> str:
    """'stage 1: 31, stage 2: 43, ...' mean velocity evaluations per image and stage."""
    means = np.asarray(evaluations, np.float64).mean(axis=1)
    return ", ".join(f"stage {s + 1}: {m:.0f}" for s, m in enumerate(means)) + \
        f" (total {means.sum():.0f} per image)"

