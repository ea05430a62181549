"""A Hugging Face T5 folder's encoder, read without PyTorch (DESIGN §7).

The folder as downloaded (e.g. ``google/flan-t5-xl``): ``config.json`` and the weights
in any of the four layouts Hugging Face writes, tried in this order (safetensors
first: no pickle at all):

- ``model.safetensors.index.json`` + the shards its ``weight_map`` names,
- ``model.safetensors``,
- ``pytorch_model.bin.index.json`` + its shards,
- ``pytorch_model.bin``.

Files are opened with :func:`pixelflow_jax.torch_format.read_state_dict` (a whitelist
unpickler for ``.bin``, a header parser for ``.safetensors``) and tensors are read one
at a time, converted (Linear ``[out, in]`` -> kernel ``[in, out]``, stacked per block)
into the encoder's parameter dtype, so the peak is the encoder's parameters plus one
tensor. ``decoder.*`` and ``lm_head.weight`` are skipped unread. The token table may be
``shared.weight`` (safetensors files usually hold only this) or
``encoder.embed_tokens.weight`` (the same tensor; ``.bin`` files hold both).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.errors import CheckpointError, ConfigError
from pixelflow_jax.t5 import T5Config, T5Encoder, abstract_encoder, check_dtype
from pixelflow_jax.torch_format import read_state_dict

CONFIG_FILE = "config.json"
# (index file or None, single file), in order of preference.
WEIGHT_LAYOUTS = (("model.safetensors.index.json", None), (None, "model.safetensors"),
                  ("pytorch_model.bin.index.json", None), (None, "pytorch_model.bin"))
EMBEDDING = "shared.weight"
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"


def read_t5_config(folder: str | os.PathLike) -> T5Config:
    """The encoder sizes from ``folder/config.json``; :class:`ConfigError` if absent or bad."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face T5 folder "
                          "(download e.g. google/flan-t5-xl whole)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({e})") from None
    return T5Config.from_dict(data, source=path)


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The weight files of ``folder`` (see the module docstring), shards in index order."""
    folder = os.fspath(folder)
    for index, single in WEIGHT_LAYOUTS:
        if single is not None:
            if os.path.isfile(os.path.join(folder, single)):
                return [os.path.join(folder, single)]
            continue
        path = os.path.join(folder, index)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise CheckpointError(f"{path}: not a weight index ({type(e).__name__}: {e})") \
                from None
        bad = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n
               or n in ("", ".", "..")]
        if bad:
            raise CheckpointError(f"{path}: shard names must be plain file names, got {bad}")
        absent = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if absent:
            raise CheckpointError(f"{folder}: shards named in {index} are missing: "
                                  f"{', '.join(absent)} (an unfinished download?)")
        return [os.path.join(folder, n) for n in names]
    raise CheckpointError(
        f"{folder} has no T5 weights: looked for "
        + ", ".join(i or s for i, s in WEIGHT_LAYOUTS))


def encoder_layout(c: T5Config) -> dict[str, tuple[tuple[str, ...], int | None, bool,
                                                  tuple[int, ...]]]:
    """Hugging Face name -> (encoder parameter path, block index or None,
    transposed, Hugging Face shape) for every tensor the encoder needs."""
    inner = c.num_heads * c.d_kv
    layout = {
        EMBEDDING: (("shared", "embedding"), None, False, (c.vocab_size, c.d_model)),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            ("relative_attention_bias", "embedding"), None, False,
            (c.relative_attention_num_buckets, c.num_heads)),
        "encoder.final_layer_norm.weight": (("final_layer_norm", "weight"), None, False,
                                            (c.d_model,)),
    }
    ff = ["wi_0", "wi_1"] if c.is_gated else ["wi"]
    for i in range(c.num_layers):
        pre = f"encoder.block.{i}.layer"
        for name, shape in [("q", (inner, c.d_model)), ("k", (inner, c.d_model)),
                            ("v", (inner, c.d_model)), ("o", (c.d_model, inner))]:
            layout[f"{pre}.0.SelfAttention.{name}.weight"] = (
                ("block", "SelfAttention", name, "kernel"), i, True, shape)
        layout[f"{pre}.0.layer_norm.weight"] = (("block", "attention_layer_norm", "weight"),
                                                i, False, (c.d_model,))
        for name in ff:
            layout[f"{pre}.1.DenseReluDense.{name}.weight"] = (
                ("block", "DenseReluDense", name, "kernel"), i, True, (c.d_ff, c.d_model))
        layout[f"{pre}.1.DenseReluDense.wo.weight"] = (
            ("block", "DenseReluDense", "wo", "kernel"), i, True, (c.d_model, c.d_ff))
        layout[f"{pre}.1.layer_norm.weight"] = (("block", "ff_layer_norm", "weight"), i, False,
                                                (c.d_model,))
    return layout


def _skipped(name: str) -> bool:
    """Tensors of the rest of the seq2seq model, which the encoder never reads."""
    return name.startswith("decoder.") or name == "lm_head.weight"


def load_t5_encoder(folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                    config: T5Config | None = None) -> T5Encoder:
    """The encoder of a Hugging Face T5 folder, with parameters (and compute) in ``dtype``.

    ``dtype`` float32 (parity) or bfloat16 (half the memory). Raises
    :class:`CheckpointError` naming every missing, mis-shaped, non-float or
    unexpected encoder tensor in one message.
    """
    folder = os.fspath(folder)
    dtype = check_dtype(dtype)
    config = config or read_t5_config(folder)
    layout = encoder_layout(config)
    graphdef, state = nnx.split(abstract_encoder(config, dtype=dtype))
    pure = nnx.to_pure_dict(state)

    def slot(path: tuple[str, ...]) -> dict:
        node = pure
        for key in path[:-1]:
            node = node[key]
        return node

    # Host buffers, filled tensor by tensor.
    for path, *_ in layout.values():
        node = slot(path)
        if not isinstance(node[path[-1]], np.ndarray):
            node[path[-1]] = np.empty(node[path[-1]].shape, dtype)

    filled: set[str] = set()
    wrong: list[str] = []
    unexpected: list[str] = []
    for file in weight_files(folder):
        for name, tensor in read_state_dict(file).items():
            if _skipped(name):
                continue
            key = EMBEDDING if name == EMBEDDING_ALIAS else name
            if key not in layout:
                if name.startswith("encoder."):
                    unexpected.append(name)
                continue
            if name == EMBEDDING_ALIAS and EMBEDDING in filled:
                continue  # the same tensor as shared.weight, already read
            path, layer, transposed, shape = layout[key]
            if tuple(tensor.shape) != shape:
                wrong.append(f"{name} has shape {list(tensor.shape)}, config.json means "
                             f"{list(shape)}")
                continue
            if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
                wrong.append(f"{name} has non-float dtype {tensor.dtype.name}")
                continue
            a = tensor.read()
            a = (a.T if transposed else a).astype(dtype)
            buffer = slot(path)[path[-1]]
            if layer is None:
                buffer[...] = a
            else:
                buffer[layer] = a
            filled.add(key)
    missing = [n for n in layout if n not in filled]
    if EMBEDDING in missing:
        missing[missing.index(EMBEDDING)] = f"{EMBEDDING} (or {EMBEDDING_ALIAS})"
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    if problems:
        raise CheckpointError(f"{folder}: the T5 encoder weights do not fit its config.json: "
                              + "; ".join(problems))

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def to_device(node: dict) -> None:  # one host buffer released per device copy
        for key in list(node):
            if isinstance(node[key], dict):
                to_device(node[key])
            else:
                node[key] = jax.device_put(node.pop(key), device)

    to_device(pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
