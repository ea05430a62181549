"""The embedded digits model: it ships whole, `sample.py` uses it, and its digits are right.

Quality is judged by an MLP classifier fitted on the real training digits
(:mod:`pixelflow_jax.digits`), never by anything the generator was trained with.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT
from pixelflow_jax import digits as D
from pixelflow_jax.checkpoint import load_checkpoint
from pixelflow_jax.config import load_config
from pixelflow_jax.default_model import DEFAULT_CHECKPOINT, default_checkpoint
from pixelflow_jax.sampling import Sampler, to_images
from pixelflow_jax.scheduler import schedule_from_config

PER_CLASS = 30  # 300 images at the sample.py defaults


def test_ships_whole_and_small():
    assert default_checkpoint() == DEFAULT_CHECKPOINT
    names = open(os.path.join(DEFAULT_CHECKPOINT, "class_names.txt")).read().split("\n")
    assert [n for n in names if n] == list(D.DIGIT_NAMES)
    card = open(os.path.join(DEFAULT_CHECKPOINT, "MODEL_CARD.md")).read()
    for needed in ("python -m pixelflow_jax.digits prepare", "python train.py "
                   "configs/pixelflow_digits.yaml", "agreement", "Frechet"):
        assert needed in card
    size = sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(DEFAULT_CHECKPOINT) for f in files)
    assert size < 6e6, f"the embedded model is {size / 1e6:.1f} MB"
    # The shipped config is the training config's model, so the card's command rebuilds it.
    shipped = yaml.safe_load(open(os.path.join(DEFAULT_CHECKPOINT, "config.yaml")))
    trained = load_config(os.path.join(ROOT, "configs", "pixelflow_digits.yaml"))
    assert shipped["model"]["params"] == trained.to_dict()["model"]["params"]
    assert trained.scheduler.num_stages >= 3


@pytest.fixture(scope="module")
def default_samples():
    model, cfg = load_checkpoint(DEFAULT_CHECKPOINT)
    schedule = schedule_from_config(cfg.scheduler)
    sampler = Sampler(model, schedule, cfg.data.resolution)
    labels = np.repeat(np.arange(10), PER_CLASS)
    # sample.py's defaults: seed 42, 10 Euler steps per stage, guidance 4, shift 1.
    x = sampler.generate(42, np.arange(len(labels)), labels=labels, steps=10, guidance=4.0,
                         shift=1.0)
    return np.asarray(to_images(x)), labels


def test_generated_digits_are_the_requested_classes(default_samples):
    images, labels = default_samples
    q = D.evaluate(images, labels)
    print(f"\n  embedded model, {len(labels)} samples at the defaults: {q.summary()}")
    assert q.agreement >= 0.9, q.summary()
    assert min(q.per_class) >= 0.6, q.summary()
    # Close to real digits in the classifier's feature space: within a few times the
    # distance between two real sets of the same size, and far below noise (> 30).
    assert q.fd <= 4 * q.fd_real + 0.5, q.summary()
    # Samples of one class are not all the same picture.
    for c in range(10):
        group = images[labels == c].astype(np.float32)
        assert np.abs(group - group.mean(0)).mean() > 3.0


def test_sample_py_without_ckpt_draws_one_row_per_digit(tmp_path):
    out = tmp_path / "digits.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(out))
    # 10 rows (digits 0..9) x 4 images of 32 px with 2 px padding.
    assert grid.shape == (10 * 34 + 2, 4 * 34 + 2, 3)
    cells = grid[2:, 2:].reshape(10, 34, 4, 34, 3)[:, :32, :, :32].transpose(0, 2, 1, 3, 4)
    q = D.evaluate(cells.reshape(40, 32, 32, 3), np.repeat(np.arange(10), 4))
    assert q.agreement >= 0.8, q.summary()
