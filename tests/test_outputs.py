"""Output paths: every writing tool refuses a bad one in one line, exit 2, before any work."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import convert_torch
import sample
import train
from conftest import ROOT
from pixelflow_jax import cli, digits, init_checkpoint
from pixelflow_jax.errors import UserError
from pixelflow_jax.images import save_png

TINY_C2I = os.path.join(ROOT, "configs", "pixelflow_tiny_c2i.yaml")
MISSING = "/nonexistent-input"  # inputs that do not exist: the output check must come first


@pytest.fixture
def paths(tmp_path):
    """A regular file, a folder, and a read-only folder (mode 0o500)."""
    (tmp_path / "f.txt").write_text("a file, not a folder")
    (tmp_path / "d").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    yield tmp_path
    ro.chmod(0o700)


def can_create_file_in(folder) -> bool:
    """The oracle for writability: try it (root ignores 0o500, so this depends on the user)."""
    try:
        with open(os.path.join(folder, "probe"), "w"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(folder, "probe"))
    return True


# ------------------------------------------------------------------ the shared check

@pytest.mark.parametrize("kind", cli.OUTPUT_KINDS)
def test_check_output_refuses(paths, kind):
    t = str(paths)
    bad = {
        "": "is empty",
        "/proc/x": "/proc is a kernel/device filesystem",
        "/sys/kernel/x": "/sys is a kernel/device filesystem",
        "/dev/x": "/dev is a kernel/device filesystem",
        f"{t}/f.txt/x": f"{t}/f.txt is a file, not a folder",
        f"{t}/f.txt/a/b/x": f"{t}/f.txt is a file, not a folder",
        f"{t}/{'n' * 256}": "longer than 255 bytes",
        f"{t}/a\0b": "NUL character",
    }
    bad[f"{t}/f.txt" if kind != "file" else f"{t}/d"] = (
        "exists and is not a folder" if kind != "file" else "is a folder, expected a file")
    os.symlink("/proc", paths / "to_proc")  # resolved before the prefix test
    bad[f"{t}/to_proc/x"] = "/proc is a kernel/device filesystem"
    for path, message in bad.items():
        with pytest.raises(UserError) as e:
            cli.check_output(path, "--out", kind)
        assert message in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_check_output_accepts_and_creates_nothing(paths):
    new = paths / "new" / "sub" / "x.png"
    assert cli.check_output(str(new), "--out", "file") == str(new)
    assert not (paths / "new").exists()  # checked, not created
    assert cli.check_output(str(paths / "d"), "--out", "folder") == str(paths / "d")
    assert cli.check_output(str(paths / "d"), "OUT", "replace", overwrite=True)
    with pytest.raises(UserError, match="exists already .pass --overwrite"):
        cli.check_output(str(paths / "d"), "OUT", "replace", overwrite=False)
    assert cli.check_output(str(paths / "d") + "/", "--out", "folder")
    with pytest.raises(UserError, match="is a folder, expected a file"):
        cli.check_output(str(paths / "new") + "/", "--out", "file")
    if os.access("/dev/shm", os.W_OK):  # a tmpfs under /dev: real storage
        assert cli.check_output("/dev/shm/pixelflow-x.png", "--out", "file")
    assert os.listdir(paths / "d") == []  # the write test cleaned up


def test_read_only_folder(paths):
    ro = str(paths / "ro")
    for path, kind in [(f"{ro}/x.png", "file"), (f"{ro}/new/deeper", "folder"),
                       (ro, "folder"), (f"{ro}/ck", "replace")]:
        if can_create_file_in(ro):  # running as root: 0o500 does not stop writes
            assert cli.check_output(path, "--out", kind)
        else:
            with pytest.raises(UserError, match=f"{ro} is not writable"):
                cli.check_output(path, "--out", kind)


def test_unwritable_folder_as_the_kernel_reports_it(paths, monkeypatch):
    """What a read-only folder (EROFS: a read-only mount, refused even for root) looks like
    to the check; here ``paths/d`` is read-only and its subfolder ``w`` is writable."""
    (paths / "d" / "w").mkdir()
    real = cli.tempfile.mkstemp

    def mkstemp(prefix="", suffix="", dir=None):
        if os.path.abspath(dir) == str(paths / "d"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix))
        return real(prefix=prefix, suffix=suffix, dir=dir)
    monkeypatch.setattr(cli.tempfile, "mkstemp", mkstemp)
    with pytest.raises(UserError) as e:
        cli.check_output(str(paths / "d" / "x.png"), "--out", "file")
    assert str(e.value) == (f"cannot write --out {paths}/d/x.png: {paths}/d is not writable "
                            "(Read-only file system)")
    with pytest.raises(UserError, match="is not writable"):  # built beside, renamed into d
        cli.check_output(str(paths / "d" / "w"), "--out", "replace", overwrite=True)
    # Files go inside an existing folder: its parent's permissions do not matter.
    assert cli.check_output(str(paths / "d" / "w"), "--out", "folder")


def test_check_distinct(tmp_path):
    src = tmp_path / "a" / "ck"
    src.mkdir(parents=True)
    with pytest.raises(UserError, match="DST .* is SRC .*would destroy the input"):
        cli.check_distinct(str(src), str(src) + "/", "DST", "SRC")
    os.symlink(src, tmp_path / "link")
    with pytest.raises(UserError, match="is SRC"):
        cli.check_distinct(str(tmp_path / "link"), str(src), "DST", "SRC")
    with pytest.raises(UserError, match="contains SRC"):
        cli.check_distinct(str(tmp_path / "a"), str(src), "DST", "SRC")
    cli.check_distinct(str(src / "inner"), str(src), "DST", "SRC")
    with pytest.raises(UserError, match="lies inside SRC"):
        cli.check_distinct(str(src / "inner"), str(src), "DST", "SRC", inside_ok=False)
    cli.check_distinct(str(tmp_path / "a" / "ck2"), str(src), "DST", "SRC")  # a prefix only


def test_write_errors_become_one_line_user_errors(tmp_path):
    out = str(tmp_path / "run")
    for name in (out, out + "/x/y", out + ".tmp-1234"):  # the output, inside, its temporaries
        with pytest.raises(UserError) as e:
            with cli.writing(out):
                raise OSError(errno.ENOSPC, "No space left on device", name)
        assert str(e.value) == f"cannot write {out}: No space left on device"
    with pytest.raises(FileNotFoundError):  # an input's error keeps its own message
        with cli.writing(out):
            raise FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "data.png"))
    with pytest.raises(UserError):
        with cli.writing(out):
            raise OSError(errno.EIO, "I/O error")
    with pytest.raises(TimeoutError):  # unnamed, and the block does other I/O too
        with cli.writing(out, unnamed=False):
            raise TimeoutError("timed out")
    with pytest.raises(UserError, match=r"cannot write .*gone/x\.png: No such file"):
        save_png(tmp_path / "gone" / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert not os.path.exists(tmp_path / "gone")


# ------------------------------------------------------------------ every writing tool

def refused(capsys, main, argv, message):
    start = time.perf_counter()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert time.perf_counter() - start < 30  # nothing was loaded or computed
    return err


def test_sample_outputs(paths, capsys):
    t = paths
    (t / "d.png").mkdir()
    for out, message in [("", "--out is empty"),
                         ("/proc/x.png", "/proc is a kernel/device filesystem"),
                         ("/proc/folder", "/proc is a kernel/device filesystem"),
                         (t / "f.txt" / "x.png", "f.txt is a file, not a folder"),
                         (t / "f.txt" / "dir", "f.txt is a file, not a folder"),
                         (t / "f.txt", "exists and is not a folder"),
                         (t / "d.png", "is a folder, expected a file")]:
        refused(capsys, sample.main, ["--ckpt", MISSING, "--out", out], message)
    (t / "fid.npz").mkdir()  # where --fid-samples would write its .npz
    refused(capsys, sample.main, ["--ckpt", MISSING, "--fid-samples", "4", "--out", t / "fid"],
            f"--out (its .npz) {t}/fid.npz: it is a folder")


def test_sample_refuses_before_loading_the_model(ckpt_dir):
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt_dir, "--out",
                           "/proc/pixelflow.png"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == ("sample.py: error: cannot write --out /proc/pixelflow.png: /proc "
                           "is a kernel/device filesystem, not storage\n")


def test_convert_outputs(paths, capsys, tmp_path):
    t = paths
    for dst, message in [("", "DST is empty"), ("/proc/ck", "/proc is a kernel/device"),
                         (t / "f.txt" / "ck", "f.txt is a file, not a folder"),
                         (t / "d", "exists already (pass --overwrite")]:
        refused(capsys, convert_torch.main, [MISSING, dst], message)
    ck = tmp_path / "a" / "ck"
    ck.mkdir(parents=True)
    (ck / "keep").write_text("the source")
    refused(capsys, convert_torch.main, ["--to-torch", ck, ck, "--overwrite"],
            "DST " + str(ck) + " is SRC")
    refused(capsys, convert_torch.main, [ck, tmp_path / "a", "--overwrite"], "contains SRC")
    assert (ck / "keep").read_text() == "the source"


def test_train_outputs(paths, capsys):
    t = paths
    config = "/nonexistent-config.yaml"
    for out, message in [("", "--out is empty"), ("/proc/run", "/proc is a kernel/device"),
                         (t / "f.txt" / "run", "f.txt is a file, not a folder"),
                         (t / "f.txt", "exists and is not a folder")]:
        refused(capsys, train.main, [config, "--out", out], message)
    run = t / "d"
    for export, message in [("/proc/ema", "/proc is a kernel/device"),
                            (t / "f.txt" / "ema", "f.txt is a file, not a folder"),
                            (run, "--export-ema " + str(run) + " is --out"),
                            (t, "contains --out"),
                            (run / "checkpoints" / "x", "lies inside RUN_DIR/checkpoints")]:
        refused(capsys, train.main, [config, "--out", run, "--export-ema", export], message)


def test_init_checkpoint_outputs(paths, capsys):
    t = paths
    for out, message in [("", "OUT is empty"), ("/proc/ck", "/proc is a kernel/device"),
                         (t / "f.txt" / "ck", "f.txt is a file, not a folder"),
                         (t / "d", "exists already (pass --overwrite")]:
        refused(capsys, init_checkpoint.main, ["/nonexistent.yaml", out], message)
    # Missing parent folders are created.
    assert init_checkpoint.main([TINY_C2I, str(t / "new" / "sub" / "ck")]) == 0
    assert os.path.isdir(t / "new" / "sub" / "ck" / "params")


def test_digits_prepare_outputs(paths, capsys):
    t = paths
    for out, message in [("", "OUT is empty"), ("/proc/digits", "/proc is a kernel/device"),
                         (t / "f.txt" / "digits", "f.txt is a file, not a folder"),
                         (t / "d", "exists already (pass --overwrite")]:
        refused(capsys, digits.main, ["prepare", out], message)


@pytest.mark.parametrize("main, argv", [
    (sample.main, ["--ckpt", MISSING, "--out", "{ro}/x.png"]),
    (sample.main, ["--ckpt", MISSING, "--fid-samples", "4", "--out", "{ro}/fid"]),
    (convert_torch.main, [MISSING, "{ro}/ck"]),
    (train.main, ["/nonexistent.yaml", "--out", "{ro}/run"]),
    (train.main, ["/nonexistent.yaml", "--out", "{ro}/run", "--export-ema", "{ro}/ema"]),
    (init_checkpoint.main, ["/nonexistent.yaml", "{ro}/ck"]),
    (digits.main, ["prepare", "{ro}/digits"]),
], ids=["sample", "sample-fid", "convert", "train", "train-export", "init_checkpoint",
        "digits"])
def test_every_tool_refuses_a_folder_it_cannot_write(paths, capsys, monkeypatch, main, argv):
    ro = str(paths / "ro")
    if can_create_file_in(ro):
        # Root writes through 0o500: refuse as the kernel would for anyone else.
        real = cli.tempfile.mkstemp

        def mkstemp(prefix="", suffix="", dir=None):
            if os.path.abspath(dir) == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return real(prefix=prefix, suffix=suffix, dir=dir)
        monkeypatch.setattr(cli.tempfile, "mkstemp", mkstemp)
    refused(capsys, main, [a.format(ro=ro) for a in argv], f"{ro} is not writable")
    assert os.listdir(ro) == []
