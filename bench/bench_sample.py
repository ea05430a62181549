#!/usr/bin/env python3
"""Benchmark sampling: this package (compiled) against eager PyTorch, in the same run.

    python bench/bench_sample.py                       # CPU: Euler tiny + small, Dopri5 tiny
    python bench/bench_sample.py --xl-compile          # + XL sampler compile time (depth 28 vs 4)
    python bench/bench_sample.py --runs xl:euler xl:dopri5 --batch 16 --dtype bfloat16 \
        --no-torch                                     # XL on a GPU
    python bench/bench_sample.py --runs xl:euler --batch 16 --dtype bfloat16 \
        --torch-device cuda --torch-autocast bfloat16 --json out.json   # + eager torch on the GPU

Each measurement runs in its own process (so peak memory is that implementation's
alone) with the same normal-scale random weights and the same injected noise.
The PyTorch baseline is tests/torch_reference.py (float32, eager), which follows
the official pipeline: with guidance it doubles the batch at every stage; for
Dopri5 it is tests/torch_dopri5_reference.py (torchdiffeq, the official 2B-row
state). Reported: compile time, steady-state seconds per image (median of
--repeats batches), images/s, velocity evaluations per image, GFLOP per image
(pixelflow_jax.flops) and achieved GFLOP/s, peak host RSS (CPU) or peak device
memory (GPU), and the relative difference between the two outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = {"tiny": "configs/pixelflow_tiny_c2i.yaml",
           "tiny_train": "configs/pixelflow_tiny_train.yaml",  # 3 stages: the quickest compile
           "small": "configs/pixelflow_small_c2i.yaml",
           "xl": "configs/pixelflow_xl_c2i.yaml"}
DEFAULT_RUNS = ["tiny:euler", "small:euler", "tiny:dopri5"]


def make_noise(batch: int, resolutions: list[int], channels: int, seed: int, copies: int = 1):
    """Block-structured noise in NumPy (NCHW), identical for both implementations.

    Block arrays have ``copies`` x batch rows (2 for the official Dopri5 state)."""
    import numpy as np

    from pixelflow_jax.noise import block_noise_factor
    rng = np.random.default_rng(seed)
    L = block_noise_factor(-1 / 3)
    init = rng.standard_normal((batch, channels, resolutions[0], resolutions[0]), np.float32)
    blocks = []
    for r in resolutions[1:]:
        rows = copies * batch
        z = rng.standard_normal((rows, channels, r // 2, r // 2, 4), np.float32) @ L.T
        blocks.append(z.reshape(rows, channels, r // 2, r // 2, 2, 2)
                      .transpose(0, 1, 2, 4, 3, 5).reshape(rows, channels, r, r))
    return init, blocks


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import numpy as np

    from pixelflow_jax.config import load_config
    from pixelflow_jax.flops import sampling_flops
    from pixelflow_jax.random_weights import normal_scale_state_dict
    from pixelflow_jax.scheduler import schedule_from_config

    cfg = load_config(os.path.join(ROOT, CONFIGS[args.config]))
    p, R = cfg.params, cfg.data.resolution
    schedule = schedule_from_config(cfg.scheduler)
    resolutions = list(schedule.stage_resolutions(R, p.patch_size))
    sd = normal_scale_state_dict(p, seed=0)
    dopri5 = args.solver == "dopri5"
    init, blocks = make_noise(args.batch, resolutions, p.in_channels, 1, 2 if dopri5 else 1)
    labels = np.arange(args.batch) % p.num_classes
    times = []
    if args.worker == "jax":
        import jax
        import jax.numpy as jnp

        if args.cache:
            from pixelflow_jax.runtime import enable_compilation_cache
            enable_compilation_cache(args.cache)

        from pixelflow_jax.checkpoint import model_from_tree
        from pixelflow_jax.convert import official_to_nnx
        from pixelflow_jax.noise import CascadeNoise
        from pixelflow_jax.runtime import compute_dtype
        from pixelflow_jax.sampling import Sampler

        model = model_from_tree(official_to_nnx(sd, p), cfg, dtype=compute_dtype(args.dtype))
        del sd
        sampler = Sampler(model, schedule, R, solver=args.solver)
        nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
        B = args.batch
        noise = CascadeNoise(nhwc(init), tuple(nhwc(b[:B]) for b in blocks))
        dup = [nhwc(b[B:]) for b in blocks] if dopri5 else None
        run = lambda: jax.block_until_ready(sampler.sample_from_noise(
            noise, labels=labels, steps=args.steps, guidance=args.cfg, dup_blocks=dup))
        compile_s = sampler.compile(B, args.steps, from_noise=True)
        for _ in range(args.warmups):
            run()
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        if sampler.num_compilations != 1:
            raise RuntimeError("sampling recompiled the program compiled ahead")
        evaluations = np.asarray(out.stats.evaluations, np.float64).mean(axis=1).tolist()
        out = np.asarray(out.x).transpose(0, 3, 1, 2)
        device = jax.devices()[0]
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", 0) / 2 ** 20 if device.platform == "gpu" \
            else peak_rss_mb()
        where = f"{device.platform}: {device.device_kind}"
        passes = [1 if w == 0 or args.cfg in (0, 1) else 2 for w in sampler.guidance_weights]
    else:
        import torch

        import torch_dopri5_reference as dref
        import torch_reference as ref
        torch.set_num_threads(os.cpu_count() or 1)
        dev = torch.device(args.torch_device)
        cuda = dev.type == "cuda"
        torch.set_default_device(dev)  # the oracles build their tables with factory calls
        tsd = {k: torch.from_numpy(v).to(dev) for k, v in sd.items()}
        del sd
        tinit = torch.from_numpy(init).to(dev)
        tblocks = [torch.from_numpy(b).to(dev) for b in blocks]
        pd = dataclasses.asdict(p)
        if dopri5:
            solve = lambda: dref.dopri5_cascade(tsd, pd, tinit, tblocks, guidance=args.cfg,
                                                class_labels=torch.tensor(labels))
        else:
            solve = lambda: (ref.euler_cascade(
                tsd, pd, tinit, tblocks, guidance=args.cfg, steps=args.steps,
                class_labels=torch.tensor(labels), num_stages=schedule.num_stages),
                [args.steps] * schedule.num_stages)
        autocast = args.torch_autocast not in (None, "none")

        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                result = solve()
            if cuda:  # kernels run asynchronously: time them to completion
                torch.cuda.synchronize()
            return result
        with torch.inference_mode():
            for _ in range(args.warmups):
                run()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats):
                start = time.perf_counter()
                out, evaluations = run()
                times.append(time.perf_counter() - start)
        evaluations = [float(e) for e in evaluations]
        out, compile_s = out.float().cpu().numpy(), 0.0
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
        kind = torch.cuda.get_device_name(dev) if cuda else \
            f"{torch.get_num_threads()} threads"
        where = (f"{dev.type}: torch {torch.__version__}, {kind}, "
                 f"{'bf16 autocast' if autocast else str(next(iter(tsd.values())).dtype)}")
        passes = [2 if args.cfg > 0 else 1] * schedule.num_stages  # the official doubling
    np.save(args.save, out)
    median = sorted(times)[len(times) // 2]
    flops = sampling_flops(p, resolutions, evaluations, passes)
    return dict(impl=args.worker, where=where, compile_s=compile_s,
                s_per_image=median / args.batch, images_per_s=args.batch / median,
                evaluations=sum(evaluations), gflop=flops / 1e9,
                gflops=flops * args.batch / median / 1e9, peak_mb=peak)


def xl_compile(cases=(("euler", 28), ("euler", 4), ("dopri5", 28))) -> list[dict]:
    """Compile time of the XL sampler (abstract weights, nothing allocated)."""
    from pixelflow_jax.config import load_config
    from pixelflow_jax.model import abstract_model
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.scheduler import schedule_from_config

    rows = []
    base = load_config(os.path.join(ROOT, CONFIGS["xl"]))
    for solver, depth in cases:
        cfg = base.replace_params(depth=depth)
        sampler = Sampler(abstract_model(cfg.params), schedule_from_config(cfg.scheduler), 256,
                          solver=solver)
        start = time.perf_counter()
        lowered = sampler.lower(4, steps=10)
        traced = time.perf_counter() - start
        lowered.compile()
        rows.append(dict(solver=solver, depth=depth, trace_s=traced,
                         total_s=time.perf_counter() - start))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS,
                    help=f"CONFIG:SOLVER pairs; configs {sorted(CONFIGS)}, solvers euler, dopri5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="Euler steps per stage")
    ap.add_argument("--cfg", type=float, default=None,
                    help="guidance (default 4 for Euler, 2.4 for Dopri5: the FID recipe)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--xl-compile", action="store_true", help="also time the XL compile")
    ap.add_argument("--torch-device", default="cpu", help="device of the PyTorch baseline")
    ap.add_argument("--torch-autocast", default="none", choices=["none", "bfloat16"],
                    help="run the PyTorch baseline under torch.autocast")
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="", help="also write the measurements to this JSON file")
    ap.add_argument("--worker-timeout", type=float, default=0,
                    help="seconds each measurement may take (0: no limit)")
    for hidden in ("--worker", "--config", "--save", "--solver"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        print(json.dumps(worker(args)))
        return

    import numpy as np
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"batch {args.batch}\n")
    print("| config | solver | impl | device | compile s | s/image | images/s | evals/image | "
          "GFLOP/image | GFLOP/s | peak MB | speed-up | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    measured, failed = [], []
    for run in args.runs:
        config, solver = run.split(":")
        cfg = args.cfg if args.cfg is not None else (2.4 if solver == "dopri5" else 4.0)
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for impl in ["jax"] + ([] if args.no_torch else ["torch"]):
                save = os.path.join(tmp, f"{impl}.npy")
                cmd = [sys.executable, __file__, "--worker", impl, "--config", config,
                       "--solver", solver, "--save", save, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--cfg", str(cfg),
                       "--repeats", str(args.repeats), "--warmups", str(args.warmups),
                       "--dtype", args.dtype,
                       "--torch-device", args.torch_device, "--torch-autocast",
                       args.torch_autocast, "--cache", args.cache]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          timeout=args.worker_timeout or None)
                    why = f"exit {proc.returncode}: {proc.stderr.strip()[-3000:]}"
                except subprocess.TimeoutExpired:
                    proc, why = None, f"timed out after {args.worker_timeout:.0f} s"
                if proc is None or proc.returncode:
                    # Keep the other measurements: report the failure, exit non-zero at the end.
                    print(f"{config}:{solver} {impl} worker failed, {why}", file=sys.stderr)
                    failed.append(dict(config=config, solver=solver, impl=impl,
                                       error=why.strip().splitlines()[-1]))
                    continue
                results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
                results[impl]["out"] = np.load(save)
        diff = ""
        if {"jax", "torch"} <= set(results):
            a, b = results["jax"]["out"], results["torch"]["out"]
            diff = f"{np.linalg.norm(a - b) / np.linalg.norm(b):.1e}"
        for impl, r in results.items():
            measured.append(dict({k: v for k, v in r.items() if k != "out"}, config=config,
                                 solver=solver, guidance=cfg, batch=args.batch,
                                 rel_diff=float(diff) if diff and impl == "jax" else None))
        base = results.get("torch", {}).get("s_per_image")
        for impl, r in results.items():
            speed = f"{base / r['s_per_image']:.1f}x" if base else ""
            print(f"| {config} | {solver} (g={cfg}) | {impl} | {r['where']} | {r['compile_s']:.1f} "
                  f"| {r['s_per_image']:.4f} | {r['images_per_s']:.2f} | {r['evaluations']:.0f} "
                  f"| {r['gflop']:.2f} | {r['gflops']:.1f} | {r['peak_mb']:.0f} | {speed} "
                  f"| {diff if impl == 'jax' else ''} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(measured + failed, f, indent=1)
    if args.xl_compile:
        print("\n| XL sampler (batch 4, 256 px) | trace + lower s | trace + compile s |")
        print("|---|---|---|")
        for row in xl_compile():
            print(f"| {row['solver']}, depth {row['depth']} | {row['trace_s']:.1f} | "
                  f"{row['total_s']:.1f} |")
    if failed:
        sys.exit(f"{len(failed)} worker(s) failed")


if __name__ == "__main__":
    main()
