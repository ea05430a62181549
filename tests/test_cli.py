"""sample.py: it draws, it reads injected noise, and bad input is one line + exit 2."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import sample
from conftest import ROOT
from pixelflow_jax.checkpoint import load_checkpoint
from pixelflow_jax.default_model import DEFAULT_CHECKPOINT
from pixelflow_jax.noise import draw_cascade_noise, save_noise_npz
from pixelflow_jax.sampling import Sampler, to_images
from pixelflow_jax.scheduler import CascadeSchedule


def run_cli(*args):
    """Run sample.py in a fresh process: (exit code, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    return proc.returncode, proc.stderr


def test_draws_a_grid_and_a_folder(ckpt_dir, tmp_path):
    out = tmp_path / "new" / "sub" / "grid.png"  # missing folders are created
    code, err = run_cli("--ckpt", ckpt_dir, "--classes", "1,2", "3", "--num-images", "2",
                        "--steps", "2", "--batch-size", "4", "--out", out)
    assert code == 0, err
    assert "compiled in" in err and "images/s" in err
    img = np.asarray(Image.open(out))
    assert img.shape == (3 * 34 + 2, 2 * 34 + 2, 3)  # 3 rows (classes) x 2, 32 px + padding
    assert os.listdir(out.parent) == ["grid.png"]  # its parts folder is gone
    # In-process, the folder form; its images are the grid's (same seed and indices).
    assert sample.main(["--ckpt", ckpt_dir, "--classes", "1", "2", "3", "--num-images", "2",
                        "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "dir"),
                        "--quiet"]) == 0
    files = sorted(os.listdir(tmp_path / "dir"))
    assert files[0] == "000000_class1.png" and files[-2:] == ["000005_class3.png", "run.json"]
    assert len(files) == 7
    first = np.asarray(Image.open(tmp_path / "dir" / files[2]))  # class 2, first image
    np.testing.assert_array_equal(first, img[36:68, 2:34])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_noise_from_file_reproduces_library_samples(ckpt_dir, tmp_path):
    model, cfg = load_checkpoint(ckpt_dir)
    sampler = Sampler(model, CascadeSchedule(), 32)
    noise = draw_cascade_noise(5, jnp.arange(2), sampler.resolutions, 3, -1 / 3)
    save_noise_npz(tmp_path / "noise.npz", noise)
    want = np.asarray(to_images(sampler.generate_from_noise(
        noise, labels=np.array([7, 7]), steps=[2, 1, 1, 2], guidance=3.0, shift=2.0)))
    assert sample.main(["--ckpt", ckpt_dir, "--classes", "7", "--num-images", "2", "--steps",
                        "2,1,1,2", "--cfg", "3", "--shift", "2", "--noise-from",
                        str(tmp_path / "noise.npz"), "--out", str(tmp_path / "n"),
                        "--quiet"]) == 0
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / "n" / f"00000{i}_class7.png"))
        np.testing.assert_array_equal(got, want[i])


BAD = [
    (["--classes", "10"], "class id 10 is outside [0, 10)"),
    (["--classes", "-1"], "class id -1 is outside [0, 10)"),
    (["--classes", "one"], "--classes: expected integers, got 'one'"),
    (["--steps", "0"], "--steps must be integers >= 1, got 0"),
    (["--steps", "2,2"], "one per stage (4)"),
    (["--cfg", "-1"], "--cfg must be a finite number >= 0, got -1"),
    (["--cfg", "nan"], "--cfg must be a finite number >= 0, got nan"),
    (["--shift", "0"], "--shift must be a finite number > 0, got 0"),
    (["--shift", "inf"], "--shift must be a finite number > 0, got inf"),
    (["--resolution", "100"], "resolution 100 does not work with 4 stages"),
    (["--resolution", "0"], "--resolution must be an integer >= 1, got 0"),
    (["--resolution", "-32"], "--resolution must be an integer >= 1, got -32"),
    (["--num-images", "0"], "--num-images must be an integer >= 1, got 0"),
    (["--num-images", "two"], "--num-images must be an integer >= 1, got 'two'"),
    (["--seed", "-3"], "--seed must be an integer in [0, 2^32), got -3"),
    (["--seed", str(2 ** 32)], "--seed must be an integer in [0, 2^32)"),
    (["--solver", "rk4"], "invalid choice: 'rk4'"),
    (["--rtol", "0"], "--rtol must be a finite number > 0"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--fid-samples", "10"], "give --out a folder path"),
    (["--fid-samples", "0"], "--fid-samples must be an integer >= 1"),
    (["--noise-from", "/nonexistent.npz"], "no such file"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_line_and_exit_2(ckpt_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    code = sample.main(["--ckpt", ckpt_dir, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_checkpoints(ckpt_dir, tmp_path, capsys):
    cases = [
        (["--ckpt", str(tmp_path / "missing")], "does not exist"),
        (["--ckpt", str(tmp_path)], "has no config.yaml"),
    ]
    for args, message in cases:
        assert sample.main([*args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_real_process_exit_code_and_the_embedded_model(ckpt_dir, tmp_path):
    code, err = run_cli("--ckpt", ckpt_dir, "--classes", "99", "--out", tmp_path / "a.png")
    assert code == 2 and err.strip() == "sample.py: error: class id 99 is outside [0, 10)"
    # Without --ckpt: the embedded 10-class digits model.
    assert os.path.isfile(os.path.join(DEFAULT_CHECKPOINT, "config.yaml"))
    code, err = run_cli("--classes", "10", "--out", tmp_path / "a.png")
    assert code == 2 and err.strip() == "sample.py: error: class id 10 is outside [0, 10)"
    assert not (tmp_path / "a.png").exists()
