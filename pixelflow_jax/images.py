"""Writing images: PNG files that appear whole or not at all, and grids."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from pixelflow_jax.errors import UserError


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into ``rows`` rows (row-major) with white padding."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 [H, W, 3|1] image atomically (temp file + rename).

    An OSError (full disk, read-only folder, ...) becomes a one-line UserError naming
    ``path``; output paths are checked up front by :func:`pixelflow_jax.cli.check_output`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise
