"""The embedded default model: a small PixelFlow trained on scikit-learn's digits.

It ships inside the package (``pixelflow_jax/weights/digits``: ``config.yaml``,
``params/``, ``class_names.txt``, ``MODEL_CARD.md``), so ``sample.py`` and
``app.py`` work with no download. See ``MODEL_CARD.md`` for how it was trained.
"""

from __future__ import annotations

import os

from pixelflow_jax.errors import UserError

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits")


def default_checkpoint() -> str:
    """The embedded checkpoint folder; a :class:`UserError` if it is missing."""
    if not os.path.isfile(os.path.join(DEFAULT_CHECKPOINT, "config.yaml")):
        raise UserError(f"the embedded default model is missing ({DEFAULT_CHECKPOINT}); "
                        "pass --ckpt DIR")
    return DEFAULT_CHECKPOINT
