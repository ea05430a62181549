"""Softmax attention: cuDNN's fused kernel on NVIDIA GPUs, XLA elsewhere (DESIGN §2).

``implementation="auto"`` picks cuDNN's flash attention (through
:func:`jax.nn.dot_product_attention`) on GPUs for bf16/fp16 without a dense
bias, so no N x N matrix is ever stored. A text mask, always a prefix mask
(tokens and ``</s>``, then padding), travels as key/value lengths
(``kv_lengths``) rather than as the official dense bias ``(1 - m) * -10000``, so
masked cross-attention reaches the fused kernel too; the XLA paths add exactly
the official bias rebuilt from the lengths (DESIGN §7).

Everywhere else attention is computed here in a heads-first layout (XLA's CPU
batched matmul is 1.5-3x faster with the batch dimensions leading than on
:func:`jax.nn.dot_product_attention`'s [B, T, N, H] einsum) with the logits,
softmax and normalisation in float32. ``"chunked"`` maps over (batch x head,
query block) with ``lax.map``: memory stays bounded for very long sequences
(65,536 tokens at 1024 px) and, on CPU, the logits of one step stay in cache,
which is faster from ~512 tokens on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")

# Logits allowed in one XLA attention call (2^27 float32 = 512 MiB) ...
MAX_LOGITS = 2 ** 27
# ... and per (batch, head) step of the chunked form (2^20 float32 = 4 MiB).
CHUNK_LOGITS = 2 ** 20
# On CPU, sequences with at least this many query x key pairs use the chunked form.
CPU_CHUNK_FROM = 2 ** 18
# The official mask bias: masked logits get -10000 added (DESIGN §7: in float32 the
# masked weights underflow to exactly 0, as with -inf, so cuDNN's exclusion agrees).
MASK_BIAS = -10000.0


def select_implementation(implementation: str, dtype: jnp.dtype, has_bias: bool,
                          num_logits: int, seq_pairs: int = 0, backend: str | None = None,
                          max_logits: int = MAX_LOGITS) -> str:
    """Resolve ``"auto"`` to ``"cudnn"``, ``"xla"`` or ``"chunked"``.

    ``num_logits`` = B x H x T x S of the call; ``seq_pairs`` = T x S. ``has_bias``
    means a dense bias; key/value lengths (``attention(kv_lengths=...)``) are not one
    and leave cuDNN available.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not has_bias:
        return "cudnn"
    if num_logits > max_logits or (backend == "cpu" and seq_pairs >= CPU_CHUNK_FROM):
        return "chunked"
    return "xla"


def prefix_lengths(mask) -> np.ndarray | None:
    """Host-side: int32 [B] lengths if every row of ``mask`` [B, S] is 1 on its first
    n >= 1 positions and 0 after (a T5 attention mask), else None.

    None (the caller keeps the dense bias) for any other mask: holes, values other
    than 0 and 1, or an all-zero row, where the official bias gives uniform attention
    over every key but a length of 0 would leave nothing to attend.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.shape[1] == 0:
        return None
    ones = m == 1
    if not (ones | (m == 0)).all():
        return None
    lengths = ones.sum(axis=1)
    if (lengths == 0).any() or not (ones == (np.arange(m.shape[1]) < lengths[:, None])).all():
        return None
    return lengths.astype(np.int32)


def length_bias(kv_lengths: jax.Array, num_keys: int) -> jax.Array:
    """The official mask bias [B, 1, 1, S] of a prefix mask given by its lengths:
    0 on the first ``kv_lengths[b]`` keys, :data:`MASK_BIAS` after (float32)."""
    keep = jnp.arange(num_keys)[None, :] < jnp.asarray(kv_lengths)[:, None]
    return jnp.where(keep, 0.0, MASK_BIAS).astype(jnp.float32)[:, None, None, :]


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                       bias: jax.Array | None) -> jax.Array:
    """Heads-first core: q [..., T, D], k and v [..., S, D], bias broadcast to [..., T, S]."""
    s = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=jnp.float32)
    s = s * (q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    out = jnp.einsum("...ts,...sd->...td", e.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / e.sum(axis=-1, keepdims=True)).astype(q.dtype)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
             chunk_logits: int) -> jax.Array:
    """lax.map over (batch x head, query block); q [B, H, T, D], k, v [B, H, S, D]."""
    B, H, T, D = q.shape
    S = k.shape[2]
    c = T & -T  # the largest power of two dividing T ...
    while c > 16 and c * S > chunk_logits:  # ... halved until one block's logits fit
        c //= 2
    n = T // c
    qb = q.reshape(B * H, n, c, D)
    kb, vb = k.reshape(B * H, S, D), v.reshape(B * H, S, D)
    if bias is None:
        def one(i):
            return _softmax_attention(qb[i // n, i % n], kb[i // n], vb[i // n], None)
    else:
        full = jnp.broadcast_to(bias, (B, H, bias.shape[2], S)).reshape(B * H, -1, S)
        per_query = bias.shape[2] != 1

        def one(i):
            rows = jax.lax.dynamic_slice_in_dim(full[i // n], (i % n) * c, c) if per_query \
                else full[i // n]
            return _softmax_attention(qb[i // n, i % n], kb[i // n], vb[i // n], rows)
    out = jax.lax.map(one, jnp.arange(B * H * n))
    return out.reshape(B, H, T, D)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
              *, kv_lengths: jax.Array | None = None, implementation: str = "auto",
              chunk_logits: int = CHUNK_LOGITS) -> jax.Array:
    """softmax(q k^T / sqrt(D) + bias) v for q [B, T, H, D], k and v [B, S, H, D].

    ``bias`` broadcasts to [B, H, T, S] (e.g. [B, 1, 1, S] for a text mask).
    ``kv_lengths`` int [B] (each >= 1): row b attends to its first ``kv_lengths[b]``
    keys only, as the official bias of a prefix mask (:func:`length_bias`) does, but
    without a dense bias: cuDNN masks by sequence length (masked keys excluded), the
    XLA paths add :func:`length_bias` (the same logits as the official bias, bit for bit).
    Returns [B, T, H, D] in q's dtype.
    """
    B, T, H, _ = q.shape
    S = k.shape[1]
    impl = select_implementation(implementation, q.dtype, bias is not None, B * H * T * S,
                                 T * S)
    if impl == "cudnn":
        if kv_lengths is not None:
            kv_lengths = jnp.asarray(kv_lengths).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, bias=bias,
                                            key_value_seq_lengths=kv_lengths,
                                            implementation="cudnn")
    if kv_lengths is not None:
        lbias = length_bias(kv_lengths, S)
        bias = lbias if bias is None else bias.astype(jnp.float32) + lbias
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    if impl == "chunked":
        out = _chunked(q, k, v, bias, chunk_logits)
    else:
        out = _softmax_attention(q, k, v, bias)
    return heads_first(out)
