"""train.py end to end on a tiny real dataset: learning, exact resume, devices, failures."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sample
import train
from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "pixelflow_tiny_train.yaml")


def command(out, root, *overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), CONFIG, "--out", str(out),
            "--set", f"data.root={root}", *overrides]


def run(out, root, *overrides, env=None, timeout=600):
    proc = subprocess.run(command(out, root, *overrides), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    return proc


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in rows}


@pytest.fixture(scope="module")
def trained(shapes_folder, tmp_path_factory):
    """40 steps on the shapes (uninterrupted), checkpoints every 5."""
    out = tmp_path_factory.mktemp("run") / "full"
    proc = run(out, shapes_folder, "train.steps=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_training_learns(trained):
    out, err = trained
    rows = losses(out)
    assert sorted(rows) == list(range(1, 41))
    first = np.mean([rows[s][0] for s in range(1, 6)])
    last = np.mean([rows[s][0] for s in range(36, 41)])
    assert last < 0.75 * first, (first, last)
    assert "loss" in err and "samples/s" in err and "step 40/40" in err
    assert os.path.isdir(out / "ema" / "params")  # the EMA weights as a sampling checkpoint


def test_ema_export_samples(trained, tmp_path):
    out, _ = trained
    assert train.main([CONFIG, "--out", str(out), "--export-ema", str(tmp_path / "ema")]) == 0
    assert sample.main(["--ckpt", str(tmp_path / "ema"), "--out", str(tmp_path / "grid.png"),
                        "--steps", "3", "--num-images", "2", "--quiet"]) == 0
    assert os.path.getsize(tmp_path / "grid.png") > 0


def test_killed_run_resumes_with_identical_losses(trained, shapes_folder, tmp_path):
    full, _ = trained
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out, shapes_folder, "train.steps=40"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 somewhere after step 12 (checkpoints at 5, 10)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 40, "the run finished before it could be killed"
    resumed = run(out, shapes_folder, "train.steps=40")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert losses(out) == losses(full)  # every step's loss, grad norm and lr, bit for bit


def test_one_and_eight_devices_and_fsdp_give_the_same_losses(shapes_folder, tmp_path):
    results = {}
    for name, devices, overrides in [("1", 1, ["data.batch_size=24"]),
                                     ("8", 8, ["data.batch_size=3"]),
                                     ("8-fsdp", 8, ["data.batch_size=3", "train.fsdp=2"])]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = run(tmp_path / name, shapes_folder, "train.steps=3", *overrides, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"on {devices} device(s)" in proc.stderr
        results[name] = losses(tmp_path / name)
    for name in ("8", "8-fsdp"):
        for step in (1, 2, 3):
            np.testing.assert_allclose(results[name][step], results["1"][step], rtol=2e-5)


def test_sigterm_saves_and_resumes(shapes_folder, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(command(out, shapes_folder, "train.steps=200", "train.save_every=1000"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == train.EXIT_PREEMPTED, err[-3000:]
    assert "SIGTERM: saved step" in err
    step = int(err.split("SIGTERM: saved step")[1].split(";")[0])
    assert os.path.isdir(out / "checkpoints" / str(step))
    resumed = subprocess.run(command(out, shapes_folder, "train.steps=200",
                                     "train.save_every=1000") + ["--stop-after", str(step + 2)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stderr
    assert max(losses(out)) == step + 2


def test_non_finite_loss_stops_and_keeps_the_checkpoint(shapes_folder, tmp_path):
    out = tmp_path / "nan"
    proc = run(out, shapes_folder, "train.steps=20", "train.lr=1e30", "train.save_every=1",
               "train.grad_clip=1e30")
    assert proc.returncode == train.EXIT_NAN, proc.stderr[-3000:]
    assert "non-finite loss at step" in proc.stderr and "is intact" in proc.stderr
    kept = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert kept and kept[-1] < 20
    assert train.main([CONFIG, "--out", str(out), "--export-ema", str(tmp_path / "e")]) == 0


def test_bad_input(shapes_folder, tmp_path, capsys):
    def fails(args, message):
        assert train.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

    base = [CONFIG, "--out", str(tmp_path / "x")]
    fails(base + ["--set", "train.lrr=1"], "unknown key 'train.lrr'")
    fails(base + ["--set", f"data.root={tmp_path / 'none'}"], str(tmp_path / "none"))
    fails(base + ["--set", f"data.root={shapes_folder}", "data.batch_size=5"],
          "must be a multiple of the 3 stages")
    fails(base + ["--set", f"data.root={shapes_folder}", "model.params.num_classes=2"],
          "the data has 3 classes")
    fails([CONFIG, "--out", str(tmp_path / "nothing"), "--export-ema", str(tmp_path / "e")],
          "is not a training folder")
