"""sample.py streams: bounded memory, resume after a kill, absurd requests refused up front,
PNG modes, non-finite images not written."""

import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from PIL import Image

import sample
import torch_reference as ref
from conftest import ROOT, TINY_C2I, make_config
from pixelflow_jax import cli, estimate
from pixelflow_jax.checkpoint import save_checkpoint
from pixelflow_jax.convert import official_to_nnx
from pixelflow_jax.errors import UserError
from pixelflow_jax.generate import ClassBlocks, RoundRobin
from pixelflow_jax.images import save_png
from pixelflow_jax.resumable import ImageFolder, PendingBatches, pending_batches, plan_run

SAMPLE = os.path.join(ROOT, "sample.py")


def start(*args, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, SAMPLE, *map(str, args)], stderr=stderr,
                            stdout=subprocess.DEVNULL, text=True, cwd=ROOT)


def run_cli(*args, timeout=120):
    """sample.py in a fresh process: (exit code, stderr, seconds)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, SAMPLE, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stderr, time.perf_counter() - t


# --------------------------------------------------------------------------- bookkeeping


def test_labels_are_computed_per_batch():
    labels = ClassBlocks((7, 2, 9), 4)
    assert len(labels) == 12
    np.testing.assert_array_equal(labels[np.arange(12)], np.repeat([7, 2, 9], 4))
    assert labels[np.array([11, 0, 5])].tolist() == [9, 7, 2]
    assert RoundRobin(23, 10)[np.arange(23)].tolist() == list(range(10)) * 2 + [0] * 3
    huge = ClassBlocks((1, 3), 10 ** 9)  # nothing of this size is built
    assert len(huge) == 2 * 10 ** 9 and huge[np.array([10 ** 9 - 1, 10 ** 9])].tolist() == [1, 3]


def test_pending_batches_agree_with_a_plain_listing():
    rng = np.random.default_rng(0)
    for n, batch in ((1, 1), (10, 4), (37, 5), (64, 8), (1000, 7)):
        for _ in range(5):
            present = set(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False).tolist())
            want = [b for b in range(-(-n // batch))
                    if not all(i in present for i in range(b * batch, min((b + 1) * batch, n)))]
            got = pending_batches(present | {-1, n + 3}, n, batch)  # strays are ignored
            assert list(got) == want and len(got) == len(want)
            assert [got[k] for k in range(len(want))] == want
            if want:
                assert got[-1] == want[-1]
            assert [b for b in range(-2, -(-n // batch) + 2) if b in got] == want
    with pytest.raises(IndexError):
        PendingBatches(3, [0, 1, 2])[0]


def test_a_larger_max_steps_resumes_other_settings_do_not(tmp_path):
    images = ImageFolder(str(tmp_path / "run"), 8, ClassBlocks((1,), 8))
    settings = dict(seed=1, max_steps=2)
    os.makedirs(images.folder)
    with open(os.path.join(images.folder, "run.json"), "w") as f:
        f.write('{"seed": 1, "max_steps": 2, "name_width": 6}')
    save_png(images.path(0), np.zeros((4, 4, 3), np.uint8))
    plan = plan_run(images, dict(settings, max_steps=1000), 4)  # the advised rerun
    assert list(plan.todo) == [0, 1] and plan.pending_images == 8 and not plan.discard
    with pytest.raises(UserError, match=r"other settings \(seed: 1 -> 2\)"):
        plan_run(images, dict(settings, seed=2), 4)
    assert plan_run(images, dict(settings, seed=2), 4, other_settings="discard").discard


# --------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """One stage of 128 px in 8 px patches: cheap to draw, big images (49 kB each)."""
    params = dict(TINY_C2I, patch_size=8)
    cfg = make_config(params, 128, num_stages=1)
    tree = official_to_nnx({k: v.numpy() for k, v in ref.random_state_dict(params, 3).items()},
                           cfg.params)
    path = str(tmp_path_factory.mktemp("wide") / "ckpt")
    save_checkpoint(path, tree, cfg)
    return path


def peak_rss_mb(*args) -> float:
    """Peak resident memory of one sample.py process (MB)."""
    proc = start(*args, "--quiet", stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024


def test_memory_does_not_grow_with_the_number_of_images(wide_ckpt, tmp_path):
    common = ("--ckpt", wide_ckpt, "--classes", "1", "--batch-size", "64", "--steps", "1")
    small = peak_rss_mb(*common, "--num-images", 256, "--out", tmp_path / "small")
    large = peak_rss_mb(*common, "--num-images", 2000, "--out", tmp_path / "large")
    assert len(os.listdir(tmp_path / "large")) == 2001  # and run.json
    # Holding the 1,744 extra images would take 86 MB, twice that while they are joined.
    print(f"\n  peak RSS: 256 images {small:.0f} MB, 2000 images {large:.0f} MB")
    assert large - small < 60


# --------------------------------------------------------------------------- resume after a kill


def kill_after_pngs(count, folder, *args):
    """Start sample.py, SIGKILL it once ``count`` PNGs are in ``folder``; the PNGs left."""
    def pngs():
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return [n for n in names if n.endswith(".png") and not n.startswith(".")]

    proc = start(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(pngs()) < count:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    return pngs()


def folder_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


SLOW = ("--classes", "1", "2", "--num-images", "20", "--steps", "25", "--batch-size", "4")


def test_a_killed_folder_run_resumes_to_the_same_images(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "cut"
    args = ["--ckpt", ckpt_dir, *SLOW, "--out", str(out)]
    kept = kill_after_pngs(4, out, *args)  # one whole batch at least
    assert 4 <= len(kept) < 40, kept  # killed midway, the finished images kept
    assert sample.main(args) == 0
    err = capsys.readouterr().err
    assert "resuming: " in err and " of 10 batches are complete" in err
    assert sample.main([*args[:-1], str(tmp_path / "whole"), "--quiet"]) == 0
    cut, whole = folder_bytes(out), folder_bytes(tmp_path / "whole")
    assert len(whole) == 41 and cut == whole  # 40 PNGs and run.json, byte for byte


def test_a_killed_grid_resumes_to_the_same_grid(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "g.png"
    parts = tmp_path / ".g.png.parts"
    args = ["--ckpt", ckpt_dir, *SLOW, "--out", str(out)]
    kept = kill_after_pngs(4, parts, *args)
    assert 4 <= len(kept) < 40 and not out.exists()
    assert sample.main(args) == 0
    assert "resuming: " in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["g.png"]  # the parts are gone
    assert sample.main([*args[:-1], str(tmp_path / "whole.png"), "--quiet"]) == 0
    assert out.read_bytes() == (tmp_path / "whole.png").read_bytes()

    # Parts left by a run with other settings are discarded, not mixed in.
    os.makedirs(parts)
    (parts / "run.json").write_text('{"seed": 1}')
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(parts / "000000_class1.png")
    assert sample.main([*args, "--quiet"]) == 0
    assert out.read_bytes() == (tmp_path / "whole.png").read_bytes()
    assert not parts.exists()


def test_unrecorded_pngs_are_refused(ckpt_dir, tmp_path, capsys):
    os.makedirs(tmp_path / "old")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "old" / "000000_class1.png")
    assert sample.main(["--ckpt", ckpt_dir, "--classes", "1", "--out",
                        str(tmp_path / "old")]) == 2
    assert "holds 1 PNG(s) named like this run's images but no run.json" in \
        capsys.readouterr().err


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("extra", [["--classes", "1", "--num-images", "1000000000"],
                                   ["--fid-samples", "1000000000"]])
def test_absurd_requests_are_refused_at_once(ckpt_dir, tmp_path, extra):
    out = tmp_path / "out"
    code, err, seconds = run_cli("--ckpt", ckpt_dir, *extra, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert seconds < 5, seconds
    # The estimate: ~62 days on 2 cores (1e9 images x 2.69e8 FLOP at 50 GFLOP/s).
    assert "1,000,000,000 images" in err and " days on 1 cpu device" in err, err
    assert not out.exists()


def test_steps_past_the_training_grid_are_refused(ckpt_dir, tmp_path, capsys):
    code = sample.main(["--ckpt", ckpt_dir, "--steps", "100000", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--steps 100000 is more than the 1000 model timesteps" in err


def test_a_batch_too_big_for_memory_is_refused(ckpt_dir, tmp_path, capsys):
    code = sample.main(["--ckpt", ckpt_dir, "--classes", "1", "--num-images", "1000000",
                        "--batch-size", "1000000", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "of memory per device" in err and "lower --batch-size" in err, err


def test_estimate_assumptions():
    # DESIGN §4: the unconditional pass is skipped where g_s = (g - 1) w_s + 1 is 1.
    weights = (0, 1 / 6, 2 / 3, 1)
    assert estimate.passes_per_stage(weights, 4.0) == [1, 2, 2, 2]
    assert estimate.passes_per_stage(weights, 1.0) == [1, 1, 1, 1]
    assert estimate.passes_per_stage(weights, 0.0) == [1, 1, 1, 1]
    assert estimate.evaluations_per_stage("euler", [10, 20, 20, 30], 1000) == [10, 20, 20, 30]
    assert estimate.evaluations_per_stage("dopri5", [10] * 4, 2) == [13.0] * 4  # 1 + 6 x 2
    # An H200 runs at half its 989 TFLOP/s dense bf16 peak, a quarter in float32.
    assert estimate.device_flops("gpu", "NVIDIA H200", "bfloat16") == 494.5e12
    assert estimate.device_flops("gpu", "NVIDIA H200", "float32") == 247.25e12
    assert estimate.device_flops("gpu", "Some future chip", "bfloat16") == 50e12
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 100,
                                                                      "bytes_in_use": 30})
    assert estimate.free_memory(gpu) == 70
    assert [estimate.describe_seconds(x) for x in (0.2, 59, 600, 7200, 86400 * 3)] == \
        ["~1 s", "~59 s", "~10 min", "~2.0 h", "~3 days"]


def test_disk_estimate_is_checked(tmp_path):
    est = estimate.Estimate(images=10, flops_per_image=1e9, flops_per_second=1e10,
                            where="1 cpu device", disk_bytes=5e6, memory_bytes=1e6)
    estimate.check_estimate(est, disk_free=6e6, memory_free=2e6, out="o", allow_long=False)
    with pytest.raises(UserError, match=r"up to 5.0 MB of disk for 10 images, but o has "
                                        r"4.0 MB free \(and would take ~1 s on 1 cpu device\)"):
        estimate.check_estimate(est, disk_free=4e6, memory_free=2e6, out="o", allow_long=True)
    # A PNG is never larger than its raw rows (here incompressible noise).
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    save_png(tmp_path / "noise.png", noise)
    assert os.path.getsize(tmp_path / "noise.png") <= estimate.png_bytes(64, 3)


def test_yes_lets_a_long_request_run(ckpt_dir, tmp_path, capsys, monkeypatch):
    # A machine at 1 FLOP/s per core: every request is estimated to take days.
    monkeypatch.setattr(estimate, "CPU_FLOPS_PER_CORE", 1.0)
    args = ["--ckpt", ckpt_dir, "--classes", "1", "--num-images", "2", "--steps", "2",
            "--out", str(tmp_path / "y")]
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert "would take ~" in err and "days" in err and "pass --yes to run it anyway" in err
    assert not (tmp_path / "y").exists()
    assert sample.main([*args, "--yes"]) == 0
    assert "days on 1 cpu device" in capsys.readouterr().err  # the first status line
    assert len(os.listdir(tmp_path / "y")) == 3


# --------------------------------------------------------------------------- files


def test_pngs_are_readable_by_others(ckpt_dir, tmp_path):
    old = os.umask(0o022)
    try:
        args = ["--ckpt", ckpt_dir, "--classes", "1", "--num-images", "2", "--steps", "2",
                "--quiet"]
        assert sample.main([*args, "--out", str(tmp_path / "f")]) == 0
        assert sample.main([*args, "--out", str(tmp_path / "g.png")]) == 0
        assert oct(os.stat(tmp_path / "f" / "000000_class1.png").st_mode & 0o777) == "0o644"
        assert oct(os.stat(tmp_path / "g.png").st_mode & 0o777) == "0o644"
        os.umask(0o027)
        save_png(tmp_path / "h.png", np.zeros((2, 2, 3), np.uint8))
        assert oct(os.stat(tmp_path / "h.png").st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def nan_ckpt(c2i, tmp_path_factory):
    """The tiny model with a NaN in class 3's embedding: class 3's images are all NaN."""
    tree = jax.tree.map(np.array, c2i.tree)  # a copy
    tree["class_embedder"]["embedding_table"]["embedding"][3, 0] = np.nan
    path = str(tmp_path_factory.mktemp("nan") / "ckpt")
    save_checkpoint(path, tree, c2i.config)
    return path


def test_nonfinite_images_are_named_and_not_written(nan_ckpt, tmp_path, capsys):
    args = ["--ckpt", nan_ckpt, "--classes", "2", "3", "--num-images", "2", "--steps", "2",
            "--quiet"]
    assert sample.main([*args, "--out", str(tmp_path / "f")]) == cli.EXIT_UNFINISHED
    err = capsys.readouterr().err.strip()
    assert err == ("sample.py: 2 image(s) came out with NaN or inf values and were not "
                   "written (first: [2, 3]); the checkpoint or the settings give non-finite "
                   "values")
    assert sorted(n for n in os.listdir(tmp_path / "f") if n.endswith(".png")) == \
        ["000000_class2.png", "000001_class2.png"]
    assert sample.main([*args, "--out", str(tmp_path / "g.png")]) == cli.EXIT_UNFINISHED
    assert capsys.readouterr().err.strip().endswith(f"; {tmp_path / 'g.png'} was not written")
    assert not (tmp_path / "g.png").exists()
