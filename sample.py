#!/usr/bin/env python3
"""Sample images from a PixelFlow checkpoint folder.

Examples:
  python sample.py                      (the embedded digits model: one row per digit)
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
import io
import json
import os
import shutil
import sys

from pixelflow_jax import cli, defaults
from pixelflow_jax.cli import EXIT_UNFINISHED

# ImageNet classes shown by default (golden retriever, otter, ...): the usual demo set.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
# A grid is assembled in memory; past this many images a folder serves better.
MAX_GRID_IMAGES = 4096


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
    add("--num-images", type=cli.positive_int, default=4, metavar="N",
        help="images per class or prompt; a grid has one row per class or prompt and at most "
             f"{MAX_GRID_IMAGES} images (default %(default)s)")
    add("--seed", type=cli.seed, default=defaults.SEED,
        help="random seed; image i always gets the same noise from (seed, i) "
             "(default %(default)s)")
    add("--cfg", type=cli.non_negative_float, default=defaults.GUIDANCE,
        help="classifier-free guidance g; class models: stage s uses (g-1) w_s + 1 with "
             "w = [0, 1/6, 2/3, 1]; text models: g at every stage; 0 or 1 disables guidance "
             "(default %(default)g; the FID recipe uses 2.4)")
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
    if args.quiet:
        args.progress = "none"
    elif args.progress == "auto":
        args.progress = "stages" if sys.stderr.isatty() else "batches"


def say(args, text: str) -> None:
    import jax
    if not args.quiet and jax.process_index() == 0:
        print(text, file=sys.stderr)


def parts_folder(grid: str) -> str:
    """Where a grid's images are written before it is assembled: ``.NAME.parts`` beside it."""
    grid = os.path.abspath(grid)
    return os.path.join(os.path.dirname(grid), f".{os.path.basename(grid)}.parts")


def file_digest(path: str) -> str:
    """SHA-256 of a file (recorded for --noise-from: the noise decides the images)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def report_failures(args, summary, what_was_not_written: str) -> int:
    """Name the images that were not written, one line per kind; the exit code."""
    lines = []
    if summary.num_nonfinite:
        lines.append(f"{summary.num_nonfinite} image(s) came out with NaN or inf values and "
                     f"were not written (first: {summary.nonfinite[:10]}); the checkpoint or "
                     "the settings give non-finite values")
    if summary.num_unfinished:
        lines.append(f"{summary.num_unfinished} image(s) did not finish within --max-steps "
                     f"{args.max_steps} and were not written (first: "
                     f"{summary.unfinished[:10]}); rerun with a larger --max-steps to draw them")
    for line in lines:
        print(f"sample.py: {line}{what_was_not_written}", file=sys.stderr)
    return EXIT_UNFINISHED if lines else 0


def plan_output(args, p, dtype_name: str, classes: list[int], steps: list[int], n: int,
                resolution: int, batch: int, devices: int, stream, encoder_dir: str | None = None):
    """(plan, labels): what the output already holds and what is left; writes nothing.
    Text runs (``encoder_dir`` given) label images with prompt numbers."""
    from pixelflow_jax.fid import fid_folder, fid_labels, fid_settings
    from pixelflow_jax.generate import ClassBlocks
    from pixelflow_jax.prompts import PromptBlocks, PromptCycle, prompts_digest
    from pixelflow_jax.resumable import ImageFolder, plan_run

    settings = dict(checkpoint=os.path.abspath(args.ckpt), dtype=dtype_name, rtol=args.rtol,
                    atol=args.atol, max_steps=args.max_steps, error_control=args.error_control)
    text = encoder_dir is not None
    if text:  # the prompts decide the images: a resume with other prompts is refused
        settings.update(prompts_sha256=prompts_digest(args.prompts),
                        num_prompts=len(args.prompts), negative_prompt=args.negative_prompt,
                        text_encoder=os.path.abspath(encoder_dir))
    if args.fid_samples is not None:
        settings = fid_settings(n, seed=args.seed, guidance=args.cfg, steps=steps,
                                shift=args.shift, solver=args.solver, resolution=resolution,
                                batch=batch, devices=devices, settings=settings)
        return (plan_run(fid_folder(args.out, n), settings, batch, stream=stream),
                PromptCycle(n, len(args.prompts)) if text else fid_labels(n, p.num_classes))
    labels = PromptBlocks(len(args.prompts), args.num_images) if text \
        else ClassBlocks(tuple(classes), args.num_images)
    if not text:
        settings.update(classes=list(classes))
    settings.update(num_images=args.num_images, seed=args.seed,
                    guidance=args.cfg, steps=list(steps), shift=args.shift, solver=args.solver,
                    resolution=resolution, batch=batch, devices=devices,
                    noise_from=args.noise_from and file_digest(args.noise_from))
    grid = args.out_kind == "grid"  # its parts are a cache: another run's are discarded
    folder = os.path.abspath(parts_folder(args.out) if grid else args.out)
    return (plan_run(ImageFolder(folder, n, None if text else labels), settings, batch,
                     other_settings="discard" if grid else "refuse", stream=stream), labels)


def check_cost(args, p, dtype_name: str, guidance_weights, resolutions, steps: list[int],
               n: int, rows: int, batch: int, devices: int, pending: int):
    """The estimate of drawing ``pending`` images; raises UserError (on every host) when
    it is over a limit (pixelflow_jax.estimate)."""
    import jax

    from pixelflow_jax import estimate
    from pixelflow_jax.errors import UserError

    R, C = resolutions[-1], p.in_channels
    disk_extra = n * R * R * 3 if args.fid_samples is not None else 0  # the .npz
    grid_bytes = 0
    if args.out_kind == "grid":
        grid_bytes = (rows * (R + 2) + 2) * (-(-n // rows) * (R + 2) + 2) * C
        disk_extra = grid_bytes + estimate.PNG_OVERHEAD
    device = jax.devices()[0]
    est = estimate.estimate_sampling(
        p, resolutions, solver=args.solver, steps=steps, max_steps=args.max_steps,
        guidance=args.cfg, guidance_weights=guidance_weights, images=pending,
        rows_per_device=batch // devices, devices=devices, hosts=jax.process_count(),
        platform=device.platform, kind=device.device_kind, dtype_name=dtype_name,
        disk_per_image=estimate.png_bytes(R, C), disk_extra=disk_extra)
    problem = None
    try:
        estimate.check_estimate(est, disk_free=estimate.free_disk(args.out),
                                memory_free=estimate.free_memory(device), out=args.out,
                                allow_long=args.yes)
        host_free = estimate.free_memory(jax.devices("cpu")[0])
        if grid_bytes and host_free is not None and 2 * grid_bytes > host_free:
            raise UserError(f"the grid needs ~{estimate.describe_bytes(2 * grid_bytes)} of "
                            f"memory, more than the {estimate.describe_bytes(host_free)} free; "
                            "give --out a folder to write separate PNGs")
    except UserError as e:
        problem = e
    estimate.agree_on_all_hosts(problem)
    return est


def finish(args, plan, summary, rows: int) -> int:
    """Report what was not written, then the .npz (FID) or the grid; the exit code."""
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.fid import finish_fid
    from pixelflow_jax.images import grid_from_files, save_png

    if summary.evaluations:
        say(args, f"velocity evaluations per image: {summary.evaluations}")
    unwritten = {"grid": f"; {args.out} was not written", "folder": ""}[args.out_kind]
    code = report_failures(args, summary, "; the .npz was not made"
                           if args.fid_samples is not None else unwritten)
    if code:
        return code
    if args.fid_samples is not None:
        with cli.writing(args.out, unnamed=False):
            npz = finish_fid(plan)
        say(args, f"drew {summary.drawn} images in {summary.seconds:.1f} s; wrote "
                  f"{npz or 'no .npz on this host'}")
        return 0
    if args.out_kind == "grid":
        parts, n = plan.images.folder, plan.images.num_images
        files = plan.images.find()
        missing = [i for i in range(n) if i not in files]
        if missing:  # only if the folder changed under us
            raise UserError(f"{parts} lost image {missing[0]}; rerun the same command")
        grid = grid_from_files([files[i] for i in range(n)], rows=rows)
        # a text grid carries its rows' prompts, in order
        text = None if args.prompts is None else {
            "prompts": json.dumps(args.prompts, ensure_ascii=False)}
        save_png(args.out, grid, text)
        with cli.writing(parts, unnamed=False):
            shutil.rmtree(parts)
    drew = (f"{summary.drawn} images drawn in {summary.seconds:.1f} s" if summary.drawn
            else "every image was there already")
    say(args, f"wrote {args.out} ({drew})")
    return 0


def run(args: argparse.Namespace) -> int:
    from pixelflow_jax import distributed, runtime

    validate_args(args)
    distributed.initialize(args.distributed)  # before anything touches a device
    import jax
    import numpy as np

    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.generate import MAX_IMAGES, global_batch_size
    from pixelflow_jax.noise import load_noise_npz
    from pixelflow_jax.resumable import draw_run
    from pixelflow_jax.scheduler import schedule_from_config

    if jax.process_count() > 1 and args.out_kind == "grid":
        raise UserError("on several hosts each host holds only its own images: give --out a "
                        "folder (or use --fid-samples)")
    runtime.enable_compilation_cache()
    dtype = runtime.compute_dtype(args.dtype)
    dtype_name = np.dtype(dtype).name
    if args.ckpt is None:
        from pixelflow_jax.default_model import default_checkpoint
        args.ckpt = default_checkpoint()
    model, cfg = load_checkpoint(args.ckpt, dtype=dtype, attention_impl=args.attention)
    p = cfg.params
    text = p.cross_attention_dim is not None
    encoder_dir = None
    if text:
        from pixelflow_jax.prompts import text_encoder_folder
        if args.classes is not None:
            raise UserError(f"{args.ckpt} is a text-to-image model: give --prompt or "
                            "--prompts-file, not --classes")
        if args.prompts is None:
            raise UserError(f"{args.ckpt} is a text-to-image model: give --prompt TEXT or "
                            "--prompts-file FILE")
        encoder_dir = text_encoder_folder(args.ckpt, args.text_encoder)
        args.negative_prompt = args.negative_prompt or ""
        classes = []
    elif p.num_classes == 0:
        raise UserError(f"{args.ckpt} takes neither class labels nor text: sample.py draws "
                        "class-conditional and text-to-image models only")
    else:
        given = [f for f, v in (("--prompt / --prompts-file", args.prompts),
                                ("--negative-prompt", args.negative_prompt),
                                ("--text-encoder", args.text_encoder)) if v is not None]
        if given:
            raise UserError(f"{args.ckpt} is a class-conditional model: it takes --classes, "
                            f"not {given[0]}")
        classes = args.classes if args.classes is not None else (
            list(IMAGENET_DEMO_CLASSES) if p.num_classes == 1000
            else list(range(min(p.num_classes, 10))))
        bad = [c for c in classes if not 0 <= c < p.num_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is outside [0, {p.num_classes})")
    rows = len(args.prompts) if text else len(classes)
    schedule = schedule_from_config(cfg.scheduler)
    steps = schedule.steps_per_stage(args.steps[0] if len(args.steps) == 1 else args.steps)
    grid_steps = schedule.num_train_timesteps
    if args.solver != "dopri5" and max(steps) > grid_steps:
        raise UserError(f"--steps {max(steps)} is more than the {grid_steps} model timesteps "
                        f"this model was trained on; more steps per stage cannot improve it")
    n = args.fid_samples or rows * args.num_images
    if n > MAX_IMAGES:
        raise UserError(f"{n:,} images is more than one run can number ({MAX_IMAGES:,}); "
                        "draw fewer")
    if args.out_kind == "grid" and n > MAX_GRID_IMAGES:
        raise UserError(f"a grid of {n:,} images is too large (at most {MAX_GRID_IMAGES:,}); "
                        "give --out a folder to write them as separate PNGs")
    resolution = cfg.data.resolution if args.resolution is None else args.resolution
    resolutions = schedule.stage_resolutions(resolution, p.patch_size)
    devices = jax.device_count()  # the Sampler's mesh: every device
    batch = global_batch_size(args.batch_size, devices, n)
    noise = dup = None
    if args.noise_from:
        noise, dup = load_noise_npz(args.noise_from, n, resolutions, p.in_channels)
    stream = io.StringIO() if args.quiet else sys.stderr  # a few lines at most when quiet

    plan, labels = plan_output(args, p, dtype_name, classes, steps, n, resolution, batch,
                               devices, stream, encoder_dir)
    pending = plan.pending_images
    weights = (1.0,) * schedule.num_stages if text else schedule.guidance_weights()
    est = check_cost(args, p, dtype_name, weights, resolutions, steps, n, rows, batch,
                     devices, pending)
    condition = None
    if text and pending:
        from pixelflow_jax.prompts import PromptConditioning
        from pixelflow_jax.text_encoder import TextEncoder
        say(args, f"loading the text encoder {encoder_dir}...")
        condition = PromptConditioning(TextEncoder.from_folder(encoder_dir), args.prompts,
                                       args.negative_prompt, p.cross_attention_dim)

    from pixelflow_jax.sampling import Sampler  # diffrax takes a second: after the checks
    from pixelflow_jax.solvers import Dopri5Config
    dopri5 = Dopri5Config(rtol=args.rtol, atol=args.atol, max_steps=args.max_steps,
                          error_control=args.error_control)
    sampler = Sampler(model, schedule, resolution, solver=args.solver, dopri5=dopri5,
                      report_progress=args.progress == "stages")
    progress = args.progress if args.solver == "euler" or args.progress == "none" else "batches"
    how = (f"{steps} Euler steps, shift {args.shift}" if args.solver != "dopri5" else
           f"dopri5 (rtol {args.rtol}, atol {args.atol}, {args.error_control} error control)")
    status = ("every image is there already" if pending == 0 else est.summary() if pending == n
              else f"{pending} to draw, {est.summary()}")
    say(args, f"{n} images of {resolution} px, {how}, guidance {args.cfg}, {dtype_name}: "
              f"{status}")
    if noise is None and pending and not text:  # text: compiled per prompt-length bucket
        note = ("the live stage display is never cached" if progress == "stages"
                else "cached for later runs")
        say(args, f"compiling for batch {batch} ({note})...")
        say(args, f"compiled in {sampler.precompile(batch, steps):.1f} s")

    with cli.writing(plan.images.folder, unnamed=False):  # checkpoint and noise are read
        if args.out_kind == "grid":
            cli.make_parents(args.out)
        summary = draw_run(sampler, plan, labels, seed=args.seed, guidance=args.cfg,
                           steps=steps, shift=args.shift, noise=noise, dup_blocks=dup,
                           progress=progress, stream=stream, condition=condition,
                           prompts=args.prompts if text else None)
    return finish(args, plan, summary, rows=rows)


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind."""
    if args.fid_samples is None and args.out.lower().endswith(".png"):
        return (f"{args.out} was not written; the finished images are kept in "
                f"{parts_folder(args.out)} and the same command resumes")
    return f"the finished images in {args.out} are kept; rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    """Run sample.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
