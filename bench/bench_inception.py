#!/usr/bin/env python3
"""Images/s of FID Inception feature extraction (pool_3, mixed_6/conv, logits in one pass).

    python bench/bench_inception.py                       # batch 16, 256-px uint8 input
    python bench/bench_inception.py --batch 32 --dtype bfloat16
    python bench/bench_inception.py --weights classify_image_graph_def.pb --no-torch

The batch is sharded over every local device (the project's ``data`` mesh; batch
must divide evenly), weights replicated. Weights: random He-normal (speed does not
depend on values) unless --weights names a real file. Unless --no-torch, the same
batch also runs through torch-fidelity's FeatureExtractorInceptionV3 (float32,
eager PyTorch on CPU, the same weights) for a ratio measured in the same run.
Times are medians of --repeats batches after the first call (compile + run,
reported apart).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(args, images):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pixelflow_jax import distributed
    from pixelflow_jax.inception import FIDInception, make_extractor
    from pixelflow_jax.inception_weights import load_inception

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = (load_inception(args.weights, dtype=dtype) if args.weights
             else FIDInception(dtype=dtype, rngs=nnx.Rngs(0)))
    mesh = distributed.data_mesh(jax.local_devices())
    if args.batch % mesh.size:
        sys.exit(f"--batch {args.batch} must be a multiple of the {mesh.size} local devices")
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, distributed.replicate(state, mesh))
    extract = make_extractor(model)
    x = distributed.to_global(images, mesh)
    start = time.perf_counter()
    jax.block_until_ready(extract(x))
    first = time.perf_counter() - start
    seconds = _median_time(lambda: jax.block_until_ready(extract(x)), args.repeats)
    return first, seconds, model


def bench_torch(args, images, model):
    import jax
    import numpy as np
    import torch
    from flax import nnx

    import inception_fixtures as fx
    from pixelflow_jax.inception_weights import _torch_name
    from pixelflow_jax.torch_format import write_state_dict

    torch.set_num_threads(os.cpu_count() or 1)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    flat = {".".join(str(k.key) for k in p): np.asarray(v, np.float32) for p, v in leaves}
    sd = {}
    for name, a in flat.items():
        key, transposed = _torch_name(name)
        sd[key] = np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4
                                       else a.T if transposed else a)
    sd["fc.bias"] = np.zeros(1008, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.pth")
        write_state_dict(path, sd)
        net = fx.torch_fidelity_inception(path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def run():
        with torch.no_grad():
            net(x)
    run()
    return _median_time(run, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--side", type=int, default=256, help="input side in pixels (default 256)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="convolution compute dtype (bfloat16: not for reported numbers)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches (default 3)")
    ap.add_argument("--weights", default=None,
                    help="a real weight file (.pb or .pth); default: random weights")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the torch-fidelity (eager PyTorch) comparison")
    args = ap.parse_args()

    import jax
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.side, args.side, 3),
                                               dtype=np.uint8)
    first_s, jax_s, model = bench_jax(args, images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.local_device_count()}")
    print(f"batch {args.batch} x {args.side} px uint8, {args.dtype}, "
          f"median of {args.repeats}")
    print("| impl | first call s (compile + run) | s/batch | images/s |\n|---|---|---|---|")
    print(f"| jax ({args.dtype}) | {first_s:.1f} | {jax_s:.3f} | {args.batch / jax_s:.1f} |")
    if not args.no_torch:
        torch_s = bench_torch(args, images, model)
        print(f"| torch-fidelity (float32, eager) | - | {torch_s:.3f} | "
              f"{args.batch / torch_s:.1f} |")
        print(f"speed-up: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
