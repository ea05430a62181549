"""Scoring a sample set against a reference batch: the library behind ``evaluate.py``.

``run_evaluation(EvaluateRequest(samples, reference, inception))`` reads both image
sets (ADM ``.npz`` files, ``arr_0`` uint8 [N, H, W, 3], or folders of PNGs as
``sample.py`` writes them), runs the FID Inception (:mod:`pixelflow_jax.inception`)
over them in batches sharded over every device of every host, and scores them with
:mod:`pixelflow_jax.adm_metrics`: FID, sFID, Inception Score, precision, recall
(DESIGN §12).

- A reference ``.npz`` may hold ADM's whole-dataset statistics ``mu``, ``sigma``,
  ``mu_s``, ``sigma_s``; they are read, never recomputed. Without them they are
  computed from ``arr_0``. Precision and recall always use ``arr_0``'s features.
- Each set's features and statistics are cached beside it (``PATH.adm-stats.npz``),
  keyed by its files' names, sizes and modification times, the weights file's SHA-256
  and the compute dtype; a second evaluation against another reference reads the cache
  and does not run the network.
- Problems with the inputs are one-line :class:`UserError` s raised before the
  network runs.

jax and flax are imported inside the functions, so importing this module is fast.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import struct
import sys
import time
import zipfile
from typing import Any, Callable, NamedTuple, TextIO

import numpy as np

from pixelflow_jax import adm_metrics
from pixelflow_jax.errors import UserError

POOL_FEATURES = 2048      # pool_3 (FID, precision, recall)
SPATIAL_FEATURES = 2023   # mixed_6/conv, 7 channels x 17 x 17 (sFID)
MIN_IMAGES = adm_metrics.NEIGHBOURHOOD + 1  # precision/recall: each image's 3rd neighbour
CACHE_SUFFIX = ".adm-stats.npz"
CACHE_VERSION = 1
DEFAULT_PER_DEVICE = 64   # images per device and batch (ADM's batch is 64)
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
LABELS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
          "precision": "Precision", "recall": "Recall"}


# --------------------------------------------------------------------------- image sets


def _npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{where} is not a readable .npy array ({e})") from None
    raise UserError(f"{where} uses .npy format {version[0]}.{version[1]}; save it with "
                    "numpy.savez (format 1.0 or 2.0)")


class ImageSet:
    """uint8 images [N, H, W, 3] read by rows; ``fingerprint`` names the files' state."""

    path: str
    role: str
    num_images: int
    height: int
    width: int

    def read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> list:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.role} {self.path}"


class NpzImages(ImageSet):
    """``arr_0`` of an ``.npz``: memory-mapped when stored uncompressed (as ``sample.py``
    and numpy.savez write it), else streamed in order."""

    def __init__(self, path: str, role: str):
        self.path, self.role = path, role
        where = f"{role} {path}"
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"{where} is not a readable .npz file ({e})") from None
        with zf:
            names = zf.namelist()
            if "arr_0.npy" not in names:
                keys = ", ".join(n.removesuffix(".npy") for n in names) or "none"
                raise UserError(f"{where} has no arr_0 (the images); its keys: {keys}")
            info = zf.getinfo("arr_0.npy")
            try:
                with zf.open(info) as member:
                    shape, fortran, dtype = _npy_header(member, f"{where} arr_0")
                    header_size = member.tell()
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise UserError(f"{where} is damaged or truncated ({e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{where}: arr_0 must be uint8 images [N, H, W, 3] (NHWC, RGB), "
                            f"got {dtype} {list(shape)}")
        if fortran:
            raise UserError(f"{where}: arr_0 is stored in Fortran order; save it in C order")
        self.num_images, self.height, self.width = shape[0], shape[1], shape[2]
        self._shape, self._info = tuple(shape), info
        self._memmap = None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise UserError(f"{where} is damaged (bad zip entry for arr_0)")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_size
            need = offset + int(np.prod(shape))
            if os.path.getsize(path) < need:
                raise UserError(f"{where} is truncated: arr_0 needs {need:,} bytes, the file "
                                f"has {os.path.getsize(path):,}")
            self._memmap = np.memmap(path, np.uint8, "r", offset=offset, shape=self._shape)
        self._stream = None
        self._next = 0

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self._memmap is not None:
            return np.ascontiguousarray(self._memmap[rows])
        # A compressed member streams: rows must not go backwards (they never do here).
        if self._stream is None or rows[0] < self._next:
            self._open_stream()
        per = self.height * self.width * 3
        out = np.empty((len(rows), self.height, self.width, 3), np.uint8)
        last = None
        for i, row in enumerate(rows):
            if row == last:
                out[i] = out[i - 1]
                continue
            skip = row - self._next
            while skip > 0:  # another host's rows
                take = min(skip, 256)
                self._exactly(take * per)
                skip -= take
            out[i] = np.frombuffer(self._exactly(per), np.uint8).reshape(out.shape[1:])
            self._next, last = row + 1, row
        return out

    def _open_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        zf = zipfile.ZipFile(self.path)
        self._stream = zf.open(self._info)
        _npy_header(self._stream, self.describe())
        self._next = 0

    def _exactly(self, size: int) -> bytes:
        try:
            data = self._stream.read(size)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"{self.describe()} is damaged ({e})") from None
        if len(data) != size:
            raise UserError(f"{self.describe()} is truncated")
        return data

    def fingerprint(self) -> list:
        st = os.stat(self.path)
        return [[os.path.basename(self.path), st.st_size, st.st_mtime_ns]]


class PngFolder(ImageSet):
    """The PNGs of a folder (hidden files skipped), in image-number order when every name
    is one of ``sample.py``'s (``INDEX.png``, ``INDEX_classK.png``), else by name;
    read as RGB (as ``sample.py``'s ``.npz``), decoded in threads."""

    def __init__(self, path: str, role: str):
        from pixelflow_jax.resumable import parse_png_name

        self.path, self.role = path, role
        with os.scandir(path) as entries:
            files = [e for e in entries if e.name.lower().endswith(".png")
                     and not e.name.startswith(".") and e.is_file()]
        if not files:
            raise UserError(f"{role} {path} holds no PNG files")
        parsed = [parse_png_name(e.name) for e in files]
        if all(parsed):
            numbers = [p[0] for p in parsed]
            if len(set(numbers)) != len(numbers):
                raise UserError(f"{role} {path} holds two PNGs with the same image number")
            files = [f for _, f in sorted(zip(numbers, files), key=lambda t: t[0])]
        else:
            files.sort(key=lambda e: e.name)
        self._files = [e.path for e in files]
        self._stats = [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files]
        first = self._load(0)
        self.num_images, (self.height, self.width) = len(files), first.shape[:2]
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(self._files[i]) as image:
                a = np.asarray(image.convert("RGB"))
        except Exception as e:  # PIL raises many types for damaged files
            raise UserError(f"{self._files[i]} is not a readable PNG ({type(e).__name__}: "
                            f"{e})") from None
        if hasattr(self, "height") and a.shape[:2] != (self.height, self.width):
            raise UserError(f"{self._files[i]} is {a.shape[1]}x{a.shape[0]} px, unlike the "
                            f"other images of {self.path} ({self.width}x{self.height})")
        return a

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.stack(list(self._pool.map(self._load, [int(r) for r in rows])))

    def fingerprint(self) -> list:
        return self._stats


def open_images(path: str, role: str) -> ImageSet:
    """``path`` as an image set (an ``.npz`` with ``arr_0``, or a folder of PNGs); ``role``
    names it in messages (``SAMPLES``, ``REF``)."""
    if os.path.isdir(path):
        images = PngFolder(path, role)
    elif os.path.isfile(path):
        images = NpzImages(path, role)
    else:
        raise UserError(f"{role} {path}: no such file or folder")
    if images.num_images < MIN_IMAGES:
        raise UserError(f"{role} {path} holds {images.num_images} image(s); the ADM metrics "
                        f"need at least {MIN_IMAGES} (precision and recall use each image's "
                        f"{adm_metrics.NEIGHBOURHOOD} nearest neighbours)")
    return images


def read_reference_statistics(path: str, feature_sizes: tuple[int, int] = (
        POOL_FEATURES, SPATIAL_FEATURES)) -> tuple[adm_metrics.Statistics,
                                                   adm_metrics.Statistics] | None:
    """ADM's whole-dataset statistics of a reference ``.npz`` ((pool, spatial)), or None
    when it holds none of ``mu``, ``sigma``, ``mu_s``, ``sigma_s``; UserError when it holds
    only some of them, or any of the wrong shape (``feature_sizes``: the network's pool
    and spatial widths)."""
    if os.path.isdir(path):
        return None
    p, s = feature_sizes
    shapes = {"mu": (p,), "sigma": (p, p), "mu_s": (s,), "sigma_s": (s, s)}
    with np.load(path) as npz:
        present = [k for k in shapes if k in npz.files]
        if not present:
            return None
        missing = [k for k in shapes if k not in npz.files]
        if missing:
            raise UserError(f"REF {path} has {', '.join(present)} but not "
                            f"{', '.join(missing)}: ADM reference statistics are all four of "
                            "mu, sigma, mu_s, sigma_s (or none, to compute them from arr_0)")
        values = {}
        for key, shape in shapes.items():
            try:
                a = npz[key]
            except Exception as e:  # a damaged member
                raise UserError(f"REF {path}: {key} is unreadable ({e})") from None
            if a.shape != shape or not np.issubdtype(a.dtype, np.floating):
                raise UserError(f"REF {path}: {key} must be a float array of shape "
                                f"{list(shape)}, got {a.dtype} {list(a.shape)}")
            if not np.isfinite(a).all():
                raise UserError(f"REF {path}: {key} holds NaN or inf values")
            values[key] = a.astype(np.float64)
    return (adm_metrics.Statistics(values["mu"], values["sigma"]),
            adm_metrics.Statistics(values["mu_s"], values["sigma_s"]))


# --------------------------------------------------------------------------- features


class Features(NamedTuple):
    """The network's outputs for a whole set, float32 (host)."""

    pool: np.ndarray      # [N, 2048]
    spatial: np.ndarray   # [N, 2023]
    logits: np.ndarray    # [N, 1008]


class Progress:
    """'SAMPLES: 12,800/50,000 images, 412.3 images/s, 115 s left' on stderr: redrawn in
    place on a terminal, else a line per tenth of the work."""

    def __init__(self, total: int, label: str, stream: TextIO | None):
        self.total, self.label, self.stream = total, label, stream
        self.interactive = stream is not None and getattr(stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self._tenth = 0

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else 0.0
        final = done >= self.total
        text = (f"{self.label}: {done:,}/{self.total:,} images, {rate:.1f} images/s, "
                + (f"done in {elapsed:.1f} s" if final else f"{left:.0f} s left"))
        if self.interactive:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final or 10 * done // self.total > self._tenth:
            self._tenth = 10 * done // self.total
            self.stream.write(text + "\n")
        self.stream.flush()


class Extractor:
    """A feature network run in batches over every device of every host.

    ``model``: an NNX module mapping uint8 images [B, H, W, 3] to outputs with
    ``pool``, ``spatial`` and ``logits`` (:class:`pixelflow_jax.inception.FIDInception`).
    Parameters are replicated over the ``data`` mesh, each global batch is split along it
    (each host feeding its own rows), and the outputs are gathered on every host. An
    image's features depend only on that image: the batch is padded to a fixed shape
    (one compilation) and the padding discarded.
    """

    def __init__(self, model, mesh=None):
        import jax
        from flax import nnx

        from pixelflow_jax import distributed

        self.mesh = mesh if mesh is not None else distributed.data_mesh()
        graphdef, state = nnx.split(model)
        self._state = distributed.replicate(state, self.mesh)
        out = distributed.replicated(self.mesh)

        def run(state, images):
            y = nnx.merge(graphdef, state)(images)
            return y.pool, y.spatial, y.logits

        self._run = jax.jit(run, out_shardings=(out, out, out))

    def global_batch(self, requested: int | None, total: int) -> int:
        """``requested`` (default 64 per device), at most ``total`` rounded up, as a
        multiple of the device count."""
        from pixelflow_jax.generate import global_batch_size
        devices = self.mesh.size
        return global_batch_size(requested or DEFAULT_PER_DEVICE * devices, devices, total)

    def __call__(self, images: ImageSet, batch: int | None = None,
                 stream: TextIO | None = None, *, batch_for: int | None = None) -> Features:
        """Every image's features, in order (on every host). The batch is sized for
        ``batch_for`` images (default: this set's), so that two sets of one resolution can
        share one compiled program."""
        from pixelflow_jax import distributed
        from pixelflow_jax.generate import host_rows

        n = images.num_images
        G = self.global_batch(batch, max(n, batch_for or 0))
        num_batches = -(-n // G)
        progress = Progress(n, images.role, stream)
        outputs: list[np.ndarray] = []

        def read(b: int) -> tuple[int, np.ndarray]:
            lo, hi = b * G, min((b + 1) * G, n)
            rows, _ = host_rows(lo, hi, G)
            return b, images.read(rows)

        def collect(b: int, result) -> None:
            lo, hi = b * G, min((b + 1) * G, n)
            parts = [np.asarray(a)[:hi - lo] for a in result]
            outputs.append(parts)
            progress.update(hi)

        # Read (decode) batch b+1 while the devices run batch b.
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            future = reader.submit(read, 0)
            pending = None
            for b in range(num_batches):
                _, x = future.result()
                if b + 1 < num_batches:
                    future = reader.submit(read, b + 1)
                result = self._run(self._state, distributed.to_global(x, self.mesh))
                if pending is not None:
                    collect(*pending)
                pending = (b, result)
            if pending is not None:
                collect(*pending)
        return Features(*(np.concatenate([o[i] for o in outputs]).astype(np.float32)
                          for i in range(3)))


# --------------------------------------------------------------------------- statistics cache


@dataclasses.dataclass
class SetStatistics:
    """What the metrics need of one image set."""

    pool: np.ndarray                        # [N, 2048] float32, for precision/recall
    fid: adm_metrics.Statistics             # of pool
    sfid: adm_metrics.Statistics            # of spatial
    inception_score: float | None = None    # samples only


def cache_path(path: str) -> str:
    """Where a set's statistics are cached: ``PATH.adm-stats.npz`` beside it."""
    return os.path.abspath(path).rstrip("/" + os.sep) + CACHE_SUFFIX


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(images: ImageSet, weights_digest: str, dtype: str, split_size: int) -> str:
    """The state the cached numbers depend on, as a JSON string."""
    files = hashlib.sha256(json.dumps(images.fingerprint()).encode()).hexdigest()
    return json.dumps(dict(version=CACHE_VERSION, files=files, images=images.num_images,
                           size=[images.height, images.width], weights=weights_digest,
                           dtype=dtype, is_split=split_size), sort_keys=True)


def load_cache(path: str, key: str) -> SetStatistics | None:
    """The cached statistics at ``path`` if written under ``key``, else None."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            score = float(z["inception_score"])
            return SetStatistics(
                z["pool"], adm_metrics.Statistics(z["mu"], z["sigma"]),
                adm_metrics.Statistics(z["mu_s"], z["sigma_s"]),
                None if np.isnan(score) else score)
    except Exception:  # missing, damaged or from another version: recompute
        return None


def save_cache(path: str, key: str, stats: SetStatistics) -> bool:
    """Write the cache (atomically); False when the folder is not writable."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.asarray(key), pool=stats.pool, mu=stats.fid.mu,
                     sigma=stats.fid.sigma, mu_s=stats.sfid.mu, sigma_s=stats.sfid.sigma,
                     inception_score=np.float64(np.nan if stats.inception_score is None
                                                else stats.inception_score))
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        return False


def _agree(value: bool) -> bool:
    """Process 0's ``value`` on every host (cache hits must agree, or collectives hang)."""
    import jax
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvaluateRequest:
    """What ``evaluate.py``'s flags say (see its --help)."""

    samples: str
    reference: str
    inception: str
    json: str | None = None
    batch: int | None = None
    dtype: str = "float32"
    cache: bool = True
    any_resolution: bool = False
    quiet: bool = False
    # Library-only knobs (tests use small networks and sets):
    split_size: int = adm_metrics.IS_SPLIT_SIZE       # Inception Score split
    row_batch: int = adm_metrics.BATCH_SIZE            # precision/recall distance blocks
    feature_sizes: tuple[int, int] = (POOL_FEATURES, SPATIAL_FEATURES)  # reference stats


@dataclasses.dataclass(frozen=True)
class Scores:
    """The ADM suite's five numbers."""

    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("fid", "sfid", "inception_score", "precision",
                                               "recall")}

    def table(self) -> str:
        """A two-column table in ADM's order."""
        width = max(len(v) for v in LABELS.values())
        return "\n".join(f"{LABELS[k]:<{width}}  {getattr(self, k):.6g}" for k in METRICS)


@dataclasses.dataclass
class Inputs:
    """Checked inputs: opened image sets and the reference's own statistics."""

    samples: ImageSet
    reference: ImageSet
    reference_stats: tuple[adm_metrics.Statistics, adm_metrics.Statistics] | None


def check_inputs(request: EvaluateRequest) -> Inputs:
    """Open and check both sets, the reference statistics and the weights path, before any
    work; raises UserError."""
    check_weights_file(request.inception)
    samples = open_images(request.samples, "SAMPLES")
    reference = open_images(request.reference, "REF")
    stats = read_reference_statistics(request.reference, request.feature_sizes)
    a, b = (samples.height, samples.width), (reference.height, reference.width)
    if a != b and not request.any_resolution:
        raise UserError(
            f"SAMPLES are {a[1]}x{a[0]} px but REF {b[1]}x{b[0]} px: the network resizes both "
            "to 299, so the scores would compare images of different sharpness, unlike any "
            "published number; use the reference batch of your resolution, or pass "
            "--any-resolution to score them anyway")
    return Inputs(samples, reference, stats)


def check_weights_file(path: str) -> None:
    """The weights file exists and starts like a .pb or a .pth (its contents are read, and
    checked, only when some set is not cached); UserError naming it."""
    from pixelflow_jax.inception_weights import file_kind
    if not os.path.exists(path):
        raise UserError(f"--inception {path}: no such file")
    try:
        file_kind(path)
    except UserError as e:
        raise UserError(f"--inception {e}") from None


def _say(request: EvaluateRequest, text: str) -> None:
    import jax
    if not request.quiet and jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def set_statistics(images: ImageSet, extractor: Callable[[], Extractor],
                   request: EvaluateRequest, weights_digest: str, *,
                   inception_score: bool, batch_for: int | None = None) -> SetStatistics:
    """A set's statistics from its cache, or from the network (then cached)."""
    import jax

    key = cache_key(images, weights_digest, request.dtype, request.split_size)
    path = cache_path(images.path)
    cached = None
    if request.cache and jax.process_index() == 0:
        cached = load_cache(path, key)
        if cached is not None and inception_score and cached.inception_score is None:
            cached = None
    if _agree(cached is not None):
        if jax.process_index() == 0:
            _say(request, f"{images.role}: read the cached statistics {path}")
        return cached  # None on other hosts: only process 0 scores
    stream = None if request.quiet or jax.process_index() != 0 else sys.stderr
    features = extractor()(images, request.batch, stream, batch_for=batch_for)
    if jax.process_index() != 0:
        return None
    stats = SetStatistics(
        features.pool, adm_metrics.statistics(features.pool),
        adm_metrics.statistics(features.spatial),
        adm_metrics.inception_score(features.logits, request.split_size)
        if inception_score else None)
    if request.cache and not save_cache(path, key, stats):
        _say(request, f"{images.role}: could not write the cache {path} (not writable); "
                      "continuing without it")
    return stats


def load_network(request: EvaluateRequest):
    """The FID Inception with the request's weights and dtype."""
    import jax.numpy as jnp

    from pixelflow_jax.inception_weights import load_inception
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[request.dtype]
    return load_inception(request.inception, dtype=dtype)


def evaluate(request: EvaluateRequest, inputs: Inputs | None = None, *,
             network: Callable[[EvaluateRequest], Any] | None = None) -> Scores | None:
    """Score ``request.samples`` against ``request.reference``; the scores on process 0,
    None on other hosts. ``network(request)`` builds the feature network (default
    :func:`load_network`; built only if some set is not cached)."""
    import warnings

    import jax

    network = network or load_network

    inputs = inputs or check_inputs(request)
    weights_digest = file_sha256(request.inception) if os.path.isfile(request.inception) \
        else request.inception
    built: list[Extractor] = []

    def extractor() -> Extractor:
        if not built:
            start = time.perf_counter()
            built.append(Extractor(network(request)))
            _say(request, f"loaded the Inception network {request.inception} "
                          f"({request.dtype}) in {time.perf_counter() - start:.1f} s")
        return built[0]

    both = max(inputs.samples.num_images, inputs.reference.num_images)  # one program
    s = set_statistics(inputs.samples, extractor, request, weights_digest,
                       inception_score=True, batch_for=both)
    r = set_statistics(inputs.reference, extractor, request, weights_digest,
                       inception_score=False, batch_for=both)
    if jax.process_index() != 0:
        return None
    ref_fid, ref_sfid = inputs.reference_stats or (r.fid, r.sfid)
    if inputs.reference_stats is not None:
        _say(request, "REF: FID and sFID use the file's own statistics (mu, sigma, mu_s, "
                      "sigma_s)")
    if inputs.samples.num_images < request.split_size:
        _say(request, f"note: {inputs.samples.num_images} samples are fewer than one "
                      f"Inception Score split ({request.split_size}): the score is over one "
                      "split of all of them (ADM's rule)")
    values = {}
    for name, a, b in (("fid", s.fid, ref_fid), ("sfid", s.sfid, ref_sfid)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", adm_metrics.SingularProductWarning)
            try:
                values[name] = adm_metrics.frechet_distance(a, b)
            except adm_metrics.FIDError as e:
                raise UserError(f"{LABELS[name]}: {e}") from None
        for w in caught:
            if issubclass(w.category, adm_metrics.SingularProductWarning):
                _say(request, f"note: {LABELS[name]}: {w.message}")
    _say(request, "computing precision and recall...")
    pr = adm_metrics.precision_recall(r.pool, s.pool, row_batch=request.row_batch,
                                      col_batch=request.row_batch)
    return Scores(inception_score=s.inception_score, fid=values["fid"], sfid=values["sfid"],
                  precision=pr.precision, recall=pr.recall)


def write_json(path: str, scores: Scores) -> None:
    """``{fid, sfid, inception_score, precision, recall}``, written atomically."""
    from pixelflow_jax import cli

    cli.make_parents(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with cli.writing(path):
        with open(tmp, "w") as f:
            json.dump(scores.as_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)


def run_evaluation(request: EvaluateRequest, *,
                   network: Callable[[EvaluateRequest], Any] | None = None,
                   out: TextIO | None = None) -> int:
    """What ``evaluate.py`` does: check, score, print the table (stdout, process 0) and
    write ``--json``; returns the exit code."""
    import jax

    from pixelflow_jax import cli, runtime

    if request.json is not None:
        cli.check_output(request.json, "--json", "file")
    inputs = check_inputs(request)
    runtime.enable_compilation_cache()
    scores = evaluate(request, inputs, network=network)
    if jax.process_index() == 0:
        out = out or sys.stdout
        n, m = inputs.samples.num_images, inputs.reference.num_images
        print(f"{n:,} samples ({inputs.samples.path}) against {m:,} reference images "
              f"({inputs.reference.path})", file=out)
        print(scores.table(), file=out, flush=True)
        if request.json is not None:
            write_json(request.json, scores)
    return cli.EXIT_OK


# --------------------------------------------------------------------------- sample.py --evaluate


def check_reference(reference: str, inception: str | None, *, resolution: int | None = None,
                    num_samples: int | None = None) -> ImageSet:
    """``sample.py --evaluate REF --inception WEIGHTS``'s checks, before any sampling: the
    reference batch is readable (arr_0, statistics), the weights file exists, and (when
    given) the samples' resolution matches and there are enough of them. UserError."""
    if inception is None:
        raise UserError("--evaluate needs --inception WEIGHTS (the FID Inception: "
                        "classify_image_graph_def.pb or one of the two .pth files)")
    check_weights_file(inception)
    images = open_images(reference, "--evaluate")
    read_reference_statistics(reference)
    if num_samples is not None and num_samples < MIN_IMAGES:
        raise UserError(f"--evaluate needs at least {MIN_IMAGES} samples (precision and "
                        f"recall use each image's {adm_metrics.NEIGHBOURHOOD} nearest "
                        f"neighbours); --fid-samples is {num_samples}")
    if resolution is not None and (images.height, images.width) != (resolution, resolution):
        raise UserError(f"--evaluate {reference} holds {images.width}x{images.height} px "
                        f"images but the samples will be {resolution}x{resolution} px; use "
                        "the reference batch of that resolution (or score later with "
                        "evaluate.py --any-resolution)")
    return images


def score_fid_run(npz: str, reference: str, inception: str, *, quiet: bool = False,
                  out: TextIO | None = None) -> Scores | None:
    """Score a finished ``sample.py --fid-samples`` run's ``.npz`` against ``reference``
    (every host takes part; process 0 prints the table and returns the scores)."""
    import jax

    if jax.process_count() > 1:  # process 0 wrote the .npz; every host reads it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pixelflow_jax: fid npz written")
    request = EvaluateRequest(samples=npz, reference=reference, inception=inception,
                              quiet=quiet)
    scores = evaluate(request, check_inputs(request))
    if scores is not None:
        print(scores.table(), file=out or sys.stdout, flush=True)
    return scores
