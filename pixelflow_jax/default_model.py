"""The embedded models: a small PixelFlow trained on digits, and its one-step student.

They ship inside the package (``pixelflow_jax/weights/<name>``: ``config.yaml``,
``params/``, ``class_names.txt``, ``MODEL_CARD.md``), so ``sample.py`` and
``app.py`` work with no download. See each ``MODEL_CARD.md`` for how it was trained.
``--ckpt`` (and ``train.init_from``) also take their short names (:data:`SHORT_NAMES`):
``digits``, the default model, and ``digits-1step``, its reflowed and distilled
student that draws with one Euler step per stage (DESIGN §11).
"""

from __future__ import annotations

import os

from pixelflow_jax.errors import UserError

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_CHECKPOINT = os.path.join(WEIGHTS, "digits")
SHORT_NAMES = {"digits": "the embedded digits model",
               "digits-1step": "the embedded one-step digits student"}


def default_checkpoint() -> str:
    """The embedded checkpoint folder; a :class:`UserError` if it is missing."""
    if not os.path.isfile(os.path.join(DEFAULT_CHECKPOINT, "config.yaml")):
        raise UserError(f"the embedded default model is missing ({DEFAULT_CHECKPOINT}); "
                        "pass --ckpt DIR")
    return DEFAULT_CHECKPOINT


def embedded_checkpoint(name: str) -> str:
    """The folder of the embedded model ``name`` (a key of :data:`SHORT_NAMES`).

    A :class:`UserError` when this copy of the package does not ship it.
    """
    folder = os.path.join(WEIGHTS, name)
    if not os.path.isfile(os.path.join(folder, "config.yaml")):
        raise UserError(f"{name!r} ({SHORT_NAMES[name]}) is not shipped with this copy of "
                        f"pixelflow_jax ({folder} is missing); pass a checkpoint folder")
    return folder


def resolve_checkpoint(ckpt: str | None) -> str:
    """A checkpoint argument as a folder: None is the default model, a short name its
    embedded folder (unless a folder of that name exists here), anything else a path."""
    if ckpt is None:
        return default_checkpoint()
    if ckpt in SHORT_NAMES and not os.path.isdir(ckpt):
        return embedded_checkpoint(ckpt)
    return ckpt
