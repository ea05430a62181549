#!/usr/bin/env python3
"""Sample images from a PixelFlow checkpoint folder.

Examples:
  python sample.py                      (the embedded digits model: one row per digit)
  python sample.py --ckpt digits-1step  (its one-step student: its config.yaml's sample:
                                         section sets 1 step per stage, guidance 1)
  python sample.py --ckpt CKPT_DIR --classes 207 360 --num-images 4 --out grid.png
  python sample.py --ckpt CKPT_DIR --solver dopri5 --cfg 2.4 --fid-samples 50000 --out fid/
  python sample.py --ckpt T2I_DIR --text-encoder FLAN_T5_DIR --prompt "a cat" --out cat.png

The batch is spread over every device (and, on a multi-host TPU slice, every
host: run the same command on each). Images are written as their batch
finishes, so any number of them fits in memory, and the same command resumes
an interrupted run. Requests estimated to take more than 24 h (see --yes), or
needing more disk or memory than is free, are refused up front with the
estimate. User mistakes (the output path is checked before anything is loaded)
end with one line on stderr and exit code 2; images whose adaptive solve did
not finish, or that came out non-finite, are not written and give exit code 3;
Ctrl-C gives 130.

Text-to-image checkpoints take prompts instead of classes (--prompt, --prompts-file)
and a T5 encoder folder (--text-encoder, or the checkpoint's text_encoder/); image i
of prompt k is numbered k * --num-images + i, and guidance g applies at every stage.
"""

from __future__ import annotations

import argparse
import os
import sys

from pixelflow_jax import cli, defaults
from pixelflow_jax.sample_run import (MAX_GRID_IMAGES, SampleRequest, interrupted_message,
                                      run_sampling)


def build_parser() -> argparse.ArgumentParser:
    """sample.py's flags."""
    p = cli.Parser(prog="sample.py", doc=__doc__)
    add = p.add_argument
    cli.add_ckpt(p)
    add("--classes", type=cli.int_list, nargs="+", metavar="ID",
        help="class ids, space- or comma-separated (default: 8 well-known classes for "
             "ImageNet models, else the first 10 classes)")
    add("--prompt", action="append", default=None, metavar="TEXT",
        help="text-to-image checkpoints: a prompt (repeat the flag for several)")
    add("--prompts-file", default=None, metavar="FILE",
        help="text-to-image: UTF-8, one prompt per line (blank lines skipped), after any "
             "--prompt; with --fid-samples image i gets prompt i mod (number of prompts)")
    add("--negative-prompt", default=None, metavar="TEXT",
        help="text-to-image: the prompt of the unguided rows (default: empty, as the "
             "official pipeline)")
    add("--text-encoder", default=None, metavar="HF_T5_DIR",
        help="text-to-image: the T5 encoder's Hugging Face folder (config.json, "
             "tokenizer.json, weights), e.g. google/flan-t5-xl (default: the "
             "checkpoint's text_encoder/ folder)")
    cli.add_text_dtype(p)
    add("--num-images", type=cli.positive_int, default=4, metavar="N",
        help="images per class or prompt; a grid has one row per class or prompt and at most "
             f"{MAX_GRID_IMAGES} images (default %(default)s)")
    add("--seed", type=cli.seed, default=defaults.SEED,
        help="random seed; image i always gets the same noise from (seed, i) "
             "(default %(default)s)")
    # --cfg, --solver, --steps, --shift: a checkpoint's config.yaml may set its own defaults
    # (its sample: section, e.g. a one-step student's steps 1, guidance 1); flags override.
    add("--cfg", type=cli.non_negative_float, default=None,
        help="classifier-free guidance g; class models: stage s uses (g-1) w_s + 1 with "
             "w = [0, 1/6, 2/3, 1]; text models: g at every stage; 0 or 1 disables guidance "
             f"(default: the checkpoint's sample.guidance, else {defaults.GUIDANCE:g}; the FID "
             "recipe uses 2.4)")
    add("--solver", choices=defaults.SOLVERS, default=None,
        help="euler: fixed steps (--steps, --shift); euler-diffrax: the same steps through "
             "diffrax; dopri5: adaptive, as the published FID 1.98 (ignores --steps and "
             "--shift, as the official code) (default: the checkpoint's sample.solver, else "
             f"{defaults.SOLVERS[0]})")
    add("--steps", type=cli.positive_int_list, nargs="+", default=None, metavar="N",
        help="Euler steps per stage: one number, or one per stage, e.g. 10,20,20,30 "
             f"(default: the checkpoint's sample.steps, else {defaults.STEPS})")
    add("--shift", type=cli.positive_float, default=None,
        help="Euler noise shift: t <- t / (shift + (1 - shift) t); > 1 spends more steps at "
             f"high noise (default: the checkpoint's sample.shift, else {defaults.SHIFT:g})")
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
        help="a .png path writes one grid (its images are drawn into a hidden .NAME.parts "
             "folder beside it, removed once the grid is written); any other path is a "
             "folder of PNGs named INDEX_classID.png, or with --fid-samples or prompts "
             "INDEX.png (each PNG's prompt in its 'prompt' text chunk and in prompts.jsonl "
             "beside it; a grid's row prompts in its 'prompts' chunk); "
             "missing folders are created. Images are written as their batch finishes, and "
             "rerunning the same command after an interruption resumes "
             "(default %(default)s)")
    add("--fid-samples", type=cli.positive_int, default=None, metavar="N",
        help="draw N class-balanced images into the --out folder (image i has class "
             "i mod num_classes) and then OUT.npz for the ADM evaluation suite; rerunning "
             "the same command resumes an interrupted run")
    add("--evaluate", default=None, metavar="REF.npz",
        help="with --fid-samples: when the run is complete, score OUT.npz against this ADM "
             "reference batch (FID, sFID, Inception Score, precision, recall; as "
             "evaluate.py OUT.npz REF.npz); the reference is checked before sampling")
    add("--inception", default=None, metavar="WEIGHTS",
        help="with --evaluate: the FID Inception weights (classify_image_graph_def.pb, "
             "pt_inception-2015-12-05-6726825d.pth or "
             "weights-inception-2015-12-05-6726825d.pth)")
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
    add("--yes", action="store_true",
        help="run a request estimated to take more than 24 h (it is refused otherwise; "
             "requests that need more disk or memory than is free are refused regardless)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint (the output path included); raise UserError."""
    from pixelflow_jax.errors import UserError

    if args.steps is not None:
        args.steps = [n for group in args.steps for n in group]
    if args.classes is not None:
        args.classes = [c for group in args.classes for c in group]
    args.prompts = None
    if args.prompt is not None or args.prompts_file is not None:
        from pixelflow_jax.prompts import read_prompts
        if args.classes is not None:
            raise UserError("--classes is for class-conditional checkpoints, --prompt / "
                            "--prompts-file for text-to-image ones: give one of them")
        args.prompts = read_prompts(args.prompt, args.prompts_file)
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
    if args.evaluate is not None or args.inception is not None:
        if args.evaluate is None:
            raise UserError("--inception is for --evaluate REF.npz")
        if args.fid_samples is None:
            raise UserError("--evaluate scores a --fid-samples run: add --fid-samples N")
        from pixelflow_jax.evaluate_run import check_reference
        check_reference(args.evaluate, args.inception, num_samples=args.fid_samples)
    if args.quiet:
        args.progress = "none"
    elif args.progress == "auto":
        args.progress = "stages" if sys.stderr.isatty() else "batches"


def request_from_args(args: argparse.Namespace) -> SampleRequest:
    """The library's request from flags already checked by :func:`validate_args`."""
    return SampleRequest(
        out=args.out, out_kind=args.out_kind, ckpt=args.ckpt, classes=args.classes,
        prompts=args.prompts, negative_prompt=args.negative_prompt,
        text_encoder=args.text_encoder, text_dtype=args.text_dtype,
        num_images=args.num_images, seed=args.seed,
        cfg=args.cfg, solver=args.solver, steps=args.steps, shift=args.shift, rtol=args.rtol,
        atol=args.atol, max_steps=args.max_steps, error_control=args.error_control,
        dtype=args.dtype, fid_samples=args.fid_samples, batch_size=args.batch_size,
        resolution=args.resolution, noise_from=args.noise_from, attention=args.attention,
        progress=args.progress, quiet=args.quiet, yes=args.yes, evaluate=args.evaluate,
        inception=args.inception)


def run(args: argparse.Namespace) -> int:
    """Check the flags, start multi-host JAX if launched so, and draw (pixelflow_jax.sample_run)."""
    from pixelflow_jax import distributed

    validate_args(args)
    distributed.initialize(args.distributed)  # before anything touches a device
    return run_sampling(request_from_args(args))


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind."""
    return interrupted_message(args.out, args.fid_samples)


def main(argv: list[str] | None = None) -> int:
    """Run sample.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
