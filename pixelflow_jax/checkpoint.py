"""Model checkpoints: a folder holding ``config.yaml``, ``params/`` (orbax) and
``checksums.json``.

``config.yaml`` is in the official layout; ``params/`` is an orbax
StandardCheckpointer tree of the NNX parameters (blocks stacked);
``checksums.json`` holds a CRC-32 of every stored array. A folder is written
beside its destination and renamed into place, so it appears whole or not at
all. Loading checks the stored tree against the config first and names every
missing, unexpected or mis-shaped entry, then reads every array and checks it
against its checksum: a damaged or truncated file is a one-line
:class:`CheckpointError` naming the entry, never garbage weights.

Arrays are read with tensorstore directly rather than through orbax's restore,
so that a read error belongs to one named array and leaves no concurrent read
behind to print tracebacks after the error is raised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.config import PixelFlowConfig, load_config, save_config
from pixelflow_jax.convert import compare_shapes
from pixelflow_jax.errors import CheckpointError, UserError
from pixelflow_jax.model import PixelFlowModel, abstract_model

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
CHECKSUM_FILE = "checksums.json"
CHECKSUM_FORMAT = "pixelflow-jax checksums 1"
_REDO = "re-download or re-convert the checkpoint"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _checkpointer():
    """A synchronous orbax checkpointer that holds no second copy of what it saves.

    Orbax deep-copies host arrays by default (a guard for asynchronous saves; this
    one is synchronous), and with compression on, tensorstore buffers the whole
    encoded output (zstd gains little on float weights). Either doubles the peak
    memory of converting a 2.7 GB checkpoint.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                        use_compression=False))


def _shapes(flat: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat.items()}


def array_checksum(a: np.ndarray) -> str:
    """CRC-32 (zlib) of an array's bytes in C order, as 8 hex digits.

    CRC-32 rather than a cryptographic hash: it guards against accidental damage
    (disk, copy, interrupted download), not tampering, and it is the fastest of
    the candidates: on a 256 MB float32 array, zlib.crc32 2.2 GB/s, hashlib.sha256
    1.0 GB/s (with SHA-NI), hashlib.blake2b 0.5 GB/s on one core; so the 2.6 GB XL
    checkpoint costs ~1.2 s of CRC, spread over threads. A CRC-32 catches every
    error burst up to 32 bits; other damage slips through with probability 2^-32.
    """
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(flat):08x}"


def _checksums(flat: dict[str, np.ndarray]) -> dict[str, str]:
    # zlib.crc32 releases the GIL on large buffers: arrays are hashed in parallel.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(flat, pool.map(array_checksum, flat.values())))


def _write_checksums(directory: str, flat: dict[str, np.ndarray]) -> None:
    path = os.path.join(directory, CHECKSUM_FILE)
    record = {"format": CHECKSUM_FORMAT,
              "algorithm": "crc32 (zlib) of each array's bytes as stored, C order",
              "params": dict(sorted(_checksums(flat).items()))}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _read_checksums(directory: str) -> dict[str, str] | None:
    """name -> CRC from ``checksums.json``; None for a folder written without one."""
    path = os.path.join(directory, CHECKSUM_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        entries = record["params"]
        if record.get("format") != CHECKSUM_FORMAT or not all(
                isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v) for v in entries.values()):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path} is damaged (not a {CHECKSUM_FORMAT} file); "
                              f"{_REDO}") from None
    return entries


def param_tree(model: PixelFlowModel) -> dict:
    """The model's parameters as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_checkpoint(directory: str | os.PathLike, params: dict | PixelFlowModel,
                    config: PixelFlowConfig, *, overwrite: bool = False,
                    dtype: Any = None) -> None:
    """Write ``params`` (a model or its :func:`param_tree`) and ``config`` to ``directory``.

    ``dtype`` optionally casts the stored parameters (e.g. bfloat16 to halve the
    size); loading always returns float32. Records every stored array's checksum
    in ``checksums.json`` (see :func:`array_checksum`). Refuses an existing
    ``directory`` unless ``overwrite``.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if isinstance(params, PixelFlowModel):
        params = param_tree(params)
    if os.path.exists(directory) and not overwrite:
        raise UserError(f"{directory} exists already (pass overwrite to replace it)")
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {directory}: folder {parent} does not exist")
    # On the host once: the checksums and orbax must see the same bytes.
    params = jax.tree.map(lambda a: np.asarray(a) if dtype is None
                          else np.asarray(a).astype(dtype), params)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        save_config(config, os.path.join(tmp, CONFIG_FILE))
        _write_checksums(tmp, _flatten(params))
        with _checkpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
        replace_folder(tmp, directory)
    except PermissionError as e:
        raise UserError(f"cannot write {directory}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: str, dst: str) -> None:
    """Move the finished folder ``tmp`` to ``dst``; an old ``dst`` is removed only after."""
    dst = os.path.abspath(dst)
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


def _describe_folder_problem(directory: str) -> str | None:
    if not os.path.exists(directory):
        return f"checkpoint folder {directory} does not exist"
    if not os.path.isdir(directory):
        return f"checkpoint {directory} is not a folder"
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return f"checkpoint folder {directory} has no {CONFIG_FILE}"
    if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        if os.path.exists(os.path.join(directory, "model.pt")):
            return (f"{directory} is an official PyTorch checkpoint (model.pt); convert it "
                    f"first: python convert_torch.py {directory} OUT_DIR")
        return f"checkpoint folder {directory} has no {PARAMS_DIR}/ folder"
    return None


def _orbax_metadata(path: str) -> tuple[list[str], dict]:
    """(stored array names, orbax's ``_METADATA`` record) of a params folder.

    Read here rather than through orbax, whose reader logs errors and leaves
    concurrent reads behind (tracebacks on stderr) when a file is damaged.
    """
    file = os.path.join(path, "_METADATA")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a readable orbax checkpoint (no _METADATA file)")
    try:
        with open(file) as f:
            meta = json.load(f)
        names = [".".join(str(k["key"]) for k in entry["key_metadata"])
                 for entry in meta["tree_metadata"].values()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{file} is damaged (not orbax tree metadata); {_REDO}") from None
    return names, meta


def _array_spec(path: str, name: str, meta: dict) -> dict:
    """The tensorstore spec of orbax's stored array ``name`` under ``path``."""
    if meta.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": path + "/"},
                   "path": name + "/"}
    else:
        kvstore = {"driver": "file", "path": os.path.join(path, name) + "/"}
    # A missing chunk is damage, not an array of fill values.
    return {"driver": "zarr3" if meta.get("use_zarr3", False) else "zarr",
            "kvstore": kvstore, "fill_missing_data_reads": False}


def _reason(e: Exception) -> str:
    # tensorstore: 'CODE: Error reading "x/0.0" in OCDBT database at ...: what went wrong'
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return line.split(" [tensorstore_spec=")[0].rsplit('": ', 1)[-1][:160]


def _entries(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(f"params/{n}" for n in names[:3]) + more


class _Failed:
    """A future that failed before it started (tensorstore rejected the request)."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self) -> Any:
        raise self.error


def _start(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as e:  # a name from a damaged _METADATA can make a bad spec
        return _Failed(e)


def _wait_all(directory: str, futures: dict[str, Any]) -> dict[str, Any]:
    """Every future's result; CheckpointError naming the entries whose file is damaged."""
    results, failed = {}, {}
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except Exception as e:  # tensorstore raises ValueError, and others for odd input
            failed[name] = e
    if failed:
        bad = sorted(failed)
        what = ("no parameter array can be read" if len(bad) == len(futures)
                else f"{_entries(bad)} cannot be read")
        raise CheckpointError(f"{directory}: {PARAMS_DIR}/ is damaged or truncated: {what} "
                              f"({_reason(failed[bad[0]])}); {_REDO}")
    return results


def _open_checked(directory: str | os.PathLike) -> tuple[PixelFlowConfig, dict, dict[str, Any]]:
    """(config, abstract parameter tree, name -> open tensorstore array) of a folder
    whose stored tree matches its config; raises CheckpointError naming every problem."""
    import tensorstore as ts

    directory = os.path.abspath(os.fspath(directory))
    problem = _describe_folder_problem(directory)
    if problem:
        raise CheckpointError(problem)
    config = load_config(os.path.join(directory, CONFIG_FILE))
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config.params)))
    path = os.path.join(directory, PARAMS_DIR)
    names, meta = _orbax_metadata(path)
    context = ts.Context()  # one open database and cache for every array
    stores = _wait_all(directory, {
        n: _start(ts.open, _array_spec(path, n, meta), context=context, open=True, read=True)
        for n in names})
    problems = compare_shapes({n: tuple(a.shape) for n, a in stores.items()},
                              _shapes(_flatten(abstract)))
    if problems:
        raise CheckpointError(f"{directory} does not match its {CONFIG_FILE}: "
                              + "; ".join(problems))
    return config, abstract, stores


def _read_all(directory: str, stores: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every array in its stored dtype, read concurrently."""
    reads = _wait_all(directory, {n: _start(a.read) for n, a in stores.items()})
    return {n: np.asarray(a) for n, a in reads.items()}


def _verify(directory: str, arrays: dict[str, np.ndarray], expected: dict[str, str]) -> None:
    missing, extra = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
    if missing or extra:
        parts = ([f"lists no {_entries(missing)}"] if missing else []) + \
                ([f"lists unknown {_entries(extra)}"] if extra else [])
        raise CheckpointError(f"{directory}: {CHECKSUM_FILE} does not match {PARAMS_DIR}/ "
                              f"({'; '.join(parts)}); {_REDO}")
    got = _checksums(arrays)
    bad = sorted(n for n in arrays if got[n] != expected[n])
    if bad:
        raise CheckpointError(f"{directory}: {_entries(bad)} "
                              f"{'is' if len(bad) == 1 else 'are'} damaged: checksum "
                              f"mismatch; {_REDO}")


def _load_verified(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray],
                                                           PixelFlowConfig, dict]:
    """(name -> stored array, config, abstract tree), every array checked against
    ``checksums.json`` when the folder has one."""
    directory = os.path.abspath(os.fspath(directory))
    config, abstract, stores = _open_checked(directory)
    expected = _read_checksums(directory)
    arrays = _read_all(directory, stores)
    if expected is not None:
        _verify(directory, arrays, expected)
    return arrays, config, abstract


def _fill(tree: Any, make: Any, prefix: str = "") -> Any:
    """``tree``'s structure with each leaf ``make(name)``, names as :func:`_flatten`'s."""
    if isinstance(tree, dict):
        return {k: _fill(v, make, f"{prefix}{k}.") for k, v in tree.items()}
    return make(prefix[:-1])


def load_param_tree(directory: str | os.PathLike) -> tuple[dict, PixelFlowConfig]:
    """A checkpoint's parameters as a nested dict of float32 NumPy arrays, and its config.

    Verified as :func:`load_checkpoint`.
    """
    arrays, config, abstract = _load_verified(directory)
    return _fill(abstract, lambda n: arrays.pop(n).astype(np.float32, copy=False)), config


def load_checkpoint(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                    attention_impl: str = "auto") -> tuple[PixelFlowModel, PixelFlowConfig]:
    """Load a checkpoint folder as a model (float32 parameters, ``dtype`` compute).

    Every array is checked against ``checksums.json``; a folder written before
    checksums existed (no such file) loads without that check (see
    :func:`add_checksums`). Raises :class:`CheckpointError` (a :class:`UserError`)
    naming every problem: a damaged, truncated or mismatched entry is named.
    """
    arrays, config, _ = _load_verified(directory)
    graphdef, state = nnx.split(abstract_model(config.params, dtype=dtype,
                                               attention_impl=attention_impl))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # One float32 host copy at a time, each stored array released once on the device.
    tree = _fill(nnx.to_pure_dict(state), lambda n: jax.device_put(
        arrays.pop(n).astype(np.float32, copy=False), sharding))
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state), config


def add_checksums(directory: str | os.PathLike) -> None:
    """Write ``checksums.json`` for a folder saved before checksums existed.

    The arrays are taken as they are now: check the folder first (sample from
    it). Refuses a folder that has checksums already.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, CHECKSUM_FILE)):
        raise UserError(f"{directory} has {CHECKSUM_FILE} already")
    _, _, stores = _open_checked(directory)
    _write_checksums(directory, _read_all(directory, stores))


def model_from_tree(tree: dict, config: PixelFlowConfig, *, dtype: Any = jnp.float32,
                    attention_impl: str = "auto") -> PixelFlowModel:
    """A model holding the parameters ``tree`` (nested dict, e.g. from ``official_to_nnx``)."""
    model = abstract_model(config.params, dtype=dtype, attention_impl=attention_impl)
    graphdef, state = nnx.split(model)
    expected = _flatten(nnx.to_pure_dict(state))
    problems = compare_shapes(_shapes(_flatten(tree)), _shapes(expected))
    if problems:
        raise CheckpointError("; ".join(problems))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree))
    return nnx.merge(graphdef, state)
