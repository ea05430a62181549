"""bench/device_check.sh end to end on CPU (--smoke), so the one-shot GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

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
    "FID Inception, 16 px uint8, batch 1, float32: images/s",
    "FID Inception, bfloat16: images/s",
    "FID + sFID Frechet distances (32x32, 31x31), host: s",
    "Precision/recall, 64 x 64 random 32-d features: s",
    "Score 50k samples vs 10k reference, float32 (estimate): s",
    "T5 encoder (tiny sizes), float32, 512 tokens (official padding): s/prompt",
    "T5 float32, bucketed: s/prompt",
    "T5 encoder (tiny sizes), bfloat16, 512 tokens (official padding): s/prompt",
    "T5 bfloat16, bucketed: s/prompt",
    "T5 bucketed: float32 s / bfloat16 s",
    "Text-to-image tiny, 32 px, 1 steps/stage, g 4, batch 1, bf16: s/image",
    "Text-to-image: peak memory MiB",
    "Text-to-image: attention calls on cuDNN's fused kernel",
]
PARTS = ("euler", "memory", "train", "dopri5", "inception", "t5", "t2i")
CUDNN = "Text-to-image: attention calls on cuDNN's fused kernel"


def run_check(out: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--smoke",
                           "--out", out, "--cache", ".pytest_cache/xla_device_check", *args],
                          capture_output=True, text=True, env=env, timeout=420)


def table(section: str) -> dict[str, str]:
    return {figure: value for figure, (value, _) in rows(section).items()}


def rows(section: str) -> dict[str, tuple[str, str]]:
    """figure -> (value, detail) of the appended table."""
    found = re.findall(r"^\| (.+?) \| (.*?) \| (.*?) \| (.*?) \|$", section, re.M)
    return {figure: (value, detail) for figure, value, _, detail in found if figure != "figure"}


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
    assert numbers.pop(CUDNN) == 0  # no cuDNN on a CPU
    assert all(v > 0 for v in numbers.values()), numbers
    assert numbers["Train tiny: global batch"] == 12  # the first candidate fits on the host
    # A velocity evaluation per Dopri5 stage is at least one 6-evaluation step on 3 stages.
    assert numbers["Dopri5: velocity evaluations/image"] >= 18
    speed = numbers["Euler: speed-up, PyTorch s/image / JAX s/image"]
    ratio = (numbers["Euler: eager PyTorch s/image"]
             / numbers["Euler tiny, 1 steps/stage, g 4, batch 2, bf16: s/image"])
    assert abs(speed - ratio) <= 0.02 * ratio + 0.01
    # The text path: the bucketed ratio is the two s/prompt figures' quotient, the bucket
    # is 16 tokens (10 + </s>), bucketing changes features by rounding only.
    details = rows(section)
    for dtype in ("float32", "bfloat16"):
        full = numbers[f"T5 encoder (tiny sizes), {dtype}, 512 tokens (official padding): "
                       "s/prompt"]
        cut = numbers[f"T5 {dtype}, bucketed: s/prompt"]
        detail = details[f"T5 {dtype}, bucketed: s/prompt"][1]
        m = re.fullmatch(r"16 tokens; 512 / bucketed = ([\d.]+); features differ by (\S+) "
                         r"of their largest", detail)
        assert m, detail
        assert abs(float(m.group(1)) - full / cut) <= 0.01 * full / cut + 0.01
        # float32: rounding (DESIGN §10's 1e-5); bfloat16: within its epsilon 2^-7.
        assert float(m.group(2)) < {"float32": 1e-5, "bfloat16": 2 ** -7}[dtype]
    dtype_ratio = (numbers["T5 float32, bucketed: s/prompt"]
                   / numbers["T5 bfloat16, bucketed: s/prompt"])
    assert abs(numbers["T5 bucketed: float32 s / bfloat16 s"] - dtype_ratio) \
        <= 0.01 * dtype_ratio + 0.01
    t2i = details["Text-to-image tiny, 32 px, 1 steps/stage, g 4, batch 1, bf16: s/image"][1]
    assert "finite: True" in t2i and "cpu" in t2i, t2i
    # 8 model instances (text models guide every stage), each a self- and a cross-attention.
    assert details[CUDNN][1].startswith("of 16 in the program"), details[CUDNN]
    check_inception(numbers, details)
    # Figures are printed as they are measured, before the section.
    assert "  Euler: compile s: " in proc.stdout.split("## Device check")[0]


def close(a: float, b: float, rel: float = 2e-3) -> bool:
    """Equal up to the table's 4 significant digits."""
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


def check_inception(numbers: dict, details: dict) -> None:
    """The inception part's figures agree with each other and with the estimate's formula."""
    f32 = numbers["FID Inception, 16 px uint8, batch 1, float32: images/s"]
    bf16 = numbers["FID Inception, bfloat16: images/s"]
    assert "cpu" in details["FID Inception, 16 px uint8, batch 1, float32: images/s"][1]
    m = re.match(r"bfloat16 / float32 = ([\d.]+);",
                 details["FID Inception, bfloat16: images/s"][1])
    assert m and abs(float(m.group(1)) - bf16 / f32) <= 0.01 * bf16 / f32 + 0.01, m
    fid_key = "FID + sFID Frechet distances (32x32, 31x31), host: s"
    m = re.fullmatch(r"FID (\S+) s \+ sFID (\S+) s \(scipy sqrtm on \d+ CPU cores\)",
                     details[fid_key][1])
    assert m and close(float(m.group(1)) + float(m.group(2)), numbers[fid_key]), details[fid_key]
    pr = numbers["Precision/recall, 64 x 64 random 32-d features: s"]
    key = "Score 50k samples vs 10k reference, float32 (estimate): s"
    m = re.fullmatch(
        r"\((\d+) \+ (\d+)\) / (\S+) images/s \+ (\S+) s x (\d+)/(\d+) statistics \+ (\S+) s "
        r"FID\+sFID \+ (\S+) s x (\d+)/(\d+) IS \+ (\S+) s x (\S+) precision/recall; compile "
        r"and decoding excluded \(bench/bench_inception.py\)", details[key][1])
    assert m, details[key][1]
    s_, r_, rate, stats, s_r, n1, fid, is_, s2, n2, pr_s, scale = (float(g) for g in m.groups())
    assert (s_, r_, s_r, s2) == (50000, 10000, 60000, 50000) and n1 == n2 == 64
    assert close(rate, f32) and close(fid, numbers[fid_key]) and close(pr_s, pr)
    # Precision/recall pairs: both sets' k-NN radii and the cross pass, over 3 x 64^2.
    assert close(scale, (r_ ** 2 + s_ ** 2 + r_ * s_) / (3 * 64 ** 2))
    total = (s_ + r_) / rate + stats * s_r / n1 + fid + is_ * s2 / n2 + pr_s * scale
    assert close(total, numbers[key], 5e-3), (total, numbers[key])


def test_spent_budget_still_appends_and_fails(tmp_path):
    out = tmp_path / "BENCH.md"
    proc = run_check(str(out), "--budget", "1")
    assert proc.returncode == 1
    section = out.read_text()
    values = table(section)
    assert list(values) == FIGURES and set(values.values()) == {"failed"}
    for part in PARTS:
        assert f"{part}: not run, the 1 s budget was spent" in section


TINY_T5 = dict(layers=1, d_model=32, d_kv=8, heads=2, d_ff=64, vocab=64, buckets=32)


def t5_params(c: dict) -> int:
    """flan-t5 encoder parameters from its sizes (gated MLP: wi_0, wi_1, wo; DESIGN §7)."""
    d, inner = c["d_model"], c["heads"] * c["d_kv"]
    block = 4 * d * inner + 3 * d * c["d_ff"] + 2 * d  # q k v o, MLP, two layer norms
    return c["vocab"] * d + c["buckets"] * c["heads"] + c["layers"] * block + d


def test_t2i_memory_plan_tiny(tmp_path):
    """bench_t2i.py's plan mode on a tiny text model: byte accounting and the batch fit."""
    out, card_gib = tmp_path / "plan.json", 0.02
    t5 = TINY_T5
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_t2i.py"), "--resolutions", "32",
         "--batches", "1", "2", "--steps", "1", "--card-gib", str(card_gib), "--no-verify",
         "--set", "model.params.depth=1", "model.params.num_attention_heads=2",
         "model.params.attention_head_dim=8", f"model.params.cross_attention_dim={t5['d_model']}",
         "scheduler.num_stages=2",
         "--t5-layers", str(t5["layers"]), "--t5-heads", str(t5["heads"]),
         "--t5-d-kv", str(t5["d_kv"]), "--t5-d-ff", str(t5["d_ff"]),
         "--t5-vocab", str(t5["vocab"]), "--json", str(out),
         "--cache", os.path.join(ROOT, ".pytest_cache", "xla_device_check")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    enc = [r for r in rows if r["kind"] == "encoder"]
    assert {(r["dtype"], r["length"]) for r in enc} == {
        (d, n) for d in ("float32", "bfloat16") for n in (16, 512)}
    assert all(r["params"] == t5_params(t5) for r in enc)
    f32 = next(r for r in enc if r["dtype"] == "float32")["param_bytes"]
    assert all(r["param_bytes"] == (f32 if r["dtype"] == "float32" else f32 // 2) for r in enc)

    samp = {(r["batch"], r["params"]): r for r in rows if r["kind"] == "sampler"}
    assert set(samp) == {(1, "float32"), (2, "float32"), (1, "bfloat16 matrices")}
    for r in samp.values():
        plan = r["plan"]
        assert plan["total"] == plan["argument"] + plan["output"] + plan["temp"]
        assert plan["argument"] >= r["param_bytes"] > 0
        assert r["cudnn_calls"] == 0 and r["attention_calls"] == 8  # 2 stages x 2 x 2
    one, two, half = samp[1, "float32"], samp[2, "float32"], samp[1, "bfloat16 matrices"]
    assert two["plan"]["total"] > one["plan"]["total"]
    # Only the parameters differ between the two batch-1 programs' arguments.
    assert one["plan"]["argument"] - half["plan"]["argument"] \
        == one["param_bytes"] - half["param_bytes"] > 0

    (fit,) = [r for r in rows if r["kind"] == "largest"]
    slope = two["plan"]["total"] - one["plan"]["total"]
    card, enc16 = card_gib * 2 ** 30, {r["dtype"]: r["param_bytes"] for r in enc}
    for mode, extra in (("separate", 0), ("together, bf16 encoder", enc16["bfloat16"]),
                        ("together, float32 encoder", enc16["float32"])):
        guess = fit[mode]["predicted"]
        assert fit[mode]["slope_bytes"] == slope and guess >= 1, fit[mode]
        # The affine guess: the last batch whose line through batches 1 and 2 fits.
        line = lambda b: one["plan"]["total"] + extra + (b - 1) * slope
        assert line(guess) <= card < line(guess + 1)
    assert "Largest batch on a card with 0.02 GiB usable" in proc.stdout


def load_bench_t2i():
    spec = importlib.util.spec_from_file_location("bench_t2i",
                                                  os.path.join(ROOT, "bench", "bench_t2i.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("plan", [
    lambda b: 1000 + 37 * b,                       # affine: the first guess is right
    lambda b: 5000 + 300 * b ** 0.8,               # sublinear, as XLA's buffer reuse makes it
    lambda b: 200 + 9 * b + (b // 16) * 40,        # steps (padding to tiles)
    lambda b: 10 ** 6 + b,                         # batch 1 does not fit
])
def test_largest_fitting_matches_brute_force(plan):
    largest_fitting = load_bench_t2i().largest_fitting
    target = 20_000
    truth = max((b for b in range(1, 100_000) if plan(b) <= target), default=0)
    calls = []

    def counted(b):
        calls.append(b)
        return plan(b)
    known = {1: plan(1), 2: plan(2)}
    found = largest_fitting(counted, known, target, max_new=12)
    assert found == dict(batch=truth, confirmed=True, evaluated=len(calls)), (found, truth)
    assert len(set(calls)) == len(calls) and not {1, 2} & set(calls)  # nothing twice
