"""The T5 encoder (PixelFlow's text encoder, flan-t5-xl) in Flax NNX (DESIGN §7).

Output: ``last_hidden_state`` of the Hugging Face ``T5EncoderModel``, i.e. after the
final layer norm, computed with the attention mask. Every size comes from a
:class:`T5Config` (the folder's ``config.json``); flan-t5-xl is d_model 2048, 32 heads
of 64, d_ff 5120, 24 layers, gated GELU.

T5 specifics reproduced: RMS layer norm without mean or bias (variance in float32);
attention without biases and without the 1/sqrt(d) scaling (T5 folds it into the
initialisation of q); one relative-position bias table, owned by block 0, computed
once per call and added in every block; the mask added as float32's most negative
value; softmax in float32.

Attribute paths mirror the Hugging Face names so loading is a table
(``pixelflow_jax.hf_weights``): ``block.SelfAttention.q.kernel`` is
``encoder.block.{i}.layer.0.SelfAttention.q.weight`` transposed, for every block i
stacked on a leading axis (blocks run under ``lax.scan``, as in ``model.py``);
``attention_layer_norm`` / ``ff_layer_norm`` are ``layer.0`` / ``layer.1.layer_norm``.

Precision: float32 by default (the official pipeline runs the encoder in float32).
bfloat16 keeps the parameters and the matmuls in bfloat16 and the residual stream,
norms and softmax in float32. float16 is refused: T5's activations overflow it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.errors import ConfigError, UserError

F32 = jnp.float32

# Hugging Face activation names (``ACT2FN``) -> function on float32.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """The encoder's sizes, as named in a Hugging Face T5 ``config.json``."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The ``ACT2FN`` name: as Hugging Face derives it, "gated-gelu" means tanh GELU."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "T5Config":
        """Read the encoder's fields from a parsed ``config.json`` (other keys are ignored).

        Raises :class:`ConfigError` naming every missing or bad field.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not a T5 encoder "
                              "(expected 't5', e.g. google/flan-t5-xl)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items()
                   if f.default is dataclasses.MISSING and n not in data]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        kwargs = {n: data[n] for n in fields if n in data}
        problems = [f"{n} must be a positive integer, got {v!r}" for n, v in kwargs.items()
                    if fields[n].type == "int" and (type(v) is not int or v < 1)]
        eps = kwargs.get("layer_norm_epsilon", 1e-6)
        if type(eps) not in (int, float) or not 0 <= eps < 1:
            problems.append(f"layer_norm_epsilon must be a number in [0, 1), got {eps!r}")
        if not isinstance(kwargs.get("feed_forward_proj", "relu"), str):
            problems.append("feed_forward_proj must be a string")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        config = cls(**kwargs)
        config.validate(source, data.get("dense_act_fn"))
        return config

    def validate(self, source: str = "T5Config", dense_act_fn: Any = None) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"{source}: feed_forward_proj {self.feed_forward_proj!r} is not "
                              "'ACT' or 'gated-ACT'")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation {self.activation!r} (from feed_forward_proj "
                              f"{self.feed_forward_proj!r}) is not one of "
                              f"{', '.join(sorted(ACTIVATIONS))}")
        # Hugging Face derives dense_act_fn from feed_forward_proj, but some versions let a
        # dense_act_fn in the file override it: refuse a disagreement rather than guess.
        if dense_act_fn is not None and dense_act_fn != self.activation:
            raise ConfigError(f"{source}: dense_act_fn {dense_act_fn!r} disagrees with "
                              f"feed_forward_proj {self.feed_forward_proj!r} "
                              f"(which means {self.activation!r})")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(f"{source}: relative_attention_num_buckets must be >= 4")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ConfigError(f"{source}: relative_attention_max_distance must exceed "
                              "relative_attention_num_buckets // 4 (the exact distances)")


def check_dtype(dtype: Any) -> jnp.dtype:
    """``dtype`` as a NumPy dtype if the encoder supports it (float32, bfloat16)."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise UserError(f"unknown dtype {dtype!r} for the T5 encoder") from None
    if d == jnp.float16:
        raise UserError("the T5 encoder cannot run in float16: its activations overflow "
                        "float16's range; use bfloat16 or float32")
    if d not in (jnp.dtype(F32), jnp.dtype(jnp.bfloat16)):
        raise UserError(f"the T5 encoder runs in float32 or bfloat16, not {d.name}")
    return d


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of key position j relative to query i: int32 [length, length].

    Half the buckets per direction (the upper half for keys after the query); in each,
    distances below a quarter of ``num_buckets`` get a bucket each, longer ones share
    logarithmically wider buckets up to ``max_distance``, beyond which all share the last.
    Computed with NumPy in float32, as PyTorch computes it, so bucket edges agree.
    """
    half = num_buckets // 2
    exact = half // 2
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]      # key - query
    dist = np.abs(rel)
    # log of at least 1: the distances below ``exact`` take the other branch anyway.
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)
    log_ratio = np.log(ratio) / np.float32(math.log(max_distance / exact))
    large = exact + (log_ratio * np.float32(half - exact)).astype(np.int64)
    bucket = np.where(dist < exact, dist, np.minimum(large, half - 1)) + np.where(rel > 0, half, 0)
    return bucket.astype(np.int32)


def init_std(name: str, c: T5Config) -> float:
    """T5's initialisation scale of the weight ``name`` (q also carries attention's
    1/sqrt(d_kv), which T5 folds into the weights instead of the scores)."""
    return {"q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model ** -0.5, "v": c.d_model ** -0.5,
            "o": (c.num_heads * c.d_kv) ** -0.5, "wi": c.d_model ** -0.5,
            "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5,
            "shared": 1.0, "relative_attention_bias": c.d_model ** -0.5}[name]


def _linear(din: int, dout: int, std: float, dtype: Any, param_dtype: Any,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


class T5LayerNorm(nnx.Module):
    """weight * x / sqrt(mean(x^2) + eps): no mean, no bias; float32 out."""

    def __init__(self, dim: int, eps: float, param_dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(F32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(F32) * x


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias; q, k, v, o without biases."""

    def __init__(self, c: T5Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        inner = c.num_heads * c.d_kv
        self.heads, self.d_kv, self.dtype = c.num_heads, c.d_kv, dtype
        self.q = _linear(c.d_model, inner, init_std("q", c), dtype, param_dtype, rngs)
        self.k = _linear(c.d_model, inner, init_std("k", c), dtype, param_dtype, rngs)
        self.v = _linear(c.d_model, inner, init_std("v", c), dtype, param_dtype, rngs)
        self.o = _linear(inner, c.d_model, init_std("o", c), dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array,
                 mask_bias: jax.Array) -> jax.Array:
        """x [N, L, d_model]; position_bias [H, L, L] and mask_bias [N, L] float32."""
        heads = lambda t: t.reshape(*t.shape[:2], self.heads, self.d_kv)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=F32)
        scores = scores + position_bias[None] + mask_bias[:, None, None, :]
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(self.dtype), v,
                         preferred_element_type=F32)
        return self.o(out.reshape(*out.shape[:2], -1).astype(self.dtype))


class T5FeedForward(nnx.Module):
    """Gated: ``wo(act(wi_0 x) * wi_1 x)``; otherwise ``wo(act(wi x))``."""

    def __init__(self, c: T5Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.gated, self.act, self.dtype = c.is_gated, c.activation, dtype
        if c.is_gated:
            self.wi_0 = _linear(c.d_model, c.d_ff, init_std("wi_0", c), dtype, param_dtype, rngs)
            self.wi_1 = _linear(c.d_model, c.d_ff, init_std("wi_1", c), dtype, param_dtype, rngs)
        else:
            self.wi = _linear(c.d_model, c.d_ff, init_std("wi", c), dtype, param_dtype, rngs)
        self.wo = _linear(c.d_ff, c.d_model, init_std("wo", c), dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        if self.gated:
            h = act(self.wi_0(x).astype(F32)) * self.wi_1(x).astype(F32)
        else:
            h = act(self.wi(x).astype(F32))
        return self.wo(h.astype(self.dtype))


class T5Block(nnx.Module):
    """Pre-norm self-attention then pre-norm feed-forward, residual stream in float32."""

    def __init__(self, c: T5Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.attention_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, param_dtype)
        self.SelfAttention = T5Attention(c, dtype, param_dtype, rngs)
        self.ff_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, param_dtype)
        self.DenseReluDense = T5FeedForward(c, dtype, param_dtype, rngs)

    def __call__(self, h: jax.Array, position_bias: jax.Array,
                 mask_bias: jax.Array) -> jax.Array:
        a = self.attention_layer_norm(h).astype(self.dtype)
        h = h + self.SelfAttention(a, position_bias, mask_bias).astype(F32)
        f = self.ff_layer_norm(h).astype(self.dtype)
        return h + self.DenseReluDense(f).astype(F32)


class T5Encoder(nnx.Module):
    """The T5 encoder stack: token ids and mask -> float32 ``last_hidden_state``.

    Args:
      config: sizes (from the folder's ``config.json``).
      dtype: compute dtype, float32 (default, parity with the official pipeline) or
        bfloat16; float16 raises :class:`UserError`.
      param_dtype: parameter dtype (default: ``dtype``, so bfloat16 halves memory).
      rngs: initialisation randomness (random weights, for benchmarks; real weights
        come from :func:`pixelflow_jax.hf_weights.load_t5_encoder`).
    """

    def __init__(self, config: T5Config, *, dtype: Any = F32, param_dtype: Any = None,
                 rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = check_dtype(dtype)
        param_dtype = check_dtype(dtype if param_dtype is None else param_dtype)
        self.shared = nnx.Embed(c.vocab_size, c.d_model, param_dtype=param_dtype,
                                embedding_init=nnx.initializers.normal(init_std("shared", c)),
                                rngs=rngs)
        self.relative_attention_bias = nnx.Embed(
            c.relative_attention_num_buckets, c.num_heads, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(init_std("relative_attention_bias", c)),
            rngs=rngs)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> T5Block:
            return T5Block(c, self.dtype, param_dtype, rngs)

        self.block = make_blocks(rngs)
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids and attention_mask [N, L] (1 = token) -> float32 [N, L, d_model]."""
        c = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids {input_ids.shape} and attention_mask "
                             f"{attention_mask.shape} must both be [N, L]")
        length = input_ids.shape[1]
        # A trace-time constant: the sequence length is static.
        buckets = relative_position_buckets(length, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        table = self.relative_attention_bias.embedding[...].astype(F32)
        position_bias = jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))  # [H, L, L]
        mask_bias = (1.0 - attention_mask.astype(F32)) * jnp.finfo(F32).min
        precision = "highest" if self.dtype == F32 else None
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            h = jnp.take(self.shared.embedding[...], input_ids, axis=0).astype(F32)
            graphdef, state = nnx.split(self.block)

            def body(h, block_state):
                return nnx.merge(graphdef, block_state)(h, position_bias, mask_bias), None

            h, _ = jax.lax.scan(body, h, state)
            return self.final_layer_norm(h)


def abstract_encoder(config: T5Config, **kwargs) -> T5Encoder:
    """An encoder whose parameters are ShapeDtypeStructs (nothing allocated)."""
    return nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0), **kwargs))


def init_encoder(config: T5Config, *, seed: int = 0, **kwargs) -> T5Encoder:
    """An encoder with random weights at T5's initialisation scales (:func:`init_std`).

    Drawn one parameter, and for stacked block parameters one block, at a time, so the
    peak is little more than the parameters (one ``jax.jit`` over the whole
    initialisation holds its random temporaries too: 2.4x the parameters on CPU).
    """
    graphdef, state = nnx.split(abstract_encoder(config, **kwargs))
    key = jax.random.key(seed)

    def draw(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names = [p.key for p in path]
        if names[-1] == "weight":  # layer norms
            return jnp.ones(leaf.shape, leaf.dtype)
        std = init_std(names[-2] if names[-1] == "kernel" else names[0], config)
        k = jax.random.fold_in(key, zlib.crc32("/".join(names).encode()))
        return _normal(k, leaf.shape, leaf.dtype, std, names[0] == "block")

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float,
            stacked: bool) -> jax.Array:
    draw = lambda k, s: (std * jax.random.normal(k, s, F32)).astype(dtype)
    if not stacked:
        return draw(key, shape)
    return jax.lax.map(lambda k: draw(k, shape[1:]), jax.random.split(key, shape[0]))
