#!/usr/bin/env python3
"""Images/s of FID Inception feature extraction (pool_3, mixed_6/conv, logits in one pass).

    python bench/bench_inception.py                       # batch 16, 256-px uint8 input
    python bench/bench_inception.py --batch 32 --dtype float32 bfloat16
    python bench/bench_inception.py --weights classify_image_graph_def.pb --no-torch
    python bench/bench_inception.py --score-cost          # + host-side scoring, 50k estimate

The batch is sharded over every local device (the project's ``data`` mesh; batch
must divide evenly), weights replicated. Weights: He-normal random ones drawn in NumPy
(speed does not depend on values) unless --weights names a real file. Unless --no-torch,
the same batch also runs through torch-fidelity's FeatureExtractorInceptionV3 (float32,
eager PyTorch on CPU, the same weights) for a ratio measured in the same run.
Times are medians of --repeats batches after the first call (compile + run,
reported apart).

--score-cost also times what scoring does besides the network, on random features
(``pixelflow_jax.adm_metrics``, as ``evaluate.py`` calls it): the mean and covariance of
``--pr-size`` rows of 2048 (pool) and 2023 (sFID's spatial) features, FID's and sFID's
Frechet distance (a 2048x2048 and a 2023x2023 covariance product and its scipy ``sqrtm``),
the Inception Score of ``--pr-size`` rows of 1008 logits, and precision/recall of two
``--pr-size`` x 2048 sets (a second call, after the one that compiles). From those it
estimates the time to score ``--num-samples`` (50,000) samples against ADM's
``--num-reference`` (10,000) reference images, compile and image decoding excluded:

    T = (S + R) / images_per_s                       feature extraction of both sets
      + t_stats * (S + R) / n                        statistics, O(N d^2): linear in N
      + t_fid + t_sfid                               O(d^3), independent of N
      + t_is * S / n                                 IS, linear in N
      + t_pr * (R^2 + S^2 + R S) / (3 n^2)           precision/recall: both sets' k-NN radii
                                                     (R^2, S^2 pairs) and the cross pass (R S),
                                                     measured on n x n sets (3 n^2 pairs)

with S = --num-samples, R = --num-reference, n = --pr-size (ADM's reference batch holds its
own mu/sigma, but evaluate.py still extracts its 10k images for precision/recall).
"""

from __future__ import annotations

import argparse
import importlib
import json
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


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def random_inception(dtype, seed: int = 0):
    """A FIDInception with He-normal convolution and logit weights drawn in NumPy, identity
    BatchNorm. (``FIDInception(rngs=...)`` draws with ``jax.random``, one eager program per
    parameter shape: ~20 s of compiles on a 2-core CPU before the first batch.)"""
    import jax
    import numpy as np
    from flax import nnx

    from pixelflow_jax.inception import abstract_inception
    from pixelflow_jax.inception_weights import model_from_weights

    rng = np.random.default_rng(seed)
    flat = {}
    leaves = jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(abstract_inception())))
    for path, leaf in leaves:
        name = ".".join(str(k.key) for k in path)
        shape = tuple(leaf.shape)
        if name.endswith("kernel"):  # conv HWIO or fc [in, out]: fan-in = all but the last
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = (rng.standard_normal(shape, np.float32)
                          * np.float32(np.sqrt(2.0 / fan_in)))
        elif name.endswith(("scale", "var")):
            flat[name] = np.ones(shape, np.float32)
        else:  # BatchNorm bias and mean
            flat[name] = np.zeros(shape, np.float32)
    return model_from_weights(flat, dtype)


def bench_jax(args, images, dtype_name: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pixelflow_jax import distributed
    from pixelflow_jax.inception import make_extractor
    from pixelflow_jax.inception_weights import load_inception

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    model = (load_inception(args.weights, dtype=dtype) if args.weights
             else random_inception(dtype))
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


def pair_scale(num_samples: int, num_reference: int, n: int) -> float:
    """Distance pairs of precision/recall on R reference and S sample features (both sets'
    k-NN radii, R^2 + S^2, and the cross pass, R S) over those of two n-row sets (3 n^2)."""
    r, s = num_reference, num_samples
    return (r * r + s * s + r * s) / (3.0 * n * n)


def score_cost(args) -> dict:
    """Host-side scoring times on random features (see the module docstring)."""
    import jax
    import numpy as np

    importlib.import_module("scipy.linalg")  # imported before the clock starts

    from pixelflow_jax import adm_metrics

    n, (d_pool, d_spatial) = args.pr_size, args.feature_dims
    rng = np.random.default_rng(1)
    # Two different Gaussians, so FID > 0 and precision/recall are not trivially 1.
    a_pool = rng.standard_normal((n, d_pool), np.float32)
    b_pool = rng.standard_normal((n, d_pool), np.float32) * np.float32(1.1) + np.float32(0.1)
    a_sp = rng.standard_normal((n, d_spatial), np.float32)
    b_sp = rng.standard_normal((n, d_spatial), np.float32) * np.float32(1.1)
    logits = rng.standard_normal((n, 1008), np.float32) * np.float32(3.0)

    sa_pool, t_pool = _timed(lambda: adm_metrics.statistics(a_pool))
    sa_sp, t_sp = _timed(lambda: adm_metrics.statistics(a_sp))
    sb_pool, sb_sp = adm_metrics.statistics(b_pool), adm_metrics.statistics(b_sp)
    fid, t_fid = _timed(lambda: adm_metrics.frechet_distance(sa_pool, sb_pool))
    sfid, t_sfid = _timed(lambda: adm_metrics.frechet_distance(sa_sp, sb_sp))
    _, t_is = _timed(lambda: adm_metrics.inception_score(logits))
    _, t_pr_first = _timed(lambda: adm_metrics.precision_recall(a_pool, b_pool))
    pr, t_pr = _timed(lambda: adm_metrics.precision_recall(a_pool, b_pool))
    device = jax.devices()[0]
    return dict(impl="score", rows=n, pool_dim=d_pool, spatial_dim=d_spatial,
                stats_s=t_pool + t_sp, stats_pool_s=t_pool, stats_spatial_s=t_sp,
                fid_s=t_fid, sfid_s=t_sfid, is_s=t_is, pr_s=t_pr, pr_first_s=t_pr_first,
                fid=fid, sfid=sfid, precision=pr.precision, recall=pr.recall,
                pr_where=f"{device.platform}: {device.device_kind}",
                host_cores=os.cpu_count())


def estimate(score: dict, images_per_s: float, num_samples: int, num_reference: int) -> dict:
    """The module docstring's T, term by term (seconds)."""
    s, r, n = num_samples, num_reference, score["rows"]
    scale = pair_scale(s, r, n)
    terms = dict(extraction_s=(s + r) / images_per_s,
                 stats_s=score["stats_s"] * (s + r) / n,
                 fid_sfid_s=score["fid_s"] + score["sfid_s"],
                 is_s=score["is_s"] * s / n,
                 pr_s=score["pr_s"] * scale)
    return dict(terms, total_s=sum(terms.values()), pair_scale=scale, images_per_s=images_per_s,
                num_samples=s, num_reference=r)


def formula(est: dict, score: dict) -> str:
    """The estimate with its numbers, in the form device_check.py's table shows it."""
    return (f"({est['num_samples']} + {est['num_reference']}) / {est['images_per_s']:.4g} "
            f"images/s + {score['stats_s']:.4g} s x {(est['num_samples'] + est['num_reference'])}"
            f"/{score['rows']} statistics + {score['fid_s'] + score['sfid_s']:.4g} s FID+sFID + "
            f"{score['is_s']:.4g} s x {est['num_samples']}/{score['rows']} IS + "
            f"{score['pr_s']:.4g} s x {est['pair_scale']:.4g} precision/recall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--side", type=int, default=256, help="input side in pixels (default 256)")
    ap.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                    help="convolution compute dtype(s), one after the other in this process "
                         "(bfloat16: not for reported numbers)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches (default 3)")
    ap.add_argument("--weights", default=None,
                    help="a real weight file (.pb or .pth); default: random weights")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the torch-fidelity (eager PyTorch) comparison")
    ap.add_argument("--score-cost", action="store_true",
                    help="also time the host-side scoring and estimate the time to score "
                         "--num-samples against --num-reference")
    ap.add_argument("--pr-size", type=int, default=5000,
                    help="rows of each random feature set timed (default 5000)")
    ap.add_argument("--feature-dims", type=int, nargs=2, default=[2048, 2023],
                    metavar=("POOL", "SPATIAL"),
                    help="feature sizes of FID and sFID (default 2048 2023; smaller only for "
                         "smoke tests)")
    ap.add_argument("--num-samples", type=int, default=50000, help="for the estimate (50000)")
    ap.add_argument("--num-reference", type=int, default=10000,
                    help="for the estimate (ADM's reference batches: 10000)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file "
                                               "(rewritten after each measurement)")
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    args = ap.parse_args()
    if min(args.batch, args.side, args.repeats, args.num_samples, args.num_reference) < 1:
        ap.error("--batch, --side, --repeats and the set sizes must be positive")
    if args.pr_size < 4 or min(args.feature_dims) < 1:
        ap.error("--pr-size must be at least 4 (k = 3 neighbours), the dims positive")

    import jax
    import numpy as np

    if args.cache:
        from pixelflow_jax.runtime import enable_compilation_cache
        enable_compilation_cache(args.cache)
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    load = os.getloadavg()
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.side, args.side, 3),
                                               dtype=np.uint8)
    device = jax.devices()[0]
    where = f"{device.platform}: {device.device_kind} x{jax.local_device_count()}"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f}; jax {jax.__version__} on {where}")
    print(f"batch {args.batch} x {args.side} px uint8, median of {args.repeats}")
    print("| impl | first call s (compile + run) | s/batch | images/s |\n|---|---|---|---|",
          flush=True)
    models = {}
    for dtype in args.dtype:
        first_s, jax_s, models[dtype] = bench_jax(args, images, dtype)
        save(dict(impl="jax", dtype=dtype, batch=args.batch, side=args.side, first_s=first_s,
                  s_per_batch=jax_s, images_per_s=args.batch / jax_s, where=where))
        print(f"| jax ({dtype}) | {first_s:.1f} | {jax_s:.3f} | {args.batch / jax_s:.1f} |",
              flush=True)
    if not args.no_torch:
        import jax.numpy as jnp
        model = models["float32"] if "float32" in models else random_inception(jnp.float32)
        torch_s = bench_torch(args, images, model)
        save(dict(impl="torch-fidelity", dtype="float32", batch=args.batch, side=args.side,
                  s_per_batch=torch_s, images_per_s=args.batch / torch_s))
        print(f"| torch-fidelity (float32, eager) | - | {torch_s:.3f} | "
              f"{args.batch / torch_s:.1f} |")
        for r in rows:
            if r["impl"] == "jax":
                print(f"speed-up of jax ({r['dtype']}) over torch-fidelity: "
                      f"{torch_s / r['s_per_batch']:.2f}x")
    if args.score_cost:
        score = score_cost(args)
        save(score)
        n = score["rows"]
        print(f"\nHost-side scoring on random features ({n} rows; precision/recall on "
              f"{score['pr_where']}):\n| step | s |\n|---|---|")
        print(f"| statistics (mean, np.cov float64) of {n} x {score['pool_dim']} | "
              f"{score['stats_pool_s']:.3f} |")
        print(f"| statistics of {n} x {score['spatial_dim']} | {score['stats_spatial_s']:.3f} |")
        print(f"| FID Frechet distance ({score['pool_dim']}x{score['pool_dim']} product, scipy "
              f"sqrtm) | {score['fid_s']:.3f} |")
        print(f"| sFID Frechet distance ({score['spatial_dim']}x{score['spatial_dim']}) | "
              f"{score['sfid_s']:.3f} |")
        print(f"| Inception Score of {n} x 1008 logits | {score['is_s']:.3f} |")
        print(f"| precision/recall, {n} x {n} x {score['pool_dim']}, first call (compile) | "
              f"{score['pr_first_s']:.3f} |")
        print(f"| precision/recall, {n} x {n} x {score['pool_dim']} | {score['pr_s']:.3f} |")
        print(f"(FID {score['fid']:.4g}, sFID {score['sfid']:.4g}, precision "
              f"{score['precision']:.4f}, recall {score['recall']:.4f}: random features)")
        for r in [r for r in rows if r["impl"] == "jax"]:
            est = estimate(score, r["images_per_s"], args.num_samples, args.num_reference)
            save(dict(impl="estimate", dtype=r["dtype"], formula=formula(est, score), **est))
            print(f"\nEstimated time to score {args.num_samples:,} samples against "
                  f"{args.num_reference:,} reference images, jax {r['dtype']}: "
                  f"{est['total_s']:,.0f} s = {est['total_s'] / 3600:.2f} h (compile and "
                  f"decoding excluded)\n  = {formula(est, score)}\n  = "
                  + " + ".join(f"{est[k]:.1f}" for k in ("extraction_s", "stats_s",
                                                          "fid_sfid_s", "is_s", "pr_s")) + " s")
    print(f"\nload average {os.getloadavg()[0]:.2f} after ({load[0]:.2f} before)")


if __name__ == "__main__":
    main()
