"""The name table between official PyTorch state dicts and this package's NNX parameters.

One rule per official name: the NNX path is the same dotted path with the
block index moved to a stacked leading axis, ``weight`` renamed to ``kernel``
(linears, transposed [out, in] -> [in, out]; the patch conv, [E, C, p, p] ->
[p, p, C, E]) or ``embedding`` (the class table). RMSNorm weights and biases
are copied. :func:`official_to_nnx` collects every problem before failing.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from pixelflow_jax.config import ModelParams
from pixelflow_jax.errors import UserError

_RMSNORM_MODULES = {"q_norm", "k_norm", "norm2", "norm3"}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


class ConversionError(UserError):
    """A state dict that does not fit the model; ``problems`` lists every mismatch."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20
                                 else [])
        super().__init__(f"{len(problems)} problem(s) with the weights: " + "; ".join(shown))


# ----------------------------------------------------------------------------- layout


def _block_layout(p: ModelParams) -> list[tuple[str, tuple[int, ...]]]:
    E = p.embed_dim

    def attn(name: str, kv_dim: int) -> list[tuple[str, tuple[int, ...]]]:
        out = []
        for proj, din in (("q_proj", E), ("k_proj", kv_dim), ("v_proj", kv_dim), ("o_proj", E)):
            out.append((f"{name}.{proj}.weight", (E, din)))
            if p.attention_bias:
                out.append((f"{name}.{proj}.bias", (E,)))
        return out + [(f"{name}.q_norm.weight", (E,)), (f"{name}.k_norm.weight", (E,))]

    layout = [("norm1.linear.weight", (6 * E, E)), ("norm1.linear.bias", (6 * E,))]
    layout += attn("attn1", E)
    if p.cross_attention_dim is not None:
        layout += [("norm2.weight", (E,))] + attn("attn2", p.cross_attention_dim)
    return layout + [("norm3.weight", (E,)), ("mlp.fc1.weight", (4 * E, E)),
                     ("mlp.fc1.bias", (4 * E,)), ("mlp.fc2.weight", (E, 4 * E)),
                     ("mlp.fc2.bias", (E,))]


def official_layout(p: ModelParams) -> dict[str, tuple[int, ...]]:
    """Every official state-dict name -> shape, in the official order."""
    E, C = p.embed_dim, p.in_channels
    out = {"patch_embed.proj.weight": (E, C, p.patch_size, p.patch_size),
           "patch_embed.proj.bias": (E,)}
    for emb in ("timestep_embedder", "latent_size_embedder"):
        out.update({f"{emb}.linear_1.weight": (E, 256), f"{emb}.linear_1.bias": (E,),
                    f"{emb}.linear_2.weight": (E, E), f"{emb}.linear_2.bias": (E,)})
    if p.num_classes > 0:
        out["class_embedder.embedding_table.weight"] = (p.num_classes + 1, E)
    block = _block_layout(p)
    for i in range(p.depth):
        out.update({f"transformer_blocks.{i}.{name}": shape for name, shape in block})
    out.update({"proj_out_1.weight": (2 * E, E), "proj_out_1.bias": (2 * E,),
                "proj_out_2.weight": (p.patch_size ** 2 * p.out_channels, E),
                "proj_out_2.bias": (p.patch_size ** 2 * p.out_channels,)})
    return out


# ----------------------------------------------------------------------------- rules


def nnx_name(official: str) -> tuple[str, str]:
    """(NNX dotted path, transform) for an official name without block index.

    transform is ``"linear"`` (transpose), ``"conv"`` ([E,C,p,p] -> [p,p,C,E]) or ``"copy"``.
    """
    module, _, leaf = official.rpartition(".")
    if leaf == "bias":
        return official, "copy"
    if official == "patch_embed.proj.weight":
        return "patch_embed.proj.kernel", "conv"
    if official == "class_embedder.embedding_table.weight":
        return "class_embedder.embedding_table.embedding", "copy"
    if module.rpartition(".")[2] in _RMSNORM_MODULES:
        return official, "copy"
    return f"{module}.kernel", "linear"


# transform -> (permutation official -> NNX, permutation NNX -> official)
_PERMUTATIONS = {"linear": ((1, 0), (1, 0)), "conv": ((2, 3, 1, 0), (3, 2, 0, 1))}


def _permute(a: np.ndarray, transform: str, to_nnx: bool) -> np.ndarray:
    if transform == "copy":
        return a
    return a.transpose(_PERMUTATIONS[transform][0 if to_nnx else 1])


def compare_shapes(stored: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """Every difference between two {name: shape} maps, as messages (empty if none)."""
    problems = []
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected)}")
    for k, shape in expected.items():
        if k in stored and tuple(stored[k]) != tuple(shape):
            problems.append(f"{k} has shape {list(stored[k])}, expected {list(shape)}")
    return problems


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: Mapping, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- conversion


def is_floating(dtype) -> bool:
    """True for every float dtype, bfloat16 included (NumPy does not count it)."""
    try:
        ml_dtypes.finfo(dtype)
        return True
    except ValueError:
        return False


def _read(value) -> np.ndarray:
    """An array from an array or a lazy tensor (anything with ``.read()``)."""
    return value.read() if hasattr(value, "read") else np.asarray(value)


def infer_params(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Any, str]]:
    """What the weights say about ``model.params``: field -> (value, evidence).

    Only fields the tensors determine; ``num_attention_heads x attention_head_dim``
    is reported as ``embed_dim``.
    """
    out: dict[str, tuple[Any, str]] = {}
    w = shapes.get("patch_embed.proj.weight")
    if w is not None and len(w) == 4:
        ev = f"patch_embed.proj.weight is {list(w)}"
        out.update(embed_dim=(w[0], ev), in_channels=(w[1], ev), patch_size=(w[2], ev))
        o = shapes.get("proj_out_2.weight")
        if o is not None and w[2] and o[0] % (w[2] * w[2]) == 0:
            out["out_channels"] = (o[0] // (w[2] * w[2]), f"proj_out_2.weight is {list(o)}")
    t = shapes.get("class_embedder.embedding_table.weight")
    out["num_classes"] = (t[0] - 1, f"class_embedder.embedding_table.weight is {list(t)}") \
        if t is not None else (0, "there is no class_embedder.embedding_table.weight")
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, shapes) if m}
    if blocks:
        out["depth"] = (max(blocks) + 1, f"blocks 0..{max(blocks)} are present")
        has_bias = "transformer_blocks.0.attn1.q_proj.bias" in shapes
        out["attention_bias"] = (has_bias, "transformer_blocks.0.attn1.q_proj.bias is "
                                 + ("present" if has_bias else "absent"))
        k = shapes.get("transformer_blocks.0.attn2.k_proj.weight")
        out["cross_attention_dim"] = (k[1], f"transformer_blocks.0.attn2.k_proj.weight is "
                                      f"{list(k)}") if k is not None \
            else (None, "there is no attn2 (cross-attention)")
    return out


def config_disagreements(shapes: Mapping[str, tuple[int, ...]], p: ModelParams) -> list[str]:
    """Messages for every ``model.params`` value the weights contradict."""
    config = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    config["embed_dim"] = p.embed_dim
    problems = []
    for field, (value, evidence) in infer_params(shapes).items():
        if config[field] != value:
            name = ("num_attention_heads x attention_head_dim" if field == "embed_dim"
                    else field)
            problems.append(f"config model.params.{name} = {config[field]} but the weights "
                            f"have {value} ({evidence})")
    return problems


def check_state_dict(state_dict: Mapping[str, Any], p: ModelParams) -> list[str]:
    """Every problem that stops ``state_dict`` loading into a model of ``p`` (no data read)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = config_disagreements(shapes, p)
    problems += compare_shapes(shapes, official_layout(p))
    problems += [f"{k} has non-floating dtype {np.dtype(v.dtype).name}"
                 for k, v in state_dict.items() if not is_floating(v.dtype)]
    return problems


def official_to_nnx(state_dict: Mapping[str, Any], p: ModelParams,
                    dtype: Any = np.float32) -> dict:
    """An official state dict as a nested dict of NNX parameters (blocks stacked on axis 0).

    Values are arrays or lazy tensors (``.read()``), read one at a time: the
    result is the only full copy held. Every problem of :func:`check_state_dict`
    is reported at once, before anything is read. ``dtype`` is the result's
    dtype (None keeps each input's).
    """
    problems = check_state_dict(state_dict, p)
    if problems:
        raise ConversionError(problems)
    cast = (lambda a: a.astype(dtype, copy=False)) if dtype is not None else (lambda a: a)
    tree: dict = {}
    for name in official_layout(p):
        if not name.startswith("transformer_blocks."):
            path, transform = nnx_name(name)
            _set(tree, path, np.ascontiguousarray(cast(_permute(_read(state_dict[name]),
                                                                 transform, True))))
    for rest, _ in _block_layout(p):
        path, transform = nnx_name(rest)
        stacked = None
        for i in range(p.depth):
            block = cast(_permute(_read(state_dict[f"transformer_blocks.{i}.{rest}"]),
                                  transform, True))
            if stacked is None:
                stacked = np.empty((p.depth,) + block.shape, block.dtype)
            stacked[i] = block
        _set(tree, f"transformer_blocks.{path}", stacked)
    return tree


def iter_official(tree: Mapping, p: ModelParams) -> Iterator[tuple[str, np.ndarray]]:
    """(official name, array in PyTorch layout, a view) for every parameter, in order."""
    for name in official_layout(p):
        m = _BLOCK.match(name)
        if m:
            path, transform = nnx_name(m.group(2))
            a = np.asarray(_get(tree, f"transformer_blocks.{path}"))[int(m.group(1))]
        else:
            path, transform = nnx_name(name)
            a = np.asarray(_get(tree, path))
        yield name, _permute(a, transform, False)


def nnx_to_official(tree: Mapping, p: ModelParams) -> "collections.OrderedDict[str, np.ndarray]":
    """The inverse of :func:`official_to_nnx`: an ordered official state dict (copies)."""
    return collections.OrderedDict(
        (name, np.ascontiguousarray(a)) for name, a in iter_official(tree, p))
