#!/usr/bin/env python3
"""Sample images from a PixelFlow checkpoint folder.

Examples:
  python sample.py                      (the embedded digits model: one row per digit)
  python sample.py --ckpt CKPT_DIR --classes 207 360 --num-images 4 --out grid.png
  python sample.py --ckpt CKPT_DIR --solver dopri5 --cfg 2.4 --fid-samples 50000 --out fid/

The batch is spread over every device (and, on a multi-host TPU slice, every
host: run the same command on each). User mistakes (the output path is checked
before anything is loaded) end with one line on stderr and exit code 2; images
whose adaptive solve did not finish give exit code 3; Ctrl-C gives 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pixelflow_jax import cli, defaults
from pixelflow_jax.cli import EXIT_UNFINISHED

# ImageNet classes shown by default (golden retriever, otter, ...): the usual demo set.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def build_parser() -> argparse.ArgumentParser:
    """sample.py's flags."""
    p = cli.Parser(prog="sample.py", doc=__doc__)
    add = p.add_argument
    cli.add_ckpt(p)
    add("--classes", type=cli.int_list, nargs="+", metavar="ID",
        help="class ids, space- or comma-separated (default: 8 well-known classes for "
             "ImageNet models, else the first 10 classes)")
    add("--num-images", type=cli.positive_int, default=4, metavar="N",
        help="images per class; a grid has one row per class (default %(default)s)")
    add("--seed", type=cli.seed, default=defaults.SEED,
        help="random seed; image i always gets the same noise from (seed, i) "
             "(default %(default)s)")
    add("--cfg", type=cli.non_negative_float, default=defaults.GUIDANCE,
        help="classifier-free guidance g; stage s uses (g-1) w_s + 1 with w = [0, 1/6, 2/3, 1]; "
             "0 disables guidance (default %(default)g; the FID recipe uses 2.4)")
    add("--solver", choices=defaults.SOLVERS, default=defaults.SOLVERS[0],
        help="euler: fixed steps (--steps, --shift); euler-diffrax: the same steps through "
             "diffrax; dopri5: adaptive, as the published FID 1.98 (ignores --steps and "
             "--shift, as the official code) (default %(default)s)")
    add("--steps", type=cli.positive_int_list, nargs="+", default=[[defaults.STEPS]],
        metavar="N",
        help=f"Euler steps per stage: one number, or one per stage, e.g. 10,20,20,30 "
             f"(default {defaults.STEPS})")
    add("--shift", type=cli.positive_float, default=defaults.SHIFT,
        help="Euler noise shift: t <- t / (shift + (1 - shift) t); > 1 spends more steps at "
             "high noise (default %(default)g)")
    add("--rtol", type=cli.positive_float, default=defaults.RTOL,
        help="dopri5 relative tolerance (default %(default)g)")
    add("--atol", type=cli.positive_float, default=defaults.ATOL,
        help="dopri5 absolute tolerance (default %(default)g)")
    add("--max-steps", type=cli.positive_int, default=defaults.MAX_SOLVER_STEPS,
        help="dopri5 step limit per stage; an image that needs more is reported, not written "
             "(default %(default)s)")
    add("--error-control", choices=defaults.ERROR_CONTROLS, default=defaults.ERROR_CONTROLS[0],
        help="dopri5: batch = one error norm and step size for each device's batch (official); "
             "image = every image its own steps, independent of batch and device count "
             "(default %(default)s)")
    cli.add_dtype(p)
    add("--out", default="samples.png",
        help="a .png path writes one grid; any other path is a folder of PNGs named "
             "INDEX_classID.png, or with --fid-samples INDEX.png; missing folders are "
             "created (default %(default)s)")
    add("--fid-samples", type=cli.positive_int, default=None, metavar="N",
        help="draw N class-balanced images into the --out folder (image i has class "
             "i mod num_classes) and then OUT.npz for the ADM evaluation suite; rerunning "
             "the same command resumes an interrupted run")
    add("--batch-size", type=cli.positive_int, default=16, metavar="B",
        help="images per compiled batch across all devices, rounded up to a multiple of the "
             "device count (default %(default)s)")
    add("--resolution", type=cli.positive_int, default=None, metavar="R",
        help="output side length (default: the checkpoint's data.resolution)")
    add("--noise-from", metavar="FILE.npz", default=None,
        help="use this noise instead of the seed: 'init' [B,C,h,w] and 'block1'..'block{S-1}' "
             "[B,C,H_s,W_s], float32 NCHW, B = all images (blocks may have 2B rows: the "
             "official dopri5 duplicate half's noise)")
    cli.add_attention(p)
    cli.add_distributed(p)
    add("--progress", choices=["auto", "stages", "batches", "none"], default="auto",
        help="stages: live display of every Euler stage (its program uses host callbacks, "
             "which JAX's persistent compilation cache never stores, so it compiles on every "
             "run); batches: a line per batch with images/s and time left (cached); "
             "auto: stages on a terminal, else batches")
    add("--quiet", action="store_true", help="print nothing but errors (--progress none)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint (the output path included); raise UserError."""
    from pixelflow_jax.errors import UserError

    args.steps = [n for group in args.steps for n in group]
    if args.classes is not None:
        args.classes = [c for group in args.classes for c in group]
    if args.noise_from is not None and not os.path.isfile(args.noise_from):
        raise UserError(f"--noise-from {args.noise_from}: no such file")
    if not args.out.strip():
        raise UserError("--out is empty: give a .png file path (a grid) or a folder path")
    args.out_kind = "grid" if args.out.lower().endswith(".png") else "folder"
    if args.fid_samples is not None:
        if args.out_kind == "grid":
            raise UserError("--fid-samples writes a folder of PNGs: give --out a folder path")
        if args.classes is not None or args.noise_from is not None:
            raise UserError("--fid-samples chooses the classes and draws its own noise; "
                            "drop --classes / --noise-from")
    cli.check_output(args.out, "--out", "file" if args.out_kind == "grid" else "folder")
    if args.fid_samples is not None:  # the ADM suite's .npz, beside the folder
        cli.check_output(args.out.rstrip("/" + os.sep) + ".npz", "--out (its .npz)", "file")
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
    resolution = cfg.data.resolution if args.resolution is None else args.resolution
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
        with cli.writing(args.out, unnamed=False):  # the checkpoint is read already
            summary = run_fid(sampler, args.out, n, seed=args.seed, guidance=args.cfg,
                              steps=steps, shift=args.shift, batch_size=batch,
                              settings=settings, progress=progress)
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
        cli.make_parents(args.out)
        save_png(args.out, make_grid(images, rows=len(classes)))
    elif args.out_kind == "folder":
        with cli.writing(args.out):
            os.makedirs(args.out, exist_ok=True)
        labels = request.labels
        for i, img in zip(stats.indices, images):
            save_png(os.path.join(args.out, f"{i:06d}_class{labels[i]}.png"), img)
    say(args, f"wrote {args.out} ({n} images in {elapsed:.1f} s)")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind."""
    if args.fid_samples is not None:
        return f"the finished images in {args.out} are kept; rerun the same command to resume"
    if args.out.lower().endswith(".png"):
        return f"{args.out} was not written"
    return f"{args.out} may hold only some of the images (each one written is whole)"


def main(argv: list[str] | None = None) -> int:
    """Run sample.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
