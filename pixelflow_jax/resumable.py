"""Resumable image runs: a folder of PNGs that the same command completes.

Both kinds of ``sample.py`` output go through here: a folder of class images
(``INDEX_classK.png``; a grid is drawn into a hidden parts folder first), a
folder of prompt images (``INDEX.png`` with a ``prompts.jsonl``, each PNG's prompt in
its text chunk) and a FID set (``INDEX.png``, :mod:`pixelflow_jax.fid`). Names have
:func:`name_width` digits (6, more past a million images), so they sort in image
order; a name of any width is read back.

``run.json`` records the settings. The same command again skips every batch
whose PNGs all exist and are intact and draws the rest (a damaged PNG is
redrawn); batches are aligned on image numbers (:mod:`pixelflow_jax.generate`),
so the final set is identical to an uninterrupted run's. A folder holding a run
with other settings is refused (or, for a grid's parts, discarded). An image
whose solve did not finish, or that holds a non-finite value, is not written.

Bookkeeping grows with the files present, never with the number of images asked
for: batches still to draw are "all but the complete ones" (:class:`PendingBatches`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence,
                    TextIO)

import jax
import numpy as np
from PIL import Image

from pixelflow_jax.errors import UserError
from pixelflow_jax.generate import (Labels, describe_evaluations, images_in_batches,
                                    iter_batches)
from pixelflow_jax.images import TEMPORARY_PREFIX, save_png
from pixelflow_jax.prompts import write_prompt_records

if TYPE_CHECKING:
    from pixelflow_jax.sampling import Sampler

RUN_FILE = "run.json"
MIN_NAME_WIDTH = 6
# Recorded but not compared on resume: the width follows from the image count, and an image
# that finished within one step limit is the same under a larger one (raising --max-steps
# to draw the images that did not finish is the point of a rerun).
UNCOMPARED = frozenset({"name_width", "max_steps"})
LISTED = 100  # image numbers kept per kind of failure (counts are exact)

_NAME = re.compile(r"([0-9]+)(?:_class([0-9]+))?\.png")


def name_width(num_images: int) -> int:
    """Digits in the PNG names of a run of ``num_images`` images: 6, or enough for N-1."""
    return max(MIN_NAME_WIDTH, len(str(max(num_images - 1, 0))))


def parse_png_name(name: str) -> tuple[int, int | None] | None:
    """(image number, class or None) of ``DIGITS.png`` / ``DIGITS_classK.png`` of any
    width; None for other names."""
    m = _NAME.fullmatch(name)
    return None if m is None else (int(m[1]), None if m[2] is None else int(m[2]))


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """Where image i of a run of ``num_images`` goes: ``folder/INDEX.png``, or with
    ``named_classes`` (the labels) ``folder/INDEX_classK.png``."""

    folder: str
    num_images: int
    named_classes: Labels | None = None

    def path(self, index: int, label: int | None = None) -> str:
        """The path of image ``index`` (``label``: its class, else looked up)."""
        name = f"{index:0{name_width(self.num_images)}d}"
        if self.named_classes is not None:
            label = int(self.named_classes[np.array([index])][0]) if label is None else label
            name += f"_class{label}"
        return os.path.join(self.folder, name + ".png")

    def find(self) -> dict[int, str]:
        """Image number -> path of each PNG in the folder named for an image of the run.

        Where two names give one number (the same image under another width), the
        run's own width wins.
        """
        found: dict[int, str] = {}
        if not os.path.isdir(self.folder):
            return found
        width = name_width(self.num_images)
        candidates: list[tuple[int, int | None, str, bool]] = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                parsed = parse_png_name(entry.name)
                if parsed is None or parsed[0] >= self.num_images \
                        or (parsed[1] is None) != (self.named_classes is None):
                    continue
                own = len(str(entry.name).split("_")[0].split(".")[0]) == width
                candidates.append((parsed[0], parsed[1], entry.path, own))
        if self.named_classes is not None and candidates:
            want = self.named_classes[np.array([c[0] for c in candidates], np.int64)]
            candidates = [c for c, k in zip(candidates, want) if c[1] == k]
        for index, _, path, own in candidates:
            if index not in found or own:
                found[index] = path
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


class PendingBatches:
    """Batch numbers 0..total-1 except the ``complete`` ones, without listing them.

    Supports ``len``, ``in``, iteration and indexing, as :func:`iter_batches` uses it.
    """

    def __init__(self, total: int, complete: Iterable[int] = ()):
        self.total = total
        self.complete = np.unique(np.fromiter(complete, np.int64))

    def __len__(self) -> int:
        return self.total - len(self.complete)

    def __contains__(self, b: object) -> bool:
        if not isinstance(b, (int, np.integer)) or not 0 <= b < self.total:
            return False
        k = np.searchsorted(self.complete, b)
        return not (k < len(self.complete) and self.complete[k] == b)

    def __iter__(self) -> Iterator[int]:
        skip = iter(self.complete.tolist())
        nxt = next(skip, None)
        for b in range(self.total):
            if b == nxt:
                nxt = next(skip, None)
            else:
                yield b

    def __getitem__(self, k: int) -> int:
        """The k-th pending batch number (negative k counts from the end)."""
        n = len(self)
        if not -n <= k < n:
            raise IndexError(k)
        k %= n
        # Pending numbers before complete[j]: complete[j] - j (non-decreasing in j).
        return int(k + np.searchsorted(self.complete - np.arange(len(self.complete)), k,
                                       side="right"))

    def __repr__(self) -> str:
        return f"PendingBatches({len(self)} of {self.total})"


def pending_batches(present: Iterable[int], num_images: int, batch: int) -> PendingBatches:
    """Batches [kB, (k+1)B) with at least one image not in ``present``."""
    total = -(-num_images // batch)
    index = np.unique(np.fromiter(present, np.int64))
    index = index[(index >= 0) & (index < num_images)]
    counts = np.bincount(index // batch) if len(index) else np.zeros(0, np.int64)
    full = np.full(len(counts), batch)
    if len(counts) == total:  # the last batch may be short
        full[-1] = num_images - (total - 1) * batch
    return PendingBatches(total, np.flatnonzero(counts == full))


@dataclasses.dataclass
class Plan:
    """What :func:`draw_run` will do: the batches to draw, and whether the folder holds
    another run's parts to discard first."""

    images: ImageFolder
    settings: dict[str, Any]
    batch: int
    todo: PendingBatches
    damaged: int = 0
    discard: bool = False

    @property
    def pending_images(self) -> int:
        """Images in the batches still to draw."""
        return images_in_batches(self.todo, self.images.num_images, self.batch)


@dataclasses.dataclass
class RunSummary:
    """What a run drew on this host. ``unfinished``/``nonfinite`` list the first
    :data:`LISTED` image numbers of each kind; the counts are exact."""

    drawn: int = 0
    written: int = 0
    unfinished: list[int] = dataclasses.field(default_factory=list)
    nonfinite: list[int] = dataclasses.field(default_factory=list)
    num_unfinished: int = 0
    num_nonfinite: int = 0
    seconds: float = 0.0
    evaluations: str | None = None


def _read_record(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; remove it to start over") from None


def _broadcast(a: np.ndarray) -> np.ndarray:
    """Process 0's int64 vector on every host (the length may differ between hosts)."""
    if jax.process_count() == 1:
        return a
    from jax.experimental import multihost_utils
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(a))))
    padded = np.zeros(n, np.int64)
    padded[:min(n, len(a))] = a[:n]
    return np.asarray(multihost_utils.broadcast_one_to_all(padded))


def plan_run(images: ImageFolder, settings: dict[str, Any], batch: int, *,
             other_settings: Literal["refuse", "discard"] = "refuse",
             stream: TextIO | None = None) -> Plan:
    """Read the folder (writing nothing) and plan the run; raises UserError for a folder
    holding another run (``other_settings="refuse"``) or PNGs of an unrecorded one.

    ``settings`` is recorded in ``run.json``; every key but :data:`UNCOMPARED` must
    match an existing record. Process 0 checks every PNG and tells every host.
    """
    stream = stream or sys.stderr
    folder, n = images.folder, images.num_images
    total = -(-n // batch)
    record = _read_record(folder)
    if record is not None:
        changed = [f"{k}: {record.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if k not in UNCOMPARED and record.get(k) != v]
        if changed and other_settings == "refuse":
            raise UserError(f"{folder} holds a run with other settings ({'; '.join(changed)}); "
                            "use another --out, or the original settings to resume")
        if changed:
            return Plan(images, settings, batch, PendingBatches(total), discard=True)
    # Process 0 reads the folder; every host gets its verdict: [unrecorded PNGs, damaged,
    # complete batch numbers...] (hosts must agree, or a collective would hang).
    verdict = np.zeros(2, np.int64)
    if jax.process_index() == 0:
        found = images.find()
        if found and record is None:
            verdict[0] = len(found)
        else:
            bad = sorted(i for i, p in found.items() if not png_intact(p))
            if bad:
                stream.write(f"redrawing {len(bad)} damaged PNG(s) (first: "
                             f"{os.path.basename(found[bad[0]])})\n")
            verdict[1] = len(bad)
            complete = pending_batches(set(found) - set(bad), n, batch).complete
            verdict = np.concatenate([verdict, complete])
    verdict = _broadcast(verdict)
    unrecorded, damaged, complete = int(verdict[0]), int(verdict[1]), verdict[2:]
    if unrecorded and other_settings == "discard":
        return Plan(images, settings, batch, PendingBatches(total), discard=True)
    if unrecorded:
        raise UserError(f"{folder} holds {unrecorded} PNG(s) named like this run's images but "
                        f"no {RUN_FILE} saying how they were drawn; use another --out, or "
                        "delete them")
    return Plan(images, settings, batch, PendingBatches(total, complete), damaged)


def _start_folder(plan: Plan) -> None:
    """Create the folder (emptied first when it held another run's parts) and record."""
    folder = plan.images.folder
    if jax.process_index() == 0:
        if plan.discard and os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        # Half-written PNGs of a killed run (images.save_png's temporaries): no host is
        # writing yet, so none of them is live.
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY_PREFIX) and entry.name.endswith(".png"):
                    os.unlink(entry.path)
        path = os.path.join(folder, RUN_FILE)
        if plan.discard or not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(plan.settings, name_width=name_width(plan.images.num_images)),
                          f, indent=1)
            os.replace(tmp, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax: run folder ready")


def draw_run(sampler: Sampler, plan: Plan, labels: Labels, *, seed: int, guidance: float,
             steps, shift: float, noise=None, dup_blocks=None, progress: str = "batches",
             stream: TextIO | None = None,
             condition: Callable[[np.ndarray], dict[str, Any]] | None = None,
             prompts: Sequence[str] | None = None) -> RunSummary:
    """Draw the batches of ``plan`` into its folder, writing each image as its batch
    finishes (one batch in memory at a time); returns this host's summary.

    ``labels``: the class of every image. ``noise``/``dup_blocks``: injected noise of
    every image (else from ``seed``). Every host returns after all hosts have written.
    Text runs: ``labels`` are prompt numbers, ``condition`` turns them into the
    sampler's inputs (:class:`pixelflow_jax.prompts.PromptConditioning`) and with
    ``prompts`` every PNG carries its prompt (text chunk ``prompt``) and the folder a
    ``prompts.jsonl`` of every image of the run, written before the first batch.
    """
    stream = stream or sys.stderr
    _start_folder(plan)
    if prompts is not None and jax.process_index() == 0:
        n = plan.images.num_images
        write_prompt_records(plan.images.folder, [plan.images.path(i) for i in range(n)],
                             prompts, labels)
    todo, G = plan.todo, plan.batch
    if len(todo) < todo.total:
        stream.write(f"resuming: {todo.total - len(todo)} of {todo.total} batches are "
                     f"complete, {len(todo)} to draw\n")
    summary, start = RunSummary(), time.perf_counter()
    evaluation_sums = None
    for batch in iter_batches(sampler, labels, seed, batch_size=G, guidance=guidance,
                              steps=steps, shift=shift, batches=todo, noise=noise,
                              dup_blocks=dup_blocks, progress=progress, stream=stream,
                              condition=condition):
        sums = np.asarray(batch.evaluations, np.float64).sum(axis=1)
        evaluation_sums = sums if evaluation_sums is None else evaluation_sums + sums
        summary.drawn += len(batch.indices)
        classes = labels[batch.indices]
        for i, k, img, done, fine in zip(batch.indices.tolist(), classes.tolist(),
                                         batch.images, batch.finished, batch.finite):
            # A NaN makes the solve's end moot: report it as non-finite first.
            if not fine:
                summary.num_nonfinite += 1
                if len(summary.nonfinite) < LISTED:
                    summary.nonfinite.append(i)
            elif not done:
                summary.num_unfinished += 1
                if len(summary.unfinished) < LISTED:
                    summary.unfinished.append(i)
            else:
                text = None if prompts is None else {"prompt": prompts[k]}
                save_png(plan.images.path(i, k), img, text)
                summary.written += 1
    if evaluation_sums is not None:
        summary.evaluations = describe_evaluations((evaluation_sums / summary.drawn)[:, None])
    summary.seconds = time.perf_counter() - start
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax: images written")
    return summary
