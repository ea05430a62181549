"""FID-scale runs: class balance, resume after an interruption, the streamed .npz."""

import json
import os

import numpy as np
import pytest

import sample
from pixelflow_jax.fid import fid_labels, write_npz


def test_class_balance_follows_the_official_list():
    labels = fid_labels(25, 10)
    assert labels.tolist() == list(range(10)) * 2 + [0] * 5
    assert np.bincount(fid_labels(50_000, 1000)).tolist() == [50] * 1000


def run(ckpt_dir, out, *extra):
    return sample.main(["--ckpt", ckpt_dir, "--fid-samples", "10", "--batch-size", "4",
                        "--steps", "2", "--out", str(out), "--quiet", *extra])


def test_interrupted_run_resumes_to_the_same_set(ckpt_dir, tmp_path, capsys):
    assert run(ckpt_dir, tmp_path / "full") == 0
    with np.load(tmp_path / "full.npz") as f:
        full = f["arr_0"]
    assert full.shape == (10, 32, 32, 3) and full.dtype == np.uint8
    assert len([n for n in os.listdir(tmp_path / "full") if n.endswith(".png")]) == 10
    assert json.load(open(tmp_path / "full" / "run.json"))["num_samples"] == 10

    # The state an interruption leaves: some images of later batches missing, a stray
    # temporary file, no .npz yet.
    os.rename(tmp_path / "full", tmp_path / "cut")
    for i in (5, 8, 9):
        os.unlink(tmp_path / "cut" / f"{i:06d}.png")
    (tmp_path / "cut" / ".tmp-abc.png").write_bytes(b"half an image")
    before = {n: os.path.getmtime(tmp_path / "cut" / n) for n in ("000000.png", "000003.png")}
    capsys.readouterr()
    assert sample.main(["--ckpt", ckpt_dir, "--fid-samples", "10", "--batch-size", "4",
                        "--steps", "2", "--out", str(tmp_path / "cut")]) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 of 3 batches are complete, 2 to draw" in err
    assert "images/s" in err and "left" in err
    with np.load(tmp_path / "cut.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)
    # The complete first batch was not redrawn.
    assert before == {n: os.path.getmtime(tmp_path / "cut" / n) for n in before}


def test_resume_with_other_settings_is_refused(ckpt_dir, tmp_path, capsys):
    assert run(ckpt_dir, tmp_path / "a") == 0
    capsys.readouterr()
    assert run(ckpt_dir, tmp_path / "a", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (seed: 42 -> 5)" in err


def test_unfinished_solves_are_reported(ckpt_dir, tmp_path, capsys):
    code = run(ckpt_dir, tmp_path / "u", "--solver", "dopri5", "--max-steps", "2")
    err = capsys.readouterr().err
    assert code == sample.EXIT_UNFINISHED
    assert "did not finish within --max-steps 2 and were not written" in err
    assert not os.path.exists(tmp_path / "u.npz")
    assert not [n for n in os.listdir(tmp_path / "u") if n.endswith(".png")]


def test_npz_is_streamed(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / f"{i:06d}.png")
    write_npz(str(tmp_path), 3, str(tmp_path / "x.npz"))
    with np.load(tmp_path / "x.npz") as f:
        assert f["arr_0"].shape == (3, 4, 4, 3) and f["arr_0"][2, 0, 0, 0] == 2
    with pytest.raises(FileNotFoundError):
        write_npz(str(tmp_path), 4, str(tmp_path / "y.npz"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("y.npz")]  # no .tmp left
