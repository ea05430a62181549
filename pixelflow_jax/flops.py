"""Analytic FLOP counts of the PixelFlow network (for MFU and benchmarks).

One multiply-add is 2 FLOPs. For N tokens of width E, depth L, patch p, C channels:

    per block      24 N E^2          q, k, v, o projections (8 N E^2) + MLP E -> 4E -> E (16 N E^2)
                 +  4 N^2 E          attention: q k^T and (softmax) v
                 + 12 E^2            adaLN modulation (once per image)
    cross-attention (text models, L_t text tokens of width D_t):
                 +  4 N E^2 + 4 L_t D_t E + 4 N L_t E
    outside        4 N p^2 C E       patch embedding and output projection
                 +  4 E^2 + 4 (256 E + E^2)   output modulation, time and size embedders

Norms, RoPE, softmax and elementwise work are not counted (they are memory-bound).
A training step costs 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from typing import Sequence

from pixelflow_jax.config import ModelParams


def forward_flops(p: ModelParams, tokens: int, text_tokens: int = 0) -> int:
    """FLOPs of one forward pass for one image of ``tokens`` tokens."""
    E, N, L = p.embed_dim, tokens, p.depth
    block = 24 * N * E * E + 4 * N * N * E + 12 * E * E
    if p.cross_attention_dim is not None:
        D = p.cross_attention_dim
        block += 4 * N * E * E + 4 * text_tokens * D * E + 4 * N * text_tokens * E
    outside = 4 * N * p.patch_size ** 2 * p.in_channels * E + 4 * E * E + 4 * (256 * E + E * E)
    return L * block + outside


def sampling_flops(p: ModelParams, resolutions: Sequence[int],
                   evaluations: Sequence[float], passes: Sequence[int]) -> float:
    """FLOPs to sample one image: stage s makes ``evaluations[s]`` velocity evaluations,
    each ``passes[s]`` forward passes (2 with classifier-free guidance, else 1)."""
    return float(sum(n * k * forward_flops(p, (r // p.patch_size) ** 2)
                     for r, n, k in zip(resolutions, evaluations, passes)))
