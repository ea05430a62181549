"""Teacher pairs for reflow and distillation: every stage's (start, end) of the teacher cascade.

A pair folder (DESIGN §11) holds, for images 0..N-1 drawn by the guided teacher
cascade, the x each image ENDED every stage with (before the next renoise; the
last stage's end is the final image). Only what cannot be rebuilt is stored:
the x a stage STARTED from is rebuilt from (teacher seed, image index), as
the cascade made it: stage 0 the initial noise, stage s > 0
``alpha_s up(end_{s-1}) + beta_s eps_s`` with the image's block noise
(:func:`stage_starts_jax`, with :func:`pixelflow_jax.noise.draw_cascade_noise`
and :func:`pixelflow_jax.cascade.renoise`).

Image i has class ``i mod num_classes`` (the FID runs' list,
:func:`pixelflow_jax.fid.fid_labels`). Layout::

    PAIRS/pairs.json                 settings: teacher, stages, storage, batch
    PAIRS/ends/{lo}-{hi}.npz         images lo..hi-1: member ends.npy [hi-lo, D]

One ``.npz`` (uncompressed, zip CRC-32 per member) per host and batch, written
atomically as the batch finishes; row k holds image lo+k's stage ends, each
flattened NHWC and concatenated in stage order (D = sum_s R_s^2 C values).
Rows are read by offset (no whole-file loads), so a set larger than memory
serves random batches. Storage per image, ``4 D`` bytes in float32 (``2 D``
in float16 or bfloat16): digits (8, 16, 32 px, RGB) 16,128 B; XL 256 px
1,044,480 B; XL 1024 px 16,711,680 B.

Generation (:func:`make_pairs`, ``python -m pixelflow_jax.reflow pairs``) is an
FID-style run: batches aligned on image numbers, sharded over every device and
host, resumed after a kill (batches without all their files are redrawn), and
the same pairs whatever the device count (to float32 rounding, DESIGN §6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import struct
import sys
import time
import zipfile
from typing import TYPE_CHECKING, Any, Sequence, TextIO

import numpy as np

from pixelflow_jax.errors import UserError

if TYPE_CHECKING:
    import jax

    from pixelflow_jax.sampling import Sampler

FORMAT = "pixelflow-jax teacher pairs"
VERSION = 1
RECORD = "pairs.json"
PARTS = "ends"
MEMBER = "ends.npy"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
LABELS = "round-robin"  # image i: class i mod K; past the last whole round, class 0
TEMPORARY_PREFIX = ".tmp-"
# Recorded, not compared on resume: pairs do not depend on them (up to float rounding).
UNCOMPARED = frozenset({"devices", "hosts"})
# open_pairs checks every CRC-32 (reading every byte) up to this size by default.
VERIFY_BYTES = 4 << 30

_PART = re.compile(r"([0-9]+)-([0-9]+)\.npz")


# --------------------------------------------------------------------------- geometry


def stage_sizes(resolutions: Sequence[int], channels: int) -> list[int]:
    """Values of one image's end at each stage: R_s^2 C."""
    return [r * r * channels for r in resolutions]


def bytes_per_image(resolutions: Sequence[int], channels: int, storage: str = "float32") -> int:
    """Disk bytes of one image's stage ends (the payload; a part file adds ~200 B)."""
    return sum(stage_sizes(resolutions, channels)) * (4 if storage == "float32" else 2)


def _storage_dtype(storage: str) -> np.dtype:
    """The on-disk dtype: bfloat16 is stored as its uint16 bit pattern (portable .npy)."""
    if storage not in STORAGE_DTYPES:
        raise UserError(f"pair storage must be one of {', '.join(STORAGE_DTYPES)}, "
                        f"got {storage!r}")
    return np.dtype({"float32": np.float32, "float16": np.float16,
                     "bfloat16": np.uint16}[storage])


def _encode(x: np.ndarray, storage: str) -> np.ndarray:
    if storage == "bfloat16":
        import ml_dtypes
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x, np.float32).astype(_storage_dtype(storage))


def _decode(raw: np.ndarray, storage: str) -> np.ndarray:
    if storage == "bfloat16":
        import ml_dtypes
        return raw.view(ml_dtypes.bfloat16).astype(np.float32)
    return raw.astype(np.float32)


# --------------------------------------------------------------------------- starts


def stage_starts_jax(seed: Any, indices: Any, stage: int, prev_ends: Any, *,
                     resolutions: Sequence[int], channels: int, gamma: float,
                     alphas: Sequence[float], betas: Sequence[float]) -> jax.Array:
    """The x the teacher started stage ``stage`` from, for images ``indices`` [B] (jittable).

    Stage 0: the image's initial noise; stage s > 0: ``alphas[s] up(prev_ends) +
    betas[s] eps_s`` with ``prev_ends`` [B, R_{s-1}, R_{s-1}, C] the images' ends of
    stage s-1 and eps_s their block noise, both drawn from ``(seed, index)`` exactly
    as the sampler draws them (DESIGN §3-4, §11). ``stage`` and the keyword arguments
    are static (:meth:`Pairs.start_args` gives them); ``seed``, ``indices`` and
    ``prev_ends`` may be traced.
    """
    import jax.numpy as jnp

    from pixelflow_jax.cascade import renoise
    from pixelflow_jax.noise import draw_cascade_noise

    noise = draw_cascade_noise(seed, jnp.asarray(indices, jnp.int32), tuple(resolutions),
                               channels, gamma)
    if stage == 0:
        return noise.init.astype(jnp.float32)
    return renoise(jnp.asarray(prev_ends, jnp.float32), alphas[stage], betas[stage],
                   noise.blocks[stage - 1])


_starts_jit = None


def _jitted_starts():
    global _starts_jit
    if _starts_jit is None:
        import jax
        _starts_jit = jax.jit(stage_starts_jax, static_argnames=(
            "stage", "resolutions", "channels", "gamma", "alphas", "betas"))
    return _starts_jit


# --------------------------------------------------------------------------- part files


def part_name(lo: int, hi: int, num: int) -> str:
    """``{lo}-{hi}.npz``, zero-padded to the digits of ``num`` (at least 6), so names
    sort in image order."""
    width = max(6, len(str(num)))
    return f"{lo:0{width}d}-{hi:0{width}d}.npz"


@dataclasses.dataclass(frozen=True)
class Part:
    """One part file: images ``lo..hi-1``; their rows start at byte ``offset``."""

    lo: int
    hi: int
    path: str
    offset: int


def _inspect_part(path: str, rows: int, width: int, dtype: np.dtype) -> int:
    """The byte offset of row 0 of a part's ``ends.npy``; raises ValueError naming
    what is wrong (structure only: CRCs are checked by :func:`_crc_ok`)."""
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
            if names != [MEMBER]:
                raise ValueError(f"holds {names}, expected [{MEMBER!r}]")
            info = z.getinfo(MEMBER)
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError("is compressed (parts are stored uncompressed)")
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ValueError("has a damaged local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"has .npy version {version}")
        shape, fortran, got = read(f)
        offset = f.tell()
    want = (rows, width)
    if shape != want or fortran or got != dtype:
        raise ValueError(f"holds {got} {list(shape)}, expected {dtype} {list(want)}")
    if info.file_size != offset - start + rows * width * dtype.itemsize:
        raise ValueError("has the wrong payload size")
    return offset


def _crc_ok(path: str) -> bool:
    """Whether every member's CRC-32 matches (reads the whole file)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _scan_parts(folder: str, num: int, width: int, dtype: np.dtype
                ) -> tuple[list[Part], list[str]]:
    """(intact parts sorted by ``lo``, paths of damaged ones) in ``folder/ends``."""
    parts_dir = os.path.join(folder, PARTS)
    good, bad = [], []
    if not os.path.isdir(parts_dir):
        return good, bad
    with os.scandir(parts_dir) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        m = _PART.fullmatch(name)
        if m is None:
            continue
        lo, hi = int(m[1]), int(m[2])
        path = os.path.join(parts_dir, name)
        if not 0 <= lo < hi <= num:
            bad.append(path)
            continue
        try:
            good.append(Part(lo, hi, path, _inspect_part(path, hi - lo, width, dtype)))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error):
            bad.append(path)
    good.sort(key=lambda p: p.lo)
    return good, bad


def write_part(folder: str, lo: int, num: int, rows: np.ndarray) -> str:
    """Write images ``lo..lo+len(rows)-1`` (``rows`` [n, D], storage dtype) atomically
    (a temporary beside it, then a rename); returns the path."""
    parts_dir = os.path.join(folder, PARTS)
    path = os.path.join(parts_dir, part_name(lo, lo + len(rows), num))
    tmp = os.path.join(parts_dir, f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}.npz")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open(MEMBER, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(rows), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


# --------------------------------------------------------------------------- reading


class Pairs:
    """An opened pair folder (see :func:`open_pairs`).

    Attributes:
      folder: its path.
      num: N, the images.
      labels: [N] int32 class of every image (no null label).
      resolutions: every stage's side, e.g. (8, 16, 32).
      channels: C.
      teacher: how the pairs were drawn: ``checkpoint`` (path), ``solver``, ``steps``
        (one per stage), ``guidance``, ``shift``, ``seed``, ``dtype`` (compute),
        ``guidance_weights``, ``resolution`` (and Dopri5's options).
      seed: the teacher's seed (every image's noise comes from ``(seed, index)``).
      gamma, alphas, betas: the block-noise correlation and renoise coefficients.
      storage: the on-disk dtype (float32, float16, bfloat16).
    """

    def __init__(self, folder: str, record: dict[str, Any], parts: list[Part]):
        self.folder, self.record = folder, record
        self.num = int(record["num"])
        self.resolutions = tuple(int(r) for r in record["resolutions"])
        self.channels = int(record["channels"])
        self.teacher = dict(record["teacher"])
        self.seed = int(self.teacher["seed"])
        self.gamma = float(record["gamma"])
        self.alphas = tuple(float(a) for a in record["alphas"])
        self.betas = tuple(float(b) for b in record["betas"])
        self.storage = record["storage"]
        self.labels = pair_labels(self.num, int(record["num_classes"]))
        self._dtype = _storage_dtype(self.storage)
        sizes = stage_sizes(self.resolutions, self.channels)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._width = int(self._offsets[-1])
        self._parts = parts
        self._los = np.asarray([p.lo for p in parts], np.int64)

    def __repr__(self) -> str:
        return (f"Pairs({self.folder!r}, num={self.num}, resolutions={self.resolutions}, "
                f"storage={self.storage})")

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    def start_args(self) -> dict[str, Any]:
        """The static keyword arguments of :func:`stage_starts_jax` for these pairs."""
        return {"resolutions": self.resolutions, "channels": self.channels,
                "gamma": self.gamma, "alphas": self.alphas, "betas": self.betas}

    def _check(self, stage: int, indices: Any) -> np.ndarray:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num):
            raise ValueError(f"image indices must be in [0, {self.num})")
        return idx

    def ends(self, stage: int, indices: Any) -> np.ndarray:
        """[len, R_s, R_s, C] float32 (model space): the teacher's x at the end of stage
        ``stage`` for images ``indices``, before the next stage's renoise."""
        idx = self._check(stage, indices)
        r, C = self.resolutions[stage], self.channels
        size, item = r * r * C, self._dtype.itemsize
        raw = np.empty((len(idx), size), self._dtype)
        which = np.searchsorted(self._los, idx, side="right") - 1
        row_bytes = self._width * item
        skip = int(self._offsets[stage]) * item
        for k in np.unique(which):
            part = self._parts[k]
            sel = np.flatnonzero(which == k)
            fd = os.open(part.path, os.O_RDONLY)
            try:
                for j in sel:
                    at = part.offset + (int(idx[j]) - part.lo) * row_bytes + skip
                    buf = os.pread(fd, size * item, at)
                    if len(buf) != size * item:
                        raise UserError(f"{part.path} is truncated; rerun the pairs command "
                                        "to redraw it")
                    raw[j] = np.frombuffer(buf, self._dtype)
            finally:
                os.close(fd)
        return _decode(raw, self.storage).reshape(len(idx), r, r, C)

    def starts(self, stage: int, indices: Any) -> np.ndarray:
        """[len, R_s, R_s, C] float32: the x the teacher started stage ``stage`` from, for
        images ``indices``, rebuilt by :func:`stage_starts_jax` from the teacher's seed,
        the image numbers and (stage > 0) :meth:`ends` of the stage before."""
        idx = self._check(stage, indices)
        prev = None if stage == 0 else self.ends(stage - 1, idx)
        out = _jitted_starts()(np.uint32(self.seed), idx.astype(np.int32), stage=stage,
                               prev_ends=prev, **self.start_args())
        return np.asarray(out, np.float32)

    def verify(self) -> None:
        """Check every part's CRC-32 (reads every byte); UserError naming a damaged one."""
        for part in self._parts:
            if not _crc_ok(part.path):
                raise UserError(f"{part.path} is damaged (CRC mismatch); delete it and rerun "
                                "the pairs command to redraw it")


def pair_labels(num: int, num_classes: int) -> np.ndarray:
    """[num] int32: image i has class i mod num_classes, as the FID runs
    (:func:`pixelflow_jax.fid.fid_labels`)."""
    from pixelflow_jax.fid import fid_labels
    return np.asarray(fid_labels(num, num_classes)[np.arange(num)], np.int32)


def read_record(folder: str) -> dict[str, Any] | None:
    """``pairs.json`` of ``folder``, or None if there is none; UserError if unreadable."""
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); remove the folder to start "
                        "over") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a pair record (no format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise UserError(f"{path} has pair format version {record.get('version')}, this "
                        f"package reads version {VERSION}")
    return record


def _coverage_problem(parts: list[Part], num: int) -> str | None:
    """Where the parts fail to tile 0..num-1 exactly, in words; None when they do."""
    missing = overlap = 0
    first_missing = None
    at = 0
    for p in parts:
        if p.lo > at:
            missing += p.lo - at
            first_missing = at if first_missing is None else first_missing
        elif p.lo < at:
            overlap += min(at, p.hi) - p.lo
        at = max(at, p.hi)
    if at < num:
        missing += num - at
        first_missing = at if first_missing is None else first_missing
    if overlap:
        return f"{overlap} image(s) are in two part files"
    if missing:
        return f"{missing} of {num} images are missing (first: {first_missing})"
    return None


def open_pairs(folder: str | os.PathLike, *, verify: bool | None = None) -> Pairs:
    """Open a complete pair folder written by :func:`make_pairs`.

    Every problem is one-line :class:`UserError`: no folder, no or a foreign
    ``pairs.json``, missing images (an unfinished run: rerun the same pairs command),
    damaged or mis-shaped part files. ``verify``: also check every CRC-32 (reads
    every byte); None = when the parts hold at most 4 GiB.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise UserError(f"pair folder {folder}: no such folder")
    record = read_record(folder)
    if record is None:
        raise UserError(f"{folder} is not a pair folder (no {RECORD}); make one with "
                        "python -m pixelflow_jax.reflow pairs")
    try:
        num, storage = int(record["num"]), record["storage"]
        width = sum(stage_sizes(record["resolutions"], int(record["channels"])))
        for key in ("teacher", "gamma", "alphas", "betas", "num_classes"):
            record[key]
        int(record["teacher"]["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{os.path.join(folder, RECORD)} lacks or garbles {e}") from None
    parts, bad = _scan_parts(folder, num, width, _storage_dtype(storage))
    if bad:
        raise UserError(f"{len(bad)} damaged part file(s) in {folder} (first: "
                        f"{os.path.basename(bad[0])}); rerun the pairs command to redraw them")
    problem = _coverage_problem(parts, num)
    if problem:
        raise UserError(f"{folder} is incomplete: {problem}; rerun the same pairs command "
                        "to finish it")
    pairs = Pairs(folder, record, parts)
    if verify is None:
        verify = num * bytes_per_image(pairs.resolutions, pairs.channels, storage) \
            <= VERIFY_BYTES
    if verify:
        pairs.verify()
    return pairs


# --------------------------------------------------------------------------- writing


def pair_settings(sampler: Sampler, num: int, *, seed: int, guidance: float, steps: Any,
                  shift: float, batch: int, storage: str, teacher: dict[str, Any]
                  ) -> dict[str, Any]:
    """What ``pairs.json`` records: the stages, storage, batch and ``teacher`` (checkpoint,
    compute dtype, solver options) completed with the run's own settings."""
    import jax

    schedule = sampler.schedule
    teacher = dict(teacher, solver=sampler.solver, steps=schedule.steps_per_stage(steps),
                   guidance=float(guidance), shift=float(shift), seed=int(seed),
                   guidance_weights=list(sampler.guidance_weights),
                   resolution=sampler.resolution)
    record = {"format": FORMAT, "version": VERSION, "num": int(num),
              "num_classes": int(sampler.params.num_classes), "labels": LABELS,
              "resolutions": list(sampler.resolutions),
              "channels": int(sampler.params.in_channels), "gamma": float(schedule.gamma),
              "alphas": [float(st.alpha) for st in schedule.stages],
              "betas": [float(st.beta) for st in schedule.stages], "storage": storage,
              "batch": int(batch), "teacher": teacher, "devices": sampler.mesh.size,
              "hosts": jax.process_count()}
    return json.loads(json.dumps(record))  # as it reads back (lists, plain floats)


@dataclasses.dataclass
class PairsPlan:
    """What :func:`make_pairs` will do: the batches to draw and the files to drop first."""

    folder: str
    settings: dict[str, Any]
    batch: int
    todo: Any  # resumable.PendingBatches
    stale: list[str]
    damaged: int = 0

    @property
    def pending_images(self) -> int:
        from pixelflow_jax.generate import images_in_batches
        return images_in_batches(self.todo, self.settings["num"], self.batch)


def plan_pairs(folder: str, settings: dict[str, Any], *,
               stream: TextIO | None = None) -> PairsPlan:
    """Read ``folder`` (writing nothing) and plan the run; UserError for a folder holding
    pairs with other settings. Process 0 reads the folder and tells every host."""
    import jax

    from pixelflow_jax.resumable import PendingBatches, _broadcast

    stream = stream or sys.stderr
    folder = os.path.abspath(folder)
    num, G = settings["num"], settings["batch"]
    total = -(-num // G)
    record = read_record(folder) if os.path.isdir(folder) else None
    if record is not None:
        changed = [f"{k}: {record.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if k not in UNCOMPARED and record.get(k) != v]
        if changed:
            raise UserError(f"{folder} holds pairs with other settings ({'; '.join(changed)}); "
                            "use another --out, or the original settings to resume")
    verdict = np.zeros(2, np.int64)  # [part files without a record, damaged, complete...]
    stale: list[str] = []
    if jax.process_index() == 0:
        width = sum(stage_sizes(settings["resolutions"], settings["channels"]))
        parts, bad = _scan_parts(folder, num, width, _storage_dtype(settings["storage"]))
        if (parts or bad) and record is None:
            verdict[0] = len(parts) + len(bad)
        else:
            if bad:
                stream.write(f"redrawing the batches of {len(bad)} damaged part file(s) "
                             f"(first: {os.path.basename(bad[0])})\n")
            verdict[1] = len(bad)
            covered = np.zeros(total, np.int64)
            for p in parts:
                b = p.lo // G
                if p.hi <= (b + 1) * G:  # parts never straddle batches
                    covered[b] += p.hi - p.lo
            sizes = np.full(total, G)
            sizes[-1] = num - (total - 1) * G
            complete = np.flatnonzero(covered == sizes)
            done = set(complete.tolist())
            stale = bad + [p.path for p in parts if p.lo // G not in done]
            verdict = np.concatenate([verdict, complete])
    verdict = _broadcast(verdict)
    if verdict[0]:
        raise UserError(f"{folder} holds {int(verdict[0])} part file(s) but no {RECORD} saying "
                        "how they were drawn; use another --out, or delete them")
    return PairsPlan(folder, settings, G, PendingBatches(total, verdict[2:]), stale,
                     int(verdict[1]))


def _start_folder(plan: PairsPlan) -> None:
    """Create the folder, drop temporaries and the parts of unfinished batches (process
    0; nobody is writing yet), write ``pairs.json``; every host waits for it."""
    import jax
    if jax.process_index() == 0:
        parts_dir = os.path.join(plan.folder, PARTS)
        os.makedirs(parts_dir, exist_ok=True)
        with os.scandir(parts_dir) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY_PREFIX):
                    os.unlink(entry.path)
        for path in plan.stale:
            if os.path.exists(path):
                os.unlink(path)
        path = os.path.join(plan.folder, RECORD)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(plan.settings, f, indent=1)
            os.replace(tmp, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax: pair folder ready")


@dataclasses.dataclass
class PairsSummary:
    """What a run drew on this host: images drawn and written, failures (the first
    100 image numbers of each kind; counts exact), seconds, batches left."""

    drawn: int = 0
    written: int = 0
    nonfinite: list[int] = dataclasses.field(default_factory=list)
    unfinished: list[int] = dataclasses.field(default_factory=list)
    num_nonfinite: int = 0
    num_unfinished: int = 0
    seconds: float = 0.0
    batches_left: int = 0


def make_pairs(sampler: Sampler, plan: PairsPlan, *, max_batches: int | None = None,
               stream: TextIO | None = None, quiet: bool = False) -> PairsSummary:
    """Draw the pending batches of ``plan`` with ``sampler`` (built with ``trace=True``),
    writing each host's rows of each batch as the batch finishes.

    The run's settings come from ``plan.settings`` (:func:`pair_settings`). Images whose
    solve did not finish or that hold a non-finite value leave their batch unwritten
    (reported in the summary). ``max_batches``: stop after that many batches (the same
    call continues). Progress: a line per batch with images/s and time left.
    """
    import jax

    from pixelflow_jax import distributed
    from pixelflow_jax.generate import host_rows, images_in_batches

    if not getattr(sampler, "trace", False):
        raise ValueError("make_pairs needs a Sampler(..., trace=True)")
    stream = stream or sys.stderr
    say = (lambda text: None) if quiet or jax.process_index() != 0 else \
        (lambda text: (stream.write(text + "\n"), stream.flush()))
    s, teacher = plan.settings, plan.settings["teacher"]
    num, G, storage = s["num"], plan.batch, s["storage"]
    labels_all = pair_labels(num, s["num_classes"])
    _start_folder(plan)
    todo = list(plan.todo)
    if len(todo) < plan.todo.total:
        say(f"resuming: {plan.todo.total - len(todo)} of {plan.todo.total} batches are "
            f"complete, {len(todo)} to draw")
    if max_batches is not None:
        todo = todo[:max_batches]
    total = images_in_batches(todo, num, G)
    kwargs = dict(steps=teacher["steps"], guidance=teacher["guidance"], shift=teacher["shift"])
    summary, start = PairsSummary(), time.perf_counter()

    def launch(b):
        lo, hi = b * G, min((b + 1) * G, num)
        rows, real = host_rows(lo, hi, G)
        out = sampler.sample(teacher["seed"], rows, labels=labels_all[rows], **kwargs)
        return b, lo, hi, rows, real, out

    def finish(job):
        b, lo, hi, rows, real, out = job
        ends, finished = distributed.to_local((out.trace.ends, out.stats.finished))
        flat = np.concatenate([np.asarray(e, np.float32).reshape(len(rows), -1)
                               for e in ends], axis=1)[:real]
        finite = np.isfinite(flat).all(axis=1)
        done = np.asarray(finished, bool)[:real]
        for i in rows[:real][~finite].tolist():
            summary.num_nonfinite += 1
            if len(summary.nonfinite) < 100:
                summary.nonfinite.append(i)
        for i in rows[:real][finite & ~done].tolist():
            summary.num_unfinished += 1
            if len(summary.unfinished) < 100:
                summary.unfinished.append(i)
        summary.drawn += real
        if real and finite.all() and done.all():
            write_part(plan.folder, int(rows[0]), num, _encode(flat, storage))
            summary.written += real
        return hi - lo

    # One batch ahead: the devices draw batch k+1 while the host writes batch k.
    done_images, pending = 0, None
    for count, b in enumerate(todo):
        job = launch(b)
        if pending is not None:
            done_images += finish(pending)
        pending = job
        if count:
            _progress(say, count, len(todo), done_images, total, start)
    if pending is not None:
        done_images += finish(pending)
        _progress(say, len(todo), len(todo), done_images, total, start)
    summary.seconds = time.perf_counter() - start
    summary.batches_left = len(plan.todo) - len(todo)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax: pairs written")
    return summary


def _progress(say, count: int, batches: int, done: int, total: int, start: float) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    left = (total - done) / rate if rate else float("inf")
    say(f"batch {count}/{batches}: {done}/{total} images, {rate:.2f} images/s, "
        f"{left:.0f} s left")
