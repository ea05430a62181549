#!/usr/bin/env python3
"""Benchmark XL text-to-image: compile time, memory plan of a 24 GB card, and (GPU) speed.

    python bench/bench_t2i.py                          # CPU: compile + plan at 256 and 1024 px
    python bench/bench_t2i.py --resolutions 256 --batches 1 2 --no-verify   # quicker
    python bench/bench_t2i.py --time --resolutions 1024 --batches 1   # GPU: s/image, bf16
    python bench/bench_t2i.py --time --resolutions 64 --batches 1 --steps 1 --set \
        model.params.depth=1 model.params.num_attention_heads=2 \
        model.params.attention_head_dim=8 model.params.cross_attention_dim=64 \
        --t5-layers 1 --t5-heads 2 --t5-d-kv 8 --t5-d-ff 64 --t5-vocab 64   # smoke: seconds

The model is ``configs/pixelflow_xl_t2i.yaml`` (882M parameters, cross-attention to
2048-wide flan-t5-xl features; DESIGN §1, §7); the text encoder has flan-t5-xl's sizes
with d_model the model's ``cross_attention_dim``. Without ``--time`` nothing is allocated:
every program is lowered and compiled from shapes alone (``Sampler.compile``, abstract
weights), and XLA's buffer plan (``compiled.memory_analysis()``) gives its argument,
output and temp bytes. Each sampling program is the whole cascade (Euler, ``--steps``
per stage, guidance > 1, so every stage runs 2 rows per image: the text model guides
stage 0 too, DESIGN §4) with the prompt at its bucketed length (``--context-length``).

The plan of a 24 GB card (21.5 GiB usable, as ``bench/device_check.py``) compares:
- *separate*: encode (the encoder's parameters + its program), free the encoder, then
  sample: peak = max(encoder program, sampling program);
- *together*: the encoder stays resident while sampling: peak = max(encoder program,
  encoder parameters + sampling program), with the encoder in bfloat16, or in float32
  (what ``sample.py`` loads today, for parity with the official pipeline).
The largest batch is searched by compiling (unless ``--no-verify``): the affine fit
through the two smallest compiled batches is the first guess, then secant steps until
batch b fits and b + 1 does not (``--max-compiles`` per mode). The sampling
program holds float32 parameters (DESIGN §9); one more compile per resolution stores the
transformer's matrices (ndim >= 2) as bfloat16 instead, to show what that would save.
On a CPU host these are XLA's CPU plans: the CPU takes the chunked attention (no N x N
logits, like cuDNN's flash attention) and its own fusions, so a GPU's plan differs;
the device check measures the real peak.

``--time`` also allocates random normal-scale weights (``pixelflow_jax.random_weights``)
and random prompt features, runs each program and reports seconds per image (median of
``--repeats``), achieved TFLOP/s (``pixelflow_jax.flops``) and the peak device memory.
The count of cuDNN fused-attention calls in each program tells whether the masked
cross-attention reached the fused kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 2 ** 30
MiB = 2 ** 20
# A 24 GB card holds 22.35 GiB; leave ~0.85 GiB for the CUDA context and library workspaces.
CARD_GIB = 21.5
ENCODER_ROWS = 2  # one prompt and the negative prompt: TextEncoder pads rows to powers of two
CUDNN_CALL = "__cudnn$fmha"


def attention_sites(sampler) -> int:
    """Attention calls in the sampling program: self- and cross-attention in the scanned
    block of each model instance (a conditional and a guided one per stage, or only the
    conditional where the stage's guidance weight is 0; DESIGN §8)."""
    return 2 * sum(1 if w == 0 else 2 for w in sampler.guidance_weights)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_bytes(compiled) -> dict:
    """XLA's buffer plan of ``compiled``: argument, output, temp and total bytes."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                temp=m.temp_size_in_bytes, total=total)


def tree_bytes(tree) -> int:
    import jax
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def encoder_config(args, width: int):
    from pixelflow_jax.t5 import T5Config
    return T5Config(vocab_size=args.t5_vocab, d_model=width, d_kv=args.t5_d_kv,
                    num_heads=args.t5_heads, d_ff=args.t5_d_ff, num_layers=args.t5_layers,
                    feed_forward_proj="gated-gelu")


def encoder_plans(args, width: int) -> list[dict]:
    """Parameters and XLA plan of the encoder program (2 rows) per dtype and length."""
    import jax
    import numpy as np
    from flax import nnx

    from pixelflow_jax.t5 import abstract_encoder

    config = encoder_config(args, width)
    rows = []
    for dtype in ("float32", "bfloat16"):
        graphdef, state = nnx.split(abstract_encoder(config, dtype=dtype))
        forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
        for length in dict.fromkeys((args.context_length, 512)):
            ids = jax.ShapeDtypeStruct((ENCODER_ROWS, length), np.int32)
            start = time.perf_counter()
            compiled = forward.lower(state, ids, ids).compile()
            rows.append(dict(kind="encoder", dtype=dtype, length=length,
                             params=sum(int(x.size) for x in jax.tree.leaves(state)),
                             param_bytes=tree_bytes(state),
                             compile_s=time.perf_counter() - start, plan=plan_bytes(compiled)))
    return rows


def bf16_matrices(state):
    """``state`` with every parameter of ndim >= 2 as a bfloat16 ShapeDtypeStruct."""
    import jax
    import jax.numpy as jnp

    def one(a):
        dtype = jnp.bfloat16 if a.ndim >= 2 else a.dtype
        return jax.ShapeDtypeStruct(a.shape, dtype, sharding=getattr(a, "sharding", None))
    return jax.tree.map(one, state)


def make_sampler(cfg, resolution: int, dtype: str, weights: bool):
    from pixelflow_jax.model import abstract_model
    from pixelflow_jax.runtime import compute_dtype
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.scheduler import schedule_from_config

    if weights:
        from pixelflow_jax.checkpoint import model_from_tree
        from pixelflow_jax.convert import official_to_nnx
        from pixelflow_jax.random_weights import normal_scale_state_dict
        sd = normal_scale_state_dict(cfg.params, seed=0)
        model = model_from_tree(official_to_nnx(sd, cfg.params), cfg, dtype=compute_dtype(dtype))
        del sd
    else:
        model = abstract_model(cfg.params, dtype=compute_dtype(dtype))
    return Sampler(model, schedule_from_config(cfg.scheduler), resolution)


def compile_program(sampler, batch: int, args) -> tuple[object, float, float, int]:
    """(compiled, trace + lower s, total s, cuDNN attention calls) of the sampling program
    for ``batch`` images."""
    start = time.perf_counter()
    lowered = sampler.lower(batch, args.steps, context_length=args.context_length)
    lower_s = time.perf_counter() - start
    text = lowered.as_text()
    compiled = lowered.compile()
    return compiled, lower_s, time.perf_counter() - start, text.count(CUDNN_CALL)


def sampler_plans(args, cfg) -> list[dict]:
    """Compile time and XLA plan per (resolution, dtype, batch); largest batch per card."""
    import jax

    rows = []
    for resolution in args.resolutions:
        for dtype in args.dtypes:
            sampler = make_sampler(cfg, resolution, dtype, weights=False)
            param_bytes = tree_bytes(sampler.state)
            measured = {}
            for batch in args.batches:
                compiled, lower_s, total_s, cudnn = compile_program(sampler, batch, args)
                plan = plan_bytes(compiled)
                measured[batch] = plan.get("total")
                rows.append(dict(kind="sampler", resolution=resolution, dtype=dtype,
                                 batch=batch, params="float32", param_bytes=param_bytes,
                                 lower_s=lower_s, compile_s=total_s, plan=plan,
                                 cudnn_calls=cudnn, attention_calls=attention_sites(sampler)))
                print(f"  {resolution} px {dtype} batch {batch}: compile {total_s:.1f} s, "
                      f"plan {plan.get('total', 0) / GiB:.2f} GiB", flush=True)
            if args.bf16_params:
                full = sampler.state
                sampler.state = bf16_matrices(full)
                batch = min(args.batches)
                compiled, lower_s, total_s, cudnn = compile_program(sampler, batch, args)
                rows.append(dict(kind="sampler", resolution=resolution, dtype=dtype,
                                 batch=batch, params="bfloat16 matrices",
                                 param_bytes=tree_bytes(sampler.state), lower_s=lower_s,
                                 compile_s=total_s, plan=plan_bytes(compiled),
                                 cudnn_calls=cudnn, attention_calls=attention_sites(sampler)))
                sampler.state = full
            fit = largest_batch(measured, args, sampler, rows, resolution, dtype)
            rows.append(dict(kind="largest", resolution=resolution, dtype=dtype, **fit))
            jax.clear_caches()
    return rows


def together_modes(args) -> list[tuple[str, int]]:
    """(mode, encoder bytes resident while sampling): freed, or kept in bf16 / float32
    (``sample.py`` today loads it in float32 and keeps it)."""
    return [("separate", 0), ("together, bf16 encoder", args.encoder_bytes["bfloat16"]),
            ("together, float32 encoder", args.encoder_bytes["float32"])]


def largest_fitting(plan_of: Callable[[int], float], known: dict[int, float], target: float,
                    max_new: int) -> dict:
    """The largest batch b with ``plan_of(b) <= target``, for a plan that grows with b.

    ``known`` (batch -> plan) seeds the search and collects every evaluation. A secant
    step through the nearest known points picks each next batch (XLA reuses buffers, so
    plans grow a little less than linearly); at most ``max_new`` new evaluations.
    Returns ``batch`` (0 if batch 1 does not fit), ``confirmed`` (b fits and b + 1 was
    evaluated and does not) and ``evaluated`` (how many new batches were tried).
    """
    evaluated = 0
    while True:
        fits = sorted(b for b, v in known.items() if v <= target)
        over = sorted(b for b, v in known.items() if v > target)
        lo, hi = (fits[-1] if fits else 0), (over[0] if over else None)
        if hi == 1 or (hi is not None and hi == lo + 1) or evaluated >= max_new:
            return dict(batch=lo, confirmed=hi is not None and hi == lo + 1,
                        evaluated=evaluated)
        if hi is None:  # extrapolate through the two largest known batches
            a, b = sorted(known)[-2:]
        else:  # interpolate between the bracket (or the two smallest above it)
            a, b = (lo, hi) if lo else sorted(known)[:2]
        slope = (known[b] - known[a]) / (b - a)
        guess = int(a + (target - known[a]) // slope) if slope > 0 else 2 * max(known)
        upper = hi - 1 if hi is not None else max(guess, lo + 1)
        batch = min(max(guess, lo + 1), upper)  # never a known batch: all fit <= lo < hi
        known[batch] = plan_of(batch)
        evaluated += 1


def largest_batch(measured: dict, args, sampler, rows, resolution, dtype) -> dict:
    """The largest batch whose plan fits ``--card-gib`` for each :func:`together_modes`,
    searched by compiling (:func:`largest_fitting`); the first guess is the affine fit
    through the two smallest compiled batches."""
    if len(measured) < 2 or None in measured.values():
        return dict(error="needs two compiled batches with a plan")
    card = args.card_gib * GiB

    def compile_batch(batch: int) -> float:
        compiled, _, total_s, _ = compile_program(sampler, batch, args)
        measured[batch] = plan_bytes(compiled)["total"]
        print(f"  {resolution} px {dtype} batch {batch}: compile {total_s:.1f} s, "
              f"plan {measured[batch] / GiB:.3g} GiB", flush=True)
        return measured[batch]

    (b0, p0), (b1, p1) = sorted(measured.items())[:2]
    slope = (p1 - p0) / (b1 - b0)
    fits = {}
    for mode, extra in together_modes(args):
        predicted = int((card - extra - (p0 - slope * b0)) // slope) if slope > 0 else 0
        fit = dict(predicted=max(predicted, 0), slope_bytes=slope)
        if args.verify:
            known = {b: v + extra for b, v in measured.items()}
            found = largest_fitting(lambda b: compile_batch(b) + extra, known, card,
                                    args.max_compiles)
            fit.update(found)
            fit["checked"] = {str(b): known[b] for b in (found["batch"], found["batch"] + 1)
                              if b in known}
        fits[mode] = fit
    return fits


def timing(args, cfg) -> list[dict]:
    """Seconds per image with random weights and prompt features (allocates everything)."""
    import jax
    import numpy as np

    from pixelflow_jax.flops import sampling_flops

    rows = []
    p, L = cfg.params, args.context_length
    rng = np.random.default_rng(0)
    for resolution in args.resolutions:
        for dtype in args.dtypes:
            start = time.perf_counter()
            sampler = make_sampler(cfg, resolution, dtype, weights=True)
            jax.block_until_ready(sampler.state)
            build_s = time.perf_counter() - start
            for batch in args.batches:
                # Traced once more to read the program's attention calls (a few seconds).
                cudnn = sampler.lower(batch, args.steps, context_length=L).as_text() \
                    .count(CUDNN_CALL)
                compile_s = sampler.compile(batch, args.steps, context_length=L)
                # Prompt features: 11 real tokens, the negative prompt's 1 (``</s>``).
                context = rng.standard_normal((batch, L, p.cross_attention_dim), np.float32)
                mask = np.zeros((batch, L), np.float32)
                mask[:, :min(11, L)] = 1
                null_mask = np.zeros((1, L), np.float32)
                null_mask[:, 0] = 1
                null = rng.standard_normal((1, L, p.cross_attention_dim), np.float32)

                def run():
                    out = sampler.sample(0, np.arange(batch), steps=args.steps,
                                         guidance=args.cfg, context=context,
                                         context_mask=mask, null_context=null,
                                         null_context_mask=null_mask)
                    return jax.block_until_ready(out.x)
                for _ in range(args.warmups):
                    run()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    x = run()
                    times.append(time.perf_counter() - start)
                if sampler.num_compilations != 1:
                    raise RuntimeError("sampling recompiled the program compiled ahead")
                median = sorted(times)[len(times) // 2]
                res = list(sampler.resolutions)
                flop = sampling_flops(p, res, [args.steps] * len(res), [2] * len(res))
                device = jax.devices()[0]
                stats = device.memory_stats() or {}
                peak = stats.get("peak_bytes_in_use", 0) / MiB if device.platform != "cpu" \
                    else peak_rss_mb()
                rows.append(dict(kind="time", resolution=resolution, dtype=dtype, batch=batch,
                                 steps=args.steps, guidance=args.cfg, build_s=build_s,
                                 compile_s=compile_s, s_per_image=median / batch,
                                 gflop=flop / 1e9, tflops=flop * batch / median / 1e12,
                                 peak_mb=peak, cudnn_calls=cudnn,
                                 attention_calls=attention_sites(sampler),
                                 finite=bool(np.isfinite(np.asarray(x)).all()),
                                 where=f"{device.platform}: {device.device_kind}"))
            del sampler
            jax.clear_caches()
    return rows


def gib(n) -> str:
    return "n/a" if n is None else f"{n / GiB:.4g}"


def report(rows: list[dict], args) -> None:
    enc = [r for r in rows if r["kind"] == "encoder"]
    samp = [r for r in rows if r["kind"] == "sampler"]
    if enc:
        print("\nText encoder (flan-t5-xl sizes), 2 rows (prompt + negative prompt):\n")
        print("| dtype | sequence | parameters GiB | argument GiB | temp GiB | total GiB | "
              "compile s |")
        print("|---|---|---|---|---|---|---|")
        for r in enc:
            pl = r["plan"]
            print(f"| {r['dtype']} | {r['length']} | {gib(r['param_bytes'])} | "
                  f"{gib(pl.get('argument'))} | {gib(pl.get('temp'))} | {gib(pl.get('total'))} "
                  f"| {r['compile_s']:.1f} |")
    if samp:
        print(f"\nSampling program (Euler {args.steps} steps/stage, guidance: 2 rows per image, "
              f"prompt length {args.context_length}):\n")
        print("| px | compute | parameters | batch | trace + lower s | compile s | "
              "argument GiB | output GiB | temp GiB | total GiB | + bf16 encoder GiB | "
              "+ float32 encoder GiB | cuDNN attention calls / all |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in samp:
            pl = r["plan"]
            total = pl.get("total")
            print(f"| {r['resolution']} | {r['dtype']} | {r['params']} | {r['batch']} | "
                  f"{r['lower_s']:.1f} | {r['compile_s']:.1f} | {gib(pl.get('argument'))} | "
                  f"{gib(pl.get('output'))} | {gib(pl.get('temp'))} | {gib(total)} | "
                  f"{gib(total and total + args.encoder_bytes['bfloat16'])} | "
                  f"{gib(total and total + args.encoder_bytes['float32'])} | "
                  f"{r['cudnn_calls']} / {r.get('attention_calls', '?')} |")
        print(f"\nLargest batch on a card with {args.card_gib:g} GiB usable (24 GB: "
              f"{CARD_GIB:g}):\n")
        print("| px | compute | encoder | affine guess | largest batch | plans at it and +1, "
              "GiB | confirmed | compiles added |")
        print("|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["kind"] == "largest"):
            for mode, _ in together_modes(args):
                fit = r.get(mode)
                if fit is None:
                    print(f"| {r['resolution']} | {r['dtype']} | {mode} | {r.get('error')} "
                          "| | | | |")
                    continue
                checked = ", ".join(f"{b}: {gib(v)}" for b, v in fit.get("checked", {}).items())
                print(f"| {r['resolution']} | {r['dtype']} | {mode} | {fit['predicted']} | "
                      f"{fit.get('batch', 'not searched')} | {checked} | "
                      f"{fit.get('confirmed', 'n/a')} | {fit.get('evaluated', 0)} |")
    times = [r for r in rows if r["kind"] == "time"]
    if times:
        print("\n| px | compute | batch | steps | compile s | s/image | TFLOP/s | peak MB | "
              "cuDNN attention calls / all | device |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in times:
            print(f"| {r['resolution']} | {r['dtype']} | {r['batch']} | {r['steps']} | "
                  f"{r['compile_s']:.1f} | {r['s_per_image']:.4g} | {r['tflops']:.3g} | "
                  f"{r['peak_mb']:,.0f} | {r['cudnn_calls']} / {r['attention_calls']} | "
                  f"{r['where']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pixelflow_xl_t2i.yaml",
                    help="text-to-image model config (default: XL)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="config overrides, e.g. model.params.depth=1 (smaller smoke runs)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                    help="images per program (with guidance 2 model rows each)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"],
                    help="transformer compute dtype (bfloat16: what a GPU runs)")
    ap.add_argument("--steps", type=int, default=10, help="Euler steps per stage")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance (> 1: 2 rows per image)")
    ap.add_argument("--context-length", type=int, default=16,
                    help="prompt tokens after bucketing (16: a prompt of up to 15 tokens)")
    ap.add_argument("--t5-layers", type=int, default=24, help="encoder blocks (flan-t5-xl: 24)")
    ap.add_argument("--t5-heads", type=int, default=32, help="encoder heads (flan-t5-xl: 32)")
    ap.add_argument("--t5-d-kv", type=int, default=64, help="encoder head width (64)")
    ap.add_argument("--t5-d-ff", type=int, default=5120, help="encoder MLP width (5120)")
    ap.add_argument("--t5-vocab", type=int, default=32128, help="encoder vocabulary (32128)")
    ap.add_argument("--card-gib", type=float, default=CARD_GIB,
                    help=f"usable memory of the card planned for (default {CARD_GIB:g}: a "
                         "24 GB card less the CUDA context)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="report the affine prediction only (no search by compiling)")
    ap.add_argument("--max-compiles", type=int, default=6,
                    help="compiles the largest-batch search may add per mode (default 6)")
    ap.add_argument("--no-bf16-params", dest="bf16_params", action="store_false",
                    help="skip the plan with bfloat16 transformer matrices")
    ap.add_argument("--time", action="store_true",
                    help="allocate random weights and time sampling (GPU); no plans")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs (--time)")
    ap.add_argument("--warmups", type=int, default=0,
                    help="untimed runs before them (--time; the program is compiled ahead)")
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if min(args.batches) < 1 or args.steps < 1 or args.repeats < 1 or args.context_length < 1:
        ap.error("--batches, --steps, --repeats and --context-length must be positive")
    if args.cfg <= 1:
        ap.error("--cfg must be above 1 (the plan assumes the guided 2-row batch)")

    import jax
    if args.cache:
        from pixelflow_jax.runtime import enable_compilation_cache
        enable_compilation_cache(args.cache)
    from pixelflow_jax.config import load_config
    from pixelflow_jax.errors import UserError

    try:
        cfg = load_config(os.path.join(ROOT, args.config), args.overrides)
    except UserError as e:
        ap.error(str(e))
    p = cfg.params
    if p.cross_attention_dim is None:
        ap.error(f"{args.config} is not a text-to-image config (no cross_attention_dim)")
    device = jax.devices()[0]
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, jax {jax.__version__}, {device.platform}: "
          f"{device.device_kind}; load average {load[0]:.2f} before")
    print(f"model: {args.config} {' '.join(args.overrides)} (depth {p.depth}, "
          f"{p.num_attention_heads} x {p.attention_head_dim}, text width "
          f"{p.cross_attention_dim})")
    if args.time:
        rows = timing(args, cfg)
    else:
        rows = encoder_plans(args, p.cross_attention_dim)
        args.encoder_bytes = {r["dtype"]: r["param_bytes"] for r in rows}
        rows += sampler_plans(args, cfg)
    report(rows, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} after ({load[0]:.2f} before)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
