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
    """Write a uint8 [H, W, 3|1] image atomically (temp file + rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output(out: str) -> str:
    """Validate an output path before any work: ``*.png`` is a grid file, anything
    else a folder of PNGs. Returns ``"grid"`` or ``"folder"``; raises UserError."""
    grid = out.lower().endswith(".png")
    target = os.path.abspath(out)
    folder = os.path.dirname(target) if grid else target
    if grid and os.path.isdir(target):
        raise UserError(f"output {out} is a folder, expected a .png file path")
    if not grid and os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"output folder {out} exists and is not a folder")
    probe = folder
    while not os.path.exists(probe):  # the nearest existing ancestor must be writable
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot write {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: no write permission in {probe}")
    if grid and os.path.exists(target) and not os.access(target, os.W_OK):
        raise UserError(f"cannot write {out}: the file is not writable")
    return "grid" if grid else "folder"
