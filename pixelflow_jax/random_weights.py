"""Random weights of normal scale in the official layout (NumPy only, no JAX).

Linears and the patch conv N(0, 1/fan_in), biases N(0, 0.1^2), RMSNorm weights
1 + N(0, 0.2^2), the class table N(0, 1): every layer does real work, unlike
the official from-scratch initialisation whose output layer is zero. For smoke
tests and benchmarks; equivalence tests draw their own weights in the oracle.
"""

from __future__ import annotations

import numpy as np

from pixelflow_jax.config import ModelParams
from pixelflow_jax.convert import official_layout


def normal_scale_state_dict(params: ModelParams, seed: int = 0) -> dict[str, np.ndarray]:
    """Official name -> float32 array (PyTorch layout), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in official_layout(params).items():
        z = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith(".bias"):
            sd[name] = 0.1 * z
        elif len(shape) == 1:
            sd[name] = 1.0 + 0.2 * z
        elif name.startswith("class_embedder"):
            sd[name] = z
        else:
            sd[name] = z / np.sqrt(np.prod(shape[1:]), dtype=np.float32)
    return sd
