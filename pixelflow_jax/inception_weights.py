"""The FID Inception's weights from any of the three published files. DESIGN §12.

- ``classify_image_graph_def.pb`` (TensorFlow's 2015-12-05 graph, the one ADM's
  evaluator runs): read without TensorFlow by :func:`read_graphdef`, a small
  protobuf wire-format reader that decodes the ``GraphDef``'s ``Const`` nodes
  (``<scope>/conv2d_params`` HWIO, ``<scope>/batchnorm/{gamma,beta,moving_mean,
  moving_variance}``, ``softmax/weights``) and the attributes of each
  ``<scope>/batchnorm`` op (``variance_epsilon``, ``scale_after_normalization``).
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``: torchvision names, read by the
  project's torch-free reader (:mod:`pixelflow_jax.torch_format`).

Both become the same :class:`~pixelflow_jax.inception.FIDInception` parameters.
The first read is cached as an orbax folder (with CRC-32 checksums) beside the
file, ``FILE.orbax/``, or, when ``$PIXELFLOW_INCEPTION_CACHE`` names a folder,
in ``$PIXELFLOW_INCEPTION_CACHE/<name>-<hash of the path>.orbax/``. The cache is
keyed by the file's size and modification time; a stale or damaged cache is
read again from the file and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import sys
import uuid
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.errors import UserError
from pixelflow_jax.inception import BN_EPS, FIDInception, abstract_inception

CACHE_ENV = "PIXELFLOW_INCEPTION_CACHE"
CACHE_FORMAT = "pixelflow-jax inception cache 1"
SOURCE_FILE = "source.json"


class InceptionWeightsError(UserError):
    """A file that is not one of the FID Inception weight files, or is damaged."""


# ----------------------------------------------------------------------------- names

# Top-level layer -> TF scope of the 2015-12-05 graph.
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_MIXED = {"Mixed_5b": ("mixed", "A"), "Mixed_5c": ("mixed_1", "A"), "Mixed_5d": ("mixed_2", "A"),
          "Mixed_6a": ("mixed_3", "B"), "Mixed_6b": ("mixed_4", "C"),
          "Mixed_6c": ("mixed_5", "C"), "Mixed_6d": ("mixed_6", "C"),
          "Mixed_6e": ("mixed_7", "C"), "Mixed_7a": ("mixed_8", "D"),
          "Mixed_7b": ("mixed_9", "E"), "Mixed_7c": ("mixed_10", "E")}


def _tower(tf: str, torch: list[str]) -> dict[str, str]:
    # The k-th convolution of a TF tower is "conv", "conv_1", "conv_2", ...
    return {t: f"{tf}/conv" + (f"_{k}" if k else "") for k, t in enumerate(torch)}


# Branch -> scope inside its block, per block type (torchvision's branch names).
_BRANCHES = {
    "A": {"branch1x1": "conv", **_tower("tower", ["branch5x5_1", "branch5x5_2"]),
          **_tower("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
          "branch_pool": "tower_2/conv"},
    "B": {"branch3x3": "conv",
          **_tower("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])},
    "C": {"branch1x1": "conv",
          **_tower("tower", [f"branch7x7_{i}" for i in (1, 2, 3)]),
          **_tower("tower_1", [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
          "branch_pool": "tower_2/conv"},
    "D": {**_tower("tower", ["branch3x3_1", "branch3x3_2"]),
          **_tower("tower_1", [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)])},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower/conv",
          **_tower("tower/mixed", ["branch3x3_2a", "branch3x3_2b"]),
          **_tower("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2"]),
          **_tower("tower_1/mixed", ["branch3x3dbl_3a", "branch3x3dbl_3b"]),
          "branch_pool": "tower_2/conv"},
}


def tf_scopes() -> dict[str, str]:
    """Every BasicConv of :class:`FIDInception` (dotted path) -> its TF graph scope."""
    out = dict(_STEM)
    for block, (scope, kind) in _MIXED.items():
        out.update({f"{block}.{b}": f"{scope}/{s}" for b, s in _BRANCHES[kind].items()})
    return out


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of :class:`FIDInception` (a fresh copy of a cached table)."""
    return dict(_shape_table())


@functools.lru_cache(maxsize=1)
def _shape_table() -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = nnx.to_pure_dict(nnx.state(abstract_inception()))
    return tuple(_flatten(state, lambda a: tuple(a.shape)))


def _flatten(tree: Any, leaf: Any = lambda a: a, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, leaf, f"{prefix}{k}.")
    else:
        yield prefix[:-1], leaf(tree)


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, a in flat.items():
        *parents, last = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = a
    return tree


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_complete(path: str, what: str, flat: dict[str, np.ndarray],
                    expected: dict[str, tuple[int, ...]], hint: str,
                    label: dict[str, str]) -> None:
    """UserError naming (by the file's own names, ``label``) what is missing or mis-shaped."""
    missing = [label[n] for n in expected if n not in flat]
    if missing:
        raise InceptionWeightsError(f"{path}: not the FID Inception {what}: no {_few(missing)} "
                                    f"({hint})")
    bad = [f"{label[n]} {list(flat[n].shape)} (expected {list(s)})"
           for n, s in expected.items() if tuple(flat[n].shape) != tuple(s)]
    if bad:
        raise InceptionWeightsError(f"{path}: not the FID Inception {what}: wrong shape of "
                                    f"{_few(bad)}")


# ----------------------------------------------------------------------------- .pth


def _torch_name(nnx_name: str) -> tuple[str, bool]:
    """(torchvision state-dict name, whether the array is a transposed weight)."""
    for ours, theirs in ((".conv.kernel", ".conv.weight"), (".bn.scale", ".bn.weight"),
                         (".bn.bias", ".bn.bias"), (".bn.mean", ".bn.running_mean"),
                         (".bn.var", ".bn.running_var")):
        if nnx_name.endswith(ours):
            return nnx_name[: -len(ours)] + theirs, ours == ".conv.kernel"
    if nnx_name == "fc.kernel":
        return "fc.weight", True
    raise AssertionError(nnx_name)


def _ignored_torch_key(key: str) -> bool:
    # fc.bias: ADM's logits are pool_3 @ softmax/weights without the bias.
    return (key == "fc.bias" or key.endswith(".num_batches_tracked")
            or key.startswith("AuxLogits."))


def read_pth(path: str) -> dict[str, np.ndarray]:
    """pytorch-fid's or torch-fidelity's ``.pth`` -> {FIDInception path: float32 array}."""
    from pixelflow_jax.torch_format import read_state_dict

    tensors = read_state_dict(path)  # UserError naming the file when unreadable
    expected = _expected_shapes()
    names = {_torch_name(n)[0] for n in expected}
    unexpected = [k for k in tensors if k not in names and not _ignored_torch_key(k)]
    if unexpected:
        raise InceptionWeightsError(f"{path}: not the FID Inception weights: unexpected "
                                    f"{_few(unexpected)}")
    flat = {}
    for name in expected:
        key, transposed = _torch_name(name)
        if key not in tensors:
            continue
        a = tensors[key].read().astype(np.float32)
        if transposed:  # [out, in, kh, kw] -> HWIO; Linear [out, in] -> [in, out]
            a = np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
        flat[name] = a
    _check_complete(path, "weights", flat, expected, "a different .pth?",
                    {n: _torch_name(n)[0] for n in expected})
    return flat


# ----------------------------------------------------------------------------- .pb


class _Truncated(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise _Truncated
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message; value is an int, or a memoryview
    for length-delimited fields (no copy)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise _Truncated
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Truncated
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > end:
                raise _Truncated
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if field == 0:
            raise ValueError("field number 0")
        yield field, wire, value


_TF_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 9: np.dtype("<i8")}


def _tensor(buf: memoryview) -> np.ndarray | None:
    """A TensorProto: dtype (1), tensor_shape (2), tensor_content (4) or float_val (5) /
    double_val (6) / int_val (7) / int64_val (10), the last value repeated to fill;
    None for other dtypes."""
    dtype_code, shape, content, values = 1, [], None, []
    for field, wire, v in _fields(buf):
        if field == 1:
            dtype_code = v
        elif field == 2:
            for f, _, dim in _fields(v):
                if f == 2:  # TensorShapeProto.dim: size (1)
                    shape.append(next((s for g, _, s in _fields(dim) if g == 1), 0))
        elif field == 4:
            content = v
        elif field in (5, 6, 7, 10):
            if wire == 2:  # packed
                fmt = {5: "<f4", 6: "<f8", 7: None, 10: None}[field]
                if fmt:
                    values.extend(np.frombuffer(v, fmt).tolist())
                else:
                    p = 0
                    while p < len(v):
                        x, p = _varint(v, p)
                        values.append(x - (1 << 64) if x >= 1 << 63 else x)
            elif wire == 5:
                values.append(struct.unpack("<f", struct.pack("<I", v))[0])
            elif wire == 1:
                values.append(struct.unpack("<d", struct.pack("<Q", v))[0])
            else:
                values.append(v - (1 << 64) if v >= 1 << 63 else v)
    if dtype_code not in _TF_DTYPES:
        return None  # strings, halves, ...: no weight of ours is stored so
    dtype, count = _TF_DTYPES[dtype_code], int(np.prod(shape))
    if content is not None and len(content):
        if len(content) != count * dtype.itemsize:
            raise ValueError(f"tensor_content of {len(content)} bytes for shape {shape}")
        return np.frombuffer(content, dtype).reshape(shape).copy()
    if len(values) > count or (count and not values):
        raise ValueError(f"{len(values)} values for shape {shape}")
    values = values + values[-1:] * (count - len(values))  # TF repeats the last value
    return np.array(values, dtype).reshape(shape)


def _attr_value(buf: memoryview) -> tuple[str, Any]:
    """An AttrValue: ('f', float) (field 4), ('b', bool) (5), ('tensor', array) (8),
    or ('', None)."""
    for field, wire, v in _fields(buf):
        if field == 4 and wire == 5:
            return "f", struct.unpack("<f", struct.pack("<I", v))[0]
        if field == 5 and wire == 0:
            return "b", bool(v)
        if field == 8 and wire == 2:
            return "tensor", _tensor(v)
    return "", None


def read_graphdef(path: str, *, want_attrs_of: tuple[str, ...] = ("batchnorm",)
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(``Const`` node name -> array, node name -> {attr: float/bool}) of a ``GraphDef`` file.

    Only Const nodes' ``value`` tensors and the float/bool attributes of nodes
    whose name ends with one of ``want_attrs_of`` are decoded; everything else
    is skipped by length. GraphDef.node is field 1; NodeDef: name 1, op 2,
    attr 5 (map entries: key 1, AttrValue 2).
    """
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as e:
        raise InceptionWeightsError(f"{path}: cannot read ({e.strerror})") from None
    consts: dict[str, np.ndarray] = {}
    attrs: dict[str, dict[str, Any]] = {}
    try:
        for field, wire, node in _fields(data):
            if field != 1 or wire != 2:
                continue
            try:
                parsed = _node(node, want_attrs_of)
            except _Truncated:  # inside a node: malformed, not a short file
                raise ValueError("a field runs past the end of its node") from None
            if parsed is None:
                continue
            name, value = parsed
            if isinstance(value, np.ndarray):
                consts[name] = value
            elif isinstance(value, dict):
                attrs[name] = value
    except _Truncated:
        raise InceptionWeightsError(f"{path}: truncated (a protobuf field runs past the end of "
                                    "the file; an unfinished download?)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise InceptionWeightsError(f"{path}: not a TensorFlow GraphDef .pb ({e})") from None
    return consts, attrs


def _node(node: memoryview, want_attrs_of: tuple[str, ...]) -> tuple[str, Any] | None:
    """(name, Const value array or {attr: float/bool}) of a NodeDef we need, else None."""
    name = op = None
    entries = []
    for f, w, v in _fields(node):
        if f == 1 and w == 2:
            name = bytes(v).decode("utf-8")
        elif f == 2 and w == 2:
            op = bytes(v).decode("utf-8")
        elif f == 5 and w == 2:
            entries.append(v)
    if name is None:
        raise ValueError("a node without a name")
    is_const = op == "Const"
    if not (is_const or name.rsplit("/", 1)[-1] in want_attrs_of):
        return None
    node_attrs = {}
    for entry in entries:
        key = value = None
        for f, w, v in _fields(entry):
            if f == 1 and w == 2:
                key = bytes(v).decode("utf-8")
            elif f == 2 and w == 2:
                value = v
        if key is None or value is None or (is_const and key != "value"):
            continue
        node_attrs[key] = _attr_value(value)[1]
    if is_const:
        return name, node_attrs.get("value")
    return name, {k: v for k, v in node_attrs.items() if isinstance(v, (bool, float))}


def read_pb(path: str) -> dict[str, np.ndarray]:
    """``classify_image_graph_def.pb`` -> {FIDInception path: float32 array}.

    Each BatchNorm is read as TensorFlow runs it: gamma applies only where the
    op's ``scale_after_normalization`` is true (else the scale is 1), and a
    ``variance_epsilon`` other than 0.001 is folded into the variance.
    """
    consts, attrs = read_graphdef(path)
    if not consts:
        raise InceptionWeightsError(f"{path}: holds no Const nodes (not the FID Inception "
                                    "graph classify_image_graph_def.pb)")
    flat, label = {}, {"fc.kernel": "softmax/weights"}
    for ours, scope in tf_scopes().items():
        bn = f"{scope}/batchnorm"
        pairs = {"conv.kernel": f"{scope}/conv2d_params", "bn.scale": f"{bn}/gamma",
                 "bn.bias": f"{bn}/beta", "bn.mean": f"{bn}/moving_mean",
                 "bn.var": f"{bn}/moving_variance"}
        for leaf, tf in pairs.items():
            label[f"{ours}.{leaf}"] = tf
            if tf in consts:
                flat[f"{ours}.{leaf}"] = consts[tf].astype(np.float32)
        op = attrs.get(bn, {})
        if op.get("scale_after_normalization") is False and f"{ours}.bn.scale" in flat:
            flat[f"{ours}.bn.scale"] = np.ones_like(flat[f"{ours}.bn.scale"])
        eps = op.get("variance_epsilon")
        if eps is not None and np.float32(eps) != np.float32(BN_EPS) and f"{ours}.bn.var" in flat:
            flat[f"{ours}.bn.var"] = (flat[f"{ours}.bn.var"].astype(np.float64) + eps
                                      - BN_EPS).astype(np.float32)
    if "softmax/weights" in consts:
        flat["fc.kernel"] = consts["softmax/weights"].astype(np.float32)  # already [2048, 1008]
    _check_complete(path, "graph", flat, _expected_shapes(),
                    "truncated, or a different .pb than classify_image_graph_def.pb?", label)
    return flat


# ----------------------------------------------------------------------------- any file


def file_kind(path: str) -> str:
    """'pth' (a zip, as torch.save writes) or 'pb'; UserError for anything else."""
    if not os.path.exists(path):
        raise InceptionWeightsError(f"{path}: no such file (the FID Inception weights: "
                                    "classify_image_graph_def.pb or a .pth, see the README)")
    if os.path.isdir(path):
        raise InceptionWeightsError(f"{path} is a folder, not an Inception weight file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InceptionWeightsError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise InceptionWeightsError(f"{path}: empty file (an unfinished download?)")
    if head[:2] == b"PK":
        return "pth"
    # A protobuf starts with a field key: a field number > 0 and wire type 0, 1, 2 or 5
    # (a GraphDef written by TensorFlow starts with 0x0a, its first node).
    if head[0] >> 3 and head[0] & 7 in (0, 1, 2, 5):
        return "pb"
    raise InceptionWeightsError(f"{path}: neither a TensorFlow .pb nor a torch .pth file")


def read_inception_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{FIDInception parameter path: float32 array} from a ``.pb`` or ``.pth`` file."""
    path = os.fspath(path)
    return read_pth(path) if file_kind(path) == "pth" else read_pb(path)


def cache_dir(path: str | os.PathLike) -> str:
    """Where the orbax cache of weight file ``path`` lives (see the module docstring)."""
    path = os.path.abspath(os.fspath(path))
    root = os.environ.get(CACHE_ENV)
    if root:
        tag = hashlib.sha256(path.encode()).hexdigest()[:8]
        return os.path.join(os.path.abspath(root), f"{os.path.basename(path)}-{tag}.orbax")
    return path + ".orbax"


def _source_record(path: str) -> dict:
    st = os.stat(path)
    return {"format": CACHE_FORMAT, "file": os.path.basename(path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _read_cache(directory: str, path: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``directory`` is a complete, undamaged cache of ``path`` now."""
    from pixelflow_jax import checkpoint as ck

    try:
        with open(os.path.join(directory, SOURCE_FILE)) as f:
            if json.load(f) != _source_record(path):
                return None
    except (OSError, ValueError):
        return None
    try:
        import tensorstore as ts

        params = os.path.join(directory, ck.PARAMS_DIR)
        names, meta = ck._orbax_metadata(params)
        expected = _expected_shapes()
        if sorted(names) != sorted(expected):
            return None
        context = ts.Context()
        stores = ck._wait_all(directory, {n: ck._start(ts.open, ck._array_spec(params, n, meta),
                                                       context=context, open=True, read=True)
                                          for n in names})
        arrays = ck._read_all(directory, stores)
        checksums = ck._read_checksums(directory)
        if checksums is None:
            return None
        ck._verify(directory, arrays, checksums)
    except (UserError, OSError, ValueError):
        return None
    if any(tuple(arrays[n].shape) != s for n, s in expected.items()):
        return None
    return {n: arrays[n].astype(np.float32, copy=False) for n in expected}


def _write_cache(directory: str, path: str, flat: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp

    from pixelflow_jax import checkpoint as ck

    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        ck._write_checksums(tmp, flat)
        with ck._checkpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, ck.PARAMS_DIR),
                              args=ocp.args.PyTreeSave(_nest(flat)))
        with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
            json.dump(_source_record(path), f)
        ck.replace_folder(tmp, directory)
    except OSError as e:
        print(f"note: cannot cache the Inception weights in {directory} ({e.strerror or e}); "
              f"set {CACHE_ENV}=FOLDER to cache them elsewhere", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_from_weights(flat: dict[str, np.ndarray], dtype: Any = jnp.float32) -> FIDInception:
    """A :class:`FIDInception` holding ``flat`` ({parameter path: array})."""
    graphdef, state = nnx.split(abstract_inception(dtype))
    tree = nnx.to_pure_dict(state)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(flat[".".join(str(k.key) for k in p)], jnp.float32), tree)
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def load_inception(path: str | os.PathLike, *, cache: bool = True,
                   dtype: Any = jnp.float32) -> FIDInception:
    """The FID Inception with the weights of ``path`` (``.pb`` or either ``.pth``).

    With ``cache``, the first read writes :func:`cache_dir` (an orbax folder) and
    later calls read that instead, as long as the file's size and modification
    time are unchanged. ``dtype``: the convolutions' compute dtype; bfloat16 is
    not for reported numbers (DESIGN §12). A missing, wrong or truncated file
    raises :class:`InceptionWeightsError` (a UserError) naming it.
    """
    path = os.path.abspath(os.fspath(path))
    file_kind(path)  # a clear error for a missing or foreign file, cache or not
    flat = None
    directory = cache_dir(path)
    if cache and os.path.isdir(directory):
        flat = _read_cache(directory, path)
    if flat is None:
        flat = read_inception_weights(path)
        if cache:
            _write_cache(directory, path, flat)
    return model_from_weights(flat, dtype)
