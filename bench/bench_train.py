#!/usr/bin/env python3
"""Benchmark the training step: samples/s, step time, FLOP/s and MFU, compile time, memory.

    python bench/bench_train.py                                   # CPU, small config
    python bench/bench_train.py --config configs/pixelflow_xl_c2i.yaml --batch-per-device 64 \
        --set train.dtype=bfloat16                                # XL on one GPU
    python bench/bench_train.py --config configs/pixelflow_xl_c2i.yaml \
        --batch-per-device 64 32 16 8 --remat-fallback --set train.dtype=bfloat16 \
        --json out.json                           # the largest batch that fits (XLA's plan)

Batches are random uint8 images already in memory (the data loader is measured on its
own), so this is the step itself: forward and backward of every stage, AdamW, EMA. FLOPs
per step come from pixelflow_jax.flops (3x the forward of B/S samples per stage); MFU
divides the achieved FLOP/s by the device's peak bf16 rate where it is known.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def plan(compiled) -> int | None:
    """Bytes of device memory the compiled step needs as XLA planned it (None: unknown)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    # Donated state is updated in place: aliased outputs take no extra room.
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def is_oom(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def measure(args, batch_per_device: int, remat: bool | None) -> dict:
    """Compile the step (abstract state first), check it fits, then time it.

    Returns the row, or ``{"skipped": why}`` when XLA's plan or the allocation says it does
    not fit on the device."""
    import jax
    import numpy as np

    from pixelflow_jax.config import load_config
    from pixelflow_jax.trainer import (Trainer, flops_per_step, learning_rate_schedule,
                                       optimizer, peak_flops)

    overrides = [f"data.batch_size={batch_per_device}", *args.overrides]
    if remat is not None:
        overrides.append(f"train.remat={str(remat).lower()}")
    cfg = load_config(os.path.join(ROOT, args.config), overrides)
    trainer = Trainer(cfg, os.path.join(ROOT, "runs", "bench_train"))  # only run() writes there
    lr = learning_rate_schedule(cfg.train, 1000)
    tx = optimizer(cfg.train, lr)
    graphdef, abstract = trainer.create_train_state(tx, abstract=True)
    step_fn = trainer.make_train_step(graphdef, tx, lr, abstract)
    R, B = cfg.data.resolution, trainer.global_batch
    device = jax.devices()[0]
    row = dict(config=args.config, global_batch=B, remat=cfg.train.remat, dtype=cfg.train.dtype,
               device=f"{device.platform}: {device.device_kind} x {jax.device_count()}")
    start = time.perf_counter()
    # Compiling for the abstract state allocates nothing: XLA's plan says whether it fits.
    compiled = step_fn.lower(abstract, trainer.abstract_batch()).compile()
    row["compile_s"] = time.perf_counter() - start
    need, limit = plan(compiled), (device.memory_stats() or {}).get("bytes_limit")
    row["planned_mb"] = need / 2 ** 20 if need is not None else None
    if args.compile_only:
        memory = compiled.memory_analysis()
        if memory is not None:  # per device, as XLA planned it
            row.update({f"{name}_mb": getattr(memory, name + "_size_in_bytes") / 2 ** 20
                        for name in ("argument", "output", "temp", "generated_code")})
        return row
    if need is not None and limit and need > limit:
        return dict(row, skipped=f"XLA plans {need / 2 ** 30:.1f} GiB, the device has "
                                 f"{limit / 2 ** 30:.1f} GiB")
    state = batch = metrics = None
    try:
        _, state = trainer.create_train_state(tx)
        rng = np.random.default_rng(0)
        batch = trainer.global_batch_arrays({
            "images": rng.integers(0, 256, (B, R, R, 3), dtype=np.uint8),
            "labels": rng.integers(0, cfg.params.num_classes, B)})
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - only an out-of-memory moves on
        if not is_oom(error):
            raise
        return dict(row, skipped=f"out of memory: {str(error).splitlines()[0][:200]}")
    finally:
        del state, batch
    step_s = sorted(times)[len(times) // 2]
    flops = flops_per_step(cfg, B)
    peak = peak_flops(device)
    stats = device.memory_stats() or {}
    memory = (stats["peak_bytes_in_use"] / 2 ** 20 if "peak_bytes_in_use" in stats
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(row, step_s=step_s, samples_per_s=B / step_s, gflop_per_sample=flops / B / 1e9,
                tflops=flops / step_s / 1e12, peak_mb=memory, loss=float(metrics["loss"]),
                mfu=flops / step_s / (peak * jax.device_count()) if peak else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pixelflow_small_c2i.yaml")
    ap.add_argument("--batch-per-device", type=int, nargs="+", default=[16],
                    help="one batch, or candidates largest first: the first that fits is timed")
    ap.add_argument("--remat-fallback", action="store_true",
                    help="retry a batch that does not fit with train.remat=true")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the step for abstract inputs (nothing allocated) and stop")
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="", help="also write the rows tried to this JSON file")
    args = ap.parse_args()
    if args.cache:
        from pixelflow_jax.runtime import enable_compilation_cache
        enable_compilation_cache(args.cache)
    rows = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    for batch in args.batch_per_device:
        for remat in [None, True] if args.remat_fallback else [None]:
            rows.append(measure(args, batch, remat))
            save()  # what was measured survives a later timeout
            row = rows[-1]
            if args.compile_only:
                print(f"{args.config}: train step (global batch {row['global_batch']}) compiled "
                      f"in {row['compile_s']:.1f} s")
                if "temp_mb" in row:
                    print("device memory MB: " + ", ".join(
                        f"{name} {row[name + '_mb']:.0f}"
                        for name in ("argument", "output", "temp", "generated_code")))
                break
            if "skipped" in row:
                print(f"global batch {row['global_batch']}, remat {row['remat']}: "
                      f"{row['skipped']}", flush=True)
                if row["remat"]:
                    break  # remat was on already: a retry would be the same program
                continue
            break
        if rows and "step_s" in rows[-1]:
            break
    if args.compile_only:
        return
    row = rows[-1]
    if "step_s" not in row:
        sys.exit("no batch fits on the device")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {row['device']}; "
          f"{args.config}, global batch {row['global_batch']}, {row['dtype']} compute, "
          f"remat {row['remat']}\n")
    print("| compile s | step s | samples/s | GFLOP/sample | achieved TFLOP/s | MFU | peak MB |")
    print("|---|---|---|---|---|---|---|")
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
    print(f"| {row['compile_s']:.1f} | {row['step_s']:.3f} | {row['samples_per_s']:.1f} | "
          f"{row['gflop_per_sample']:.2f} | {row['tflops']:.3f} | {mfu} | {row['peak_mb']:.0f} |")
    print(f"\nloss after {args.steps + 1} steps: {row['loss']:.4f}")


if __name__ == "__main__":
    main()
