"""One step per stage, the data side: teacher pairs and the straightness of trajectories.

    python -m pixelflow_jax.reflow pairs --out PAIRS --num 20000 [--ckpt TEACHER] ...
    python -m pixelflow_jax.reflow straightness [--ckpt CKPT] [--steps 32] ...

``pairs`` draws the guided teacher cascade and stores every stage's end x
(pixelflow_jax.pairs, DESIGN §11): image i gets class i mod num_classes and its
noise from (seed, i); resumable (the same command finishes a killed run), sharded
over every device and host, the same pairs whatever the device count.
``straightness`` measures how straight a model's trajectories are, per stage
(the Rectified Flow paper's S, DESIGN §11), with a fine Euler solver.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, TextIO

from pixelflow_jax import cli, defaults
from pixelflow_jax.errors import UserError

if TYPE_CHECKING:
    import jax

    from pixelflow_jax.sampling import Sampler

PROG = "python -m pixelflow_jax.reflow"
STRAIGHTNESS_STEPS = 32  # Euler steps per stage of the straightness measure


# --------------------------------------------------------------------------- straightness


@dataclasses.dataclass(frozen=True)
class StraightnessEuler:
    """The official Euler steps (:class:`pixelflow_jax.solvers.Euler`'s tables and update)
    that also measure every image's straightness in each stage (DESIGN §11).

    Its per-image extras (``StageTrace.aux``): ``deviation`` = (1/d) sum_i w_i
    ||v_i - vbar||^2 and ``displacement`` = (1/d) ||vbar||^2, with v_i the velocity of
    step i, w_i = dt_i / sum dt, vbar = sum_i w_i v_i (= x_end - x_start: a stage's
    time runs from 0 to 1) and d = R_s^2 C. Accumulated in one pass (weighted
    Welford), so a nearly straight path loses no digits to cancellation.
    """

    max_steps: int | None = None
    copies: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False

    def inputs(self, schedule, steps, shift: float) -> dict[str, Any]:
        """The padded Euler tables T, dt [S, M] and step counts n [S]."""
        tables = schedule.euler_tables(steps, shift, self.max_steps)
        return {"T": tables.T, "dt": tables.dt, "n": tables.num_steps}

    def solve_stage(self, velocity, y, cond, stage: int, inputs: dict[str, Any]):
        import jax
        import jax.numpy as jnp

        T, dt, n = inputs["T"][stage], inputs["dt"][stage], inputs["n"][stage]
        x = y[0]
        B, d = x.shape[0], x[0].size
        axes = tuple(range(1, x.ndim))

        def step(i, carry):
            y, W, mean, M2 = carry
            v = velocity(y, T[i], cond)
            y = jax.tree.map(lambda a, b: a + dt[i] * b, y, v)
            u = v[0].astype(jnp.float32)
            W1 = W + dt[i]
            delta = u - mean
            mean = mean + (dt[i] / W1) * delta
            M2 = M2 + dt[i] * jnp.sum(delta * (u - mean), axis=axes)
            return y, W1, mean, M2

        init = (y, jnp.zeros((), jnp.float32), jnp.zeros(x.shape, jnp.float32),
                jnp.zeros((B,), jnp.float32))
        y, W, mean, M2 = jax.lax.fori_loop(0, n, step, init)
        aux = {"deviation": M2 / W / d,
               "displacement": jnp.sum(jnp.square(mean), axis=axes) / d}
        return y, jnp.full((B,), n), jnp.ones((B,), bool), aux

    def evaluations(self, steps):
        """One velocity evaluation per step."""
        return steps


@dataclasses.dataclass
class Straightness:
    """Per-stage straightness of a model's trajectories (DESIGN §11), means over images.

    ``deviation[s]``: S_s, the mean over images of (1/d) sum_i w_i ||v_i - vbar||^2
    (0 for a straight trajectory); ``displacement[s]``: the mean of (1/d) ||vbar||^2;
    ``relative[s]`` = deviation / displacement (scale-free, comparable across stages).
    """

    deviation: list[float]
    displacement: list[float]
    images: int
    steps: list[int]
    guidance: float
    shift: float
    seed: int

    @property
    def relative(self) -> list[float]:
        return [d / m if m > 0 else float("nan")
                for d, m in zip(self.deviation, self.displacement)]

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), relative=self.relative)


def straightness_sampler(model, schedule, resolution: int, *, max_steps: int | None = None,
                         mesh: jax.sharding.Mesh | None = None) -> Sampler:
    """A :class:`~pixelflow_jax.sampling.Sampler` that measures straightness (trace on)."""
    from pixelflow_jax.sampling import Sampler
    return Sampler(model, schedule, resolution, solver=StraightnessEuler(max_steps),
                   mesh=mesh, trace=True)


def measure_straightness(sampler: Sampler, num: int, *, seed: int = defaults.SEED,
                         guidance: float = defaults.GUIDANCE,
                         steps: int | Sequence[int] = STRAIGHTNESS_STEPS,
                         shift: float = defaults.SHIFT, batch_size: int = 50,
                         stream: TextIO | None = None) -> Straightness:
    """Straightness of ``num`` images (image i: class i mod num_classes, noise from
    (seed, i)) drawn by ``sampler`` (from :func:`straightness_sampler`) with ``steps``
    Euler steps per stage and guidance ``guidance`` (0 or 1: none). ``stream``: a line
    per batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pixelflow_jax import distributed
    from pixelflow_jax.generate import global_batch_size, host_rows
    from pixelflow_jax.pairs import pair_labels

    S = sampler.schedule.num_stages
    steps = sampler.schedule.steps_per_stage(steps)
    labels = pair_labels(num, sampler.params.num_classes)
    G = global_batch_size(batch_size, sampler, num)
    sums = np.zeros((2, S), np.float64)
    masked_sum = jax.jit(lambda aux, m: jnp.stack([
        jnp.stack([jnp.sum(a["deviation"] * m), jnp.sum(a["displacement"] * m)])
        for a in aux], axis=1))
    batches = -(-num // G)
    for b in range(batches):
        lo, hi = b * G, min((b + 1) * G, num)
        rows, real = host_rows(lo, hi, G)
        out = sampler.sample(seed, rows, labels=labels[rows], steps=steps, guidance=guidance,
                             shift=shift)
        mask = distributed.to_global((np.arange(len(rows)) < real).astype(np.float32),
                                     sampler.mesh)
        sums += np.asarray(distributed.to_local(masked_sum(out.trace.aux, mask)), np.float64)
        if stream is not None and jax.process_index() == 0:
            stream.write(f"batch {b + 1}/{batches}: images {lo}-{hi - 1}\n")
            stream.flush()
    return Straightness(deviation=(sums[0] / num).tolist(), displacement=(sums[1] / num).tolist(),
                        images=num, steps=steps, guidance=float(guidance), shift=float(shift),
                        seed=int(seed))


def format_straightness(result: Straightness, resolutions: Sequence[int]) -> str:
    """A small table: stage, side, S, |vbar|^2, S / |vbar|^2."""
    lines = [f"{'stage':>5} {'side':>5} {'S':>10} {'|vbar|^2':>10} {'S/|vbar|^2':>11}"]
    for s, (dev, disp, rel) in enumerate(zip(result.deviation, result.displacement,
                                             result.relative)):
        lines.append(f"{s + 1:>5} {resolutions[s]:>5} {dev:>10.4g} {disp:>10.4g} {rel:>11.4g}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _pick(given, carried, default):
    return given if given is not None else carried if carried is not None else default


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    cli.add_ckpt(parser)
    add("--cfg", type=cli.non_negative_float, default=None,
        help="classifier-free guidance g; stage s uses (g-1) w_s + 1 with the official "
             "w (DESIGN §4); 0 or 1 disables it (default: the checkpoint's sample.guidance, "
             f"else {defaults.GUIDANCE:g}: a teacher guided, a student as it samples)")
    add("--shift", type=cli.positive_float, default=None,
        help="Euler noise shift (default: the checkpoint's sample.shift, else "
             f"{defaults.SHIFT:g})")
    add("--seed", type=cli.seed, default=defaults.SEED,
        help="image i's noise comes from (seed, i) (default %(default)s)")
    cli.add_dtype(parser)
    cli.add_attention(parser)
    cli.add_distributed(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``pairs`` and ``straightness`` commands' flags."""
    p = cli.Parser(prog=PROG, doc=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=cli.Parser)
    pp = sub.add_parser(
        "pairs", help="draw teacher pairs (every stage's end x) into a folder",
        description="Draw N images with the guided teacher cascade and store every stage's "
                    "end x (float32 by default: 16 KB per image for digits, 1.0 MB for XL "
                    "256 px) into OUT; the starts are rebuilt from (seed, image). Resumable: "
                    "the same command finishes an interrupted run.")
    add = pp.add_argument
    add("--out", required=True, metavar="PAIRS",
        help="pair folder to write (created; rerunning the same command resumes it)")
    add("--num", type=cli.positive_int, required=True, metavar="N",
        help="images (pairs per stage); image i has class i mod num_classes")
    _add_model_flags(pp)
    add("--solver", choices=defaults.SOLVERS, default=None,
        help="teacher solver (default: the checkpoint's sample.solver, else "
             f"{defaults.SOLVERS[0]})")
    add("--steps", type=cli.positive_int_list, nargs="+", default=None, metavar="N",
        help="teacher Euler steps per stage: one number or one per stage (default: the "
             f"checkpoint's sample.steps, else {defaults.STEPS})")
    add("--rtol", type=cli.positive_float, default=defaults.RTOL,
        help="dopri5 relative tolerance (default %(default)g)")
    add("--atol", type=cli.positive_float, default=defaults.ATOL,
        help="dopri5 absolute tolerance (default %(default)g)")
    add("--max-steps", type=cli.positive_int, default=defaults.MAX_SOLVER_STEPS,
        help="dopri5 step limit per stage; images that hit it are not written "
             "(default %(default)s)")
    add("--error-control", choices=defaults.ERROR_CONTROLS, default="image",
        help="dopri5: image = every image its own steps, so pairs do not depend on the "
             "batch or device count (default); batch = the official shared step size")
    add("--batch", type=cli.positive_int, default=64, metavar="B",
        help="images per compiled batch across all devices, rounded up to a multiple of "
             "the device count; each batch is written as it finishes (default %(default)s)")
    add("--storage", choices=("float32", "float16", "bfloat16"), default="float32",
        help="dtype on disk; float16 halves the size and rounds by ~2.4e-4 at |x| = 0.5, "
             "far below a uint8 level (0.0078); bfloat16 rounds 8x coarser "
             "(default %(default)s)")
    add("--max-batches", type=cli.positive_int, default=None, metavar="K",
        help="stop after K batches (time-sliced jobs); the same command continues")
    add("--yes", action="store_true",
        help="run a request estimated to take more than 24 h (refused otherwise)")
    add("--quiet", action="store_true", help="print nothing but errors")

    sp = sub.add_parser(
        "straightness", help="per-stage straightness of a model's trajectories",
        description="Draw N images with a fine Euler solver and print, per stage, the "
                    "straightness S (the Rectified Flow paper's, DESIGN §11): the mean "
                    "squared deviation of the velocity from the stage's displacement, per "
                    "value; 0 for straight trajectories.")
    add = sp.add_argument
    add("--num", type=cli.positive_int, default=200, metavar="N",
        help="images (default %(default)s)")
    add("--steps", type=cli.positive_int_list, nargs="+", default=[STRAIGHTNESS_STEPS],
        metavar="N", help="Euler steps per stage of the measure; the same for every model "
                          "compared (default %(default)s)")
    _add_model_flags(sp)
    add("--batch", type=cli.positive_int, default=50, metavar="B",
        help="images per compiled batch (default %(default)s)")
    add("--json", action="store_true", help="print the result as one JSON line too")
    return p


def _load(args) -> tuple[Any, Any, str, str]:
    """(model, config, checkpoint folder, compute dtype name)."""
    import numpy as np

    from pixelflow_jax import runtime
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.default_model import resolve_checkpoint

    runtime.enable_compilation_cache()
    dtype = runtime.compute_dtype(args.dtype)
    ckpt = os.path.abspath(resolve_checkpoint(args.ckpt))
    model, cfg = load_checkpoint(ckpt, dtype=dtype, attention_impl=args.attention)
    p = cfg.params
    if p.cross_attention_dim is not None or p.num_classes == 0:
        raise UserError(f"{ckpt} is not a class-conditional model; pairs and straightness "
                        "work on class models")
    return model, cfg, ckpt, np.dtype(dtype).name


def run_pairs(args: argparse.Namespace) -> int:
    """``pairs``: plan, check the cost, draw; returns the exit code."""
    import jax

    from pixelflow_jax import estimate
    from pixelflow_jax.generate import global_batch_size
    from pixelflow_jax.pairs import bytes_per_image, make_pairs, pair_settings, plan_pairs
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.scheduler import schedule_from_config
    from pixelflow_jax.solvers import Dopri5Config

    cli.check_output(args.out, "--out", "folder")
    model, cfg, ckpt, dtype_name = _load(args)
    sample_cfg = getattr(cfg, "sample", None)
    carried = lambda name: getattr(sample_cfg, name, None)
    guidance = _pick(args.cfg, carried("guidance"), defaults.GUIDANCE)
    solver = _pick(args.solver, carried("solver"), defaults.SOLVERS[0])
    shift = _pick(args.shift, carried("shift"), defaults.SHIFT)
    steps_given = args.steps and [n for group in args.steps for n in group]
    carried_steps = carried("steps")
    if isinstance(carried_steps, int):
        carried_steps = [carried_steps]
    steps = _pick(steps_given, carried_steps, [defaults.STEPS])
    schedule = schedule_from_config(cfg.scheduler)
    steps = schedule.steps_per_stage(steps[0] if len(steps) == 1 else steps)
    if solver != "dopri5" and max(steps) > schedule.num_train_timesteps:
        raise UserError(f"--steps {max(steps)} is more than the "
                        f"{schedule.num_train_timesteps} model timesteps")
    dopri5 = Dopri5Config(rtol=args.rtol, atol=args.atol, max_steps=args.max_steps,
                          error_control=args.error_control)
    sampler = Sampler(model, schedule, cfg.data.resolution, solver=solver, dopri5=dopri5,
                      trace=True)
    G = global_batch_size(args.batch, sampler, args.num)
    teacher = {"checkpoint": ckpt, "dtype": dtype_name}
    if solver == "dopri5":
        teacher.update(rtol=args.rtol, atol=args.atol, error_control=args.error_control)
    settings = pair_settings(sampler, args.num, seed=args.seed, guidance=guidance, steps=steps,
                             shift=shift, batch=G, storage=args.storage, teacher=teacher)
    say = (lambda text: None) if args.quiet or jax.process_index() != 0 else \
        (lambda text: print(text, file=sys.stderr, flush=True))
    plan = plan_pairs(args.out, settings)
    pending = plan.pending_images
    per_image = bytes_per_image(sampler.resolutions, sampler.params.in_channels, args.storage)
    device = jax.devices()[0]
    devices = sampler.mesh.size
    est = estimate.estimate_sampling(
        cfg.params, sampler.resolutions, solver=solver, steps=steps, max_steps=args.max_steps,
        guidance=guidance, guidance_weights=sampler.guidance_weights, images=pending,
        rows_per_device=G // devices, devices=devices, hosts=jax.process_count(),
        platform=device.platform, kind=device.device_kind, dtype_name=dtype_name,
        disk_per_image=per_image + 256 / max(G, 1))
    problem = None
    try:
        estimate.check_estimate(est, disk_free=estimate.free_disk(args.out),
                                memory_free=estimate.free_memory(device), out=args.out,
                                allow_long=args.yes)
    except UserError as e:
        problem = e
    estimate.agree_on_all_hosts(problem)
    how = (f"{steps} Euler steps, shift {shift}" if solver != "dopri5" else
           f"dopri5 (rtol {args.rtol}, atol {args.atol}, {args.error_control} error control)")
    say(f"{args.num} pairs of {sampler.resolutions} px ({estimate.describe_bytes(per_image)} "
        f"per image in {args.storage}), {how}, guidance {guidance}, {dtype_name}: "
        + ("every batch is there already" if not pending else
           f"{pending} to draw, {est.summary()}"))
    if pending:
        say(f"compiling for batch {G}...")
        say(f"compiled in {sampler.compile(G // jax.process_count(), steps):.1f} s")
    with cli.writing(args.out, unnamed=False):
        summary = make_pairs(sampler, plan, max_batches=args.max_batches,
                             quiet=args.quiet)
    problems = []
    if summary.num_nonfinite:
        problems.append(f"{summary.num_nonfinite} image(s) came out with NaN or inf values "
                        f"(first: {summary.nonfinite[:10]})")
    if summary.num_unfinished:
        problems.append(f"{summary.num_unfinished} image(s) did not finish within "
                        f"--max-steps {args.max_steps} (first: {summary.unfinished[:10]})")
    if problems:
        for line in problems:
            print(f"{PROG} pairs: {line}; their batches were not written", file=sys.stderr)
        return cli.EXIT_UNFINISHED
    if summary.batches_left:
        say(f"stopped after --max-batches {args.max_batches}: {summary.batches_left} batches "
            "left; rerun the same command to continue")
        return cli.EXIT_OK
    rate = summary.drawn / summary.seconds if summary.seconds else 0.0
    say(f"wrote {args.num} pairs to {args.out} "
        f"({estimate.describe_bytes(args.num * per_image)}); drew {summary.drawn} in "
        f"{summary.seconds:.1f} s ({rate:.1f} pairs/s)")
    return cli.EXIT_OK


def run_straightness(args: argparse.Namespace) -> int:
    """``straightness``: measure and print; returns the exit code."""
    import jax

    from pixelflow_jax.scheduler import schedule_from_config

    model, cfg, ckpt, dtype_name = _load(args)
    sample_cfg = getattr(cfg, "sample", None)
    guidance = _pick(args.cfg, getattr(sample_cfg, "guidance", None), defaults.GUIDANCE)
    shift = _pick(args.shift, getattr(sample_cfg, "shift", None), defaults.SHIFT)
    schedule = schedule_from_config(cfg.scheduler)
    flat = [n for group in args.steps for n in group]
    steps = schedule.steps_per_stage(flat[0] if len(flat) == 1 else flat)
    if max(steps) > schedule.num_train_timesteps:
        raise UserError(f"--steps {max(steps)} is more than the "
                        f"{schedule.num_train_timesteps} model timesteps")
    sampler = straightness_sampler(model, schedule, cfg.data.resolution)
    first = jax.process_index() == 0
    if first:
        print(f"{ckpt}: {args.num} images, {steps} Euler steps per stage, guidance "
              f"{guidance}, shift {shift}, seed {args.seed}, {dtype_name}", file=sys.stderr)
    result = measure_straightness(sampler, args.num, seed=args.seed, guidance=guidance,
                                  steps=steps, shift=shift, batch_size=args.batch,
                                  stream=sys.stderr)
    if first:
        print(format_straightness(result, sampler.resolutions))
        if args.json:
            print(json.dumps(dict(result.as_dict(), checkpoint=ckpt)))
    return cli.EXIT_OK


def run(args: argparse.Namespace) -> int:
    from pixelflow_jax import distributed
    distributed.initialize(args.distributed)
    return run_pairs(args) if args.command == "pairs" else run_straightness(args)


def interrupted(args: argparse.Namespace) -> str:
    if args.command == "pairs":
        return f"the finished batches in {args.out} are kept; rerun the same command to resume"
    return "nothing was written"


def main(argv: list[str] | None = None) -> int:
    """Run the tool with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
