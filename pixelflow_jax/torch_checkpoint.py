"""Official PyTorch checkpoint folders in, and back out (what ``convert_torch.py`` runs).

An official checkpoint is a folder with ``model.pt`` (a ``torch.save`` state
dict) and ``config.yaml``; a bare ``.pt``/``.pth``/``.safetensors`` file works
too, given its config. Nothing here imports PyTorch or lets a checkpoint run
code (see :mod:`pixelflow_jax.torch_format`). Every problem is reported at once,
before anything is written, and output folders appear whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
import uuid
from typing import Any

import jax.numpy as jnp
import numpy as np

from pixelflow_jax.checkpoint import load_param_tree, replace_folder, save_checkpoint
from pixelflow_jax.config import load_config, save_config
from pixelflow_jax.convert import ConversionError, iter_official, official_to_nnx
from pixelflow_jax.errors import UserError
from pixelflow_jax.torch_format import SAFETENSORS_DTYPES, read_state_dict, write_state_dict

WEIGHT_FILES = ("model.pt", "model.pth", "model.safetensors")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    tensors: int
    parameters: int
    seconds: float


def locate_official(src: str, config: str | None = None) -> tuple[str, str]:
    """(weights file, config file) for an official folder, or a file plus ``config``."""
    src = os.fspath(src)
    if os.path.isdir(src):
        found = [os.path.join(src, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(src, f))]
        if not found:
            if os.path.isdir(os.path.join(src, "params")):
                raise UserError(f"{src} is already a pixelflow-jax checkpoint (use --to-torch "
                                "to convert it to PyTorch)")
            raise UserError(f"{src} has none of {', '.join(WEIGHT_FILES)}")
        weights = found[0]
        config = config or os.path.join(src, "config.yaml")
        if not os.path.isfile(config):
            raise UserError(f"{src} has no config.yaml; pass --config CONFIG")
        return weights, config
    if not os.path.exists(src):
        raise UserError(f"{src}: no such file or folder")
    if config is None:
        raise UserError(f"{src} is a single weights file: pass --config CONFIG (its config.yaml)")
    return src, config


def _check_destination(dst: str, overwrite: bool) -> None:
    if os.path.exists(dst) and not overwrite:
        raise UserError(f"{dst} exists already (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {dst}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {dst}: no write permission in {parent}")


# Small files of a Hugging Face T5 folder copied beside the encoder weights (the tokenizer).
TEXT_ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "spiece.model")


def check_text_encoder(folder: str, cross_attention_dim: int | None) -> None:
    """Refuse a T5 folder that does not load (config, tokenizer, every encoder tensor) or
    whose ``d_model`` is not the checkpoint's ``cross_attention_dim`` (DESIGN §7)."""
    from pixelflow_jax.hf_weights import read_t5_config
    from pixelflow_jax.text_encoder import TextEncoder

    if cross_attention_dim is None:
        raise UserError("--text-encoder is for text-to-image checkpoints; this one is "
                        "class-conditional (no cross_attention_dim)")
    if not os.path.isdir(folder):
        raise UserError(f"--text-encoder {folder}: no such folder")
    d_model = read_t5_config(folder).d_model
    if d_model != cross_attention_dim:
        raise UserError(f"--text-encoder {folder}: its d_model is {d_model} but the checkpoint's "
                        f"cross_attention_dim is {cross_attention_dim}")
    # bfloat16: the checks only, at half the memory of the float32 encoder.
    TextEncoder.from_folder(folder, dtype=jnp.bfloat16)


def write_text_encoder(src: str, dst: str) -> int:
    """Write ``dst``: the tokenizer files and config of the T5 folder ``src`` and its encoder
    tensors alone (no decoder, no ``lm_head``), as stored, under their Hugging Face names in
    one ``model.safetensors``. ``src`` must have passed :func:`check_text_encoder`.
    Returns the number of tensors written."""
    from pixelflow_jax.hf_weights import (EMBEDDING, EMBEDDING_ALIAS, encoder_layout,
                                          read_t5_config, weight_files)

    wanted = set(encoder_layout(read_t5_config(src)))
    tensors = {}
    for file in weight_files(src):
        for name, tensor in read_state_dict(file).items():
            key = EMBEDDING if name == EMBEDDING_ALIAS else name
            if key in wanted and key not in tensors:
                tensors[key] = tensor
    names = {v.name: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        size = int(np.prod(t.shape)) * t.dtype.itemsize
        header[name] = {"dtype": names[t.dtype.name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format advises
    os.makedirs(dst)
    for name in TEXT_ENCODER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():  # one tensor in memory at a time
            f.write(np.ascontiguousarray(t.read()).astype(t.dtype.newbyteorder("<")).tobytes())
    return len(tensors)


def import_torch_checkpoint(src: str, dst: str, *, config: str | None = None,
                            dtype: str = "float32", overwrite: bool = False,
                            text_encoder: str | None = None) -> ConversionReport:
    """Convert an official checkpoint into this package's checkpoint folder ``dst``.

    ``dtype`` is the stored parameters' dtype (``float32`` or ``bfloat16``); the
    network always computes with float32 parameters. ``text_encoder``, a Hugging Face
    T5 folder, is checked and its encoder written into ``dst/text_encoder`` (see
    :func:`write_text_encoder`). Raises ``UserError`` (with every problem) for bad
    input; ``dst`` is untouched on failure.
    """
    from pixelflow_jax.prompts import TEXT_ENCODER_FOLDER

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    weights, config_path = locate_official(src, config)
    cfg = load_config(config_path)
    _check_destination(dst, overwrite)
    if text_encoder is not None:
        check_text_encoder(text_encoder, cfg.params.cross_attention_dim)
    state_dict = read_state_dict(weights)
    try:
        tree = official_to_nnx(state_dict, cfg.params, dtype=DTYPES[dtype])
    except ConversionError as e:
        raise ConversionError([f"{weights} vs {config_path}: {p}" for p in e.problems]) from None
    if text_encoder is None:
        save_checkpoint(dst, tree, cfg, overwrite=overwrite)
    else:
        # Both parts into one folder beside dst, renamed into place whole.
        tmp = f"{os.path.abspath(dst)}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_checkpoint(tmp, tree, cfg)
            write_text_encoder(text_encoder, os.path.join(tmp, TEXT_ENCODER_FOLDER))
            replace_folder(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    parameters = sum(int(t.size) for t in _leaves(tree))
    return ConversionReport(len(state_dict), parameters, time.perf_counter() - start)


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def export_torch_checkpoint(src: str, dst: str, *, overwrite: bool = False) -> ConversionReport:
    """Write a checkpoint folder of this package as an official one: ``model.pt`` (float32,
    loadable with ``load_state_dict(strict=True)``) and ``config.yaml``."""
    start = time.perf_counter()
    _check_destination(dst, overwrite)
    tree, cfg = load_param_tree(src)
    tmp = f"{os.path.abspath(dst)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        write_state_dict(os.path.join(tmp, "model.pt"), dict(iter_official(tree, cfg.params)))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        replace_folder(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parameters = sum(int(t.size) for t in _leaves(tree))
    return ConversionReport(sum(1 for _ in iter_official(tree, cfg.params)), parameters,
                            time.perf_counter() - start)
