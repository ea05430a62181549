"""Process-level JAX setup shared by the command-line tools."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from pixelflow_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (reused across runs).

    Location: ``path``, else ``$PIXELFLOW_JAX_CACHE``, else
    ``~/.cache/pixelflow_jax/xla``. Returns the folder used.
    """
    path = path or os.environ.get("PIXELFLOW_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pixelflow_jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return ""  # a read-only home must not stop sampling
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compute_dtype(name: str = "auto") -> Any:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU; or ``float32`` / ``bfloat16``."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in DTYPES:
        raise UserError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]
