"""Drawing many images in fixed-size batches (what ``sample.py`` runs).

Images are numbered 0..N-1 and cut into aligned global batches [kG, (k+1)G)
(the last padded), so the same image always lands in the same batch: a run
resumed after an interruption repeats exactly the computations of an
uninterrupted one. On several hosts each host draws its own slice of every
batch. Class labels are computed per batch (:class:`ClassBlocks`,
:class:`RoundRobin`), so no array of N entries is ever built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax import distributed
from pixelflow_jax.noise import CascadeNoise
from pixelflow_jax.progress import CascadeProgress

if TYPE_CHECKING:  # importing sampling (diffrax) takes a second: not before a request is checked
    from pixelflow_jax.sampling import Sampler

# Image numbers reach the noise keys as int32 (Sampler.sample): past this they would repeat.
MAX_IMAGES = 2 ** 31


class Labels(Protocol):
    """The class (or, for text models, the prompt number) of every image of a run,
    computed on demand: ``labels[rows]`` for an integer array of image numbers,
    ``len(labels)`` images in all."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ClassBlocks:
    """``per_class`` images of each class in turn: image i has ``classes[i // per_class]``."""

    classes: tuple[int, ...]
    per_class: int

    def __len__(self) -> int:
        return len(self.classes) * self.per_class

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, np.int64)[np.asarray(rows, np.int64) // self.per_class]


@dataclasses.dataclass(frozen=True)
class RoundRobin:
    """The official FID list: image i has class ``i mod num_classes``; images past the
    last whole round have class 0."""

    num_images: int
    num_classes: int

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        whole = (self.num_images // self.num_classes) * self.num_classes
        return np.where(rows < whole, rows % self.num_classes, 0)


@dataclasses.dataclass
class Batch:
    """One finished batch, this host's rows: image numbers, uint8 images, solver stats."""

    indices: np.ndarray          # [b]
    images: np.ndarray           # [b, R, R, C] uint8
    evaluations: np.ndarray      # [S, b] velocity evaluations per stage
    finished: np.ndarray         # [b] bool: the solver reached t = 1 in every stage
    finite: np.ndarray           # [b] bool: the model-space output holds no NaN or inf


def global_batch_size(requested: int, sampler: Sampler | int, total: int) -> int:
    """The compiled batch: ``requested`` (at most ``total``) rounded up to a multiple of
    the device count (``sampler``'s, or a number)."""
    devices = sampler if isinstance(sampler, int) else sampler.mesh.size
    size = max(1, min(requested, total))
    return -(-size // devices) * devices


def host_rows(lo: int, hi: int, batch: int) -> tuple[np.ndarray, int]:
    """(this host's image numbers of the global batch starting at ``lo``, how many are
    real rather than padding). Hosts take equal consecutive slices; padding rows repeat
    the last real image (their outputs are discarded)."""
    per_host = batch // jax.process_count()
    start = lo + jax.process_index() * per_host
    rows = np.arange(start, start + per_host)
    real = int(np.clip(hi - start, 0, per_host))
    return np.minimum(rows, max(hi - 1, lo)), real


@jax.jit
def _images_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    from pixelflow_jax.sampling import to_images
    # Finiteness is read in model space: to_images clips, so a NaN would become a pixel.
    return to_images(x), jnp.isfinite(x).all(axis=(1, 2, 3))


def images_in_batches(batches, n: int, G: int) -> int:
    """Images in the batch numbers ``batches`` of a run of ``n`` images in batches of ``G``
    (only the last batch can be short)."""
    last = -(-n // G) - 1
    return len(batches) * G - ((last + 1) * G - n if last in batches else 0)


def iter_batches(sampler: Sampler, labels: Labels, seed: int, *, batch_size: int,
                 guidance: float, steps, shift: float, batches: Sequence[int] | None = None,
                 noise: CascadeNoise | None = None, dup_blocks=None,
                 progress: str = "batches", stream: TextIO | None = None,
                 condition: Callable[[np.ndarray], dict[str, Any]] | None = None
                 ) -> Iterator[Batch]:
    """Draw images 0..len(labels)-1 batch by batch, yielding this host's rows of each.

    ``labels``: an array or a :class:`Labels`. ``batches`` restricts the run to
    those batch numbers (resuming; anything with ``len``, ``in`` and iteration).
    With ``noise`` (every image's, NHWC) the seed is unused. ``progress``:
    ``"stages"`` (live per-stage display; Euler with ``report_progress``),
    ``"batches"`` (a line per batch with images/s and time left) or ``"none"``.
    One batch is in host memory at a time. ``condition``: the sampler's conditioning
    keywords for a batch's labels (text models: prompt numbers -> features, e.g.
    :class:`pixelflow_jax.prompts.PromptConditioning`); default ``labels=`` (classes).
    """
    if progress == "stages" and not sampler.report_progress:
        progress = "batches"
    stream = stream or sys.stderr
    n = len(labels)
    G = batch_size
    todo = range(-(-n // G)) if batches is None else batches
    total = images_in_batches(todo, n, G)
    step_counts = sampler.schedule.steps_per_stage(steps)
    done_images, start = 0, time.perf_counter()
    for count, b in enumerate(todo):
        lo, hi = b * G, min((b + 1) * G, n)
        rows, real = host_rows(lo, hi, G)
        conditioning = condition(labels[rows]) if condition is not None \
            else {"labels": labels[rows]}
        kwargs = dict(steps=step_counts, guidance=guidance, shift=shift, **conditioning)
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
            x, finite, stats = distributed.to_local((*_images_and_finite(out.x), out.stats))
        done_images += hi - lo
        if progress == "batches":
            rate = done_images / (time.perf_counter() - start)
            stream.write(f"{label}: images {lo}-{hi - 1}, {rate:.2f} images/s, "
                         f"{(total - done_images) / rate:.0f} s left\n")
            stream.flush()
        yield Batch(rows[:real], x[:real], stats.evaluations[:, :real], stats.finished[:real],
                    finite[:real])


def describe_evaluations(evaluations: np.ndarray) -> str:
    """'stage 1: 31, stage 2: 43, ...' mean velocity evaluations per image and stage
    (``evaluations`` [S, images])."""
    means = np.asarray(evaluations, np.float64).mean(axis=1)
    return ", ".join(f"stage {s + 1}: {m:.0f}" for s, m in enumerate(means)) + \
        f" (total {means.sum():.0f} per image)"
