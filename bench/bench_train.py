#!/usr/bin/env python3
"""Benchmark the training step: samples/s, step time, FLOP/s and MFU, compile time, memory.

    python bench/bench_train.py                                   # CPU, small config
    python bench/bench_train.py --config configs/pixelflow_xl_c2i.yaml --batch-per-device 64 \
        --set train.dtype=bfloat16                                # XL on one GPU

Batches are random uint8 images already in memory (the data loader is measured on its
own), so this is the step itself: forward and backward of every stage, AdamW, EMA. FLOPs
per step come from pixelflow_jax.flops (3x the forward of B/S samples per stage); MFU
divides the achieved FLOP/s by the device's peak bf16 rate where it is known.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pixelflow_small_c2i.yaml")
    ap.add_argument("--batch-per-device", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the step for abstract inputs (nothing allocated) and stop")
    args = ap.parse_args()

    import jax
    import numpy as np

    from pixelflow_jax.config import load_config
    from pixelflow_jax.trainer import (Trainer, flops_per_step, learning_rate_schedule,
                                       optimizer, peak_flops)

    cfg = load_config(os.path.join(ROOT, args.config),
                      [f"data.batch_size={args.batch_per_device}", *args.overrides])
    trainer = Trainer(cfg, os.path.join(ROOT, "runs", "bench_train"))  # only run() writes there
    lr = learning_rate_schedule(cfg.train, 1000)
    tx = optimizer(cfg.train, lr)
    graphdef, abstract = trainer.create_train_state(tx, abstract=True)
    step_fn = trainer.make_train_step(graphdef, tx, lr, abstract)
    R, B = cfg.data.resolution, trainer.global_batch
    if args.compile_only:
        start = time.perf_counter()
        compiled = step_fn.lower(abstract, trainer.abstract_batch()).compile()
        print(f"{args.config}: train step (global batch {B}) compiled in "
              f"{time.perf_counter() - start:.1f} s")
        memory = compiled.memory_analysis()
        if memory is not None:  # per device, as XLA planned it
            print("device memory MB: " + ", ".join(
                f"{name} {getattr(memory, name + '_size_in_bytes') / 2 ** 20:.0f}"
                for name in ("argument", "output", "temp", "generated_code")))
        return
    _, state = trainer.create_train_state(tx)
    rng = np.random.default_rng(0)
    batch = trainer.global_batch_arrays({
        "images": rng.integers(0, 256, (B, R, R, 3), dtype=np.uint8),
        "labels": rng.integers(0, cfg.params.num_classes, B)})
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    flops = flops_per_step(cfg, B)
    device = jax.devices()[0]
    peak = peak_flops(device)
    stats = device.memory_stats() or {}
    memory = (stats["peak_bytes_in_use"] / 2 ** 20 if "peak_bytes_in_use" in stats
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {device.platform}: "
          f"{device.device_kind} x {jax.device_count()}; {args.config}, global batch {B}, "
          f"{cfg.train.dtype} compute, remat {cfg.train.remat}\n")
    print("| compile s | step s | samples/s | GFLOP/sample | achieved TFLOP/s | MFU | peak MB |")
    print("|---|---|---|---|---|---|---|")
    mfu = f"{100 * flops / step_s / (peak * jax.device_count()):.1f}%" if peak else "n/a"
    print(f"| {compile_s:.1f} | {step_s:.3f} | {B / step_s:.1f} | {flops / B / 1e9:.2f} | "
          f"{flops / step_s / 1e12:.3f} | {mfu} | {memory:.0f} |")
    print(f"\nloss after {args.steps + 1} steps: {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
