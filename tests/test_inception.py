"""The FID Inception (DESIGN §12): resize, network and weight readers against oracles.

- The TF1 legacy bilinear resize against a NumPy implementation written here from
  the formula, and against torch-fidelity's TF1-compatible resize.
- Features (pool_3, mixed_6/conv[..., :7], unbiased logits) against torch-fidelity's
  ``FeatureExtractorInceptionV3`` (float64 inside), both loaded with the same
  calibrated random ``.pth`` (tests/inception_fixtures.py), at 32, 64, 256, 512 px.
- The ``.pb`` reader on a GraphDef encoded here (own wire-format writer, Const nodes
  under the real names) against the ``.pth`` route; BatchNorm attributes honoured.
- Both ``.pth`` flavours, the orbax cache (hit, stale, damaged, elsewhere), and
  one-line errors for wrong and truncated files.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import inception_fixtures as fx
from pixelflow_jax import inception_weights as iw
from pixelflow_jax.errors import UserError
from pixelflow_jax.inception import (FIDInception, make_extractor, resize_tf1_bilinear)
from pixelflow_jax.inception_weights import load_inception, read_inception_weights
from pixelflow_jax.torch_format import write_state_dict

SIDES = (32, 64, 256, 512)
PER_SIDE = 1  # one image per side: 299-px float64 oracle passes are slow on 2 cores


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def sample_images(side: int, n: int = PER_SIDE) -> np.ndarray:
    """Random uint8 images [n, side, side, 3] (varied, not i.i.d. pixel noise)."""
    return fx.calibration_images(n, seed=1000 + side, size=side)


# ----------------------------------------------------------------------------- resize


def numpy_tf1_resize(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 ``resize_bilinear(align_corners=False)``, legacy (no half-pixel centres), from
    the formula: output i reads source i * (in / out) in float32, floor and floor + 1
    clamped, weights by the fractional part; top/bottom rows first, then between them."""
    img = img.astype(np.float32)
    n, h, w, c = img.shape
    res = np.empty((n, out, out, c), np.float32)
    for i in range(out):
        sy = np.float32(i) * np.float32(h / out)
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = np.float32(sy - np.float32(y0))
        for j in range(out):
            sx = np.float32(j) * np.float32(w / out)
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx_ = np.float32(sx - np.float32(x0))
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * fx_
            bot = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * fx_
            res[:, i, j] = top + (bot - top) * fy
    return res


@pytest.mark.parametrize("shape,out", [((2, 32, 32, 3), 299), ((1, 512, 512, 3), 299),
                                       ((1, 7, 13, 3), 11), ((1, 299, 299, 3), 299)])
def test_resize_matches_formula(shape, out):
    """The resize against the formula (NumPy, float32) and torch-fidelity's version."""
    tf1_resize = fx.import_torch_fidelity(
        "interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ours = np.asarray(jax.jit(resize_tf1_bilinear, static_argnums=1)(
        jnp.asarray(img, jnp.float32), out))
    assert ours.shape == (shape[0], out, out, 3)
    expected = numpy_tf1_resize(img, out)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
    theirs = tf1_resize(
        torch.from_numpy(img).permute(0, 3, 1, 2).float(), size=(out, out),
        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    if shape[1:3] == (out, out):
        np.testing.assert_array_equal(ours, img)  # same size: the identity, bit for bit
    elif shape[1] == shape[2]:
        # The trap: jax.image.resize (half-pixel centres, antialiasing) is another function.
        other = np.asarray(jax.image.resize(jnp.asarray(img, jnp.float32),
                                            (shape[0], out, out, 3), "bilinear"))
        assert np.abs(other - expected).max() > 1.0


# ----------------------------------------------------------------------------- network


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A calibrated random torch-fidelity-style .pth (written once per module)."""
    path = str(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")
    fx.write_random_pth(path, seed=0, flavour="torch-fidelity")
    return path


@pytest.fixture(scope="module")
def oracle(weights):
    """torch-fidelity's features of sample_images(side) for each side: its network in
    float64 after its TF1 resize in float32, as TensorFlow resizes. (A float64 resize
    differs from TF's by float32 rounding, ~6e-8, which this random network amplifies
    to ~6e-5 in pool_3; the resize itself is tested on its own above.)"""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    module = fx.import_torch_fidelity("feature_extractor_inceptionv3")
    model = fx.torch_fidelity_inception(weights)
    model.to(torch.float64)
    model.feature_extractor_internal_dtype = torch.float64
    seen = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    resize = module.interpolate_bilinear_2d_like_tensorflow1x
    module.interpolate_bilinear_2d_like_tensorflow1x = (
        lambda x, **kw: resize(x.float(), **kw).double())
    out = {}
    try:
        for side in SIDES:
            x = torch.from_numpy(sample_images(side)).permute(0, 3, 1, 2).contiguous()
            with torch.no_grad():
                pool, logits = model(x)
            # mixed_6/conv after ReLU, first 7 channels, NHWC-flattened.
            spatial = seen["x"][:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            out[side] = [t.double().numpy() for t in (pool, spatial, logits)]
    finally:
        module.interpolate_bilinear_2d_like_tensorflow1x = resize
    return out


@pytest.fixture(scope="module")
def resized():
    """sample_images(side) for every side, resized to 299 by the package, in one batch.

    FIDInception.__call__ is resize-to-299 followed by the network; a 299-px input's
    resize is the identity bit for bit (test_resize_matches_formula), so every side
    runs as resize (a cheap compile per side) + one compiled 299-px network.
    """
    return jnp.concatenate([jax.jit(resize_tf1_bilinear)(
        jnp.asarray(sample_images(s), jnp.float32)) for s in SIDES])


def _errors(feats, oracle) -> dict[str, float]:
    out = {}
    for k, side in enumerate(SIDES):
        rows = slice(k * PER_SIDE, (k + 1) * PER_SIDE)
        for name, ours, theirs in zip(("pool", "spatial", "logits"), feats, oracle[side]):
            out[f"{name} {side}px"] = rel_err(ours[rows], theirs)
    return out


def test_features_match_torch_fidelity(weights, oracle, resized):
    """pool, spatial and logits at 32, 64, 256 and 512 px: relative error <= 1e-4."""
    feats = make_extractor(load_inception(weights, cache=False))(resized)
    n = len(SIDES) * PER_SIDE
    assert [f.shape for f in feats] == [(n, 2048), (n, 2023), (n, 1008)]
    assert all(f.dtype == jnp.float32 for f in feats)
    errors = _errors(feats, oracle)
    print(f"max relative error {max(errors.values()):.2e}")
    for what, err in errors.items():
        assert err <= 1e-4, f"{what}: relative error {err:.2e}"
    # Non-trivial features: they differ between images (calibrated statistics).
    pool = np.asarray(feats.pool)
    assert pool.std(0).mean() > 0.1 * np.abs(pool).mean()


def test_bfloat16_uint8_direct(weights, oracle):
    """The model called directly on uint8 images (64 px, resized inside), bf16
    convolutions: float32 outputs near the float64 oracle, not equal to it. This random
    network amplifies rounding ~30x over its depth (fixtures: random_state_dict), so
    bf16's 4e-3 becomes ~0.1 here; usable, but not for reported numbers (DESIGN §12)."""
    model = load_inception(weights, cache=False, dtype=jnp.bfloat16)
    feats = jax.jit(lambda x: model(x))(jnp.asarray(sample_images(64)))
    assert all(f.dtype == jnp.float32 for f in feats)
    errors = {name: rel_err(ours, theirs)
              for name, ours, theirs in zip(("pool", "spatial", "logits"), feats, oracle[64])}
    print(f"bfloat16 at 64 px: relative errors {errors}")
    assert 1e-3 < max(errors.values()) < 0.25, errors


# ----------------------------------------------------------------------------- .pth flavours


def _flat_params(model: FIDInception) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    return {".".join(str(k.key) for k in p): np.asarray(v) for p, v in leaves}


def test_pth_flavours_and_mapping(weights, tmp_path):
    """Both flavours give the same parameters, which are the state dict's, laid out."""
    other = str(tmp_path / "pt_inception-random.pth")
    fx.write_random_pth(other, seed=0, flavour="pytorch-fid")
    sd = torch.load(other, weights_only=True)
    assert "Conv2d_1a_3x3.bn.num_batches_tracked" in sd  # the flavours do differ
    a, b = read_inception_weights(weights), read_inception_weights(other)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a["Mixed_6d.branch7x7_2.conv.kernel"],
                                  sd["Mixed_6d.branch7x7_2.conv.weight"].numpy()
                                  .transpose(2, 3, 1, 0))
    assert a["Mixed_6d.branch7x7_2.conv.kernel"].shape == (1, 7, 160, 160)
    np.testing.assert_array_equal(a["fc.kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(a["Mixed_7c.branch_pool.bn.var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"].numpy())
    np.testing.assert_array_equal(a["Mixed_7c.branch_pool.bn.scale"],
                                  sd["Mixed_7c.branch_pool.bn.weight"].numpy())
    n_conv = len(fx.conv_layers())
    assert n_conv == 94 and len(a) == 5 * n_conv + 1


# ----------------------------------------------------------------------------- .pb


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _tensor_proto(a: np.ndarray, encoding: str = "content") -> bytes:
    dims = b"".join(_ld(2, _key(1, 0) + _varint(int(d))) for d in a.shape)
    out = _key(1, 0) + _varint(1) + _ld(2, dims)  # DT_FLOAT
    a = np.asarray(a, "<f4")
    if encoding == "content":
        return out + _ld(4, a.tobytes())
    if encoding == "packed":  # float_val, packed; TF repeats the last value to fill
        return out + _ld(5, np.unique(a)[:1].astype("<f4").tobytes())
    return out + b"".join(_key(5, 5) + struct.pack("<f", v) for v in a.reshape(-1))


def _attr(key: str, value: bytes) -> bytes:
    return _ld(5, _ld(1, key.encode()) + _ld(2, value))


def _node(name: str, op: str, inputs=(), attrs: bytes = b"") -> bytes:
    body = _ld(1, name.encode()) + _ld(2, op.encode())
    body += b"".join(_ld(3, i.encode()) for i in inputs) + attrs
    return _ld(1, body)


def _const(name: str, a: np.ndarray, encoding: str = "content") -> bytes:
    return _node(name, "Const", attrs=_attr("dtype", _key(6, 0) + _varint(1))
                 + _attr("value", _ld(8, _tensor_proto(a, encoding))))


# Block kind -> torchvision branch -> TF scope inside the block (the 2015-12-05 graph).
TF_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower/conv", "branch5x5_2": "tower/conv_1",
          "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
          "branch3x3dbl_3": "tower_1/conv_2", "branch_pool": "tower_2/conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower/conv",
          "branch3x3dbl_2": "tower/conv_1", "branch3x3dbl_3": "tower/conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower/conv", "branch7x7_2": "tower/conv_1",
          "branch7x7_3": "tower/conv_2", "branch7x7dbl_1": "tower_1/conv",
          "branch7x7dbl_2": "tower_1/conv_1", "branch7x7dbl_3": "tower_1/conv_2",
          "branch7x7dbl_4": "tower_1/conv_3", "branch7x7dbl_5": "tower_1/conv_4",
          "branch_pool": "tower_2/conv"},
    "D": {"branch3x3_1": "tower/conv", "branch3x3_2": "tower/conv_1",
          "branch7x7x3_1": "tower_1/conv", "branch7x7x3_2": "tower_1/conv_1",
          "branch7x7x3_3": "tower_1/conv_2", "branch7x7x3_4": "tower_1/conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower/conv", "branch3x3_2a": "tower/mixed/conv",
          "branch3x3_2b": "tower/mixed/conv_1", "branch3x3dbl_1": "tower_1/conv",
          "branch3x3dbl_2": "tower_1/conv_1", "branch3x3dbl_3a": "tower_1/mixed/conv",
          "branch3x3dbl_3b": "tower_1/mixed/conv_1", "branch_pool": "tower_2/conv"},
}
TF_BLOCKS = {"Mixed_5b": "mixed A", "Mixed_5c": "mixed_1 A", "Mixed_5d": "mixed_2 A",
             "Mixed_6a": "mixed_3 B", "Mixed_6b": "mixed_4 C", "Mixed_6c": "mixed_5 C",
             "Mixed_6d": "mixed_6 C", "Mixed_6e": "mixed_7 C", "Mixed_7a": "mixed_8 D",
             "Mixed_7b": "mixed_9 E", "Mixed_7c": "mixed_10 E"}
TF_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
           "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}


def tf_scope(torch_layer: str) -> str:
    if torch_layer in TF_STEM:
        return TF_STEM[torch_layer]
    block, branch = torch_layer.split(".")
    scope, kind = TF_BLOCKS[block].split()
    return f"{scope}/{TF_BRANCHES[kind][branch]}"


def write_graphdef(path: str, sd: dict, bn_attrs: dict | None = None,
                   encodings: dict | None = None, drop: tuple = ()) -> None:
    """A GraphDef holding ``sd`` (torchvision names, NumPy) as the 2015 graph names it."""
    bn_attrs, encodings = bn_attrs or {}, encodings or {}
    parts = [_node("DecodeJpeg/contents", "Const", attrs=_attr("value", _ld(8, _key(1, 0)
                   + _varint(7) + _ld(8, b"\xff\xd8")))),  # a DT_STRING const: skipped
             _const("Sub/y", np.float32(128.0).reshape(()), "float_val"),
             _node("Sub", "Sub", ["ResizeBilinear", "Sub/y"])]
    for layer in fx.conv_layers():
        scope = tf_scope(layer)
        tensors = {f"{scope}/conv2d_params": sd[f"{layer}.conv.weight"].transpose(2, 3, 1, 0),
                   f"{scope}/batchnorm/beta": sd[f"{layer}.bn.bias"],
                   f"{scope}/batchnorm/gamma": sd[f"{layer}.bn.weight"],
                   f"{scope}/batchnorm/moving_mean": sd[f"{layer}.bn.running_mean"],
                   f"{scope}/batchnorm/moving_variance": sd[f"{layer}.bn.running_var"]}
        for name, a in tensors.items():
            if name not in drop:
                parts.append(_const(name, np.ascontiguousarray(a), encodings.get(name, "content")))
        parts.append(_node(f"{scope}/Conv2D", "Conv2D", ["x", f"{scope}/conv2d_params"]))
        eps, scale_after = bn_attrs.get(layer, (1e-3, True))
        attrs = (_attr("variance_epsilon", _key(4, 5) + struct.pack("<f", eps))
                 + _attr("scale_after_normalization", _key(5, 0) + _varint(int(scale_after))))
        parts.append(_node(f"{scope}/batchnorm", "BatchNormWithGlobalNormalization",
                           [f"{scope}/Conv2D"] + [f"{scope}/batchnorm/{s}" for s in
                                                  ("moving_mean", "moving_variance", "beta",
                                                   "gamma")], attrs))
    parts.append(_const("softmax/weights", np.ascontiguousarray(sd["fc.weight"].T)))
    parts.append(_const("softmax/biases", sd["fc.bias"]))
    parts.append(_ld(4, _key(1, 0) + _varint(9)))  # versions {producer: 9}, after the nodes
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def test_pb_reader_matches_pth_route(weights, tmp_path):
    """A GraphDef with the real names maps to the .pth route's parameters, honouring each
    BatchNorm's scale_after_normalization and variance_epsilon and float_val encodings."""
    sd = fx.calibrated_state_dict(0)
    pb = str(tmp_path / "classify_image_graph_def.pb")
    plain = read_inception_weights(weights)

    write_graphdef(pb, sd)
    got = read_inception_weights(pb)
    assert got.keys() == plain.keys()
    for k in plain:
        np.testing.assert_array_equal(got[k], plain[k], err_msg=k)

    # gamma unused where scale_after_normalization is false; eps 0.003 folded into var;
    # a float_val-encoded tensor (packed, one value repeated) and an unpacked one.
    mean = "mixed_6/tower/conv_1/batchnorm/moving_mean"
    beta = "conv_4/batchnorm/beta"
    write_graphdef(pb, sd, bn_attrs={"Mixed_7b.branch1x1": (1e-3, False),
                                     "Conv2d_3b_1x1": (3e-3, True)},
                   encodings={mean: "packed", beta: "float_val"})
    got = read_inception_weights(pb)
    np.testing.assert_array_equal(got["Mixed_7b.branch1x1.bn.scale"], np.ones(320, np.float32))
    np.testing.assert_allclose(got["Conv2d_3b_1x1.bn.var"],
                               plain["Conv2d_3b_1x1.bn.var"] + 2e-3, rtol=1e-6)
    first = np.unique(sd["Mixed_6d.branch7x7_2.bn.running_mean"])[0]
    np.testing.assert_array_equal(got["Mixed_6d.branch7x7_2.bn.mean"],
                                  np.full(160, first, np.float32))
    np.testing.assert_array_equal(got["Conv2d_4a_3x3.bn.bias"], plain["Conv2d_4a_3x3.bn.bias"])
    same = [k for k in plain if k not in ("Mixed_7b.branch1x1.bn.scale", "Conv2d_3b_1x1.bn.var",
                                          "Mixed_6d.branch7x7_2.bn.mean")]
    for k in same:
        np.testing.assert_array_equal(got[k], plain[k], err_msg=k)

    # The .pb loads as a model like any file (cache off: nothing written beside it).
    model = load_inception(pb, cache=False)
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), plain["fc.kernel"])
    assert not os.path.exists(pb + ".orbax")


# ----------------------------------------------------------------------------- cache


def test_cache(weights, tmp_path, monkeypatch):
    src = str(tmp_path / "w.pth")
    with open(weights, "rb") as f, open(src, "wb") as g:
        g.write(f.read())
    expected = read_inception_weights(src)
    t0 = time.perf_counter()
    first = _flat_params(load_inception(src))
    t_first = time.perf_counter() - t0
    cache = src + ".orbax"
    assert os.path.isdir(os.path.join(cache, "params"))
    for k in expected:
        np.testing.assert_array_equal(first[k], expected[k])

    calls = []
    real = iw.read_inception_weights
    monkeypatch.setattr(iw, "read_inception_weights", lambda p: calls.append(p) or real(p))
    t0 = time.perf_counter()
    second = _flat_params(load_inception(src))
    t_second = time.perf_counter() - t0
    assert calls == []  # read from the cache
    for k in expected:
        np.testing.assert_array_equal(second[k], expected[k])
    print(f"load: {t_first:.2f} s from the file (+ cache write), {t_second:.2f} s cached")

    os.utime(src, ns=(1, 1))  # the file changed: the cache is stale
    load_inception(src)
    assert len(calls) == 1
    load_inception(src)
    assert len(calls) == 1  # rewritten for the new file

    # Damage one stored chunk: the cache is ignored and rewritten, the result is right.
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(cache, "params"))
              for f in fs if os.path.getsize(os.path.join(d, f)) > 1_000_000]
    with open(chunks[0], "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    damaged = _flat_params(load_inception(src))
    assert len(calls) == 2
    for k in expected:
        np.testing.assert_array_equal(damaged[k], expected[k])

    # Elsewhere: $PIXELFLOW_INCEPTION_CACHE, nothing new beside the file.
    elsewhere = tmp_path / "cache"
    elsewhere.mkdir()
    monkeypatch.setenv("PIXELFLOW_INCEPTION_CACHE", str(elsewhere))
    load_inception(src)
    (made,) = os.listdir(elsewhere)
    assert made.startswith("w.pth-") and made.endswith(".orbax")
    assert iw.cache_dir(src) == str(elsewhere / made)
    assert sorted(os.listdir(tmp_path)) == ["cache", "w.pth", "w.pth.orbax"]


# ----------------------------------------------------------------------------- errors


def _one_line_error(path: str, *words: str) -> str:
    with pytest.raises(UserError) as e:
        load_inception(path, cache=False)
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_files(weights, tmp_path):
    sd = fx.calibrated_state_dict(0)
    _one_line_error(str(tmp_path / "missing.pb"), "no such file")
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    _one_line_error(str(empty), "empty")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01\x02" * 100)
    _one_line_error(str(junk), "neither")
    _one_line_error(str(tmp_path), "folder")

    pb = str(tmp_path / "g.pb")
    write_graphdef(pb, sd)
    data = open(pb, "rb").read()
    cut = tmp_path / "cut.pb"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(str(cut), "truncated")
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x0a\x05" + b"\xff" * 5)
    _one_line_error(str(garbage), "not a TensorFlow GraphDef")
    other = tmp_path / "other.pb"
    other.write_bytes(_const("something/else", np.zeros(3, np.float32)))
    _one_line_error(str(other), "not the FID Inception graph", "no conv/batchnorm/")
    no_softmax = str(tmp_path / "no_softmax.pb")
    write_graphdef(no_softmax, {**sd, "fc.weight": sd["fc.weight"][:10]})
    _one_line_error(no_softmax, "wrong shape", "softmax/weights [2048, 10]")

    raw = open(weights, "rb").read()
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(raw[: len(raw) * 2 // 3])
    _one_line_error(str(cut_pth))
    partial = str(tmp_path / "partial.pth")
    write_state_dict(partial, OrderedDict((k, v) for k, v in sd.items()
                                          if k != "Mixed_6e.branch_pool.bn.running_var"))
    _one_line_error(partial, "Mixed_6e.branch_pool.bn.running_var")
    extra = str(tmp_path / "extra.pth")
    write_state_dict(extra, OrderedDict(sd, **{"Mixed_9z.conv.weight": np.zeros(2, np.float32)}))
    _one_line_error(extra, "unexpected", "Mixed_9z.conv.weight")
    shape = str(tmp_path / "shape.pth")
    write_state_dict(shape, OrderedDict(sd, **{"fc.weight": sd["fc.weight"][:1000]}))
    _one_line_error(shape, "wrong shape", "fc.weight")
