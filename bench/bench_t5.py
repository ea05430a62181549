#!/usr/bin/env python3
"""Benchmark the T5 text encoder: official 512-token padding against the bucketed length.

    python bench/bench_t5.py                        # flan-t5-xl sizes, float32 and bfloat16
    python bench/bench_t5.py --layers 2 --d-model 64 --d-kv 16 --heads 4 --d-ff 128 \
        --vocab 512 --repeats 2                     # smoke: seconds
    python bench/bench_t5.py --dtypes bfloat16 --json out.json   # one dtype, rows as JSON

The encoder has flan-t5-xl's sizes by default (d_model 2048, d_kv 64, 32 heads, d_ff 5120,
24 layers, vocabulary 32128, gated GELU; DESIGN §7) and random weights at T5's own
initialisation scales (``pixelflow_jax.t5.init_encoder``): nothing is downloaded. One
prompt of ``--prompt-tokens`` random token ids plus ``</s>`` is encoded padded to the
official 512 tokens and cut to its bucket (``pixelflow_jax.text_encoder.bucket_length``),
with the same program form as ``TextEncoder`` (parameters an argument of one ``jax.jit``).

Each dtype runs in its own process, so peak memory (host RSS on CPU, the device's
``peak_bytes_in_use`` on GPU/TPU) is that dtype's alone. Reported per (dtype, length):
ahead-of-time compile time, seconds per prompt (median of ``--repeats`` after
``--warmups``, and the minimum), XLA's temp bytes, peak memory; per dtype the speed-up of
the bucketed length over 512 (same process, same run) and the largest difference between
the real tokens' features at the two lengths, relative to their largest magnitude (T5
masks padded keys, so it is rounding). The load average before and after is printed:
absolute times on a shared machine are noise, same-run ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OFFICIAL_LENGTH = 512  # the official tokenizer's padding="max_length" (DESIGN §7)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_arrays(tokens: int, length: int, vocab: int, batch: int, seed: int = 0):
    """ids/mask int32 [batch, length]: ``tokens`` random ids (never pad 0 or eos 1), ``</s>``,
    then pads; mask 1 on the tokens and ``</s>``, as the official tokenizer pads."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    ids[:, :tokens] = rng.integers(2, vocab, (batch, tokens))
    ids[:, tokens] = 1
    mask = np.zeros((batch, length), np.int32)
    mask[:, :tokens + 1] = 1
    return ids, mask


def worker(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    if args.cache:
        from pixelflow_jax.runtime import enable_compilation_cache
        enable_compilation_cache(args.cache)
    from pixelflow_jax.t5 import T5Config, init_encoder
    from pixelflow_jax.text_encoder import bucket_length

    config = T5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_kv,
                      num_heads=args.heads, d_ff=args.d_ff, num_layers=args.layers,
                      feed_forward_proj="gated-gelu")
    dtype = jnp.dtype(args.worker)
    start = time.perf_counter()
    encoder = init_encoder(config, seed=0, dtype=dtype)
    graphdef, state = nnx.split(encoder)
    jax.block_until_ready(state)
    build_s = time.perf_counter() - start
    leaves = jax.tree.leaves(state)
    params = sum(x.size for x in leaves)
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    # TextEncoder's program: the parameters are an argument, not baked-in constants.
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    bucket = bucket_length(args.prompt_tokens + 1, OFFICIAL_LENGTH)
    device = jax.devices()[0]
    rows, outputs = [], {}
    for length in (OFFICIAL_LENGTH, bucket):
        ids, mask = prompt_arrays(args.prompt_tokens, length, args.vocab, args.batch)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        start = time.perf_counter()
        compiled = forward.lower(state, ids, mask).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        for _ in range(args.warmups):
            jax.block_until_ready(compiled(state, ids, mask))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(state, ids, mask))
            times.append(time.perf_counter() - start)
        outputs[length] = np.asarray(out[:, :args.prompt_tokens + 1], np.float64)
        median = sorted(times)[len(times) // 2]
        rows.append(dict(dtype=dtype.name, length=length, bucketed=length == bucket,
                         compile_s=compile_s, s_per_prompt=median / args.batch,
                         min_s_per_prompt=min(times) / args.batch,
                         temp_mb=memory.temp_size_in_bytes / 2 ** 20 if memory else None))
    a, b = outputs[OFFICIAL_LENGTH], outputs[bucket]
    diff = float(np.abs(a - b).max() / np.abs(a).max())
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2 ** 20 if device.platform != "cpu" \
        else peak_rss_mb()
    for row in rows:
        row.update(params=params, param_mb=param_bytes / 2 ** 20, build_s=build_s,
                   peak_mb=peak, where=f"{device.platform}: {device.device_kind}",
                   speedup=rows[0]["s_per_prompt"] / rows[1]["s_per_prompt"],
                   bucket_rel_diff=diff, batch=args.batch, prompt_tokens=args.prompt_tokens)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="encoder blocks (flan-t5-xl: 24)")
    ap.add_argument("--d-model", type=int, default=2048, help="width (flan-t5-xl: 2048)")
    ap.add_argument("--d-kv", type=int, default=64, help="head width (flan-t5-xl: 64)")
    ap.add_argument("--heads", type=int, default=32, help="attention heads (flan-t5-xl: 32)")
    ap.add_argument("--d-ff", type=int, default=5120, help="gated MLP width (flan-t5-xl: 5120)")
    ap.add_argument("--vocab", type=int, default=32128, help="vocabulary (flan-t5-xl: 32128)")
    ap.add_argument("--prompt-tokens", type=int, default=10,
                    help="tokens of the prompt before </s> (default 10: a short caption)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per encoder call")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"], help="one process each")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per length (median)")
    ap.add_argument("--warmups", type=int, default=1, help="untimed calls after compiling")
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--worker-timeout", type=float, default=0,
                    help="seconds each dtype's process may take (0: no limit)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 < args.prompt_tokens < OFFICIAL_LENGTH:
        ap.error(f"--prompt-tokens must be in [1, {OFFICIAL_LENGTH - 1}]")
    if min(args.layers, args.d_model, args.d_kv, args.heads, args.d_ff, args.batch,
           args.repeats) < 1 or args.vocab < 3 or args.warmups < 0:
        ap.error("sizes, --batch and --repeats must be positive, --vocab at least 3")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load average {load[0]:.2f} before\n"
          f"encoder: {args.layers} layers, d_model {args.d_model}, {args.heads} heads x "
          f"{args.d_kv}, d_ff {args.d_ff}, vocabulary {args.vocab}; batch {args.batch}, "
          f"{args.prompt_tokens} tokens + </s>\n")
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("dtypes", "json", "worker_timeout", "worker")]
    measured, failed = [], []
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--worker", dtype, *passed]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=args.worker_timeout or None)
            why = f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        except subprocess.TimeoutExpired:
            proc, why = None, f"timed out after {args.worker_timeout:.0f} s"
        if proc is None or proc.returncode:
            print(f"{dtype} worker failed, {why}", file=sys.stderr)
            failed.append(dict(dtype=dtype, error=why.strip().splitlines()[-1]))
            continue
        measured += json.loads(proc.stdout.strip().splitlines()[-1])
    if measured:
        first = measured[0]
        print(f"{first['params']:,} parameters; device {first['where']}\n")
    peak_name = "peak RSS MB" if not measured or measured[0]["where"].startswith("cpu") \
        else "peak device MB"
    print(f"| dtype | sequence | compile s | s/prompt (min) | prompts/s | XLA temp MB | "
          f"{peak_name} | 512 / bucketed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in measured:
        seq = f"{r['length']} ({'bucketed' if r['bucketed'] else 'official padding'})"
        temp = "" if r["temp_mb"] is None else f"{r['temp_mb']:,.0f}"
        speedup = f"**{r['speedup']:.2f}x**" if r["bucketed"] else ""
        print(f"| {r['dtype']} | {seq} | {r['compile_s']:.2f} | {r['s_per_prompt']:.4g} "
              f"({r['min_s_per_prompt']:.4g}) | {1 / r['s_per_prompt']:.3g} | {temp} | "
              f"{r['peak_mb']:,.0f} | {speedup} |")
    for dtype in dict.fromkeys(r["dtype"] for r in measured):
        r = next(r for r in measured if r["dtype"] == dtype)
        print(f"\n{dtype}: parameters {r['param_mb']:,.1f} MB, built in {r['build_s']:.1f} s; "
              f"real tokens' features, bucketed vs 512: max difference "
              f"{r['bucket_rel_diff']:.1e} of their largest magnitude")
    print(f"\nload average {os.getloadavg()[0]:.2f} after ({load[0]:.2f} before)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(measured + failed, f, indent=1)
    if failed:
        sys.exit(f"{len(failed)} worker(s) failed")


if __name__ == "__main__":
    main()
