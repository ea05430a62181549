"""Attention: kernel choice, query chunking, and no N x N matrix at 65,536 tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.attention import attention, prefix_lengths, select_implementation


def reference(q, k, v, bias=None):
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def test_selection():
    sel = lambda *a, **k: select_implementation("auto", *a, **k)
    assert sel(jnp.bfloat16, False, 10, backend="gpu") == "cudnn"
    assert sel(jnp.float32, False, 10, backend="gpu") == "xla"      # cuDNN needs 16-bit
    assert sel(jnp.bfloat16, True, 10, backend="gpu") == "xla"      # text-mask bias
    assert sel(jnp.float32, False, 10, 10, backend="cpu") == "xla"
    assert sel(jnp.float32, False, 2 ** 20, 2 ** 18, backend="cpu") == "chunked"  # faster on CPU
    assert sel(jnp.float32, False, 2 ** 20, 2 ** 18, backend="tpu") == "xla"
    assert sel(jnp.float32, False, 2 ** 30, 2 ** 24, backend="tpu") == "chunked"  # memory
    assert select_implementation("xla", jnp.float32, False, 2 ** 40) == "xla"
    with pytest.raises(ValueError, match="must be one of"):
        select_implementation("flash", jnp.float32, False, 1)


@pytest.mark.parametrize("bias_shape", [None, (2, 1, 1, 24), (2, 3, 32, 24)])
def test_chunked_equals_direct(bias_shape):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in [(2, 32, 3, 8), (2, 24, 3, 8), (2, 24, 3, 8)])
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    want = reference(q, k, v, bias)
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    for impl, limit in [("xla", 2 ** 20), ("chunked", 2 ** 20), ("chunked", 16 * 24)]:
        got = attention(f32(q), f32(k), f32(v), f32(bias), implementation=impl,
                        chunk_logits=limit)  # one block of 32 queries, or two of 16
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_65536_tokens_need_no_n_by_n_matrix():
    # 1024 px at patch 4: 65,536 tokens. An N x N float32 matrix per head is 16 GiB; the
    # compiled program must stay far below that (checked without running it).
    n, heads = 65536, 2  # auto picks the chunked form on CPU
    q = jax.ShapeDtypeStruct((1, n, heads, 8), jnp.float32)
    compiled = jax.jit(lambda q, k, v: attention(q, k, v)).lower(q, q, q).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2 * 2 ** 30, f"{temp / 2**30:.1f} GiB of temporaries"


# ------------------------------------------------------------------ text masks as lengths

def _qkv(rng, B=3, T=32, S=24, H=2, D=8):
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in [(B, T, H, D), (B, S, H, D), (B, S, H, D)])


LENGTHS = np.array([1, 9, 24], np.int32)  # eos only, a prompt, no padding at all


def official_bias(lengths, S):
    """The official text bias (1 - m) * -10000 of a prefix mask, written from the spec."""
    m = (np.arange(S)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return ((1.0 - m) * -10000.0)[:, None, None, :]


@pytest.mark.parametrize("impl, limit", [("xla", 2 ** 20), ("chunked", 16 * 24)])
def test_kv_lengths_equal_the_official_bias(impl, limit):
    """Lengths on the XLA paths give the official bias's result bit for bit, and equal
    masked keys left out entirely (float64 NumPy, and jax.nn.dot_product_attention's own
    xla path with key_value_seq_lengths): -10000 underflows to exactly 0 weight."""
    q, k, v = _qkv(np.random.default_rng(1))
    S = k.shape[1]
    got = attention(q, k, v, kv_lengths=jnp.asarray(LENGTHS), implementation=impl,
                    chunk_logits=limit)
    with_bias = attention(q, k, v, jnp.asarray(official_bias(LENGTHS, S)),
                          implementation=impl, chunk_logits=limit)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(with_bias))
    oracle = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.asarray(LENGTHS),
                                          implementation="xla")
    np.testing.assert_allclose(got, oracle, atol=2e-5)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    for b, n in enumerate(LENGTHS):  # the keys past the length simply absent
        want = reference(qn[b:b + 1], kn[b:b + 1, :n], vn[b:b + 1, :n])
        np.testing.assert_allclose(got[b:b + 1], want, atol=2e-5)
    # Not vacuous: the masked keys carry weight when unmasked.
    assert np.abs(np.asarray(got) - np.asarray(attention(q, k, v))).max() > 0.1


def test_kv_lengths_add_to_a_bias_and_follow_the_batch_under_jit():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng)
    bias = jnp.asarray(rng.standard_normal((3, 2, 32, 24)), jnp.float32)
    f = jax.jit(lambda q, k, v, b, n: attention(q, k, v, b, kv_lengths=n))
    got = f(q, k, v, bias, jnp.asarray(LENGTHS))
    want = reference(*(np.asarray(a, np.float64) for a in (q, k, v)),
                     np.asarray(bias, np.float64) + official_bias(LENGTHS, 24))
    np.testing.assert_allclose(got, want, atol=2e-5)
    # New lengths are values, not shapes: the same program.
    f(q, k, v, bias, jnp.asarray(LENGTHS[::-1].copy()))
    assert f._cache_size() == 1


def test_kv_lengths_reach_cudnn_on_gpu(monkeypatch):
    """On a GPU in bf16 the lengths go to cuDNN's flash attention (no dense bias); a bias
    still rules it out. (Recorded, not run: no GPU here.)"""
    import pixelflow_jax.attention as attention_module
    calls = []

    def fake(q, k, v, bias=None, *, key_value_seq_lengths=None, implementation=None):
        calls.append(dict(bias=bias, lengths=key_value_seq_lengths,
                          implementation=implementation))
        return q

    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_module.jax.nn, "dot_product_attention", fake)
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(np.random.default_rng(3)))
    attention(q, k, v, kv_lengths=np.asarray(LENGTHS, np.int64))
    assert len(calls) == 1 and calls[0]["implementation"] == "cudnn"
    assert calls[0]["bias"] is None
    assert calls[0]["lengths"].dtype == jnp.int32  # what cuDNN's padding mask takes
    np.testing.assert_array_equal(calls[0]["lengths"], LENGTHS)
    attention(q, k, v, jnp.asarray(official_bias(LENGTHS, 24)))  # the dense bias: XLA
    attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
              kv_lengths=LENGTHS)  # float32: XLA
    assert len(calls) == 1


def test_prefix_lengths():
    np.testing.assert_array_equal(
        prefix_lengths(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)),
        [2, 1, 4])
    assert prefix_lengths(np.array([[1, 1, 0, 0]], np.int32)).dtype == np.int32
    for bad in ([[1, 0, 1, 0]],        # a hole
                [[0, 1, 1, 0]],        # not from the start
                [[0, 0, 0, 0]],        # nothing to attend (the bias attends uniformly)
                [[1, 0.5, 0, 0]],      # not 0/1
                [1, 1, 0]):            # not [B, L]
        assert prefix_lengths(np.array(bad, np.float32)) is None, bad
