#!/usr/bin/env python3
"""One device check: every GPU figure the issues ask for, appended to BENCHMARKS.md.

    bash bench/device_check.sh                    # XL on one H100/H200, under 8 minutes
    bash bench/device_check.sh --smoke --out F    # the same path on CPU, tiny configs

Parts, each a bench run in its own process with its own timeout (a slow or failing part
cannot take the others down; whatever was measured is appended, failures named):
  euler   XL, 10 steps/stage, guidance 4, batch 16, bf16: s/image, TFLOP/s, compile time,
          and eager PyTorch (tests/torch_reference.py, bf16 autocast) on the same device
  memory  XL Euler at batch 4, bf16: peak device memory, and whether a 24 GB card holds it
  train   XL training step, the largest global batch XLA's plan fits (remat as needed):
          samples/s and MFU
  dopri5  XL FID recipe (guidance 2.4, rtol 1e-3, atol 1e-6, batch error control over the
          duplicated 2B-row state): s/image and velocity evaluations per image
  inception  FID Inception (bench/bench_inception.py --score-cost): images/s at 256 px,
          batch 256, float32 and bfloat16; the host's FID and sFID matrix square roots,
          precision/recall of two 10k x 2048 random feature sets on the device, and from
          those the estimated time to score 50k samples against ADM's 10k reference
  t5      flan-t5-xl-sized T5 encoder (bench/bench_t5.py): s/prompt in float32 and bfloat16,
          at the official 512-token padding and at the bucketed length
  t2i     XL text-to-image at 1024 px (bench/bench_t2i.py --time), 10 steps/stage,
          guidance 4 (2 rows), bf16: s/image, peak memory, and how many attention calls
          reach cuDNN's fused kernel (the masked cross-attention needs kv lengths for it)
Weights are random normal-scale (pixelflow_jax.random_weights; He-normal for the
Inception): nothing is downloaded, and an adaptive solver may take more steps than with
trained weights. The parts share one --budget (later parts get what is left); `--parts
dopri5 --budget 200` reruns one, and the compilation cache (bench/results/xla_cache) turns
a rerun's compiles into loads. The text parts come last: if the budget runs out first,
`--parts t5 t2i --budget 300` runs them (and `--parts inception --budget 130` the
Inception alone).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
# A 24 GB card holds 22.35 GiB; leave ~0.85 GiB for the CUDA context and library workspaces.
CARD_24GB_MIB = 21.5 * 1024


# What each run measures: the figures' labels name it whether or not the part ran.
SIZES = {False: dict(model="XL", steps=10, euler=16, memory=4, dopri5=16, t2i_px=1024,
                     inception_batch=256, inception_px=256, fid_dims=(2048, 2023),
                     pr_size=10000),
         True: dict(model="tiny", steps=1, euler=2, memory=2, dopri5=2, t2i_px=32,
                    inception_batch=1, inception_px=16, fid_dims=(32, 31), pr_size=64)}
PARTS = ["euler", "memory", "train", "dopri5", "inception", "t5", "t2i"]
# The scoring estimate's set sizes: 50k samples against an ADM reference batch's 10k images.
SCORE_SAMPLES, SCORE_REFERENCE = 50000, 10000
# Tiny text model and encoder for the smoke run (the XL runs use the benches' defaults).
TINY_T2I = ["--set", "model.params.depth=1", "model.params.num_attention_heads=2",
            "model.params.attention_head_dim=8", "model.params.cross_attention_dim=32"]
TINY_T5 = ["--layers", "1", "--d-model", "32", "--d-kv", "8", "--heads", "2", "--d-ff", "64",
           "--vocab", "64"]


def plans(smoke: bool) -> dict:
    """Each part's bench command (after ``python``) and its longest allowed time in s."""
    size = SIZES[smoke]
    sample = ["bench/bench_sample.py", "--dtype", "bfloat16", "--steps", str(size["steps"])]
    euler = sample + ["--runs", f"{size['model'].lower()}:euler", "--cfg", "4"]
    # One timed Dopri5 solve, no warm-up: the program is compiled ahead, and with random
    # weights the adaptive solver may take several times the trained model's evaluations.
    dopri5 = sample + ["--cfg", "2.4", "--batch", str(size["dopri5"]), "--repeats", "1",
                       "--warmups", "0", "--no-torch"]
    t5 = ["bench/bench_t5.py", "--dtypes", "float32", "bfloat16"]
    # One timed image, no warm-up (compiled ahead): at 1024 px it is ~1.4e16 FLOP.
    t2i = ["bench/bench_t2i.py", "--time", "--resolutions", str(size["t2i_px"]), "--batches",
           "1", "--dtypes", "bfloat16", "--steps", str(size["steps"]), "--cfg", "4",
           "--repeats", "1", "--warmups", "0"]
    # Both dtypes in one process; precision/recall at pr_size rows (10k: ADM's block shape).
    inception = ["bench/bench_inception.py", "--batch", str(size["inception_batch"]), "--side",
                 str(size["inception_px"]), "--dtype", "float32", "bfloat16", "--no-torch",
                 "--score-cost", "--pr-size", str(size["pr_size"]), "--feature-dims",
                 *map(str, size["fid_dims"]), "--num-samples", str(SCORE_SAMPLES),
                 "--num-reference", str(SCORE_REFERENCE)]
    if smoke:
        return {
            "euler": (euler + ["--batch", str(size["euler"]), "--repeats", "1",
                               "--torch-device", "cpu", "--torch-autocast", "bfloat16"], 60),
            # Euler's shapes again: the compilation cache serves this program.
            "memory": (euler + ["--batch", str(size["memory"]), "--repeats", "1",
                                "--no-torch"], 40),
            # float32: XLA's CPU compile of the bf16 step takes 1.5x as long.
            "train": (["bench/bench_train.py", "--config", "configs/pixelflow_tiny_train.yaml",
                       "--batch-per-device", "12", "6", "--remat-fallback", "--steps", "1"], 60),
            # 3 stages, 16 px: the quickest Dopri5 compile (no PyTorch row, whose oracle
            # knows the official 4-stage guidance weights only).
            "dopri5": (dopri5 + ["--runs", "tiny_train:dopri5"], 60),
            # One 16-px image per batch (the network resizes to 299 px whatever comes in),
            # 32-d features: ~10 s with the compilation cache warm, ~24 s cold (2 cores at
            # load 5).
            "inception": (inception + ["--repeats", "1"], 40),
            "t5": (t5 + TINY_T5 + ["--repeats", "1"], 40),
            "t2i": (t2i + TINY_T2I, 60),
        }
    return {
        "euler": (euler + ["--batch", str(size["euler"]), "--repeats", "2",
                           "--torch-device", "cuda", "--torch-autocast", "bfloat16"], 200),
        "memory": (euler + ["--batch", str(size["memory"]), "--repeats", "1", "--no-torch"], 90),
        "train": (["bench/bench_train.py", "--config", "configs/pixelflow_xl_c2i.yaml",
                   "--batch-per-device", "64", "32", "16", "8", "--remat-fallback", "--steps",
                   "3", "--set", "train.dtype=bfloat16"], 180),
        "dopri5": (dopri5 + ["--runs", "xl:dopri5"], 150),
        # Two Inception compiles, 2 x 5 batches of 256, two 2k sqrtm on the host's CPUs,
        # precision/recall compiled and run twice on 10k x 10k.
        "inception": (inception + ["--repeats", "5"], 120),
        "t5": (t5 + ["--repeats", "3"], 90),
        "t2i": (t2i, 200),
    }


def run_part(name: str, argv: list[str], limit: float, cache: str, tmp: str) -> tuple:
    """Run one bench with a hard time limit; returns (its JSON rows or None, error or None)."""
    out, err = os.path.join(tmp, f"{name}.json"), os.path.join(tmp, f"{name}.err")
    argv = [*argv, "--json", out, "--cache", cache]
    if argv[0].endswith(("bench_sample.py", "bench_t5.py")):
        # The bench stops its own workers first, so the rows measured so far get written.
        workers = 1 if "--no-torch" in argv else 2
        argv += ["--worker-timeout", str(max(1.0, (limit - 5) / workers))]
    print(f"\n## {name}: python {' '.join(argv)}  (limit {limit:.0f} s)", flush=True)
    with open(err, "w") as stderr:
        # Own process group: a timeout ends the bench's worker processes too.
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stderr=stderr,
                                start_new_session=True)
        try:
            code, why = proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, why = -9, f"timed out after {limit:.0f} s"
    rows = None
    if os.path.exists(out):
        with open(out) as f:
            rows = json.load(f)
    if code and why is None:
        with open(err) as f:
            lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        why = f"exit {code}: {lines[-1][:300] if lines else 'no message'}"
        print("\n".join(lines[-15:]), file=sys.stderr)
    failed = [r for r in rows or [] if "error" in r]
    if failed:  # the worker's own message says more than the bench's exit status
        why = "; ".join(f"{r.get('impl', r.get('dtype'))}: {r['error'][:200]}" for r in failed)
    return rows, why


def fmt(value, spec: str = ".3f") -> str:
    return "failed" if value is None else format(value, spec)


def sample_rows(rows, impl: str) -> dict:
    return next((r for r in rows or [] if r.get("impl") == impl and "error" not in r), {})


def figures(results: dict, smoke: bool) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, detail) rows of the appended table."""
    size = SIZES[smoke]
    model = size["model"]
    euler_rows, _ = results.get("euler", (None, None))
    jax_e, torch_e = sample_rows(euler_rows, "jax"), sample_rows(euler_rows, "torch")
    ratio = (torch_e["s_per_image"] / jax_e["s_per_image"]
             if jax_e and torch_e else None)
    mem = sample_rows(results.get("memory", (None, None))[0], "jax")
    dop = sample_rows(results.get("dopri5", (None, None))[0], "jax")
    train_rows = results.get("train", (None, None))[0] or []
    train = next((r for r in train_rows if "step_s" in r), {})
    tried = ", ".join(f"{r['global_batch']}{' remat' if r['remat'] else ''}: "
                      f"{'ok' if 'step_s' in r else r.get('skipped', '?')}" for r in train_rows)
    peak = mem.get("peak_mb")
    fits = None if peak is None else peak <= CARD_24GB_MIB
    rows = [
        (f"Euler {model}, {size['steps']} steps/stage, g 4, batch {size['euler']}, bf16: "
         "s/image",
         fmt(jax_e.get("s_per_image"), ".4f"), "<= 0.3 (H100)", jax_e.get("where", "")),
        ("Euler: achieved TFLOP/s", fmt(jax_e.get("gflops") and jax_e["gflops"] / 1e3),
         "", f"{fmt(jax_e.get('gflop'), '.4g')} GFLOP/image (pixelflow_jax.flops)"),
        ("Euler: compile s", fmt(jax_e.get("compile_s"), ".1f"), "", "Sampler.compile"),
        ("Euler: eager PyTorch s/image", fmt(torch_e.get("s_per_image"), ".4f"), "",
         torch_e.get("where", "")),
        ("Euler: speed-up, PyTorch s/image / JAX s/image", fmt(ratio, ".2f"), ">= 5 (Dopri5)",
         f"relative difference of the images: {fmt(jax_e.get('rel_diff'), '.1e')}"),
        (f"Dopri5 {model} FID recipe (g 2.4, rtol 1e-3, atol 1e-6, batch "
         f"{size['dopri5']}): s/image", fmt(dop.get("s_per_image"), ".4f"),
         "<= 1.1 (H100)", f"compile {fmt(dop.get('compile_s'), '.1f')} s"),
        ("Dopri5: velocity evaluations/image", fmt(dop.get("evaluations"), ".1f"), "",
         f"{fmt(dop.get('gflops') and dop['gflops'] / 1e3)} TFLOP/s achieved"),
        (f"Peak memory, Euler {model}, batch {size['memory']}, bf16: MiB", fmt(peak, ".0f"),
         "fits 24 GB", "fits a 24 GB card: "
         + ("n/a" if fits is None else ("yes" if fits else "no"))
         + f" (<= {CARD_24GB_MIB:.0f} MiB); device peak_bytes_in_use (host RSS on CPU)"),
        (f"Train {model}: global batch", fmt(train.get("global_batch"), "d"), "",
         f"remat {train.get('remat')}; tried {tried or 'nothing'}"),
        ("Train: samples/s", fmt(train.get("samples_per_s"), ".2f"), "",
         f"step {fmt(train.get('step_s'))} s, compile {fmt(train.get('compile_s'), '.1f')} s, "
         f"peak {fmt(train.get('peak_mb'), '.0f')} MiB"),
        ("Train: MFU %", "n/a" if train and train.get("mfu") is None
         else fmt(train.get("mfu") and 100 * train["mfu"], ".1f"), ">= 45",
         f"{fmt(train.get('tflops'))} TFLOP/s achieved (pixelflow_jax.trainer.flops_per_step)"),
    ]
    return rows + inception_figures(results, smoke) + text_figures(results, smoke)


def inception_figures(results: dict, smoke: bool) -> list[tuple[str, str, str, str]]:
    """The FID Inception's rows: images/s per dtype, host scoring costs, the 50k estimate."""
    size = SIZES[smoke]
    got = [r for r in results.get("inception", (None, None))[0] or [] if "error" not in r]
    jax_rows = {r["dtype"]: r for r in got if r.get("impl") == "jax"}
    f32, bf16 = jax_rows.get("float32", {}), jax_rows.get("bfloat16", {})
    score = next((r for r in got if r.get("impl") == "score"), {})
    est = next((r for r in got if r.get("impl") == "estimate" and r["dtype"] == "float32"), {})
    dims, n = size["fid_dims"], size["pr_size"]
    ratio = (bf16["images_per_s"] / f32["images_per_s"] if f32 and bf16 else None)
    return [
        (f"FID Inception, {size['inception_px']} px uint8, batch {size['inception_batch']}, "
         "float32: images/s", fmt(f32.get("images_per_s"), ".4g"), "",
         f"first call (compile + run) {fmt(f32.get('first_s'), '.1f')} s; "
         f"{f32.get('where', '')}"),
        ("FID Inception, bfloat16: images/s", fmt(bf16.get("images_per_s"), ".4g"), "",
         f"bfloat16 / float32 = {fmt(ratio, '.2f')}; first call "
         f"{fmt(bf16.get('first_s'), '.1f')} s; not for reported numbers"),
        (f"FID + sFID Frechet distances ({dims[0]}x{dims[0]}, {dims[1]}x{dims[1]}), host: s",
         fmt(score["fid_s"] + score["sfid_s"] if score else None, ".4g"), "",
         f"FID {fmt(score.get('fid_s'), '.4g')} s + sFID {fmt(score.get('sfid_s'), '.4g')} s "
         f"(scipy sqrtm on {score.get('host_cores', '?')} CPU cores)"),
        (f"Precision/recall, {n} x {n} random {dims[0]}-d features: s",
         fmt(score.get("pr_s"), ".4g"), "",
         f"first call (compile + run) {fmt(score.get('pr_first_s'), '.4g')} s; "
         f"{score.get('pr_where', '')}"),
        (f"Score {SCORE_SAMPLES // 1000}k samples vs {SCORE_REFERENCE // 1000}k reference, "
         "float32 (estimate): s", fmt(est.get("total_s"), ".4g"), "",
         f"{est.get('formula', 'n/a')}; compile and decoding excluded "
         "(bench/bench_inception.py)"),
    ]


def text_figures(results: dict, smoke: bool) -> list[tuple[str, str, str, str]]:
    """The text path's rows: T5 encoder s/prompt, XL text-to-image s/image."""
    size = SIZES[smoke]
    model = size["model"]
    t5 = [r for r in results.get("t5", (None, None))[0] or [] if "error" not in r]

    def encode(dtype: str, bucketed: bool) -> dict:
        return next((r for r in t5 if r["dtype"] == dtype and r["bucketed"] == bucketed), {})
    rows = []
    for dtype in ("float32", "bfloat16"):
        full, cut = encode(dtype, False), encode(dtype, True)
        rows += [
            (f"T5 encoder ({'flan-t5-xl' if not smoke else 'tiny'} sizes), {dtype}, "
             "512 tokens (official padding): s/prompt", fmt(full.get("s_per_prompt"), ".4g"),
             "", f"compile {fmt(full.get('compile_s'), '.1f')} s; peak "
             f"{fmt(full.get('peak_mb'), '.0f')} MiB; {full.get('where', '')}"),
            (f"T5 {dtype}, bucketed: s/prompt", fmt(cut.get("s_per_prompt"), ".4g"), "",
             f"{cut.get('length', '?')} tokens; 512 / bucketed = "
             f"{fmt(cut.get('speedup'), '.2f')}; features differ by "
             f"{fmt(cut.get('bucket_rel_diff'), '.1e')} of their largest"),
        ]
    f32, bf16 = encode("float32", True), encode("bfloat16", True)
    rows.append(("T5 bucketed: float32 s / bfloat16 s",
                 fmt(f32["s_per_prompt"] / bf16["s_per_prompt"] if f32 and bf16 else None,
                     ".2f"), "",
                 "the two dtypes run in separate processes of the same part"))
    t2i = next((r for r in results.get("t2i", (None, None))[0] or [] if "error" not in r), {})
    peak = t2i.get("peak_mb")
    rows += [
        (f"Text-to-image {model}, {size['t2i_px']} px, {size['steps']} steps/stage, g 4, "
         "batch 1, bf16: s/image", fmt(t2i.get("s_per_image"), ".4g"), "",
         f"compile {fmt(t2i.get('compile_s'), '.1f')} s; {fmt(t2i.get('tflops'))} TFLOP/s "
         f"achieved; finite: {t2i.get('finite', 'n/a')}; {t2i.get('where', '')}"),
        ("Text-to-image: peak memory MiB", fmt(peak, ".0f"), "fits 24 GB",
         "fits a 24 GB card: " + ("n/a" if peak is None else
                                  "yes" if peak <= CARD_24GB_MIB else "no")
         + "; transformer only (features given), float32 parameters"),
        ("Text-to-image: attention calls on cuDNN's fused kernel", fmt(t2i.get("cudnn_calls"),
                                                                       "d"),
         "all",
         f"of {t2i.get('attention_calls', '?')} in the program (self- and cross-attention of "
         "each model instance); half: the masked cross-attention is not fused; 0 off GPU"),
    ]
    return rows


def machine() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    versions = []
    for name in ("jax", "jaxlib", "flax", "torch"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    where = f"nvidia-smi: {gpu}" if gpu else f"no GPU ({platform.processor() or 'cpu'})"
    return (f"{where}; {os.cpu_count()} CPU cores; Python {platform.python_version()}, "
            + ", ".join(versions))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU (for CI)")
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append to")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 450; smoke 260)")
    ap.add_argument("--parts", nargs="*", default=PARTS, choices=PARTS,
                    help="which parts to run, in this order (default: all)")
    ap.add_argument("--cache", default="bench/results/xla_cache",
                    help="JAX persistent compilation cache (inside the repository, git-ignored)")
    args = ap.parse_args()
    if args.smoke:
        # The smoke run must not touch an accelerator that happens to be there.
        os.environ["JAX_PLATFORMS"] = "cpu"
    start = time.monotonic()
    budget = args.budget or (260 if args.smoke else 450)
    cache = os.path.join(ROOT, args.cache)
    os.makedirs(cache, exist_ok=True)
    cached = len(os.listdir(cache))
    command = "bash bench/device_check.sh" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:]
                                               else "")
    results, failures, printed = {}, [], set()
    all_plans = plans(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts:
            argv, longest = all_plans[name]
            left = budget - (time.monotonic() - start)
            if left < 10:
                failures.append(f"{name}: not run, the {budget:.0f} s budget was spent")
                continue
            rows, why = run_part(name, argv, min(longest, left), cache, tmp)
            results[name] = (rows, why)
            if why:
                failures.append(f"{name}: {why}")
            for figure, value, *_ in figures(results, args.smoke):
                if value != "failed" and figure not in printed:
                    print(f"  {figure}: {value}", flush=True)
                    printed.add(figure)
    when = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "", f"## Device check{' (smoke, CPU, tiny configs)' if args.smoke else ''}: "
        f"{when:%Y-%m-%d %H:%M} UTC", "",
        f"Machine: {machine()}.", "",
        f"Command: `{command}` ({time.monotonic() - start:.0f} s of a {budget:.0f} s budget; "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '')};"
        f" compilation cache {args.cache}, {cached} entries before the run"
        f"{' (compile times are cache loads)' if cached else ' (cold)'}). "
        "Random normal-scale weights.", "",
        "| figure | value | target | detail |", "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in figures(results, args.smoke)]
    lines += ["", "Failed parts: " + ("; ".join(failures) if failures else "none") + "."]
    section = "\n".join(lines) + "\n"
    with open(os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out,
              "a") as f:
        f.write(section)
    print(section)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
