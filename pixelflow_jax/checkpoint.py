"""Model checkpoints: a folder holding ``config.yaml`` and ``params/`` (orbax).

``config.yaml`` is in the official layout; ``params/`` is an orbax
StandardCheckpointer tree of the NNX parameters (blocks stacked). A folder is
written beside its destination and renamed into place, so it appears whole or
not at all. Loading checks the stored tree against the config first and names
every missing, unexpected or mis-shaped entry.
"""

from __future__ import annotations

import os
import shutil
import uuid
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


def param_tree(model: PixelFlowModel) -> dict:
    """The model's parameters as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_checkpoint(directory: str | os.PathLike, params: dict | PixelFlowModel,
                    config: PixelFlowConfig, *, overwrite: bool = False,
                    dtype: Any = None) -> None:
    """Write ``params`` (a model or its :func:`param_tree`) and ``config`` to ``directory``.

    ``dtype`` optionally casts the stored parameters (e.g. bfloat16 to halve the
    size); loading always returns float32. Refuses an existing ``directory``
    unless ``overwrite``.
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
    if dtype is not None:
        params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        save_config(config, os.path.join(tmp, CONFIG_FILE))
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


def _error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _open_checked(directory: str | os.PathLike) -> tuple[str, PixelFlowConfig, dict]:
    """(params path, config, abstract parameter tree) of a folder whose stored tree
    matches its config; raises CheckpointError naming every problem."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    problem = _describe_folder_problem(directory)
    if problem:
        raise CheckpointError(problem)
    config = load_config(os.path.join(directory, CONFIG_FILE))
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config.params)))
    path = os.path.join(directory, PARAMS_DIR)
    try:
        stored = _flatten(ocp.StandardCheckpointer().metadata(path).item_metadata.tree)
    except Exception as e:  # orbax raises many types for unreadable folders
        raise CheckpointError(f"{path} is not a readable orbax checkpoint "
                              f"({_error_line(e)})") from None
    problems = compare_shapes(_shapes(stored), _shapes(_flatten(abstract)))
    if problems:
        raise CheckpointError(f"{directory} does not match its {CONFIG_FILE}: "
                              + "; ".join(problems))
    return path, config, abstract


def _restore(path: str, restore_args: Any) -> dict:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                restore_args=restore_args))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the parameters "
                                  f"({_error_line(e)})") from None


def load_param_tree(directory: str | os.PathLike) -> tuple[dict, PixelFlowConfig]:
    """A checkpoint's parameters as a nested dict of float32 NumPy arrays, and its config."""
    import orbax.checkpoint as ocp

    path, config, abstract = _open_checked(directory)
    args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32),
                        abstract)
    return _restore(path, args), config


def load_checkpoint(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                    attention_impl: str = "auto") -> tuple[PixelFlowModel, PixelFlowConfig]:
    """Load a checkpoint folder as a model (float32 parameters, ``dtype`` compute).

    Raises :class:`CheckpointError` (a :class:`UserError`) naming every problem.
    """
    import orbax.checkpoint as ocp

    path, config, _ = _open_checked(directory)
    graphdef, state = nnx.split(abstract_model(config.params, dtype=dtype,
                                               attention_impl=attention_impl))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=sharding, dtype=jnp.float32,
                                                       global_shape=a.shape),
                        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, _restore(path, args))
    return nnx.merge(graphdef, state), config


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
