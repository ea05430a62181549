"""Two real processes on this machine, coordinated like the hosts of a TPU slice."""

import os
import socket
import subprocess
import sys

import numpy as np

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tests", "multihost_check.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_draw_the_same_fid_set_as_one(ckpt_dir, tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(i), "2", str(port), ckpt_dir,
                               str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2: drew 6, devices 4" in outputs[0][0]  # each host draws its half
    assert "process 1 of 2: drew 6, devices 4, npz None" in outputs[1][0]
    one = subprocess.run([sys.executable, SCRIPT, "0", "1", "0", ckpt_dir, str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with np.load(tmp_path / "two.npz") as a, np.load(tmp_path / "one.npz") as b:
        assert a["arr_0"].shape == (12, 32, 32, 3)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same per-device batch: bitwise
