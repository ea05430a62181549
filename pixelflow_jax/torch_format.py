"""Read and write PyTorch state-dict files without PyTorch, and without running code.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle of the
state dict, whose tensors point at storages by persistent id) and one record
``<name>/data/<key>`` of raw little-endian bytes per storage. A pickle can
name any importable function and call it, so :func:`read_state_dict` unpickles
with a whitelist: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
and the ``torch.*Storage`` types, nothing else. Those names are not imported:
they are replaced by local stand-ins that only record what to read. Tensors
come back as :class:`LazyTensor` records whose data is read from the archive
on demand, so a conversion never holds two copies of a whole checkpoint.

``.safetensors`` files are read too (a JSON header and raw bytes, no code).
:func:`write_state_dict` writes the zip format that ``torch.load`` reads, with
``weights_only=True``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from pixelflow_jax.errors import UserError

# torch storage class -> numpy dtype (the storage types a state dict may use).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_OF = {v: k for k, v in STORAGE_DTYPES.items()}
SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class UnsafeCheckpointError(UserError):
    """A checkpoint whose pickle names something a plain state dict never needs."""


class CheckpointFormatError(UserError):
    """A file that is not a readable state-dict checkpoint."""


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor in a checkpoint file, read on :meth:`read`."""

    source: "_Source"
    key: str          # storage key (zip) or tensor name (safetensors)
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int = 0   # in elements, into the storage
    strides: tuple[int, ...] | None = None  # in elements; None = contiguous

    def read(self) -> np.ndarray:
        """The tensor as a NumPy array (a fresh, contiguous copy)."""
        return self.source.read(self)


# ----------------------------------------------------------------------------- zip (torch.save)


class _StorageType:
    """Stand-in for ``torch.<X>Storage``: carries the dtype only."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records, reads nothing."""
    return ("tensor", storage, int(storage_offset), tuple(size), tuple(stride))


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint's pickle asks for '{module}.{name}', which a "
            "plain state dict never needs (a file that does can run code on this machine)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointFormatError(f"unexpected storage reference {pid!r}")
        _, storage_type, key, _location, numel = pid
        return _Storage(str(key), storage_type.dtype, int(numel))


class _Source:
    """Where a checkpoint's bytes live: a zip archive or a safetensors file."""

    def __init__(self, path: str):
        self.path = path

    def read(self, t: LazyTensor) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError


class _ZipSource(_Source):
    def __init__(self, path: str, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(path)
        self.archive, self.prefix, self.big_endian = archive, prefix, big_endian

    def read(self, t: LazyTensor) -> np.ndarray:
        name = f"{self.prefix}data/{t.key}"
        try:
            raw = self.archive.read(name)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: storage record {name} is missing") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointFormatError(f"{self.path}: cannot read {name} ({e})") from None
        if self.big_endian and t.dtype.itemsize > 1:  # via unsigned ints: bfloat16 has no '>'
            size = t.dtype.itemsize
            flat = np.frombuffer(raw, f">u{size}").astype(f"=u{size}").view(t.dtype)
        else:
            flat = np.frombuffer(raw, dtype=t.dtype)
        span = t.offset + (sum((n - 1) * s for n, s in zip(t.shape, t.strides)) + 1
                           if all(t.shape) else 0)
        if span > flat.size:
            raise CheckpointFormatError(f"{self.path}: storage {t.key} holds {flat.size} values, "
                                        f"a tensor needs {span}")
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape,
            strides=tuple(s * flat.itemsize for s in t.strides))
        return np.array(view, order="C")  # a contiguous copy that owns its memory


def _read_zip(path: str) -> dict[str, LazyTensor]:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: not a PyTorch zip checkpoint ({e})") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise CheckpointFormatError(f"{path}: no data.pkl record (is it a torch.save file?)")
    prefix = pkl[0][: -len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in names:
        big_endian = archive.read(f"{prefix}byteorder").strip() == b"big"
    try:
        data = archive.read(pkl[0])
        obj = _SafeUnpickler(io.BytesIO(data)).load()
    except UserError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: truncated or corrupt ({e})") from None
    except Exception as e:  # malformed pickles raise many types
        raise CheckpointFormatError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") \
            from None
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    source = _ZipSource(path, archive, prefix, big_endian)
    out = {}
    for name, value in obj.items():
        if not (isinstance(value, tuple) and len(value) == 5 and value[0] == "tensor"):
            raise CheckpointFormatError(f"{path}: entry {name!r} is not a tensor")
        _, storage, offset, shape, strides = value
        out[str(name)] = LazyTensor(source, storage.key, storage.dtype, shape, offset, strides)
    return out


# ----------------------------------------------------------------------------- safetensors


class _SafetensorsSource(_Source):
    def __init__(self, path: str, data_start: int):
        super().__init__(path)
        self.data_start = data_start

    def read(self, t: LazyTensor) -> np.ndarray:
        count = int(np.prod(t.shape))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + t.offset)
            raw = f.read(count * t.dtype.itemsize)
        if len(raw) != count * t.dtype.itemsize:
            raise CheckpointFormatError(f"{self.path}: truncated at tensor {t.key}")
        return np.frombuffer(raw, dtype=t.dtype).reshape(t.shape).copy()  # little-endian files


def _read_safetensors(path: str) -> dict[str, LazyTensor]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2 ** 20:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        size = os.path.getsize(path)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a safetensors file ({e})") from None
    source = _SafetensorsSource(path, 8 + length)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path}: bad header entry for {name!r}") from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + length + end > size:
            raise CheckpointFormatError(f"{path}: tensor {name!r} does not fit the file")
        out[name] = LazyTensor(source, name, dtype, shape, begin, None)
    return out


# ----------------------------------------------------------------------------- public


def read_state_dict(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Open a ``torch.save`` zip (``.pt``/``.pth``) or a ``.safetensors`` state dict.

    Returns name -> :class:`LazyTensor` in file order; nothing but the pickle is
    read yet. Raises :class:`UnsafeCheckpointError` for a pickle that names
    anything beyond a plain state dict, :class:`CheckpointFormatError` for a
    truncated or malformed file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointFormatError(f"{path}: empty file (0 bytes; an unfinished download or "
                                    "copy?)")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        raise CheckpointFormatError(
            f"{path}: not a zip-format torch.save file (legacy pre-1.6 pickles are not "
            "supported: re-save it with a recent PyTorch)")
    return _read_zip(path)


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return pickle.BININT1 + bytes([n])
    if 0 <= n < 65536:
        return pickle.BININT2 + struct.pack("<H", n)
    if -2 ** 31 <= n < 2 ** 31:
        return pickle.BININT + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _pickle_tuple(items: Iterable[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _state_dict_pickle(tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """The pickle ``torch.save`` writes for an OrderedDict of tensors stored contiguously
    (only shapes and dtypes are used)."""
    empty_dict = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    out = [pickle.PROTO + bytes([2]), empty_dict, pickle.MARK]
    for i, (name, a) in enumerate(tensors):
        storage = _pickle_tuple([_pickle_str("storage"),
                                 _global("torch", _STORAGE_OF[np.dtype(a.dtype)]),
                                 _pickle_str(str(i)), _pickle_str("cpu"), _pickle_int(a.size)])
        strides = [int(np.prod(a.shape[d + 1:])) for d in range(len(a.shape))]
        args = _pickle_tuple([storage + pickle.BINPERSID, _pickle_int(0),
                              _pickle_tuple(_pickle_int(n) for n in a.shape),
                              _pickle_tuple(_pickle_int(s) for s in strides),
                              pickle.NEWFALSE, empty_dict])
        out += [_pickle_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args,
                pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write ``state_dict`` (name -> array) as a ``torch.save`` zip file at ``path``.

    Readable by ``torch.load(path, weights_only=True)``; arrays are written
    little-endian and contiguous, in the mapping's order.
    """
    tensors = list(state_dict.items())
    for name, a in tensors:
        if np.dtype(a.dtype) not in _STORAGE_OF:
            raise ValueError(f"{name}: dtype {a.dtype} has no torch storage type")
    # Fixed timestamps: the same tensors always give the same bytes.
    record = lambda name: zipfile.ZipInfo("archive/" + name, date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(record("data.pkl"), _state_dict_pickle(tensors))
        z.writestr(record("byteorder"), "little")  # native order on every supported platform
        for i, (_, a) in enumerate(tensors):
            # One contiguous copy at a time (asarray, not ascontiguousarray: that makes 0-d 1-d).
            a = np.asarray(a, order="C")
            with z.open(record(f"data/{i}"), "w", force_zip64=a.nbytes >= 2 ** 31) as f:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
        z.writestr(record("version"), "3\n")
