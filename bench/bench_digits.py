#!/usr/bin/env python3
"""Quality and speed of digits models, judged by an independent classifier (pixelflow_jax.digits)

    python bench/bench_digits.py            # the embedded model: Euler 1, 2, 5, 10, 20 + Dopri5
    python bench/bench_digits.py --per-class 30 --steps 10 --no-dopri5
    python bench/bench_digits.py --per-class 30 --model teacher=digits:10,1 \\
        --model reflowed=runs/digits-reflow/ema:1,2 --model distilled=digits-1step:1,2-1-1

Every row draws the same images: image i has digit i // per-class (per-class images of
each digit), noise from (seed, i). Reported per row: agreement (the share the classifier
labels as the requested digit), the worst digit, FD (a Frechet distance between the
classifier's hidden features of the samples and of the held-out real digits) and FD real
(the same for as many real training digits), evaluations per image (the sampler's own
count; a guided evaluation runs the model twice), model passes per image (counting those
twice, and Dopri5's official duplicated half too), seconds per image and the speed-up
against the FIRST row.

Seconds per image exclude compilation: every row is drawn once to compile (and these
images are the ones scored), then timed --repeats times, the rows taking turns so that a
change in machine load touches them alike; the best time is kept. A time covers the
whole cascade of all images in one batch, up to uint8 images on the host.

--model LABEL=CKPT[:RUNS][@GUIDANCE], repeatable, one row per model and run:
  CKPT       a checkpoint folder or an embedded short name (digits, digits-1step)
  LABEL      the row's name (default: CKPT as given)
  RUNS       comma-separated: N (N Euler steps in every stage), N1-N2-N3 (Euler steps
             per stage) or dopri5; default: the checkpoint's sample: section
             (sample.py's defaults for it), else 10 Euler steps per stage
  GUIDANCE   default: --cfg if given, else the checkpoint's sample.guidance, else 4
Without --model the bench measures one model as it always has: --ckpt (default the
embedded digits model) at each of --steps and Dopri5 (unless --no-dopri5). The Euler
shift is each checkpoint's sample.shift, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pixelflow_jax import cli  # noqa: E402  (no JAX at import)
from pixelflow_jax.errors import UserError  # noqa: E402

LEGACY_STEPS = [1, 2, 5, 10, 20]
MODEL_SYNTAX = "LABEL=CKPT[:RUNS][@GUIDANCE]"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One --model: rows for ``runs`` (None: the checkpoint's defaults). A run is
    "dopri5", an int (Euler steps in every stage) or a tuple (Euler steps per stage)."""

    label: str
    ckpt: str | None
    runs: tuple | None = None
    guidance: float | None = None


def _run_token(token: str):
    if token == "dopri5":
        return "dopri5"
    if not re.fullmatch(r"\d+(-\d+)*", token):
        raise ValueError(token)
    steps = tuple(int(n) for n in token.split("-"))
    if min(steps) < 1:
        raise ValueError(token)
    return steps[0] if len(steps) == 1 else steps


def parse_model(text: str) -> ModelSpec:
    """``--model`` text -> :class:`ModelSpec` (argparse type; messages start with "must")."""
    def bad(why: str):
        return argparse.ArgumentTypeError(f"must be {MODEL_SYNTAX} ({why}), got {text!r}")

    label, sep, rest = text.partition("=")
    if not sep:
        label, rest = "", text
    elif not label:
        raise bad("empty LABEL")
    guidance = None
    if "@" in rest:
        rest, _, g = rest.rpartition("@")
        try:
            guidance = float(g)
        except ValueError:
            raise bad(f"GUIDANCE {g!r} is not a number") from None
        if not (math.isfinite(guidance) and guidance >= 0):
            raise bad("GUIDANCE must be a finite number >= 0")
    runs = None
    if ":" in rest:
        rest, _, r = rest.rpartition(":")
        try:
            runs = tuple(_run_token(t) for t in r.split(","))
        except ValueError as e:
            raise bad(f"a run is N, N1-N2-N3 or dopri5 with steps >= 1, not {str(e)!r}") \
                from None
    if not rest:
        raise bad("empty CKPT")
    return ModelSpec(label or rest, rest, runs, guidance)


def run_name(run) -> str:
    if run == "dopri5":
        return "Dopri5"
    if isinstance(run, tuple):
        return f"Euler {'-'.join(map(str, run))}"
    return f"Euler {run}"


def speed_up(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2g}x"


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="bench_digits.py", doc=__doc__)
    ap.add_argument("--model", type=parse_model, action="append", default=None,
                    metavar=MODEL_SYNTAX, help="a model and its runs (repeatable; see below)")
    ap.add_argument("--ckpt", default=None,
                    help="without --model: the checkpoint (default: the embedded digits model)")
    ap.add_argument("--steps", type=cli.positive_int, nargs="+", default=None,
                    help="without --model: Euler steps per stage to try (default "
                         f"{' '.join(map(str, LEGACY_STEPS))})")
    ap.add_argument("--no-dopri5", action="store_true",
                    help="without --model: skip the Dopri5 row")
    ap.add_argument("--per-class", type=cli.positive_int, default=50,
                    help="images per digit (default 50)")
    ap.add_argument("--cfg", type=cli.non_negative_float, default=None,
                    help="guidance of every model without its own @GUIDANCE (default: each "
                         "checkpoint's sample.guidance, else 4, sample.py's)")
    ap.add_argument("--seed", type=cli.seed, default=42)
    ap.add_argument("--repeats", type=cli.positive_int, default=3,
                    help="timed draws per row after the compiling one; the best counts "
                         "(default 3)")
    ap.add_argument("--per-digit", action="store_true",
                    help="add a column with the agreement for every digit 0-9")
    return ap


def model_specs(args) -> list[ModelSpec]:
    if args.model is None:
        runs = tuple(args.steps or LEGACY_STEPS) + (() if args.no_dopri5 else ("dopri5",))
        return [ModelSpec(args.ckpt or "digits", args.ckpt, runs)]
    given = [f for f, v in (("--ckpt", args.ckpt), ("--steps", args.steps),
                            ("--no-dopri5", args.no_dopri5)) if v]
    if given:
        raise UserError(f"{', '.join(given)} cannot be combined with --model; give the "
                        f"checkpoint and the runs in --model {MODEL_SYNTAX}")
    labels = [m.label for m in args.model]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UserError(f"--model labels must differ: {', '.join(twice)} appears twice")
    return args.model


@dataclasses.dataclass
class Row:
    label: str
    run: object
    guidance: float
    sampler: object
    steps: object        # the Sampler's steps argument
    shift: float
    passes_per_eval: tuple  # model passes per evaluation, per stage
    images: object = None
    evaluations: float = 0.0
    passes: float = 0.0
    unfinished: int = 0
    compile_s: float = 0.0
    seconds: float = math.inf


def prepare(spec: ModelSpec, args) -> list[Row]:
    """Load one model and build its rows (one Euler sampler for all its Euler runs)."""
    import jax.numpy as jnp

    from pixelflow_jax import defaults
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.default_model import resolve_checkpoint
    from pixelflow_jax.sampling import Sampler, stage_guidance
    from pixelflow_jax.scheduler import schedule_from_config

    folder = resolve_checkpoint(spec.ckpt)
    model, cfg = load_checkpoint(folder)
    if model.params.num_classes != 10:
        raise UserError(f"{spec.label}: {folder} is not a digits model (10 classes)")
    carried = cfg.sample
    pick = lambda *values: next(v for v in values if v is not None)  # noqa: E731
    guidance = pick(spec.guidance, args.cfg, carried.guidance, defaults.GUIDANCE)
    shift = pick(carried.shift, defaults.SHIFT)
    runs = spec.runs
    if runs is None:
        steps = pick(carried.steps, defaults.STEPS)
        runs = ("dopri5",) if carried.solver == "dopri5" else \
            (steps if isinstance(steps, int) else tuple(steps),)
    schedule = schedule_from_config(cfg.scheduler)
    for run in runs:
        if run != "dopri5":
            try:
                schedule.steps_per_stage(run)
            except UserError as e:
                raise UserError(f"{spec.label}: {run_name(run)}: {e}") from None
    euler = [run for run in runs if run != "dopri5"]
    width = max((max(schedule.steps_per_stage(r)) for r in euler), default=None)
    samplers = {}
    if euler:
        samplers["euler"] = Sampler(model, schedule, cfg.data.resolution, solver="euler",
                                    max_steps=width)
    if "dopri5" in runs:
        samplers["dopri5"] = Sampler(model, schedule, cfg.data.resolution, solver="dopri5")
    any_sampler = next(iter(samplers.values()))
    guided = tuple(1 if w == 0 or float(stage_guidance(jnp.float32(guidance), w)) == 1.0
                   else 2 for w in any_sampler.guidance_weights)
    rows = []
    for run in runs:
        sampler = samplers["dopri5" if run == "dopri5" else "euler"]
        copies = sampler.stage_solver.copies  # Dopri5's official duplicated half
        rows.append(Row(spec.label, run, guidance, sampler,
                        defaults.STEPS if run == "dopri5" else run, shift,
                        tuple(g * copies for g in guided)))
    return rows


def draw(row: Row, labels, seed: int):
    """One timed draw: (samples, uint8 images on the host, seconds)."""
    import numpy as np

    from pixelflow_jax.sampling import to_images

    start = time.perf_counter()
    out = row.sampler.sample(seed, np.arange(len(labels)), labels=labels, steps=row.steps,
                             guidance=row.guidance, shift=row.shift)
    images = np.asarray(to_images(out.x))
    return out, images, time.perf_counter() - start


def run(args) -> int:
    specs = model_specs(args)

    import jax
    import numpy as np

    from pixelflow_jax import digits as D

    rows = [row for spec in specs for row in prepare(spec, args)]
    labels = np.repeat(np.arange(10), args.per_class)
    split = D.split_digits()
    clf = D.fit_classifier(split)
    for row in rows:  # compile; these images are the ones scored
        compiled = len(row.sampler.compile_seconds)
        out, row.images, seconds = draw(row, labels, args.seed)
        row.compile_s = sum(row.sampler.compile_seconds[compiled:])
        evals = np.asarray(out.stats.evaluations, np.float64)  # [S, B]
        row.evaluations = float(evals.sum(0).mean())
        row.passes = float((evals * np.asarray(row.passes_per_eval)[:, None]).sum(0).mean())
        row.unfinished = int((~np.asarray(out.stats.finished)).sum())
        print(f"{row.label}, {run_name(row.run)}, guidance {row.guidance:g}: compiled and "
              f"drawn in {seconds:.1f} s (compile {row.compile_s:.1f} s)", file=sys.stderr)
    for _ in range(args.repeats):
        for row in rows:
            row.seconds = min(row.seconds, draw(row, labels, args.seed)[2])
    n = len(labels)
    ref = rows[0].seconds / n

    head = ["model", "solver, steps / stage", "guidance", "evaluations / image",
            "model passes / image", "agreement", "worst digit"]
    head += ["per digit 0-9"] if args.per_digit else []
    head += ["FD", "FD real", "s / image", f"speed-up vs {rows[0].label}"]
    print(f"{n} images ({args.per_class} per digit), seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), JAX {jax.__version__}. Models: "
          + ", ".join(f"{s.label} = {s.ckpt or 'digits'}" for s in specs) + ".")
    print(f"s / image excludes compilation: best of {args.repeats} timed draws of all {n} "
          "images in one batch, rows taking turns.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    q = None
    for row in rows:
        q = D.evaluate(row.images, labels, split=split, clf=clf)
        worst = int(np.argmin(q.per_class))
        per_image = row.seconds / n
        cells = [row.label, run_name(row.run), f"{row.guidance:g}", f"{row.evaluations:.4g}",
                 f"{row.passes:.4g}", f"{q.agreement:.1%}",
                 f"{worst}: {q.per_class[worst]:.0%}"]
        if args.per_digit:
            cells.append(" ".join(f"{a:.0%}".rstrip("%") for a in q.per_class) + " %")
        cells += [f"{q.fd:.2f}", f"{q.fd_real:.2f}", f"{per_image:.3g}",
                  speed_up(ref / per_image)]
        if row.unfinished:
            cells[1] += f" ({row.unfinished} unfinished)"
        print("| " + " | ".join(cells) + " |")
    print(f"\nclassifier accuracy on held-out real digits: {q.classifier_accuracy:.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
