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
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        save_config(config, os.path.join(tmp, CONFIG_FILE))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if os.path.exists(directory):
            old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except PermissionError as e:
        raise UserError(f"cannot write {directory}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def load_checkpoint(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                    attention_impl: str = "auto") -> tuple[PixelFlowModel, PixelFlowConfig]:
    """Load a checkpoint folder as a model (float32 parameters, ``dtype`` compute).

    Raises :class:`CheckpointError` (a :class:`UserError`) naming every problem.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    problem = _describe_folder_problem(directory)
    if problem:
        raise CheckpointError(problem)
    config = load_config(os.path.join(directory, CONFIG_FILE))
    model = abstract_model(config.params, dtype=dtype, attention_impl=attention_impl)
    graphdef, abstract_state = nnx.split(model)
    expected = _flatten(nnx.to_pure_dict(abstract_state))
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(directory, PARAMS_DIR)
    try:
        stored = _flatten(checkpointer.metadata(path).item_metadata.tree)
    except Exception as e:  # orbax raises many types for unreadable folders
        raise CheckpointError(f"{path} is not a readable orbax checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    problems = compare_shapes(_shapes(stored), _shapes(expected))
    if problems:
        raise CheckpointError(f"{directory} does not match its {CONFIG_FILE}: "
                              + "; ".join(problems))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sharding),
                          nnx.to_pure_dict(abstract_state))
    try:
        restored = checkpointer.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the parameters "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state), config


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
