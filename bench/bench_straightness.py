#!/usr/bin/env python3
"""Straightness per stage (DESIGN §11) of several checkpoints, as one markdown table.

    python bench/bench_straightness.py --ckpt digits --ckpt runs/reflow/ema --ckpt digits-1step
    python bench/bench_straightness.py --ckpt digits --steps 10 32 --num 300

Every model draws the same images (image i: class i mod num_classes, noise from
(seed, i)) with the same fine Euler solver; each at its own sampling guidance
(its config's ``sample.guidance``, else 4: a teacher guided, a student unguided)
unless ``--cfg`` gives one per checkpoint. S is the dt-weighted mean squared
deviation of the velocity from the stage's displacement, per value (0 = straight);
S/|vbar|^2 divides by the displacement's mean square. The last columns compare
each model's S with the first model's, stage by stage.
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
    ap.add_argument("--ckpt", action="append", required=True,
                    help="checkpoint folder or embedded short name (digits, digits-1step); "
                         "repeat for each model, the first is the reference")
    ap.add_argument("--name", action="append", default=None,
                    help="row label per --ckpt (default: the folder name)")
    ap.add_argument("--cfg", type=float, action="append", default=None,
                    help="guidance per --ckpt (default: each checkpoint's sample.guidance, "
                         "else 4)")
    ap.add_argument("--steps", type=int, nargs="+", default=[32],
                    help="Euler steps per stage of the measure; several values give one "
                         "row per model and value (default 32)")
    ap.add_argument("--num", type=int, default=200, help="images (default 200)")
    ap.add_argument("--batch", type=int, default=100, help="images per batch (default 100)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    for flag in ("name", "cfg"):
        given = getattr(args, flag)
        if given is not None and len(given) != len(args.ckpt):
            ap.error(f"give --{flag} once per --ckpt ({len(args.ckpt)}), got {len(given)}")

    import jax

    from pixelflow_jax import defaults, reflow
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.default_model import resolve_checkpoint
    from pixelflow_jax.scheduler import schedule_from_config

    rows, reference = [], {}
    for k, ckpt in enumerate(args.ckpt):
        folder = resolve_checkpoint(ckpt)
        model, cfg = load_checkpoint(folder)
        carried = getattr(getattr(cfg, "sample", None), "guidance", None)
        guidance = args.cfg[k] if args.cfg else (carried if carried is not None
                                                 else defaults.GUIDANCE)
        name = args.name[k] if args.name else ckpt.rstrip("/").split("/")[-1]
        schedule = schedule_from_config(cfg.scheduler)
        sampler = reflow.straightness_sampler(model, schedule, cfg.data.resolution,
                                              max_steps=max(args.steps))
        for steps in args.steps:
            start = time.perf_counter()
            r = reflow.measure_straightness(sampler, args.num, seed=args.seed,
                                            guidance=guidance, steps=steps,
                                            batch_size=args.batch)
            seconds = time.perf_counter() - start
            reference.setdefault(steps, r.deviation)
            rows.append((name, guidance, steps, r, reference[steps], seconds))
            print(f"{name} ({steps} steps): S {[f'{d:.4g}' for d in r.deviation]}, "
                  f"{seconds:.0f} s", file=sys.stderr)
        S = schedule.num_stages

    head = (["model", "guidance", "steps/stage"] + [f"S stage {s + 1}" for s in range(S)]
            + [f"S/\\|vbar\\|² stage {s + 1}" for s in range(S)]
            + [f"S vs first, stage {s + 1}" for s in range(S)])
    print(f"{args.num} images, seed {args.seed}; {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), JAX {jax.__version__}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, guidance, steps, r, ref, _ in rows:
        cells = ([name, f"{guidance:g}", str(steps)] + [f"{d:.4g}" for d in r.deviation]
                 + [f"{x:.3g}" for x in r.relative]
                 + [f"{d / q:.2f}x" if q > 0 else "-" for d, q in zip(r.deviation, ref)])
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
