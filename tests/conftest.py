"""Shared fixtures: tiny configs, oracle weights, and the same weights in JAX."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

# Keep test compilations out of the user's cache; must be set before any CLI import runs.
os.environ.setdefault("PIXELFLOW_JAX_CACHE", os.path.join(ROOT, ".pytest_cache", "xla"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from pixelflow_jax.checkpoint import model_from_tree, save_checkpoint  # noqa: E402
from pixelflow_jax.config import config_from_dict  # noqa: E402
from pixelflow_jax.convert import official_to_nnx  # noqa: E402

TINY_C2I = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                depth=2, patch_size=2, num_classes=10, attention_bias=True)
TINY_T2I = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                depth=2, patch_size=2, num_classes=0, attention_bias=False,
                cross_attention_dim=12)


def make_config(params: dict, resolution: int = 32, num_stages: int = 4):
    """A full config (official layout) around ``params``."""
    return config_from_dict({
        "model": {"target": "pixelflow.model.PixelFlowModel", "params": dict(params)},
        "scheduler": {"num_train_timesteps": 1000, "num_stages": num_stages,
                      "pyramid_shift": False},
        "data": {"resolution": resolution},
    })


@dataclasses.dataclass
class Pair:
    """The same random weights as an oracle state dict (float64) and a JAX model."""

    params: dict
    config: object
    sd: dict
    tree: dict

    def model(self, **kwargs):
        return model_from_tree(self.tree, self.config, **kwargs)


def make_pair(params: dict, seed: int = 1, resolution: int = 32) -> Pair:
    sd = ref.random_state_dict(params, seed=seed)
    cfg = make_config(params, resolution)
    tree = official_to_nnx({k: v.numpy() for k, v in sd.items()}, cfg.params)
    return Pair(params, cfg, sd, tree)


@pytest.fixture(scope="session")
def c2i() -> Pair:
    return make_pair(TINY_C2I)


@pytest.fixture(scope="session")
def t2i() -> Pair:
    return make_pair(TINY_T2I, seed=2)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory, c2i) -> str:
    """A saved checkpoint folder of the tiny class-conditional model (32 px, 4 stages)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(path, c2i.tree, c2i.config)
    return path


def jit_call(model, *args, **kwargs):
    """``model(*args, **kwargs)`` compiled as one program (eager NNX dispatches op by op)."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, a, k: nnx.merge(graphdef, st)(*a, **k))(state, args, kwargs)


def nchw(x) -> torch.Tensor:
    """NHWC array -> float64 NCHW tensor."""
    return torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def draw_shapes_folder(root, per_class: int = 16, size: int = 24, seed: int = 0) -> str:
    """A small real image dataset: 3 classes (red disks, green squares, blue stripes) at
    random positions and sizes, as an ImageFolder tree of PNG and JPEG files."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label, name in enumerate(["disk", "square", "stripes"]):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
            d = ImageDraw.Draw(img)
            r = int(rng.integers(5, 10))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            if label == 0:
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 40, 40))
            elif label == 1:
                d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(40, 220, 60))
            else:
                for y in range(int(rng.integers(0, 4)), size, 6):
                    d.rectangle([0, y, size, y + 2], fill=(50, 80, 240))
            img.save(os.path.join(folder, f"{i:03d}.{'jpg' if i % 4 == 0 else 'png'}"))
    return str(root)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> str:
    return draw_shapes_folder(tmp_path_factory.mktemp("shapes"))
