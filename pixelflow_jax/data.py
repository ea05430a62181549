"""Training data: image sources, the official augmentations and a resumable loader.

Two random-access sources give ``(encoded image bytes, label)`` per index: an
ImageNet-style folder (:class:`ImageFolderSource`) or a prepared TFDS dataset in
ArrayRecord format (:class:`TfdsSource`, no TensorFlow needed to read it).

:class:`Loader` turns a source into an infinite stream of uint8 batches. The
stream is a pure function of ``(seed, data)``: the order of epoch ``e`` is
``default_rng([seed, e]).permutation(N)``, host ``p`` of ``P`` reads
``perm[p::P]``, and the crop/flip of index ``i`` in epoch ``e`` comes from
``default_rng([seed, e, i, 1])``. Its :meth:`Loader.state` is three integers,
so training resumes on exactly the batch that would have come next.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pixelflow_jax.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Corrupt images are logged by name this many times per loader, then only counted.
_MAX_CORRUPT_WARNINGS = 10


class Source(Protocol):
    """A random-access dataset of encoded images and integer labels."""

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def get(self, i: int) -> tuple[bytes, int]: ...


# --------------------------------------------------------------------------- sources


class ImageFolderSource:
    """``root/<class>/**/<image>``, labelled like torchvision's ``ImageFolder``.

    Classes are the sorted names of the sub-folders of ``root``; an image's label
    is its class's index in that list. Images are the files with an extension in
    :data:`IMAGE_EXTENSIONS` (any case) anywhere below a class folder, ordered by
    (class, path relative to the class folder with ``/`` separators).
    """

    def __init__(self, root: str):
        self.root = root
        if not os.path.exists(root):
            raise UserError(f"image folder {root} does not exist")
        if not os.path.isdir(root):
            raise UserError(f"image folder {root} is not a folder")
        with os.scandir(root) as entries:
            self.class_names: list[str] = sorted(e.name for e in entries if e.is_dir())
        if not self.class_names:
            raise UserError(
                f"image folder {root} has no class sub-folders (expected root/CLASS/IMAGE)")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(root, name)
            found = []
            for folder, _, files in os.walk(class_dir, followlinks=True):
                rel_folder = os.path.relpath(folder, class_dir)
                for f in files:
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        rel = f if rel_folder == "." else os.path.join(rel_folder, f)
                        found.append(rel.replace(os.sep, "/"))
            if not found:
                # Kept as a class so the other labels match torchvision's numbering.
                log.warning("class folder %s has no images", class_dir)
            for rel in sorted(found):
                paths.append(os.path.join(class_dir, *rel.split("/")))
                labels.append(label)
        if not paths:
            raise UserError(f"image folder {root} has no images ({' '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> tuple[bytes, int]:
        """The file's raw bytes and its label."""
        with open(self.paths[i], "rb") as f:
            return f.read(), int(self.labels[i])

    def describe(self, i: int) -> str:
        return self.paths[i]


class TfdsSource:
    """A prepared TFDS image-classification dataset, read without TensorFlow.

    ``get(i)`` returns the still-encoded ``image`` feature and the ``label``.
    The dataset must have been built once in a random-access format
    (``tfds build NAME --file_format=array_record``); nothing is downloaded or
    prepared here, because preparing needs TensorFlow.
    """

    def __init__(self, name: str, data_dir: str | None, split: str = "train"):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise UserError("reading TFDS datasets needs: pip install tensorflow-datasets "
                            "array_record") from None
        self.name, self.data_dir, self.split = name, data_dir, split
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            raise UserError(f"unknown TFDS dataset {name!r}") from None
        features = builder.info.features
        for key in ("image", "label"):
            if key not in features:
                raise UserError(f"TFDS dataset {name!r} has no {key!r} feature")
        try:
            # download=False: preparing would need TensorFlow (and, for ImageNet,
            # files only the user can download), so a missing dataset is an error.
            self._records = tfds.data_source(
                name, split=split, data_dir=data_dir, download=False,
                decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:
            raise self._open_error(tfds, builder, e) from e
        label = features["label"]
        self.num_classes = int(label.num_classes)
        self.class_names: list[str] = list(label.names)

    def _open_error(self, tfds: Any, builder: Any, error: Exception) -> Exception:
        """The UserError that explains why the data source did not open, or ``error``."""
        root = os.path.expanduser(self.data_dir or tfds.core.constants.DATA_DIR)
        if not builder.is_prepared():
            manual = ""
            if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
                manual = (f" after putting its manually downloaded files in "
                          f"{os.path.join(root, 'downloads', 'manual')}")
            return UserError(
                f"TFDS dataset {self.name!r} is not prepared in {root}; prepare it once (this "
                f"needs TensorFlow, training does not){manual}: tfds build {self.name} "
                f"--file_format=array_record --data_dir {root}")
        fmt = builder.info.file_format
        if fmt not in tfds.core.file_adapters.FileFormat.with_random_access():
            return UserError(
                f"TFDS dataset {self.name!r} in {root} is stored as {fmt.value}, which has no "
                f"random access; rebuild it: tfds build {self.name} --file_format=array_record "
                f"--data_dir {root}")
        splits = sorted(builder.info.splits)
        if self.split.split("[")[0] not in splits:
            return UserError(f"TFDS dataset {self.name!r} has no split {self.split!r} "
                             f"(available: {', '.join(splits)})")
        return error

    def __len__(self) -> int:
        return len(self._records)

    def get(self, i: int) -> tuple[bytes, int]:
        """The encoded image bytes and the label of record ``i``."""
        record = self._records[i]
        return bytes(record["image"]), int(record["label"])

    def describe(self, i: int) -> str:
        return f"{self.name}[{self.split}] record {i}"


def open_source(kind: str, root: str | None, tfds_name: str, tfds_data_dir: str | None,
                split: str) -> ImageFolderSource | TfdsSource:
    """``kind`` "imagefolder" reads ``root`` (``split`` unused); "tfds" reads
    ``tfds_name``/``split`` from ``tfds_data_dir``."""
    if kind == "imagefolder":
        if not root:
            raise UserError("an image folder dataset needs a root folder (data.root)")
        return ImageFolderSource(root)
    if kind == "tfds":
        return TfdsSource(tfds_name, tfds_data_dir, split)
    raise UserError(f"unknown dataset kind {kind!r}; expected 'imagefolder' or 'tfds'")


# --------------------------------------------------------------------------- augmentation


class CorruptImageError(Exception):
    """Bytes that PIL cannot decode into an image."""


def decode_rgb(raw: bytes) -> Image.Image:
    """Decode fully (so truncation is caught here) and convert to RGB.

    Raises :class:`CorruptImageError` for anything PIL cannot read.
    """
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad data
        raise CorruptImageError(f"{type(e).__name__}: {e}") from e


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize with LANCZOS so the short side is ``size`` and the long side is
    ``int(size * long / short)``, as torchvision's ``Resize(size)``."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, resample=Image.LANCZOS)  # same size: PIL returns a copy


def _flip(arr: np.ndarray, rng: np.random.Generator, hflip: bool = True) -> np.ndarray:
    # Drawn after the crop offsets, as torchvision's RandomHorizontalFlip follows RandomCrop.
    # hflip=False (e.g. digits, text) draws nothing, so the crop randomness is unchanged.
    return arr[:, ::-1] if hflip and rng.random() < 0.5 else arr


def random_resized_crop(img: Image.Image, resolution: int, expand_ratio: float,
                        rng: np.random.Generator, hflip: bool = True) -> np.ndarray:
    """The official training augmentation, as uint8 ``[R, R, 3]``.

    Resize the short side to ``round(R * expand_ratio)`` (:func:`resize_short_side`),
    crop ``R x R`` at uniform integer offsets, flip horizontally with probability
    1/2 (unless ``hflip`` is False). All randomness comes from ``rng`` (top, then
    left, then flip).
    """
    if expand_ratio < 1:
        raise UserError(f"expand_ratio must be >= 1 for a random crop, got {expand_ratio}")
    img = resize_short_side(img, round(resolution * expand_ratio))
    w, h = img.size
    top = int(rng.integers(0, h - resolution + 1))
    left = int(rng.integers(0, w - resolution + 1))
    arr = np.asarray(img.crop((left, top, left + resolution, top + resolution)))
    return np.array(_flip(arr, rng, hflip))  # a writable, contiguous copy


def center_crop(img: Image.Image, resolution: int, rng: np.random.Generator,
                hflip: bool = True) -> np.ndarray:
    """ADM/DiT's ``center_crop_arr`` then a horizontal flip (probability 1/2 if ``hflip``),
    uint8 ``[R, R, 3]``.

    Halve with BOX while the short side is >= 2R, scale so the short side is R
    (each side ``round(x * scale)``, BICUBIC), crop the centre.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    arr = arr[top:top + resolution, left:left + resolution]
    return np.array(_flip(arr, rng, hflip))


def augment(raw: bytes, resolution: int, expand_ratio: float, center_crop_: bool,
            rng: np.random.Generator, hflip: bool = True) -> np.ndarray:
    """Decode ``raw`` and apply :func:`center_crop` or :func:`random_resized_crop`.

    Raises :class:`CorruptImageError` if ``raw`` does not decode.
    """
    img = decode_rgb(raw)
    if center_crop_:
        return center_crop(img, resolution, rng, hflip)
    return random_resized_crop(img, resolution, expand_ratio, rng, hflip)


# --------------------------------------------------------------------------- loader


class PrefetchingLoader:
    """What every prefetching loader shares: a thread pool (``_pool``, None when
    synchronous) filling ``_queue``; ``close`` and the context manager stop it."""

    _pool: concurrent.futures.ThreadPoolExecutor | None
    _queue: collections.deque
    _closed: bool

    def close(self) -> None:
        """Stop the worker threads; queued work is cancelled."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        # An unclosed loader must not keep reading into a queue nobody reads.
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Loader(PrefetchingLoader):
    """An infinite, deterministic, resumable stream of augmented batches for one host.

    Epoch ``e`` visits ``default_rng([seed, e]).permutation(len(source))[p::P]`` in
    order, ``batch_size`` images per batch; an epoch's last partial batch is
    dropped. A corrupt image is skipped (counted in :attr:`skipped`) and the batch
    takes the next one instead. ``state`` (from :meth:`state`) resumes after the
    last batch that ``next()`` returned.

    ``num_workers`` threads decode up to ``prefetch`` batches ahead of the caller
    (``num_workers=0``: decode in ``next()``); the output does not depend on either.
    """

    def __init__(self, source: Source, batch_size: int, resolution: int, *,
                 expand_ratio: float = 1.125, center_crop: bool = False, seed: int = 0,
                 num_workers: int = 4, process_index: int = 0, process_count: int = 1,
                 state: dict | None = None, prefetch: int = 2, hflip: bool = True):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if resolution < 1:
            raise UserError(f"resolution must be >= 1, got {resolution}")
        if not center_crop and expand_ratio < 1:
            raise UserError(f"expand_ratio must be >= 1, got {expand_ratio}")
        if seed < 0:
            raise UserError(f"data seed must be >= 0, got {seed}")
        if num_workers < 0 or prefetch < 0:
            raise UserError(f"num_workers and prefetch must be >= 0, got {num_workers}, "
                            f"{prefetch}")
        if not 0 <= process_index < process_count:
            raise UserError(f"process index {process_index} is not in [0, {process_count})")
        self.source = source
        self.batch_size = batch_size
        self.resolution = resolution
        self.expand_ratio = expand_ratio
        self.center_crop = center_crop
        self.hflip = hflip
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self._size = len(source)
        # Host p reads perm[p::P]: this many images per epoch.
        self._host_len = len(range(process_index, self._size, process_count))
        if self._host_len < batch_size:
            raise UserError(
                f"dataset too small: {self._size} images give host {process_index} of "
                f"{process_count} {self._host_len} per epoch, fewer than its batch size "
                f"{batch_size}")
        self._epoch, self._pos, self._skipped = _check_state(state, self._host_len)
        self._orders: dict[int, np.ndarray] = {}
        self._warned = 0
        self._closed = False
        # Submitted work in stream order: (epoch, position, index, future).
        self._queue: collections.deque = collections.deque()
        self._window = (prefetch + 1) * batch_size
        self._submit_at = (self._epoch, self._pos)
        self._pool = (concurrent.futures.ThreadPoolExecutor(
            num_workers, thread_name_prefix="pixelflow-data") if num_workers else None)
        self._fill()

    # -- public

    @property
    def skipped(self) -> int:
        """Images skipped as corrupt so far on this host (restored from ``state``)."""
        return self._skipped

    def state(self) -> dict[str, int]:
        """Where the batches returned so far end: ``{"epoch", "position", "skipped"}``."""
        return {"epoch": self._epoch, "position": self._pos, "skipped": self._skipped}

    def next(self) -> dict[str, np.ndarray]:
        """The next batch: ``images`` uint8 [B, R, R, 3], ``labels`` int32 [B],
        ``indices`` int64 [B] (dataset indices)."""
        if self._closed:
            raise RuntimeError("Loader is closed")
        b = self.batch_size
        images: list[np.ndarray] = []
        labels: list[int] = []
        indices: list[int] = []
        # A local cursor, committed only when the batch is complete, so an exception
        # (a read error, Ctrl-C) leaves state() at the last returned batch.
        epoch, pos, skipped = self._epoch, self._pos, self._skipped
        batch_start = (epoch, pos)
        while len(images) < b:
            if self._host_len - pos < b - len(images):
                # Not enough left in this epoch: drop the partial batch.
                if batch_start == (epoch, 0):
                    # Every epoch holds the same images, so none can fill a batch.
                    raise UserError(
                        f"host {self.process_index} has fewer than {b} readable images per "
                        f"epoch (of {self._host_len}; the others are corrupt)")
                images.clear()
                labels.clear()
                indices.clear()
                epoch, pos = epoch + 1, 0
                batch_start = (epoch, 0)
                continue
            index, result = self._take(epoch, pos)
            pos += 1
            if isinstance(result, CorruptImageError):
                skipped += 1
                self._warn_corrupt(index, result)
                continue
            images.append(result[0])
            labels.append(result[1])
            indices.append(index)
        if self._host_len - pos < b:
            # Start the next epoch now so state() counts finished epochs.
            epoch, pos = epoch + 1, 0
        self._epoch, self._pos, self._skipped = epoch, pos, skipped
        self._fill()
        return {"images": np.stack(images), "labels": np.asarray(labels, np.int32),
                "indices": np.asarray(indices, np.int64)}


    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next()

    # -- internals

    def _order(self, epoch: int) -> np.ndarray:
        """This host's dataset indices for ``epoch``."""
        order = self._orders.get(epoch)
        if order is None:
            for old in [e for e in self._orders if e < self._epoch]:
                del self._orders[old]
            perm = np.random.default_rng([self.seed, epoch]).permutation(self._size)
            order = self._orders[epoch] = perm[self.process_index::self.process_count]
        return order

    def _load(self, epoch: int, index: int) -> tuple[np.ndarray, int] | CorruptImageError:
        """Augmented image and label of ``index``, or the decode error (returned,
        not raised, so the caller skips it). Depends only on (seed, epoch, index)."""
        raw, label = self.source.get(index)
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            return augment(raw, self.resolution, self.expand_ratio, self.center_crop, rng,
                           self.hflip), label
        except CorruptImageError as e:
            return e

    def _fill(self) -> None:
        """Submit work ahead of the consumer until ``window`` images are queued."""
        if self._pool is None:
            return
        if self._submit_at < (self._epoch, self._pos):
            self._submit_at = (self._epoch, self._pos)
        # Without corrupt images an epoch ends at the last full batch; the consumer
        # loads any image past that on demand (see _take).
        end = self._host_len - self._host_len % self.batch_size
        while len(self._queue) < self._window:
            epoch, pos = self._submit_at
            if pos >= end:
                epoch, pos = epoch + 1, 0
            index = int(self._order(epoch)[pos])
            self._queue.append((epoch, pos, index, self._pool.submit(self._load, epoch, index)))
            self._submit_at = (epoch, pos + 1)

    def _take(self, epoch: int, pos: int) -> tuple[int, Any]:
        """Dataset index and load result at stream position (epoch, pos)."""
        queue = self._queue
        while queue and queue[0][:2] < (epoch, pos):  # dropped by an epoch change
            queue.popleft()[3].cancel()
        if queue and queue[0][:2] == (epoch, pos):
            index, future = queue.popleft()[2:]
            return index, future.result()
        # Not queued (no workers, or a position the prefetcher skipped): load here.
        index = int(self._order(epoch)[pos])
        return index, self._load(epoch, index)

    def _warn_corrupt(self, index: int, error: CorruptImageError) -> None:
        self._warned += 1
        if self._warned <= _MAX_CORRUPT_WARNINGS:
            describe = getattr(self.source, "describe", None)
            where = f" ({describe(index)})" if describe else ""
            log.warning("skipping corrupt image %d%s: %s", index, where, error)
            if self._warned == _MAX_CORRUPT_WARNINGS:
                log.warning("further corrupt images are skipped without a message")


def _check_state(state: dict | None, host_len: int) -> tuple[int, int, int]:
    """(epoch, position, skipped) from a saved :meth:`Loader.state`, or zeros."""
    if state is None:
        return 0, 0, 0
    try:
        epoch, pos, skipped = (state[k] for k in ("epoch", "position", "skipped"))
    except (KeyError, TypeError):
        raise UserError(f"data loader state must have epoch, position and skipped, "
                        f"got {state!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (epoch, pos, skipped)):
        raise UserError(f"data loader state must hold non-negative integers, got {state!r}")
    if pos > host_len:
        raise UserError(f"data loader state position {pos} is past the end of an epoch "
                        f"({host_len} images on this host); was it saved for other data?")
    return epoch, pos, skipped
