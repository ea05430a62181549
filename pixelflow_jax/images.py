"""Writing images: PNG files that appear whole or not at all, and grids."""

from __future__ import annotations

import os
import secrets
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from pixelflow_jax.errors import UserError

TEMPORARY_PREFIX = ".tmp-"  # save_png's files before their rename


def _cells(n: int, rows: int, h: int, w: int, pad: int) -> tuple[int, list[tuple[int, int]]]:
    """(columns, top-left corner of each of ``n`` cells), row-major."""
    cols = -(-n // rows)
    return cols, [(pad + r * (h + pad), pad + c * (w + pad))
                  for r, c in (divmod(i, cols) for i in range(n))]


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into ``rows`` rows (row-major) with white padding."""
    n, h, w, c = images.shape
    cols, corners = _cells(n, rows, h, w, pad)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for img, (y, x) in zip(images, corners):
        grid[y:y + h, x:x + w] = img
    return grid


def read_png(path: str) -> np.ndarray:
    """A PNG as uint8 [H, W, C] (C = 1 for grayscale)."""
    with Image.open(path) as image:
        a = np.asarray(image)
    return a[..., None] if a.ndim == 2 else a


def grid_from_files(paths: Sequence[str], rows: int, pad: int = 2) -> np.ndarray:
    """:func:`make_grid` of the PNGs ``paths`` (all one size), read one at a time."""
    first = read_png(paths[0])
    h, w, c = first.shape
    cols, corners = _cells(len(paths), rows, h, w, pad)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, (path, (y, x)) in enumerate(zip(paths, corners)):
        img = first if i == 0 else read_png(path)
        if img.shape != first.shape:
            raise UserError(f"{path} is {img.shape}, not {first.shape} like {paths[0]}")
        grid[y:y + h, x:x + w] = img
    return grid


def _create_temporary(folder: str) -> tuple[int, str]:
    """A new file beside the target, created with mode 0666 minus the umask (as ``open``
    would; mkstemp's 0600 would leave the PNG unreadable to others)."""
    while True:
        path = os.path.join(folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}.png")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _png_info(text: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    return info


def save_png(path: str | os.PathLike, image: np.ndarray,
             text: dict[str, str] | None = None) -> None:
    """Write a uint8 [H, W, 3|1] image atomically (temp file + rename).

    ``text``: PNG text chunks (iTXt, so any Unicode), e.g. ``{"prompt": ...}``.

    An OSError (full disk, read-only folder, ...) becomes a one-line UserError naming
    ``path``; output paths are checked up front by :func:`pixelflow_jax.cli.check_output`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    tmp = None
    try:
        fd, tmp = _create_temporary(folder)
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=_png_info(text) if text else None)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise
