"""One sampling run, as ``sample.py`` performs it: the library behind the command line.

:class:`SampleRequest` holds what the flags say (already checked by
``sample.validate_args``); :func:`run_sampling` loads the checkpoint, chooses the
classes or prompts, plans the resumable run (pixelflow_jax.resumable), refuses a
request over the cost limits (pixelflow_jax.estimate), draws the images and
finishes the grid or the FID ``.npz``. jax and diffrax are imported only inside the
functions, so that importing this module stays fast.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """Everything a sampling run needs, as ``sample.py``'s flags give it (see its --help).

    ``out_kind`` is "grid" (``out`` is a .png) or "folder"; ``progress`` is already
    resolved to "stages", "batches" or "none"; ``prompts`` is the list of prompts of a
    text-to-image run (None for class models); ``steps`` is the flat list of --steps.
    ``cfg``, ``solver``, ``steps`` and ``shift`` left None take the checkpoint's
    ``sample:`` defaults, else :mod:`pixelflow_jax.defaults` (:func:`with_checkpoint_defaults`).
    """

    out: str
    out_kind: str
    ckpt: str | None = None
    classes: list[int] | None = None
    prompts: list[str] | None = None
    negative_prompt: str | None = None
    text_encoder: str | None = None
    text_dtype: str | None = None  # the T5 encoder's dtype; None = float32 (official)
    num_images: int = 4
    seed: int = defaults.SEED
    cfg: float | None = None
    solver: str | None = None
    steps: list[int] | None = None
    shift: float | None = None
    rtol: float = defaults.RTOL
    atol: float = defaults.ATOL
    max_steps: int = defaults.MAX_SOLVER_STEPS
    error_control: str = defaults.ERROR_CONTROLS[0]
    dtype: str = "auto"
    fid_samples: int | None = None
    batch_size: int = 16
    resolution: int | None = None
    noise_from: str | None = None
    attention: str = "auto"
    progress: str = "batches"
    quiet: bool = False
    yes: bool = False
    evaluate: str | None = None   # with fid_samples: score OUT.npz against this reference
    inception: str | None = None  # ... with these FID Inception weights


def with_checkpoint_defaults(request: SampleRequest, sample_cfg) -> SampleRequest:
    """``request`` with its unset sampling settings (None) taken from the checkpoint's
    ``sample:`` section (``sample_cfg``, a :class:`~pixelflow_jax.config.SampleConfig`),
    else from :mod:`pixelflow_jax.defaults`; explicit settings win (DESIGN §11)."""
    def pick(given, carried, default):
        return given if given is not None else carried if carried is not None else default

    carried_steps = sample_cfg.steps
    if isinstance(carried_steps, int):
        carried_steps = [carried_steps]
    return dataclasses.replace(
        request, cfg=pick(request.cfg, sample_cfg.guidance, defaults.GUIDANCE),
        solver=pick(request.solver, sample_cfg.solver, defaults.SOLVERS[0]),
        steps=pick(request.steps, carried_steps, [defaults.STEPS]),
        shift=pick(request.shift, sample_cfg.shift, defaults.SHIFT))


def say(request: SampleRequest, text: str) -> None:
    """Print a progress line on stderr, unless quiet or not the first host."""
    import jax
    if not request.quiet and jax.process_index() == 0:
        print(text, file=sys.stderr)


def parts_folder(grid: str) -> str:
    """Where a grid's images are written before it is assembled: ``.NAME.parts`` beside it."""
    grid = os.path.abspath(grid)
    return os.path.join(os.path.dirname(grid), f".{os.path.basename(grid)}.parts")


def interrupted_message(out: str, fid_samples: int | None) -> str:
    """What an interrupted run with this output leaves behind, in one sentence."""
    if fid_samples is None and out.lower().endswith(".png"):
        return (f"{out} was not written; the finished images are kept in "
                f"{parts_folder(out)} and the same command resumes")
    return f"the finished images in {out} are kept; rerun the same command to resume"


def file_digest(path: str) -> str:
    """SHA-256 of a file (recorded for --noise-from: the noise decides the images)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def report_failures(request: SampleRequest, summary, what_was_not_written: str) -> int:
    """Name the images that were not written, one stderr line per kind; the exit code
    (EXIT_UNFINISHED if any, else 0)."""
    lines = []
    if summary.num_nonfinite:
        lines.append(f"{summary.num_nonfinite} image(s) came out with NaN or inf values and "
                     f"were not written (first: {summary.nonfinite[:10]}); the checkpoint or "
                     "the settings give non-finite values")
    if summary.num_unfinished:
        lines.append(f"{summary.num_unfinished} image(s) did not finish within --max-steps "
                     f"{request.max_steps} and were not written (first: "
                     f"{summary.unfinished[:10]}); rerun with a larger --max-steps to draw them")
    for line in lines:
        print(f"sample.py: {line}{what_was_not_written}", file=sys.stderr)
    return EXIT_UNFINISHED if lines else 0


def plan_output(request: SampleRequest, ckpt: str, p, dtype_name: str, classes: list[int],
                steps: list[int], n: int, resolution: int, batch: int, devices: int, stream,
                encoder_dir: str | None = None, negative_prompt: str | None = None):
    """(plan, labels): what the output already holds and what is left; writes nothing.
    Text runs (``encoder_dir`` given) label images with prompt numbers."""
    from pixelflow_jax.fid import fid_folder, fid_labels, fid_settings
    from pixelflow_jax.generate import ClassBlocks
    from pixelflow_jax.prompts import PromptBlocks, PromptCycle, prompts_digest
    from pixelflow_jax.resumable import ImageFolder, plan_run

    r = request
    settings = dict(checkpoint=os.path.abspath(ckpt), dtype=dtype_name, rtol=r.rtol,
                    atol=r.atol, max_steps=r.max_steps, error_control=r.error_control)
    text = encoder_dir is not None
    if text:  # the prompts decide the images: a resume with other prompts is refused
        settings.update(prompts_sha256=prompts_digest(r.prompts),
                        num_prompts=len(r.prompts), negative_prompt=negative_prompt,
                        text_encoder=os.path.abspath(encoder_dir),
                        text_dtype=r.text_dtype or "float32")
    if r.fid_samples is not None:
        settings = fid_settings(n, seed=r.seed, guidance=r.cfg, steps=steps,
                                shift=r.shift, solver=r.solver, resolution=resolution,
                                batch=batch, devices=devices, settings=settings)
        return (plan_run(fid_folder(r.out, n), settings, batch, stream=stream),
                PromptCycle(n, len(r.prompts)) if text else fid_labels(n, p.num_classes))
    labels = PromptBlocks(len(r.prompts), r.num_images) if text \
        else ClassBlocks(tuple(classes), r.num_images)
    if not text:
        settings.update(classes=list(classes))
    settings.update(num_images=r.num_images, seed=r.seed,
                    guidance=r.cfg, steps=list(steps), shift=r.shift, solver=r.solver,
                    resolution=resolution, batch=batch, devices=devices,
                    noise_from=r.noise_from and file_digest(r.noise_from))
    grid = r.out_kind == "grid"  # its parts are a cache: another run's are discarded
    folder = os.path.abspath(parts_folder(r.out) if grid else r.out)
    return (plan_run(ImageFolder(folder, n, None if text else labels), settings, batch,
                     other_settings="discard" if grid else "refuse", stream=stream), labels)


def check_cost(request: SampleRequest, p, dtype_name: str, guidance_weights, resolutions,
               steps: list[int], n: int, rows: int, batch: int, devices: int, pending: int):
    """The estimate of drawing ``pending`` images; raises UserError (on every host) when
    it is over a limit (pixelflow_jax.estimate)."""
    import jax

    from pixelflow_jax import estimate
    from pixelflow_jax.errors import UserError

    r = request
    R, C = resolutions[-1], p.in_channels
    disk_extra = n * R * R * 3 if r.fid_samples is not None else 0  # the .npz
    grid_bytes = 0
    if r.out_kind == "grid":
        grid_bytes = (rows * (R + 2) + 2) * (-(-n // rows) * (R + 2) + 2) * C
        disk_extra = grid_bytes + estimate.PNG_OVERHEAD
    device = jax.devices()[0]
    est = estimate.estimate_sampling(
        p, resolutions, solver=r.solver, steps=steps, max_steps=r.max_steps,
        guidance=r.cfg, guidance_weights=guidance_weights, images=pending,
        rows_per_device=batch // devices, devices=devices, hosts=jax.process_count(),
        platform=device.platform, kind=device.device_kind, dtype_name=dtype_name,
        disk_per_image=estimate.png_bytes(R, C), disk_extra=disk_extra)
    problem = None
    try:
        estimate.check_estimate(est, disk_free=estimate.free_disk(r.out),
                                memory_free=estimate.free_memory(device), out=r.out,
                                allow_long=r.yes)
        host_free = estimate.free_memory(jax.devices("cpu")[0])
        if grid_bytes and host_free is not None and 2 * grid_bytes > host_free:
            raise UserError(f"the grid needs ~{estimate.describe_bytes(2 * grid_bytes)} of "
                            f"memory, more than the {estimate.describe_bytes(host_free)} free; "
                            "give --out a folder to write separate PNGs")
    except UserError as e:
        problem = e
    estimate.agree_on_all_hosts(problem)
    return est


def finish(request: SampleRequest, plan, summary, rows: int) -> int:
    """Report what was not written, then write the .npz (FID) or the grid; the exit code."""
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.fid import finish_fid
    from pixelflow_jax.images import grid_from_files, save_png

    r = request
    if summary.evaluations:
        say(r, f"velocity evaluations per image: {summary.evaluations}")
    unwritten = {"grid": f"; {r.out} was not written", "folder": ""}[r.out_kind]
    code = report_failures(r, summary, "; the .npz was not made"
                           if r.fid_samples is not None else unwritten)
    if code:
        return code
    if r.fid_samples is not None:
        with cli.writing(r.out, unnamed=False):
            npz = finish_fid(plan)
        say(r, f"drew {summary.drawn} images in {summary.seconds:.1f} s; wrote "
               f"{npz or 'no .npz on this host'}")
        if r.evaluate is not None:
            from pixelflow_jax.evaluate_run import score_fid_run
            from pixelflow_jax.fid import npz_path
            score_fid_run(npz_path(plan.images.folder), r.evaluate, r.inception,
                          quiet=r.quiet)
        return 0
    if r.out_kind == "grid":
        parts, n = plan.images.folder, plan.images.num_images
        files = plan.images.find()
        missing = [i for i in range(n) if i not in files]
        if missing:  # only if the folder changed under us
            raise UserError(f"{parts} lost image {missing[0]}; rerun the same command")
        grid = grid_from_files([files[i] for i in range(n)], rows=rows)
        # a text grid carries its rows' prompts, in order
        text = None if r.prompts is None else {
            "prompts": json.dumps(r.prompts, ensure_ascii=False)}
        save_png(r.out, grid, text)
        with cli.writing(parts, unnamed=False):
            shutil.rmtree(parts)
    drew = (f"{summary.drawn} images drawn in {summary.seconds:.1f} s" if summary.drawn
            else "every image was there already")
    say(r, f"wrote {r.out} ({drew})")
    return 0


def run_sampling(request: SampleRequest) -> int:
    """Draw the requested images into ``request.out``; returns the exit code.

    0 when every image (and the grid or .npz) is written; EXIT_UNFINISHED when some
    images were not (the reasons are printed on stderr). Raises UserError, before
    drawing anything, for a checkpoint that does not fit the request or a request over
    the cost limits. Resumes what an earlier run with the same request left. Call
    pixelflow_jax.distributed.initialize first on a multi-host system.
    """
    import jax
    import numpy as np

    from pixelflow_jax import runtime
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.generate import MAX_IMAGES, global_batch_size
    from pixelflow_jax.noise import load_noise_npz
    from pixelflow_jax.resumable import draw_run
    from pixelflow_jax.scheduler import schedule_from_config

    r = request
    if jax.process_count() > 1 and r.out_kind == "grid":
        raise UserError("on several hosts each host holds only its own images: give --out a "
                        "folder (or use --fid-samples)")
    runtime.enable_compilation_cache()
    dtype = runtime.compute_dtype(r.dtype)
    dtype_name = np.dtype(dtype).name
    from pixelflow_jax.default_model import resolve_checkpoint
    ckpt = resolve_checkpoint(r.ckpt)  # None: the default model; short names: embedded ones
    model, cfg = load_checkpoint(ckpt, dtype=dtype, attention_impl=r.attention)
    r = request = with_checkpoint_defaults(r, cfg.sample)
    p = cfg.params
    text = p.cross_attention_dim is not None
    encoder_dir = negative_prompt = None
    if text:
        from pixelflow_jax.prompts import text_encoder_folder
        if r.classes is not None:
            raise UserError(f"{ckpt} is a text-to-image model: give --prompt or "
                            "--prompts-file, not --classes")
        if r.prompts is None:
            raise UserError(f"{ckpt} is a text-to-image model: give --prompt TEXT or "
                            "--prompts-file FILE")
        encoder_dir = text_encoder_folder(ckpt, r.text_encoder)
        negative_prompt = r.negative_prompt or ""
        classes = []
    elif p.num_classes == 0:
        raise UserError(f"{ckpt} takes neither class labels nor text: sample.py draws "
                        "class-conditional and text-to-image models only")
    else:
        given = [f for f, v in (("--prompt / --prompts-file", r.prompts),
                                ("--negative-prompt", r.negative_prompt),
                                ("--text-encoder", r.text_encoder),
                                ("--text-dtype", r.text_dtype)) if v is not None]
        if given:
            raise UserError(f"{ckpt} is a class-conditional model: it takes --classes, "
                            f"not {given[0]}")
        classes = r.classes if r.classes is not None else (
            list(IMAGENET_DEMO_CLASSES) if p.num_classes == 1000
            else list(range(min(p.num_classes, 10))))
        bad = [c for c in classes if not 0 <= c < p.num_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is outside [0, {p.num_classes})")
    rows = len(r.prompts) if text else len(classes)
    schedule = schedule_from_config(cfg.scheduler)
    steps = schedule.steps_per_stage(r.steps[0] if len(r.steps) == 1 else r.steps)
    grid_steps = schedule.num_train_timesteps
    if r.solver != "dopri5" and max(steps) > grid_steps:
        raise UserError(f"--steps {max(steps)} is more than the {grid_steps} model timesteps "
                        f"this model was trained on; more steps per stage cannot improve it")
    n = r.fid_samples or rows * r.num_images
    if n > MAX_IMAGES:
        raise UserError(f"{n:,} images is more than one run can number ({MAX_IMAGES:,}); "
                        "draw fewer")
    if r.out_kind == "grid" and n > MAX_GRID_IMAGES:
        raise UserError(f"a grid of {n:,} images is too large (at most {MAX_GRID_IMAGES:,}); "
                        "give --out a folder to write them as separate PNGs")
    resolution = cfg.data.resolution if r.resolution is None else r.resolution
    resolutions = schedule.stage_resolutions(resolution, p.patch_size)
    if r.evaluate is not None:  # before any sampling: the reference must fit the samples
        from pixelflow_jax.evaluate_run import check_reference
        check_reference(r.evaluate, r.inception, resolution=resolution, num_samples=n)
    devices = jax.device_count()  # the Sampler's mesh: every device
    batch = global_batch_size(r.batch_size, devices, n)
    noise = dup = None
    if r.noise_from:
        noise, dup = load_noise_npz(r.noise_from, n, resolutions, p.in_channels)
    stream = io.StringIO() if r.quiet else sys.stderr  # a few lines at most when quiet

    plan, labels = plan_output(r, ckpt, p, dtype_name, classes, steps, n, resolution, batch,
                               devices, stream, encoder_dir, negative_prompt)
    pending = plan.pending_images
    weights = (1.0,) * schedule.num_stages if text else schedule.guidance_weights()
    est = check_cost(r, p, dtype_name, weights, resolutions, steps, n, rows, batch,
                     devices, pending)
    condition = None
    if text and pending:
        from pixelflow_jax.prompts import PromptConditioning
        from pixelflow_jax.text_encoder import TextEncoder
        say(r, f"loading the text encoder {encoder_dir}...")
        encoder = TextEncoder.from_folder(encoder_dir, dtype=r.text_dtype or "float32")
        condition = PromptConditioning(encoder, r.prompts,
                                       negative_prompt, p.cross_attention_dim)

    from pixelflow_jax.sampling import Sampler  # diffrax takes a second: after the checks
    from pixelflow_jax.solvers import Dopri5Config
    dopri5 = Dopri5Config(rtol=r.rtol, atol=r.atol, max_steps=r.max_steps,
                          error_control=r.error_control)
    sampler = Sampler(model, schedule, resolution, solver=r.solver, dopri5=dopri5,
                      report_progress=r.progress == "stages")
    progress = r.progress if r.solver == "euler" or r.progress == "none" else "batches"
    how = (f"{steps} Euler steps, shift {r.shift}" if r.solver != "dopri5" else
           f"dopri5 (rtol {r.rtol}, atol {r.atol}, {r.error_control} error control)")
    status = ("every image is there already" if pending == 0 else est.summary() if pending == n
              else f"{pending} to draw, {est.summary()}")
    say(r, f"{n} images of {resolution} px, {how}, guidance {r.cfg}, {dtype_name}: {status}")
    if noise is None and pending and not text:  # text: compiled per prompt-length bucket
        note = ("the live stage display is never cached" if progress == "stages"
                else "cached for later runs")
        say(r, f"compiling for batch {batch} ({note})...")
        say(r, f"compiled in {sampler.precompile(batch, steps):.1f} s")

    with cli.writing(plan.images.folder, unnamed=False):  # checkpoint and noise are read
        if r.out_kind == "grid":
            cli.make_parents(r.out)
        summary = draw_run(sampler, plan, labels, seed=r.seed, guidance=r.cfg,
                           steps=steps, shift=r.shift, noise=noise, dup_blocks=dup,
                           progress=progress, stream=stream, condition=condition,
                           prompts=r.prompts if text else None)
    return finish(r, plan, summary, rows=rows)
