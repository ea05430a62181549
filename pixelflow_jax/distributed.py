"""Devices, hosts and data placement for data-parallel sampling and training.

One 1-D mesh axis, ``data``, spans every device of every host. Batches are
sharded along it; parameters are replicated. Each host feeds and reads only
its own rows (:func:`to_global`, :func:`to_local`), so a TPU pod slice runs
the same command on every host.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _env_says_multi_process() -> bool:
    if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:  # a multi-host Cloud TPU slice
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(key, "1") or 1) > 1:
            return True
    return False


def initialize(mode: str = "auto") -> bool:
    """Call ``jax.distributed.initialize()`` for a multi-host launch; returns whether it did.

    ``auto``: only when the environment shows several processes (a multi-host
    TPU slice, SLURM or MPI with several tasks, or a coordinator address);
    ``on``: always; ``off``: never. Must run before anything touches a device.
    """
    if mode == "off" or (mode == "auto" and not _env_says_multi_process()):
        return False
    jax.distributed.initialize()
    return True


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every host)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 split over ``data``."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(tree: Any, mesh: Mesh) -> Any:
    """This host's rows (NumPy, axis 0) as global arrays sharded along ``data``."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), tree)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def _sharded_axis(a: jax.Array) -> int | None:
    spec = getattr(a.sharding, "spec", None)
    if spec is None:
        return None
    for axis, entry in enumerate(spec):
        if entry == AXIS or (isinstance(entry, tuple) and AXIS in entry):
            return axis
    return None


def to_local(tree: Any) -> Any:
    """The parts of global arrays that this host holds, as NumPy, in global order
    (concatenated along each array's ``data``-sharded axis)."""
    def local(a: jax.Array) -> np.ndarray:
        if a.is_fully_addressable:
            return np.asarray(a)
        axis = _sharded_axis(a)
        if axis is None:  # replicated: any copy
            return np.asarray(a.addressable_shards[0].data)
        parts = {}
        for shard in a.addressable_shards:
            parts.setdefault(shard.index[axis].start or 0, np.asarray(shard.data))
        return np.concatenate([parts[k] for k in sorted(parts)], axis=axis)
    return jax.tree.map(local, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a tree (the same values on every host) on every device of ``mesh``."""
    sharding = replicated(mesh)

    def one(a):
        if isinstance(a, jax.ShapeDtypeStruct):  # abstract (ahead-of-time compilation)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
