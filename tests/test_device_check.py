"""bench/device_check.sh end to end on CPU (--smoke), so the one-shot GPU check cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE = "# Benchmarks\n\nearlier text that must survive\n"
FIGURES = [
    "Euler tiny, 1 steps/stage, g 4, batch 2, bf16: s/image",
    "Euler: achieved TFLOP/s",
    "Euler: compile s",
    "Euler: eager PyTorch s/image",
    "Euler: speed-up, PyTorch s/image / JAX s/image",
    "Dopri5 tiny FID recipe (g 2.4, rtol 1e-3, atol 1e-6, batch 2): s/image",
    "Dopri5: velocity evaluations/image",
    "Peak memory, Euler tiny, batch 2, bf16: MiB",
    "Train tiny: global batch",
    "Train: samples/s",
    "Train: MFU %",
]


def run_check(out: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--smoke",
                           "--out", out, "--cache", ".pytest_cache/xla_device_check", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def table(section: str) -> dict[str, str]:
    rows = re.findall(r"^\| (.+?) \| (.*?) \| (.*?) \| (.*?) \|$", section, re.M)
    return {figure: value for figure, value, _, _ in rows if figure != "figure"}


def test_smoke_appends_every_figure(tmp_path):
    out = tmp_path / "BENCH.md"
    out.write_text(PRE)
    proc = run_check(str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith(PRE) and text.count("## Device check") == 1
    section = text[len(PRE):]
    assert "(smoke, CPU, tiny configs)" in section
    assert re.search(r"Machine: .*jax \d+\.\d+", section)
    assert "Command: `bash bench/device_check.sh --smoke --out" in section
    assert "Failed parts: none." in section
    values = table(section)
    assert list(values) == FIGURES
    numbers = {k: float(v) for k, v in values.items() if k != "Train: MFU %"}
    assert values["Train: MFU %"] == "n/a"  # no known peak FLOP/s for a CPU
    assert all(v > 0 for v in numbers.values()), numbers
    assert numbers["Train tiny: global batch"] == 12  # the first candidate fits on the host
    # A velocity evaluation per Dopri5 stage is at least one 6-evaluation step on 3 stages.
    assert numbers["Dopri5: velocity evaluations/image"] >= 18
    speed = numbers["Euler: speed-up, PyTorch s/image / JAX s/image"]
    ratio = (numbers["Euler: eager PyTorch s/image"]
             / numbers["Euler tiny, 1 steps/stage, g 4, batch 2, bf16: s/image"])
    assert abs(speed - ratio) <= 0.02 * ratio + 0.01
    # Figures are printed as they are measured, before the section.
    assert "  Euler: compile s: " in proc.stdout.split("## Device check")[0]


def test_spent_budget_still_appends_and_fails(tmp_path):
    out = tmp_path / "BENCH.md"
    proc = run_check(str(out), "--budget", "1")
    assert proc.returncode == 1
    section = out.read_text()
    values = table(section)
    assert list(values) == FIGURES and set(values.values()) == {"failed"}
    for part in ("euler", "memory", "train", "dopri5"):
        assert f"{part}: not run, the 1 s budget was spent" in section
