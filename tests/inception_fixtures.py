"""Test-only Inception weights and the torch-fidelity oracle (DESIGN §12).

:func:`write_random_pth` saves, with ``torch.save``, a random state dict under
torchvision's Inception-v3 names, as pytorch-fid and torch-fidelity publish
theirs. Its layer table is written here from the architecture, not taken from
the package. The BatchNorm running statistics are calibrated on a few images
(each BatchNorm sees its own input's per-channel mean and variance), because
with drawn statistics a random Inception maps every image to nearly the same
features and feature-based metrics become trivial.

:func:`torch_fidelity_inception` imports torch-fidelity's Inception extractor
without running the package's ``__init__``, which imports torchvision (for its
other extractors); torch-fidelity is installed without dependencies and
torchvision is kept out (scripts/test.sh).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import types
from collections import OrderedDict

import numpy as np


def _conv(cin, cout, kh, kw=None):
    return (cin, cout, kh, kh if kw is None else kw)


def _block_a(cin, pool):
    return {"branch1x1": _conv(cin, 64, 1), "branch5x5_1": _conv(cin, 48, 1),
            "branch5x5_2": _conv(48, 64, 5), "branch3x3dbl_1": _conv(cin, 64, 1),
            "branch3x3dbl_2": _conv(64, 96, 3), "branch3x3dbl_3": _conv(96, 96, 3),
            "branch_pool": _conv(cin, pool, 1)}


def _block_b(cin):
    return {"branch3x3": _conv(cin, 384, 3), "branch3x3dbl_1": _conv(cin, 64, 1),
            "branch3x3dbl_2": _conv(64, 96, 3), "branch3x3dbl_3": _conv(96, 96, 3)}


def _block_c(cin, c7):
    return {"branch1x1": _conv(cin, 192, 1), "branch7x7_1": _conv(cin, c7, 1),
            "branch7x7_2": _conv(c7, c7, 1, 7), "branch7x7_3": _conv(c7, 192, 7, 1),
            "branch7x7dbl_1": _conv(cin, c7, 1), "branch7x7dbl_2": _conv(c7, c7, 7, 1),
            "branch7x7dbl_3": _conv(c7, c7, 1, 7), "branch7x7dbl_4": _conv(c7, c7, 7, 1),
            "branch7x7dbl_5": _conv(c7, 192, 1, 7), "branch_pool": _conv(cin, 192, 1)}


def _block_d(cin):
    return {"branch3x3_1": _conv(cin, 192, 1), "branch3x3_2": _conv(192, 320, 3),
            "branch7x7x3_1": _conv(cin, 192, 1), "branch7x7x3_2": _conv(192, 192, 1, 7),
            "branch7x7x3_3": _conv(192, 192, 7, 1), "branch7x7x3_4": _conv(192, 192, 3)}


def _block_e(cin):
    return {"branch1x1": _conv(cin, 320, 1), "branch3x3_1": _conv(cin, 384, 1),
            "branch3x3_2a": _conv(384, 384, 1, 3), "branch3x3_2b": _conv(384, 384, 3, 1),
            "branch3x3dbl_1": _conv(cin, 448, 1), "branch3x3dbl_2": _conv(448, 384, 3),
            "branch3x3dbl_3a": _conv(384, 384, 1, 3), "branch3x3dbl_3b": _conv(384, 384, 3, 1),
            "branch_pool": _conv(cin, 192, 1)}


def conv_layers() -> "OrderedDict[str, tuple[int, int, int, int]]":
    """torchvision name of every conv+BN unit -> (in, out, kh, kw), in forward order."""
    layers = OrderedDict([("Conv2d_1a_3x3", _conv(3, 32, 3)), ("Conv2d_2a_3x3", _conv(32, 32, 3)),
                          ("Conv2d_2b_3x3", _conv(32, 64, 3)), ("Conv2d_3b_1x1", _conv(64, 80, 1)),
                          ("Conv2d_4a_3x3", _conv(80, 192, 3))])
    blocks = [("Mixed_5b", _block_a(192, 32)), ("Mixed_5c", _block_a(256, 64)),
              ("Mixed_5d", _block_a(288, 64)), ("Mixed_6a", _block_b(288)),
              ("Mixed_6b", _block_c(768, 128)), ("Mixed_6c", _block_c(768, 160)),
              ("Mixed_6d", _block_c(768, 160)), ("Mixed_6e", _block_c(768, 192)),
              ("Mixed_7a", _block_d(768)), ("Mixed_7b", _block_e(1280)),
              ("Mixed_7c", _block_e(2048))]
    for block, branches in blocks:
        for branch, spec in branches.items():
            layers[f"{block}.{branch}"] = spec
    return layers


def random_state_dict(seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    """Uncalibrated normal-scale weights: He-normal convs, BN gamma 1 + N(0, 0.2²),
    beta 0.5 + N(0, 0.1²), fc N(0, 1/2048), fc bias N(0, 0.1²) (unused by ADM).

    Why beta is centred on 0.5: with calibrated statistics and beta ~ 0 (half the
    ReLUs off), this random BatchNorm network is chaotic and amplifies float32
    rounding ~30x over its depth: PyTorch float32 against float64 differed by
    1.1e-4 relative in pool_3, as much as the tolerance. With beta ~ 0.5 (about 70%
    of ReLUs on) the same comparison gives 7.5e-6, and pool_3 still varies across
    images (std over images / mean magnitude 0.29).
    """
    rng = np.random.default_rng(seed)
    sd = OrderedDict()
    for name, (cin, cout, kh, kw) in conv_layers().items():
        fan_in = cin * kh * kw
        sd[f"{name}.conv.weight"] = rng.normal(0, np.sqrt(2 / fan_in), (cout, cin, kh, kw))
        sd[f"{name}.bn.weight"] = 1 + 0.2 * rng.normal(size=cout)
        sd[f"{name}.bn.bias"] = 0.5 + 0.1 * rng.normal(size=cout)
        sd[f"{name}.bn.running_mean"] = np.zeros(cout)
        sd[f"{name}.bn.running_var"] = np.ones(cout)
    sd["fc.weight"] = rng.normal(0, np.sqrt(1 / 2048), (1008, 2048))
    sd["fc.bias"] = 0.1 * rng.normal(size=1008)
    return OrderedDict((k, v.astype(np.float32)) for k, v in sd.items())


def calibration_images(n: int = 4, seed: int = 1234, size: int = 96) -> np.ndarray:
    """Varied random uint8 images [n, size, size, 3]: smooth colour fields of random
    coarseness, brightness and contrast, plus pixel noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = int(rng.integers(2, 12))
        coarse = rng.uniform(0, 1, (cells, cells, 3))
        idx = (np.arange(size) * cells) // size
        field = coarse[idx][:, idx]
        img = rng.uniform(20, 235) + rng.uniform(20, 120) * (field - 0.5) \
            + rng.uniform(0, 40) * rng.normal(size=(size, size, 3))
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return np.stack(out)


def import_torch_fidelity(module: str) -> types.ModuleType:
    """``torch_fidelity.<module>``, imported without the package's ``__init__``."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")  # locates; runs nothing
        if spec is None:
            raise ImportError("torch-fidelity is not installed (it is pinned in "
                              "requirements-test.txt, installed --no-deps by scripts/test.sh)")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package  # a bare package: its __init__ imports torchvision
    return importlib.import_module(f"torch_fidelity.{module}")


def torch_fidelity_inception(state_dict_path: str):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (features 2048 and
    logits_unbiased) with the weights at ``state_dict_path``, in float32 eval mode."""
    module = import_torch_fidelity("feature_extractor_inceptionv3")
    return module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=state_dict_path)


def _calibrate(sd: "OrderedDict[str, np.ndarray]") -> "OrderedDict[str, np.ndarray]":
    """Running statistics = each BatchNorm input's batch statistics on calibration images."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "uncalibrated.pth")
        torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), path)
        model = torch_fidelity_inception(path)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
            m.train()
    images = torch.from_numpy(calibration_images()).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        model(images)
    out = OrderedDict(sd)
    for name, t in model.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            out[name] = t.numpy().astype(np.float32)
    return out


@functools.lru_cache(maxsize=2)
def _calibrated(seed: int) -> "OrderedDict[str, np.ndarray]":
    return _calibrate(random_state_dict(seed))


def calibrated_state_dict(seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    """:func:`random_state_dict` with calibrated running statistics (float32 NumPy; a
    fresh copy of a per-process cache: one calibration per seed)."""
    return OrderedDict((k, v.copy()) for k, v in _calibrated(seed).items())


def write_random_pth(path: str, seed: int = 0, flavour: str = "torch-fidelity") -> None:
    """Save a calibrated random Inception state dict at ``path`` with ``torch.save``.

    ``flavour``: "torch-fidelity" (the converter's keys: conv/bn/fc, no BatchNorm
    counters) or "pytorch-fid" (torchvision's full state dict, with
    ``num_batches_tracked`` counters). Same values for the same seed.
    """
    import torch

    if flavour not in ("torch-fidelity", "pytorch-fid"):
        raise ValueError(f"unknown flavour {flavour!r}")
    sd = calibrated_state_dict(seed)
    tensors = OrderedDict()
    for name, a in sd.items():
        tensors[name] = torch.from_numpy(np.ascontiguousarray(a))
        if flavour == "pytorch-fid" and name.endswith(".bn.running_var"):
            tensors[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    torch.save(tensors, path)
