"""The PixelFlow transformer in Flax NNX (DESIGN §2).

Attribute paths mirror the official PyTorch parameter names, so conversion is
a table (``pixelflow_jax.convert``): ``transformer_blocks.attn1.q_proj.kernel``
is the official ``transformer_blocks.{i}.attn1.q_proj.weight`` for every block
i stacked on a leading axis (the blocks run under ``lax.scan``, so compile
time does not grow with depth). Linear kernels are [in, out] (the transpose of
PyTorch's), the patch kernel is [p, p, C, E].

Precision: parameters are float32. Token-wise matmuls and attention run in
``dtype`` (float32 or bfloat16); the residual stream, normalisation,
modulation, RoPE and the conditioning MLPs are float32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelflow_jax.attention import attention
from pixelflow_jax.config import ModelParams
from pixelflow_jax.embeddings import apply_rope, rope_tables, sinusoidal_projection

F32 = jnp.float32
EPS = 1e-6

# The official initialisation (used when training from scratch).
_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_normal02 = nnx.initializers.normal(0.02)
# The patch conv is initialised like a linear map [C p p] -> E.
_patch_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                in_axis=(0, 1, 2), out_axis=3)


def _dense(din: int, dout: int, rngs: nnx.Rngs, *, dtype: Any = F32, use_bias: bool = True,
           kernel_init=_xavier) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=F32,
                      kernel_init=kernel_init, bias_init=_zeros, rngs=rngs)


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), float32."""
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis (eps 1e-6); float32 out."""

    def __init__(self, dim: int):
        self.weight = nnx.Param(jnp.ones((dim,), F32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(F32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + EPS)
        return x * self.weight[...]


class TimestepEmbedding(nnx.Module):
    """linear_1 (256 -> E), SiLU, linear_2 (E -> E), all float32."""

    def __init__(self, in_dim: int, dim: int, rngs: nnx.Rngs):
        self.linear_1 = _dense(in_dim, dim, rngs, kernel_init=_normal02)
        self.linear_2 = _dense(dim, dim, rngs, kernel_init=_normal02)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class LabelEmbedding(nnx.Module):
    """The class table; row ``num_classes`` is the null (unconditional) label."""

    def __init__(self, num_classes: int, dim: int, rngs: nnx.Rngs):
        self.embedding_table = nnx.Embed(num_classes + 1, dim, param_dtype=F32,
                                         embedding_init=_normal02, rngs=rngs)

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.embedding_table(labels)


class PatchEmbed(nnx.Module):
    """A p x p stride-p convolution C -> E; tokens in row-major (y, x) order."""

    def __init__(self, patch: int, channels: int, dim: int, dtype: Any, rngs: nnx.Rngs):
        self.proj = nnx.Conv(channels, dim, (patch, patch), strides=(patch, patch),
                             padding="VALID", dtype=dtype, param_dtype=F32,
                             kernel_init=_patch_init, bias_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)                                  # [B, h, w, E]
        return y.reshape(y.shape[0], -1, y.shape[-1])     # [B, h*w, E]


class AdaLayerNorm(nnx.Module):
    """norm1: ``linear(SiLU(cond))`` -> 6E modulation, float32."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.linear = _dense(dim, 6 * dim, rngs, kernel_init=_zeros)

    def __call__(self, silu_cond: jax.Array) -> tuple[jax.Array, ...]:
        # Order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; each [B, 1, E].
        return tuple(m[:, None, :] for m in jnp.split(self.linear(silu_cond), 6, axis=-1))


class Attention(nnx.Module):
    """Multi-head attention with q/k RMSNorm over the whole width and 2-D RoPE."""

    def __init__(self, q_dim: int, kv_dim: int, heads: int, head_dim: int, use_bias: bool,
                 dtype: Any, attention_impl: str, rngs: nnx.Rngs):
        inner = heads * head_dim
        self.heads, self.head_dim, self.attention_impl = heads, head_dim, attention_impl
        self.q_proj = _dense(q_dim, inner, rngs, dtype=dtype, use_bias=use_bias)
        self.k_proj = _dense(kv_dim, inner, rngs, dtype=dtype, use_bias=use_bias)
        self.v_proj = _dense(kv_dim, inner, rngs, dtype=dtype, use_bias=use_bias)
        self.o_proj = _dense(inner, q_dim, rngs, dtype=dtype, use_bias=use_bias)
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 context: jax.Array | None = None, bias: jax.Array | None = None,
                 kv_lengths: jax.Array | None = None) -> jax.Array:
        """Self-attention on x (RoPE on q and k), or cross-attention to ``context``
        (RoPE on q only), masked by ``bias`` or by ``kv_lengths`` (a prefix mask, see
        :func:`pixelflow_jax.attention.attention`). Returns [B, N, q_dim] in the
        compute dtype."""
        dtype = self.q_proj.dtype
        kv = x if context is None else context
        heads = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
        q = heads(self.q_norm(self.q_proj(x)))
        k = heads(self.k_norm(self.k_proj(kv)))
        v = heads(self.v_proj(kv))
        q = apply_rope(q, *rope)
        if context is None:
            k = apply_rope(k, *rope)
        out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias,
                        kv_lengths=kv_lengths, implementation=self.attention_impl)
        return self.o_proj(out.reshape(*out.shape[:2], -1))


class FeedForward(nnx.Module):
    """fc1 (E -> 4E), GELU (tanh approximation), fc2 (4E -> E)."""

    def __init__(self, dim: int, dtype: Any, rngs: nnx.Rngs, mult: int = 4):
        self.fc1 = _dense(dim, mult * dim, rngs, dtype=dtype)
        self.fc2 = _dense(mult * dim, dim, rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x).astype(F32), approximate=True)
        return self.fc2(h.astype(self.fc1.dtype))


class TransformerBlock(nnx.Module):
    """adaLN-modulated self-attention, optional cross-attention, and MLP."""

    def __init__(self, p: ModelParams, dtype: Any, attention_impl: str, rngs: nnx.Rngs):
        E = p.embed_dim
        self.norm1 = AdaLayerNorm(E, rngs)
        self.attn1 = Attention(E, E, p.num_attention_heads, p.attention_head_dim,
                               p.attention_bias, dtype, attention_impl, rngs)
        if p.cross_attention_dim is not None:
            self.norm2 = RMSNorm(E)
            self.attn2 = Attention(E, p.cross_attention_dim, p.num_attention_heads,
                                   p.attention_head_dim, p.attention_bias, dtype,
                                   attention_impl, rngs)
        self.norm3 = RMSNorm(E)
        self.mlp = FeedForward(E, dtype, rngs)

    def __call__(self, h: jax.Array, silu_cond: jax.Array, rope: tuple[jax.Array, jax.Array],
                 context: jax.Array | None, context_bias: jax.Array | None,
                 context_lengths: jax.Array | None = None) -> jax.Array:
        dtype = self.mlp.fc1.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(silu_cond)
        a = layer_norm(h) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * self.attn1(a.astype(dtype), rope).astype(F32)
        if context is not None:
            c = self.norm2(h).astype(dtype)
            h = h + self.attn2(c, rope, context.astype(dtype), context_bias,
                               context_lengths).astype(F32)
        m = self.norm3(h) * (1 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.mlp(m.astype(dtype)).astype(F32)


class PixelFlowModel(nnx.Module):
    """The PixelFlow network: (image, model timestep, class or text) -> velocity.

    Args:
      params: the official ``model.params``.
      dtype: compute dtype of token-wise matmuls and attention (float32 or bfloat16).
      attention_impl: see :func:`pixelflow_jax.attention.attention`.
      remat: rematerialise each block in the backward pass (training memory).
      rngs: initialisation randomness (the official scheme: Xavier-uniform linears,
        N(0, 0.02) embedders, zero adaLN and output layers).
    """

    def __init__(self, params: ModelParams, *, dtype: Any = F32, attention_impl: str = "auto",
                 remat: bool = False, rngs: nnx.Rngs):
        p = self.params = params
        E = p.embed_dim
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.patch_embed = PatchEmbed(p.patch_size, p.in_channels, E, dtype, rngs)
        self.timestep_embedder = TimestepEmbedding(256, E, rngs)
        self.latent_size_embedder = TimestepEmbedding(256, E, rngs)
        if p.num_classes > 0:
            self.class_embedder = LabelEmbedding(p.num_classes, E, rngs)

        @nnx.split_rngs(splits=p.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(p, dtype, attention_impl, rngs)

        self.transformer_blocks = make_blocks(rngs)
        self.proj_out_1 = _dense(E, 2 * E, rngs, kernel_init=_zeros)
        self.proj_out_2 = _dense(E, p.patch_size ** 2 * p.out_channels, rngs, dtype=dtype,
                                 kernel_init=_zeros)

    def __call__(self, x: jax.Array, timestep: jax.Array, class_labels: jax.Array | None = None,
                 context: jax.Array | None = None,
                 context_mask: jax.Array | None = None,
                 context_lengths: jax.Array | None = None) -> jax.Array:
        """Velocity for ``x`` [B, H, W, C] (NHWC, square) at model timesteps [B].

        Class-conditional models take ``class_labels`` [B] (int; ``num_classes`` is
        the null label); text models take ``context`` [B, L, cross_attention_dim]
        and optionally its mask: ``context_mask`` [B, L] (1 = attend; the official
        bias ``(1 - m) * -10000``), or, for a prefix mask (T5's), ``context_lengths``
        int [B] >= 1 (the first n tokens attend), which keeps cuDNN's fused kernel
        available on GPU and gives the same logits elsewhere (DESIGN §7). Returns
        float32 [B, H, W, out_channels].
        """
        p = self.params
        B, H, W, C = x.shape
        self._check_inputs(x, class_labels, context, context_mask)
        if context_lengths is not None and (context is None or context_mask is not None):
            raise ValueError("context_lengths needs context and replaces context_mask")
        grid = H // p.patch_size
        precision = "highest" if self.dtype == F32 else None
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            cond = self.timestep_embedder(sinusoidal_projection(jnp.broadcast_to(timestep, (B,))))
            if p.num_classes > 0:
                cond = cond + self.class_embedder(class_labels)
            cond = cond + self.latent_size_embedder(sinusoidal_projection(jnp.full((1,), grid)))
            silu_cond = jax.nn.silu(cond)

            h = self.patch_embed(x.astype(F32).astype(self.dtype)).astype(F32)
            rope = tuple(jnp.asarray(t) for t in rope_tables(grid, p.attention_head_dim))
            bias = None
            if context is not None and context_mask is not None:
                mask = context_mask.astype(F32)
                bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
            h = self._run_blocks(h, silu_cond, rope, context, bias, context_lengths)

            shift, scale = jnp.split(self.proj_out_1(silu_cond)[:, None, :], 2, axis=-1)
            h = layer_norm(h) * (1 + scale) + shift
            out = self.proj_out_2(h.astype(self.dtype)).astype(F32)  # [B, N, p*p*C_out]
        q, c_out = p.patch_size, p.out_channels
        out = out.reshape(B, grid, grid, q, q, c_out).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(B, H, W, c_out)

    def _run_blocks(self, h, silu_cond, rope, context, bias, context_lengths=None):
        graphdef, state = nnx.split(self.transformer_blocks)

        def body(h, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(h, silu_cond, rope, context, bias, context_lengths), None

        if self.remat:
            body = jax.checkpoint(body)
        h, _ = jax.lax.scan(body, h, state)
        return h

    def _check_inputs(self, x, class_labels, context, context_mask) -> None:
        p = self.params
        if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[1] % p.patch_size:
            raise ValueError(f"x must be [B, H, H, C] with H a multiple of {p.patch_size}, "
                             f"got {x.shape}")
        if x.shape[3] != p.in_channels:
            raise ValueError(f"x has {x.shape[3]} channels, the model takes {p.in_channels}")
        if p.num_classes > 0 and class_labels is None:
            raise ValueError("this class-conditional model needs class_labels")
        if p.num_classes == 0 and class_labels is not None:
            raise ValueError("this model has no class table; class_labels must be None")
        if p.cross_attention_dim is None and context is not None:
            raise ValueError("this model has no cross-attention; context must be None")
        if p.cross_attention_dim is not None:
            if context is None:
                raise ValueError("this text-conditioned model needs context")
            if context.shape[-1] != p.cross_attention_dim:
                raise ValueError(f"context width {context.shape[-1]} != cross_attention_dim "
                                 f"{p.cross_attention_dim}")
        if context_mask is not None and context is None:
            raise ValueError("context_mask given without context")


def count_params(model: nnx.Module) -> int:
    """Number of parameters (scalars) of ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(params: ModelParams, **kwargs) -> PixelFlowModel:
    """A model whose parameters are ShapeDtypeStructs (nothing allocated)."""
    return nnx.eval_shape(lambda: PixelFlowModel(params, rngs=nnx.Rngs(0), **kwargs))


def init_model(params: ModelParams, *, seed: int = 0, **kwargs) -> PixelFlowModel:
    """A model with the official random initialisation, built under one ``jax.jit``.

    (Built eagerly, every parameter's initialiser compiles on its own: ~9 s on CPU
    even for a tiny model.)
    """
    graphdef, _ = nnx.split(abstract_model(params, **kwargs))
    make = lambda: nnx.state(PixelFlowModel(params, rngs=nnx.Rngs(seed), **kwargs))
    return nnx.merge(graphdef, jax.jit(make)())
