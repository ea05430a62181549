"""The digits data path and the quality measures (independent of the trained model)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from pixelflow_jax import digits as D
from pixelflow_jax.data import ImageFolderSource, decode_rgb
from pixelflow_jax.errors import UserError


@pytest.fixture(scope="module")
def split():
    return D.split_digits()


def test_split_is_fixed_stratified_and_disjoint(split):
    assert len(split.train_y) + len(split.heldout_y) == 1797
    for c in range(10):
        n_held, n_train = (split.heldout_y == c).sum(), (split.train_y == c).sum()
        assert n_held == round(0.2 * (n_held + n_train))
    again = D.split_digits()
    np.testing.assert_array_equal(again.heldout_x, split.heldout_x)
    train = {x.tobytes() for x in split.train_x}
    # load_digits has a handful of exact duplicates; the parts share at most those.
    assert sum(x.tobytes() in train for x in split.heldout_x) <= 3
    other = D.split_digits(seed=1)
    assert not np.array_equal(other.heldout_x, split.heldout_x)


def test_render_and_back(split):
    x = split.train_x[:50]
    img = np.stack([D.digit_to_image(d, 32) for d in x])
    assert img.shape == (50, 32, 32, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 2]).all()  # grey
    back = D.images_to_digits(img).reshape(-1, 8, 8)
    # Block means of the bicubic upscale recover the digit up to its blur.
    assert np.abs(back - x).mean() < 1.0 and np.corrcoef(back.ravel(), x.ravel())[0, 1] > 0.97
    with pytest.raises(ValueError, match="multiple of 8"):
        D.images_to_digits(np.zeros((2, 12, 12, 3), np.uint8))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert D.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert D.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_classifier_is_independent_and_accurate(split):
    clf = D.fit_classifier(split)
    held = D.rendered(split.heldout_x, 32)
    assert (clf.predict(held / D.INK_MAX) == split.heldout_y).mean() > 0.93
    assert D.hidden_features(clf, held).shape == (len(held), 64)


def test_evaluate_scores_real_high_and_noise_low(split):
    clf = D.fit_classifier(split)
    pick = np.arange(0, 1400, 7)
    real = np.stack([D.digit_to_image(d, 32) for d in split.train_x[pick]])
    q = D.evaluate(real, split.train_y[pick], split=split, clf=clf)
    assert q.agreement > 0.97 and q.fd < 2 * q.fd_real
    # The same images asked to be other digits, and noise: both must score badly.
    wrong = D.evaluate(real, (split.train_y[pick] + 1) % 10, split=split, clf=clf)
    assert wrong.agreement < 0.1 and wrong.fd == pytest.approx(q.fd)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    bad = D.evaluate(noise, split.train_y[pick], split=split, clf=clf)
    assert bad.agreement < 0.3 and bad.fd > 10 * q.fd_real
    assert "agreement" in q.summary() and "Frechet" in q.summary()


def test_prepare_image_folders(tmp_path):
    out = str(tmp_path / "digits")
    counts = D.prepare_image_folders(out, 16)
    assert counts == {"train": 1438, "heldout": 359}
    src = ImageFolderSource(out + "/train")
    assert src.num_classes == 10 and len(src) == 1438
    raw, label = src.get(0)
    assert label == 0 and np.asarray(decode_rgb(raw)).shape == (16, 16, 3)
    with pytest.raises(UserError, match="exists already"):
        D.prepare_image_folders(out, 16)
    assert D.main(["prepare", str(tmp_path / "x"), "--resolution", "12"]) == 2
