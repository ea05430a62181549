#!/usr/bin/env python3
"""Sample images from a PixelFlow checkpoint folder.

Example:
  python sample.py --ckpt CKPT_DIR --classes 207 360 --num-images 4 --out grid.png

User mistakes end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# ImageNet classes shown by default (golden retriever, otter, ...): the usual demo set.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sample.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="checkpoint folder (config.yaml + params/) written by this project or "
                        "by convert_torch.py")
    p.add_argument("--classes", type=_int_list, nargs="+", metavar="ID",
                   help="class ids, space- or comma-separated; default: 8 well-known classes "
                        "for ImageNet models, else the first 10 classes")
    p.add_argument("--num-images", type=int, default=4, metavar="N",
                   help="images per class (one grid row per class)")
    p.add_argument("--seed", type=int, default=42,
                   help="random seed; image i always gets the same noise from (seed, i)")
    p.add_argument("--cfg", type=float, default=4.0,
                   help="classifier-free guidance scale g (stage s uses (g-1) w_s + 1 with "
                        "w = [0, 1/6, 2/3, 1]; 0 disables guidance)")
    p.add_argument("--steps", type=_int_list, nargs="+", default=[[10]], metavar="N",
                   help="Euler steps per stage: one number, or one per stage (e.g. 10,20,20,30)")
    p.add_argument("--shift", type=float, default=1.0,
                   help="noise shift: t <- t / (shift + (1 - shift) t); > 1 spends more steps "
                        "at high noise")
    p.add_argument("--solver", choices=["euler"], default="euler",
                   help="ODE solver (Dopri5 comes with a later release)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU "
                        "(parameters stay float32)")
    p.add_argument("--out", default="samples.png",
                   help="a .png path writes one grid; any other path is a folder of PNGs "
                        "named INDEX_classID.png")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="images per compiled batch (the last batch is padded)")
    p.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="output side length; default the checkpoint's data.resolution")
    p.add_argument("--noise-from", metavar="FILE.npz", default=None,
                   help="use this noise instead of the seed: 'init' [B,C,h,w] and "
                        "'block1'..'block{S-1}' [B,C,H_s,W_s], float32 NCHW, B = all images")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "chunked"], default="auto",
                   help="attention kernel; auto = cuDNN flash attention on GPU in bf16, "
                        "else XLA (query-chunked for very long sequences)")
    p.add_argument("--progress", choices=["auto", "stages", "batches", "none"], default="auto",
                   help="stages: live display of every stage's steps (its program uses host "
                        "callbacks, which JAX's persistent compilation cache never stores, so "
                        "it compiles on every run); batches: a line per batch (cached); "
                        "auto: stages on a terminal, else batches")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors "
                                                        "(same as --progress none)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint; raise UserError."""
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.images import check_output

    args.steps = [n for group in args.steps for n in group]
    if args.classes is not None:
        args.classes = [c for group in args.classes for c in group]
    if any(n < 1 for n in args.steps):
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not args.cfg >= 0 or args.cfg == float("inf"):
        raise UserError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if not args.shift > 0 or args.shift == float("inf"):
        raise UserError(f"--shift must be a finite number > 0, got {args.shift}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.noise_from is not None and not os.path.isfile(args.noise_from):
        raise UserError(f"--noise-from {args.noise_from}: no such file")
    args.out_kind = check_output(args.out)
    if args.quiet:
        args.progress = "none"
    elif args.progress == "auto":
        args.progress = "stages" if sys.stderr.isatty() else "batches"


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from pixelflow_jax import runtime
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.generate import ImageRequest, sample_class_images
    from pixelflow_jax.images import make_grid, save_png
    from pixelflow_jax.noise import load_noise_npz
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.scheduler import schedule_from_config

    validate_args(args)
    runtime.enable_compilation_cache()
    dtype = runtime.compute_dtype(args.dtype)
    model, cfg = load_checkpoint(args.ckpt, dtype=dtype, attention_impl=args.attention)
    p = cfg.params
    if p.num_classes == 0:
        raise UserError(f"{args.ckpt} is a text-to-image model; sample.py draws class-"
                        "conditional images (text prompts need a text encoder)")
    classes = args.classes if args.classes is not None else (
        list(IMAGENET_DEMO_CLASSES) if p.num_classes == 1000 else list(range(min(p.num_classes,
                                                                                 10))))
    bad = [c for c in classes if not 0 <= c < p.num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is outside [0, {p.num_classes})")
    schedule = schedule_from_config(cfg.scheduler)
    steps = schedule.steps_per_stage(args.steps[0] if len(args.steps) == 1 else args.steps)
    resolution = args.resolution or cfg.data.resolution
    request = ImageRequest(classes=tuple(classes), num_images=args.num_images, seed=args.seed,
                           guidance=args.cfg, steps=tuple(steps), shift=args.shift)
    n = len(request.labels)
    sampler = Sampler(model, schedule, resolution, report_progress=args.progress == "stages")
    noise = None
    if args.noise_from:
        noise = load_noise_npz(args.noise_from, n, sampler.resolutions, p.in_channels)
    batch = min(args.batch_size, n)
    if not args.quiet:
        print(f"{n} images of {resolution} px, classes {classes}, {steps} Euler steps, "
              f"guidance {args.cfg}, shift {args.shift}, {np.dtype(dtype).name} on "
              f"{runtime.jax.default_backend()}", file=sys.stderr)
    if noise is None:
        if not args.quiet:
            note = ("the live stage display is never cached; --progress batches is"
                    if args.progress == "stages" else "cached for later runs")
            print(f"compiling for batch {batch} ({note})...", file=sys.stderr)
        seconds = sampler.precompile(batch, steps)
        if not args.quiet:
            print(f"compiled in {seconds:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    images = sample_class_images(sampler, request, batch, noise, progress=args.progress)
    elapsed = time.perf_counter() - start
    if args.out_kind == "grid":
        save_png(args.out, make_grid(images, rows=len(classes)))
    else:
        os.makedirs(args.out, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, request.labels)):
            save_png(os.path.join(args.out, f"{i:06d}_class{label}.png"), img)
    if not args.quiet:
        print(f"wrote {args.out} ({n} images in {elapsed:.1f} s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    from pixelflow_jax.errors import UserError
    try:
        run(args)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sample.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
