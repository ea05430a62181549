"""Human-readable class names for a class-conditional checkpoint.

A checkpoint folder may carry ``class_names.txt`` (one name per line, in class
order); without one, 1000-class models get the ImageNet-1k English names shipped
with the package and any other model the plain indices.
"""

from __future__ import annotations

import os

from pixelflow_jax.errors import UserError

CLASS_NAMES_FILE = "class_names.txt"
IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "imagenet_classes.txt")


def read_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """The names in ``path``: exactly ``num_classes`` non-empty lines, else a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the class names ({e})") from None
    while lines and not lines[-1].strip():  # a trailing blank line is harmless
        lines.pop()
    names = [line.strip() for line in lines]
    if len(names) != num_classes:
        raise UserError(f"{path}: expected {num_classes} class names (one per line), "
                        f"found {len(names)}")
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise UserError(f"{path}: line {empty[0] + 1} is empty; every class needs a name")
    return names


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names (short English names, class-index order)."""
    return read_names(IMAGENET_CLASSES_FILE, 1000)


def class_names(ckpt_dir: str | os.PathLike, num_classes: int) -> list[str]:
    """One display name per class of the checkpoint in ``ckpt_dir``.

    ``class_names.txt`` in the folder wins; else ImageNet names for 1000 classes;
    else ``"0"`` .. ``"N-1"``.
    """
    path = os.path.join(ckpt_dir, CLASS_NAMES_FILE)
    if os.path.exists(path):
        return read_names(path, num_classes)
    if num_classes == 1000:
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]
