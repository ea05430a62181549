#!/usr/bin/env python3
"""Sample images from a PixelFlow checkpoint folder.

Examples:
  python sample.py                      (the embedded digits model: one row per digit)
  python sample.py --ckpt CKPT_DIR --classes 207 360 --num-images 4 --out grid.png
  python sample.py --ckpt CKPT_DIR --solver dopri5 --cfg 2.4 --fid-samples 50000 --out fid/

The batch is spread over every device (and, on a multi-host TPU slice, every
host: run the same command on each). User mistakes end with one line on stderr
and exit code 2; images whose adaptive solve did not finish give exit code 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# ImageNet classes shown by default (golden retriever, otter, ...): the usual demo set.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
EXIT_UNFINISHED = 3


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
                epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", default=None, metavar="DIR",
        help="checkpoint folder (config.yaml + params/) written by this project or by "
             "convert_torch.py (default: the embedded model, a small PixelFlow trained on "
             "handwritten digits, pixelflow_jax/weights/digits)")
    add("--classes", type=_int_list, nargs="+", metavar="ID",
        help="class ids, space- or comma-separated (default: 8 well-known classes for "
             "ImageNet models, else the first 10 classes)")
    add("--num-images", type=int, default=4, metavar="N",
        help="images per class; a grid has one row per class (default 4)")
    add("--seed", type=int, default=42,
        help="random seed; image i always gets the same noise from (seed, i) (default 42)")
    add("--cfg", type=float, default=4.0,
        help="classifier-free guidance g; stage s uses (g-1) w_s + 1 with w = [0, 1/6, 2/3, 1]; "
             "0 disables guidance (default 4; the FID recipe uses 2.4)")
    add("--solver", choices=["euler", "euler-diffrax", "dopri5"], default="euler",
        help="euler: fixed steps (--steps, --shift); euler-diffrax: the same steps through "
             "diffrax; dopri5: adaptive, as the published FID 1.98 (ignores --steps and "
             "--shift, as the official code) (default euler)")
    add("--steps", type=_int_list, nargs="+", default=[[10]], metavar="N",
        help="Euler steps per stage: one number, or one per stage, e.g. 10,20,20,30 (default 10)")
    add("--shift", type=float, default=1.0,
        help="Euler noise shift: t <- t / (shift + (1 - shift) t); > 1 spends more steps at "
             "high noise (default 1)")
    add("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance (default 1e-3)")
    add("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance (default 1e-6)")
    add("--max-steps", type=int, default=1000,
        help="dopri5 step limit per stage; an image that needs more is reported, not written "
             "(default 1000)")
    add("--error-control", choices=["batch", "image"], default="batch",
        help="dopri5: batch = one error norm and step size for each device's batch (official); "
             "image = every image its own steps, independent of batch and device count "
             "(default batch)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU (parameters stay "
             "float32)")
    add("--out", default="samples.png",
        help="a .png path writes one grid; any other path is a folder of PNGs named "
             "INDEX_classID.png, or with --fid-samples INDEX.png (default samples.png)")
    add("--fid-samples", type=int, default=None, metavar="N",
        help="draw N class-balanced images into the --out folder (image i has class "
             "i mod num_classes) and then OUT.npz for the ADM evaluation suite; rerunning "
             "the same command resumes an interrupted run")
    add("--batch-size", type=int, default=16, metavar="B",
        help="images per compiled batch across all devices, rounded up to a multiple of the "
             "device count (default 16)")
    add("--resolution", type=int, default=None, metavar="R",
        help="output side length (default: the checkpoint's data.resolution)")
    add("--noise-from", metavar="FILE.npz", default=None,
        help="use this noise instead of the seed: 'init' [B,C,h,w] and 'block1'..'block{S-1}' "
             "[B,C,H_s,W_s], float32 NCHW, B = all images (blocks may have 2B rows: the "
             "official dopri5 duplicate half's noise)")
    add("--attention", choices=["auto", "xla", "cudnn", "chunked"], default="auto",
        help="attention kernel; auto = cuDNN flash attention on GPU in bf16, else XLA "
             "(query-chunked for long sequences)")
    add("--distributed", choices=["auto", "on", "off"], default="auto",
        help="call jax.distributed.initialize(): auto = when launched on several hosts "
             "(multi-host TPU slice, SLURM, MPI, or a coordinator address)")
    add("--progress", choices=["auto", "stages", "batches", "none"], default="auto",
        help="stages: live display of every Euler stage (its program uses host callbacks, "
             "which JAX's persistent compilation cache never stores, so it compiles on every "
             "run); batches: a line per batch with images/s and time left (cached); "
             "auto: stages on a terminal, else batches")
    add("--quiet", action="store_true", help="print nothing but errors (--progress none)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint; raise UserError."""
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.images import check_output

    args.steps = [n for group in args.steps for n in group]
    if args.classes is not None:
        args.classes = [c for group in args.classes for c in group]
    finite = lambda v: v == v and abs(v) != float("inf")
    if any(n < 1 for n in args.steps):
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not (finite(args.cfg) and args.cfg >= 0):
        raise UserError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if not (finite(args.shift) and args.shift > 0):
        raise UserError(f"--shift must be a finite number > 0, got {args.shift}")
    for name in ("rtol", "atol"):
        if not (finite(getattr(args, name)) and getattr(args, name) > 0):
            raise UserError(f"--{name} must be a finite number > 0, got {getattr(args, name)}")
    for name in ("num_images", "batch_size", "max_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, "
                            f"got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.noise_from is not None and not os.path.isfile(args.noise_from):
        raise UserError(f"--noise-from {args.noise_from}: no such file")
    if args.fid_samples is not None:
        if args.fid_samples < 1:
            raise UserError(f"--fid-samples must be >= 1, got {args.fid_samples}")
        if args.out.lower().endswith(".png"):
            raise UserError("--fid-samples writes a folder of PNGs: give --out a folder path")
        if args.classes is not None or args.noise_from is not None:
            raise UserError("--fid-samples chooses the classes and draws its own noise; "
                            "drop --classes / --noise-from")
    args.out_kind = check_output(args.out)
    if args.quiet:
        args.progress = "none"
    elif args.progress == "auto":
        args.progress = "stages" if sys.stderr.isatty() else "batches"


def say(args, text: str) -> None:
    import jax
    if not args.quiet and jax.process_index() == 0:
        print(text, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from pixelflow_jax import distributed, runtime

    validate_args(args)
    distributed.initialize(args.distributed)  # before anything touches a device
    import jax
    import numpy as np

    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.fid import run_fid
    from pixelflow_jax.generate import (ImageRequest, describe_evaluations, global_batch_size,
                                        sample_class_images)
    from pixelflow_jax.images import make_grid, save_png
    from pixelflow_jax.noise import load_noise_npz
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.scheduler import schedule_from_config
    from pixelflow_jax.solvers import Dopri5Config

    if jax.process_count() > 1 and args.out_kind == "grid":
        raise UserError("on several hosts each host holds only its own images: give --out a "
                        "folder (or use --fid-samples)")
    runtime.enable_compilation_cache()
    dtype = runtime.compute_dtype(args.dtype)
    if args.ckpt is None:
        from pixelflow_jax.default_model import default_checkpoint
        args.ckpt = default_checkpoint()
    model, cfg = load_checkpoint(args.ckpt, dtype=dtype, attention_impl=args.attention)
    p = cfg.params
    if p.num_classes == 0:
        raise UserError(f"{args.ckpt} is a text-to-image model; sample.py draws class-"
                        "conditional images (text prompts need a text encoder)")
    classes = args.classes if args.classes is not None else (
        list(IMAGENET_DEMO_CLASSES) if p.num_classes == 1000
        else list(range(min(p.num_classes, 10))))
    bad = [c for c in classes if not 0 <= c < p.num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is outside [0, {p.num_classes})")
    schedule = schedule_from_config(cfg.scheduler)
    steps = schedule.steps_per_stage(args.steps[0] if len(args.steps) == 1 else args.steps)
    resolution = args.resolution or cfg.data.resolution
    dopri5 = Dopri5Config(rtol=args.rtol, atol=args.atol, max_steps=args.max_steps,
                          error_control=args.error_control)
    sampler = Sampler(model, schedule, resolution, solver=args.solver, dopri5=dopri5,
                      report_progress=args.progress == "stages")
    progress = args.progress if args.solver == "euler" or args.progress == "none" else "batches"
    n = args.fid_samples or len(classes) * args.num_images
    how = (f"{steps} Euler steps, shift {args.shift}" if args.solver != "dopri5" else
           f"dopri5 (rtol {args.rtol}, atol {args.atol}, {args.error_control} error control)")
    say(args, f"{n} images of {resolution} px, {how}, guidance {args.cfg}, "
              f"{np.dtype(dtype).name} on {sampler.mesh.size} {jax.default_backend()} device(s)")
    batch = global_batch_size(args.batch_size, sampler, n)
    if args.noise_from is None:
        note = ("the live stage display is never cached" if progress == "stages"
                else "cached for later runs")
        say(args, f"compiling for batch {batch} ({note})...")
        say(args, f"compiled in {sampler.precompile(batch, steps):.1f} s")
    start = time.perf_counter()

    if args.fid_samples is not None:
        settings = dict(checkpoint=os.path.abspath(args.ckpt), dtype=np.dtype(dtype).name,
                        rtol=args.rtol, atol=args.atol, max_steps=args.max_steps,
                        error_control=args.error_control)
        summary = run_fid(sampler, args.out, n, seed=args.seed, guidance=args.cfg, steps=steps,
                          shift=args.shift, batch_size=batch, settings=settings,
                          progress=progress)
        if "evaluations" in summary:
            say(args, f"velocity evaluations per image: {summary['evaluations']}")
        if summary["unfinished"]:
            print(f"sample.py: {len(summary['unfinished'])} image(s) did not finish within "
                  f"--max-steps {args.max_steps} and were not written (first: "
                  f"{summary['unfinished'][:10]}); rerun with a larger --max-steps to draw "
                  "them", file=sys.stderr)
            return EXIT_UNFINISHED
        say(args, f"drew {summary['drawn']} images in {summary['seconds']:.1f} s; wrote "
                  f"{summary['npz'] or 'no .npz on this host'}")
        return 0

    request = ImageRequest(classes=tuple(classes), num_images=args.num_images, seed=args.seed,
                           guidance=args.cfg, steps=tuple(steps), shift=args.shift)
    noise = dup = None
    if args.noise_from:
        noise, dup = load_noise_npz(args.noise_from, n, sampler.resolutions, p.in_channels)
    images, stats = sample_class_images(sampler, request, batch, noise, dup, progress=progress)
    elapsed = time.perf_counter() - start
    say(args, f"velocity evaluations per image: {describe_evaluations(stats.evaluations)}")
    if not stats.finished.all():
        failed = stats.indices[~stats.finished].tolist()
        print(f"sample.py: image(s) {failed[:10]} did not finish within --max-steps "
              f"{args.max_steps}; nothing was written (raise --max-steps)", file=sys.stderr)
        return EXIT_UNFINISHED
    if jax.process_index() == 0 and args.out_kind == "grid":
        save_png(args.out, make_grid(images, rows=len(classes)))
    elif args.out_kind == "folder":
        os.makedirs(args.out, exist_ok=True)
        labels = request.labels
        for i, img in zip(stats.indices, images):
            save_png(os.path.join(args.out, f"{i:06d}_class{labels[i]}.png"), img)
    say(args, f"wrote {args.out} ({n} images in {elapsed:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    from pixelflow_jax.errors import UserError
    try:
        return run(args)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sample.py: interrupted; finished images are kept, rerun to resume a "
              "--fid-samples run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
