"""The FID Inception network of the ADM evaluator, in Flax NNX (NHWC). DESIGN §12.

This is the TensorFlow graph ``classify_image_graph_def.pb`` (Inception-v3 of
2015-12-05) that every FID since 2017 uses, the graph ADM's evaluator runs, with
its quirks: the input is resized *inside* the network to 299 with TF1's legacy
bilinear resize (:func:`resize_tf1_bilinear`), then mapped by ``(x - 128) / 128``;
BatchNorm epsilon is 0.001; blocks Mixed_5b-d, 6b-e and 7b average-pool without
counting padding and Mixed_7c max-pools; there are 1008 classes.

One pass returns the three feature sets the ADM suite reads
(:class:`InceptionOutputs`): ``pool`` (``pool_3``, 2048) for FID and
precision/recall, ``spatial`` (``mixed_6/conv``: Mixed_6d's 1x1 branch after its
ReLU, first 7 channels of the 17x17 map, flattened in NHWC order, 2023) for sFID,
and ``logits`` (``pool_3 @ softmax/weights``, no bias, 1008) for the Inception Score.

Attribute paths follow torchvision's names (``Mixed_6d.branch1x1.conv.kernel``,
``...bn.scale``), so loading a ``.pth`` is a rename; weights come from
:func:`pixelflow_jax.inception_weights.load_inception`.

``dtype=jnp.bfloat16`` runs the convolutions in bfloat16 (float32 accumulation,
BatchNorm, pooling sums and outputs in float32). It is faster on GPUs/TPUs but
moves features by several percent (3e-2 to 8e-2 relative on the tests' random
network): never use it for numbers you report (DESIGN §12).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.errors import UserError

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # 2023

F32 = jnp.float32


class InceptionOutputs(NamedTuple):
    """Features of a batch of N images (float32)."""

    pool: jax.Array     # [N, 2048]  pool_3
    spatial: jax.Array  # [N, 2023]  mixed_6/conv[..., :7], NHWC-flattened
    logits: jax.Array   # [N, 1008]  pool_3 @ softmax/weights (no bias)


# ----------------------------------------------------------------------------- resize


def tf1_resize_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, float32 fraction) of TF1's legacy bilinear resize.

    Output pixel i reads the source position ``i * scale`` with the float32
    ``scale = in / out`` (``align_corners=False`` without half-pixel centres),
    between ``floor`` and ``floor + 1`` clamped to the last pixel. DESIGN §12.
    """
    scale = np.float32(in_size / out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
    frac = (src - lower.astype(np.float32)).astype(np.float32)
    return lower, upper, frac


def resize_tf1_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Resize float images [N, H, W, C] to [N, size, size, C] as TF1's ``resize_bilinear``.

    Not ``jax.image.resize`` (half-pixel centres, and antialiasing when
    shrinking) and not PyTorch's ``interpolate``: TF1's legacy sampling, with
    TF's interpolation order (rows of the top and bottom neighbours first, then
    between them). Index tables are static NumPy constants.
    """
    _, h, w, _ = images.shape
    y0, y1, dy = tf1_resize_table(h, size)
    x0, x1, dx = tf1_resize_table(w, size)
    top, bottom = jnp.take(images, y0, axis=1), jnp.take(images, y1, axis=1)
    dx = jnp.asarray(dx)[None, None, :, None]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * dx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * dx
    return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


# ----------------------------------------------------------------------------- layers


def _precision(dtype: Any) -> Any:
    # DESIGN §9: float32 means float32 everywhere (no TF32/bf16 passes on GPU/TPU).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class _Conv(nnx.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], init: Callable):
        self.kernel = nnx.Param(init((kernel[0], kernel[1], cin, cout), fan_in=cin * kernel[0]
                                     * kernel[1]))


class _BatchNorm(nnx.Module):
    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), F32))
        self.bias = nnx.Param(jnp.zeros((channels,), F32))
        self.mean = nnx.Param(jnp.zeros((channels,), F32))
        self.var = nnx.Param(jnp.ones((channels,), F32))


class BasicConv(nnx.Module):
    """Convolution without bias, inference BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, init: Callable, dtype: Any = F32):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = _Conv(cin, cout, kernel, init)
        self.bn = _BatchNorm(cout)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.conv.kernel[...].astype(self.dtype),
            (self.stride, self.stride), [(p, p) for p in self.padding],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_precision(self.dtype),
            preferred_element_type=F32)
        bn = self.bn
        # TF's BatchNormWithGlobalNormalization: (y - mean) * rsqrt(var + eps) * gamma + beta.
        a = jax.lax.rsqrt(bn.var[...] + BN_EPS) * bn.scale[...]
        return jax.nn.relu((y - bn.mean[...]) * a + bn.bias[...]).astype(self.dtype)


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 pad)


def _window_counts(n: int) -> np.ndarray:
    i = np.arange(n)
    return (np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1).astype(np.float32)


def _avg_pool_valid_only(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool over the in-image pixels only (TF's SAME average pool;
    PyTorch's ``count_include_pad=False``)."""
    _, h, w, _ = x.shape
    total = jax.lax.reduce_window(x.astype(F32), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
    counts = _window_counts(h)[:, None] * _window_counts(w)[None, :]
    return (total / jnp.asarray(counts)[None, :, :, None]).astype(x.dtype)


def _cat(*xs: jax.Array) -> jax.Array:
    return jnp.concatenate(xs, axis=-1)


# ----------------------------------------------------------------------------- blocks


class InceptionA(nnx.Module):  # Mixed_5b, 5c, 5d
    def __init__(self, cin: int, pool_features: int, **kw: Any):
        self.branch1x1 = BasicConv(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv(cin, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return _cat(self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_valid_only(x)))


class InceptionB(nnx.Module):  # Mixed_6a
    def __init__(self, cin: int, **kw: Any):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return _cat(self.branch3x3(x), b3, _max_pool(x, 2, 0))


class InceptionC(nnx.Module):  # Mixed_6b, 6c, 6d, 6e
    def __init__(self, cin: int, c7: int, **kw: Any):
        self.branch1x1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(block output, the 1x1 branch: ``mixed_N/conv`` in the TF graph)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return _cat(b1, b7, d, self.branch_pool(_avg_pool_valid_only(x))), b1


class InceptionD(nnx.Module):  # Mixed_7a
    def __init__(self, cin: int, **kw: Any):
        self.branch3x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat(b3, b7, _max_pool(x, 2, 0))


class InceptionE(nnx.Module):  # Mixed_7b (average pool), Mixed_7c (max pool)
    def __init__(self, cin: int, max_pool: bool, **kw: Any):
        self.branch1x1 = BasicConv(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)
        self.max_pool = max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        b3 = _cat(self.branch3x3_2a(b3), self.branch3x3_2b(b3))
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = _cat(self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d))
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_valid_only(x)
        return _cat(self.branch1x1(x), b3, d, self.branch_pool(pooled))


class _Linear(nnx.Module):
    def __init__(self, cin: int, cout: int, init: Callable):
        self.kernel = nnx.Param(init((cin, cout), fan_in=cin))


def _zeros(shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jnp.zeros(shape, F32)


def _he_normal(rngs: nnx.Rngs) -> Callable:
    def init(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return jax.random.normal(rngs.params(), shape, F32) * np.float32(np.sqrt(2.0 / fan_in))
    return init


class FIDInception(nnx.Module):
    """The FID Inception-v3 (DESIGN §12): images [N, H, W, 3] in [0, 255] -> features.

    ``dtype`` is the convolutions' compute dtype (float32 for reported numbers).
    Built with zero weights, or He-normal random ones when ``rngs`` is given (for
    benchmarks; a random Inception's features are nearly constant). Real weights:
    :func:`pixelflow_jax.inception_weights.load_inception`.
    """

    def __init__(self, *, dtype: Any = F32, rngs: nnx.Rngs | None = None):
        kw = dict(init=_zeros if rngs is None else _he_normal(rngs), dtype=dtype)
        self.dtype = dtype
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, max_pool=False, **kw)
        self.Mixed_7c = InceptionE(2048, max_pool=True, **kw)
        self.fc = _Linear(POOL_FEATURES, NUM_CLASSES, kw["init"])  # softmax/weights; no bias

    def __call__(self, images: jax.Array) -> InceptionOutputs:
        """Features of uint8 or float images [N, H, W, 3] with values in [0, 255]."""
        check_images_shape(images.shape, images.dtype)
        x = resize_tf1_bilinear(images.astype(F32), INPUT_SIZE)
        x = ((x - 128.0) / 128.0).astype(self.dtype)  # the graph's (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 2, 0)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 2, 0)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = jnp.mean(x.astype(F32), axis=(1, 2))  # pool_3: 8x8 VALID average
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(F32).reshape(x.shape[0], -1)
        logits = jnp.matmul(pool, self.fc.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return InceptionOutputs(pool, spatial, logits)


def check_images_shape(shape: tuple[int, ...], dtype: Any) -> None:
    """UserError unless ``shape`` is [N, H, W, 3] of uint8 or floats."""
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3], default=0) < 1:
        raise UserError(f"Inception input must be images [N, H, W, 3], got shape {list(shape)}")
    dt = jnp.dtype(dtype)
    if dt != jnp.uint8 and not jnp.issubdtype(dt, jnp.floating):
        raise UserError(f"Inception input must be uint8 or float in [0, 255], got {dt}")


def abstract_inception(dtype: Any = F32) -> FIDInception:
    """A :class:`FIDInception` whose parameters are shapes only (nothing allocated)."""
    return nnx.eval_shape(lambda: FIDInception(dtype=dtype))


def make_extractor(model: FIDInception) -> Callable[[jax.Array], InceptionOutputs]:
    """``model`` as one jitted function images -> :class:`InceptionOutputs`.

    Compiled once per input shape and dtype; the parameters are an argument,
    not constants baked into the program, and follow their own sharding (e.g.
    replicated over a mesh while the batch is sharded).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: Any, images: jax.Array) -> InceptionOutputs:
        return nnx.merge(graphdef, state)(images)

    return lambda images: run(state, images)
