"""FID-scale runs: class balance, resume after an interruption, the streamed .npz."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import sample
from pixelflow_jax import cli
from pixelflow_jax.checkpoint import load_checkpoint, save_checkpoint
from pixelflow_jax.errors import UserError
from pixelflow_jax.fid import fid_labels, run_fid, write_npz
from pixelflow_jax.resumable import ImageFolder, name_width, parse_png_name, pending_batches
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import schedule_from_config


def test_class_balance_follows_the_official_list():
    labels = fid_labels(25, 10)
    assert len(labels) == 25
    assert labels[np.arange(25)].tolist() == list(range(10)) * 2 + [0] * 5
    assert np.bincount(fid_labels(50_000, 1000)[np.arange(50_000)]).tolist() == [50] * 1000
    # Computed per batch: a billion images need no billion-entry array.
    huge = fid_labels(10 ** 9 + 5, 1000)
    assert huge[np.array([0, 1001, 10 ** 9 - 1, 10 ** 9, 10 ** 9 + 4])].tolist() == \
        [0, 1, 999, 0, 0]


def run(ckpt_dir, out, *extra):
    return sample.main(["--ckpt", ckpt_dir, "--fid-samples", "10", "--batch-size", "4",
                        "--steps", "2", "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def full_run(ckpt_dir, tmp_path_factory):
    """(folder, images) of an uninterrupted tiny run: 10 images, batches of 4."""
    out = tmp_path_factory.mktemp("fid") / "full"
    assert run(ckpt_dir, out) == 0
    with np.load(f"{out}.npz") as f:
        return str(out), f["arr_0"]


def test_interrupted_run_resumes_to_the_same_set(ckpt_dir, full_run, tmp_path, capsys):
    folder, full = full_run
    assert full.shape == (10, 32, 32, 3) and full.dtype == np.uint8
    assert len([n for n in os.listdir(folder) if n.endswith(".png")]) == 10
    record = json.load(open(os.path.join(folder, "run.json")))
    assert record["num_samples"] == 10 and record["name_width"] == 6

    # The state an interruption leaves: some images of later batches missing, a stray
    # temporary file, no .npz yet.
    shutil.copytree(folder, tmp_path / "cut")
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


def test_damaged_png_is_redrawn(ckpt_dir, full_run, tmp_path, capsys):
    folder, full = full_run
    shutil.copytree(folder, tmp_path / "d")
    truncated, flipped = tmp_path / "d" / "000006.png", tmp_path / "d" / "000009.png"
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the pixel data: only its chunk CRC tells
    flipped.write_bytes(bytes(data))
    before = os.path.getmtime(tmp_path / "d" / "000000.png")
    capsys.readouterr()
    assert sample.main(["--ckpt", ckpt_dir, "--fid-samples", "10", "--batch-size", "4",
                        "--steps", "2", "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "redrawing 2 damaged PNG(s) (first: 000006.png)" in err
    assert "resuming: 1 of 3 batches are complete, 2 to draw" in err
    with np.load(tmp_path / "d.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)
    for path, i in ((truncated, 6), (flipped, 9)):
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), full[i])
    assert before == os.path.getmtime(tmp_path / "d" / "000000.png")


def test_names_past_a_million_images(tmp_path):
    n = 1_000_003
    assert [name_width(k) for k in (1, 10, 1_000_000, 1_000_001, n, 10 ** 7 + 1)] == \
        [6, 6, 6, 7, 7, 8]
    assert os.path.basename(ImageFolder("f", 1_000_000).path(999_999)) == "999999.png"
    names = [os.path.basename(ImageFolder("f", n).path(i))
             for i in (5, 999_999, 1_000_000, 1_000_002)]
    assert names == ["0000005.png", "0999999.png", "1000000.png", "1000002.png"]
    assert sorted(names) == names
    assert [parse_png_name(x) for x in names + ["000005.png", "12345678_class7.png"]] == \
        [(5, None), (999_999, None), (1_000_000, None), (1_000_002, None), (5, None),
         (12_345_678, 7)]
    for other in (".tmp-abc.png", "run.json", "12a.png", "5.PNG", "\u0665.png", ".png",
                  "5_class.png", "5_classx.png", "_class5.png"):
        assert parse_png_name(other) is None

    # A folder holding the last whole batch and a partial final one (batch 4).
    for i in (999_996, 999_997, 999_998, 999_999, 1_000_000, 1_000_002, 2_000_000):
        (tmp_path / f"{i:07d}.png").write_bytes(b"")
    (tmp_path / "000005.png").write_bytes(b"")  # the same image under the narrower width
    (tmp_path / "0000005.png").write_bytes(b"")
    found = ImageFolder(str(tmp_path), n).find()
    assert sorted(found) == [5, 999_996, 999_997, 999_998, 999_999, 1_000_000, 1_000_002]
    assert found[5] == str(tmp_path / "0000005.png")
    todo = pending_batches(found, n, 4)
    assert len(todo) == 250_001 - 1 and 249_999 not in todo and todo[-1] == 250_000
    assert [todo[0], todo[1]] == [0, 1]
    assert len(pending_batches(set(range(n)), n, 4)) == 0


def test_nonfinite_images_are_not_written(c2i, tmp_path, capsys):
    tree = jax.tree.map(np.array, c2i.tree)  # a copy
    tree["class_embedder"]["embedding_table"]["embedding"][3, 0] = np.nan  # class 3 only
    save_checkpoint(tmp_path / "nan", tree, c2i.config)
    model, cfg = load_checkpoint(tmp_path / "nan")
    sampler = Sampler(model, schedule_from_config(cfg.scheduler), 32)
    summary = run_fid(sampler, str(tmp_path / "a"), 10, seed=0, guidance=2.0, steps=2,
                      shift=1.0, batch_size=10, settings={}, progress="none")
    assert summary["nonfinite"] == [3] and summary["num_nonfinite"] == 1
    assert summary["unfinished"] == [] and summary["written"] == 9
    assert summary["npz"] is None and not os.path.exists(tmp_path / "a.npz")
    assert sorted(ImageFolder(str(tmp_path / "a"), 10).find()) == [0, 1, 2, 4, 5, 6, 7, 8, 9]

    code = sample.main(["--ckpt", str(tmp_path / "nan"), "--fid-samples", "10", "--batch-size",
                        "10", "--steps", "2", "--out", str(tmp_path / "b"), "--quiet"])
    assert code == cli.EXIT_UNFINISHED
    err = capsys.readouterr().err.strip()
    assert err == ("sample.py: 1 image(s) came out with NaN or inf values and were not "
                   "written (first: [3]); the checkpoint or the settings give non-finite "
                   "values; the .npz was not made")
    assert not os.path.exists(tmp_path / "b" / "000003.png")
    assert not os.path.exists(tmp_path / "b.npz")


def test_resume_with_other_settings_is_refused(ckpt_dir, tmp_path, capsys):
    assert run(ckpt_dir, tmp_path / "a") == 0
    capsys.readouterr()
    assert run(ckpt_dir, tmp_path / "a", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (seed: 42 -> 5)" in err


def test_unfinished_solves_are_reported(ckpt_dir, tmp_path, capsys):
    code = run(ckpt_dir, tmp_path / "u", "--solver", "dopri5", "--max-steps", "2")
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNFINISHED
    assert "did not finish within --max-steps 2 and were not written" in err
    assert not os.path.exists(tmp_path / "u.npz")
    assert not [n for n in os.listdir(tmp_path / "u") if n.endswith(".png")]


def test_npz_is_streamed(tmp_path):
    for i in range(3):  # names of any width are read
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / f"{i:0{6 + i}d}.png")
    write_npz(str(tmp_path), 3, str(tmp_path / "x.npz"))
    with np.load(tmp_path / "x.npz") as f:
        assert f["arr_0"].shape == (3, 4, 4, 3) and f["arr_0"][:, 0, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="has no PNG of image 3; rerun"):
        write_npz(str(tmp_path), 4, str(tmp_path / "y.npz"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("y.npz")]  # no .tmp left
    (tmp_path / "0000001.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # cut after the signature
    with pytest.raises(UserError, match="0000001.png is damaged .*delete it and rerun"):
        write_npz(str(tmp_path), 3, str(tmp_path / "y.npz"))
