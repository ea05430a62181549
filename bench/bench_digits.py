#!/usr/bin/env python3
"""Quality of the embedded digits model by solver and step count, judged by an independent
classifier (pixelflow_jax.digits): agreement with the requested class, per class, and a
Frechet distance to held-out real digits next to the real-vs-real distance.

    python bench/bench_digits.py                     # Euler 1, 2, 5, 10, 20 steps + Dopri5
    python bench/bench_digits.py --per-class 100 --cfg 2

Every setting draws the same images (seed, image numbers); images/s excludes compilation.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (default: the embedded one)")
    ap.add_argument("--per-class", type=int, default=50, help="images per digit (default 50)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20],
                    help="Euler steps per stage to try")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance (default 4, sample.py's)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-dopri5", action="store_true", help="skip the Dopri5 row")
    args = ap.parse_args()

    import jax
    import numpy as np

    from pixelflow_jax import digits as D
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.default_model import default_checkpoint
    from pixelflow_jax.sampling import Sampler, to_images
    from pixelflow_jax.scheduler import schedule_from_config

    ckpt = args.ckpt or default_checkpoint()
    model, cfg = load_checkpoint(ckpt)
    schedule = schedule_from_config(cfg.scheduler)
    labels = np.repeat(np.arange(10), args.per_class)
    indices = np.arange(len(labels))
    split = D.split_digits()
    clf = D.fit_classifier(split)
    print(f"{ckpt}: {len(labels)} images, guidance {args.cfg}, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.default_backend()} device(s)")
    print(f"{'solver':<16} {'evals/img':>9} {'img/s':>7} {'agree':>6} {'worst class':>11} "
          f"{'FD':>6} {'FD real':>7}")
    runs = [("euler", n) for n in args.steps] + ([] if args.no_dopri5 else [("dopri5", None)])
    for solver, steps in runs:
        sampler = Sampler(model, schedule, cfg.data.resolution, solver=solver,
                          max_steps=max(args.steps))
        kwargs = dict(labels=labels, guidance=args.cfg, steps=steps or 10)
        jax.block_until_ready(sampler.sample(args.seed, indices, **kwargs).x)  # compile
        start = time.perf_counter()
        out = sampler.sample(args.seed, indices, **kwargs)
        images = np.asarray(to_images(out.x))
        rate = len(labels) / (time.perf_counter() - start)
        evals = float(np.asarray(out.stats.evaluations).sum(0).mean())
        q = D.evaluate(images, labels, split=split, clf=clf)
        name = f"euler {steps}" if solver == "euler" else "dopri5"
        worst = int(np.argmin(q.per_class))
        print(f"{name:<16} {evals:>9.0f} {rate:>7.1f} {q.agreement:>6.1%} "
              f"{f'{worst}: {q.per_class[worst]:.0%}':>11} {q.fd:>6.2f} {q.fd_real:>7.2f}")
    print(f"classifier accuracy on held-out real digits: {q.classifier_accuracy:.1%}")


if __name__ == "__main__":
    main()
