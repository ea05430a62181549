"""scikit-learn's handwritten digits: the embedded model's data, and how its samples are judged.

``load_digits`` (1,797 8x8 images, 10 classes, shipped inside scikit-learn, no
download) is split once, stratified, into a training and a held-out part
(:func:`split_digits`). :func:`prepare_image_folders` writes both as image
folders (``train/0 ... train/9``, ``heldout/0 ...``), upscaled to the model's
resolution, so ``train.py`` reads them through the same path as any user's
dataset::

    python -m pixelflow_jax.digits prepare data/digits
    python -m pixelflow_jax.digits reference digits_ref.npz   # evaluate.py's REF

Quality is measured by something the generator never saw: an MLP classifier
(:func:`fit_classifier`) fitted on the 8x8 training digits labels generated
images (downscaled back to 8x8, :func:`images_to_digits`); agreement with the
requested class per class and overall, and a Frechet distance between the
classifier's hidden features of generated and held-out real digits
(:func:`frechet_distance`), next to the same distance for real training digits
(:func:`evaluate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
from PIL import Image

from pixelflow_jax import cli
from pixelflow_jax.errors import UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
INK_MAX = 16.0  # load_digits pixel values are 0..16 (ink); 0 is the paper


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as e:
        raise UserError("the digits need scikit-learn: pip install -r requirements.txt") from e
    return datasets


@dataclasses.dataclass(frozen=True)
class DigitSplit:
    """8x8 digits as float [N, 8, 8] in 0..16, with labels, for both parts."""

    train_x: np.ndarray
    train_y: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray


def split_digits(holdout: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED) -> DigitSplit:
    """The fixed stratified split: ``holdout`` of each class (rounded) held out, chosen by
    ``numpy.random.default_rng(seed)``; both parts in dataset order."""
    data = _sklearn_datasets().load_digits()
    x, y = data.images.astype(np.float32), data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        held[rng.permutation(idx)[:round(holdout * len(idx))]] = True
    return DigitSplit(x[~held], y[~held], x[held], y[held])


def digit_to_image(digit: np.ndarray, resolution: int) -> np.ndarray:
    """An 8x8 digit (0..16) as uint8 RGB ``[R, R, 3]``: white ink on black, bicubic upscale."""
    gray = Image.fromarray(np.round(digit * (255.0 / INK_MAX)).astype(np.uint8), mode="L")
    up = np.asarray(gray.resize((resolution, resolution), resample=Image.BICUBIC))
    return np.repeat(up[:, :, None], 3, axis=2)


def images_to_digits(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, R, R, 3]`` images (R a multiple of 8) -> float ``[N, 64]`` digits in
    0..16: the channel mean, averaged over (R/8)x(R/8) blocks (the inverse, up to blur,
    of :func:`digit_to_image`)."""
    images = np.asarray(images, np.float32)
    n, r = images.shape[0], images.shape[1]
    if images.ndim != 4 or r != images.shape[2] or r % 8:
        raise ValueError(f"expected [N, R, R, C] images with R a multiple of 8, got "
                         f"{images.shape}")
    f = r // 8
    gray = images.mean(axis=3).reshape(n, 8, f, 8, f).mean(axis=(2, 4))
    return (gray * (INK_MAX / 255.0)).reshape(n, 64)


def prepare_image_folders(out: str, resolution: int = 32, *, split: DigitSplit | None = None,
                          overwrite: bool = False) -> dict[str, int]:
    """Write ``out/train/<c>/<i>.png`` and ``out/heldout/<c>/<i>.png`` (c = 0..9); returns
    the image count of each part. The folder appears whole or not at all."""
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} exists already (pass --overwrite to replace it)")
    split = split or split_digits()
    tmp = out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        import shutil
        shutil.rmtree(tmp)
    counts = {}
    for part, xs, ys in (("train", split.train_x, split.train_y),
                         ("heldout", split.heldout_x, split.heldout_y)):
        for c in range(10):
            os.makedirs(os.path.join(tmp, part, str(c)), exist_ok=True)
        for i, (x, c) in enumerate(zip(xs, ys)):
            Image.fromarray(digit_to_image(x, resolution)).save(
                os.path.join(tmp, part, str(c), f"{i:04d}.png"))
        counts[part] = len(ys)
    from pixelflow_jax.checkpoint import replace_folder
    replace_folder(tmp, out)
    return counts


# --------------------------------------------------------------------------- quality


def fit_classifier(split: DigitSplit | None = None, seed: int = 0):
    """An MLP (one hidden layer of 64 ReLUs) fitted on the 8x8 training digits, inputs / 16.

    Deterministic for a given ``seed``; about 97% accurate on the held-out digits.
    """
    from sklearn.neural_network import MLPClassifier

    split = split or split_digits()
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=seed)
    clf.fit(split.train_x.reshape(len(split.train_x), 64) / INK_MAX, split.train_y)
    return clf


def hidden_features(clf, digits: np.ndarray) -> np.ndarray:
    """The classifier's hidden-layer activations for ``[N, 64]`` digits in 0..16."""
    h = np.asarray(digits, np.float64) / INK_MAX @ clf.coefs_[0] + clf.intercepts_[0]
    return np.maximum(h, 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets [N, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    ra = sqrt_psd(ca)
    # tr (C_a C_b)^(1/2) = tr (C_a^(1/2) C_b C_a^(1/2))^(1/2), a symmetric PSD form.
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ cb @ ra), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


@dataclasses.dataclass(frozen=True)
class DigitQuality:
    """How generated digits score; ``fd_real`` is the real-vs-real reference."""

    agreement: float                 # fraction labelled as the requested class
    per_class: tuple[float, ...]     # the same, per requested class 0..9
    fd: float                        # Frechet distance: generated vs held-out real
    fd_real: float                   # the same for as many real training digits
    classifier_accuracy: float       # the classifier on the held-out real digits (rendered)

    def summary(self) -> str:
        per = " ".join(f"{c}:{a:.0%}" for c, a in enumerate(self.per_class))
        return (f"agreement {self.agreement:.1%} (per class {per}); Frechet distance "
                f"{self.fd:.2f} vs real-vs-real {self.fd_real:.2f}; classifier accuracy on "
                f"held-out real {self.classifier_accuracy:.1%}")


def rendered(digits: np.ndarray, resolution: int) -> np.ndarray:
    """8x8 digits as the model sees them and back: [N, 64] after
    :func:`digit_to_image` at ``resolution`` then :func:`images_to_digits`."""
    return images_to_digits(np.stack([digit_to_image(d, resolution) for d in digits]))


def evaluate(images: np.ndarray, labels: np.ndarray, *, split: DigitSplit | None = None,
             clf=None, seed: int = 0) -> DigitQuality:
    """Score generated uint8 images ``[N, R, R, 3]`` drawn for ``labels`` [N].

    Real digits are compared as the model sees them (:func:`rendered` at R), so the
    up- and downscaling blur is not counted against the generator. The real-vs-real
    reference uses N training digits (drawn by ``seed``; at most all of them), so both
    distances carry the same small-sample bias.
    """
    split = split or split_digits()
    clf = clf or fit_classifier(split)
    labels = np.asarray(labels)
    digits = images_to_digits(images)
    resolution = images.shape[1]
    pred = clf.predict(digits / INK_MAX)
    hit = pred == labels
    per_class = tuple(float(hit[labels == c].mean()) if (labels == c).any() else float("nan")
                      for c in range(10))
    held = rendered(split.heldout_x, resolution)
    n = min(len(images), len(split.train_x))
    pick = np.sort(np.random.default_rng(seed).choice(len(split.train_x), n, replace=False))
    real = rendered(split.train_x[pick], resolution)
    f_held = hidden_features(clf, held)
    accuracy = float((clf.predict(held / INK_MAX) == split.heldout_y).mean())
    return DigitQuality(
        agreement=float(hit.mean()), per_class=per_class,
        fd=frechet_distance(hidden_features(clf, digits), f_held),
        fd_real=frechet_distance(hidden_features(clf, real), f_held),
        classifier_accuracy=accuracy)


# --------------------------------------------------------------------------- command line


PROG = "python -m pixelflow_jax.digits"


def build_parser() -> argparse.ArgumentParser:
    """The digits tool's commands and flags."""
    parser = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prepare", help="write the train / held-out image folders",
                          description="Write OUT/train/<c>/ and OUT/heldout/<c>/ (c = 0..9) "
                                      "as PNG image folders for train.py.")
    prep.add_argument("out", help="folder to create (train/ and heldout/ inside; missing "
                                  "parent folders are created)")
    prep.add_argument("--resolution", type=cli.positive_int, default=32,
                      help="image side in pixels, a multiple of 8 (default %(default)s)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ref = sub.add_parser("reference", help="write the held-out digits as an ADM reference batch",
                         description="Write the held-out digits as OUT.npz (arr_0, uint8 "
                                     "[N, R, R, 3]), a reference batch for evaluate.py and "
                                     "sample.py --evaluate: a demo of the scoring pipeline on "
                                     "the embedded model, not an ImageNet number.")
    ref.add_argument("out", help="the .npz file to write (missing parent folders are created)")
    ref.add_argument("--resolution", type=cli.positive_int, default=32,
                     help="image side in pixels, a multiple of 8 (default %(default)s, the "
                          "embedded model's)")
    return parser


def reference_batch(resolution: int = 32, *, split: DigitSplit | None = None) -> np.ndarray:
    """The held-out digits as uint8 images ``[N, R, R, 3]`` (:func:`digit_to_image`), in
    dataset order: the reference batch of ``python -m pixelflow_jax.digits reference``."""
    split = split or split_digits()
    return np.stack([digit_to_image(d, resolution) for d in split.heldout_x])


def write_reference(out: str, resolution: int = 32) -> int:
    """Write :func:`reference_batch` to ``out`` (``arr_0``, atomically); returns N."""
    images = reference_batch(resolution)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(images)


def _run(args: argparse.Namespace) -> int:
    if args.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got "
                        f"{args.resolution}")
    if args.command == "reference":
        cli.check_output(args.out, "OUT", "file")
        cli.make_parents(args.out)
        with cli.writing(args.out):
            n = write_reference(args.out, args.resolution)
        print(f"wrote {args.out}: {n} held-out digits at {args.resolution} px (arr_0)")
        return 0
    cli.check_output(args.out, "OUT", "replace", overwrite=args.overwrite)
    cli.make_parents(args.out)
    with cli.writing(args.out):
        counts = prepare_image_folders(args.out, args.resolution, overwrite=args.overwrite)
    print(f"wrote {args.out}: {counts['train']} training and {counts['heldout']} held-out "
          f"digits at {args.resolution} px")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the digits tool with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), _run, argv,
                        interrupted="OUT was not written (a partial OUT.tmp is removed by "
                                    "the next run)")


if __name__ == "__main__":
    sys.exit(main())
