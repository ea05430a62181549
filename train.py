#!/usr/bin/env python3
"""Train PixelFlow (class-conditional) on an image folder or a TFDS dataset, or reflow and
distil one on its own teacher pairs (train.objective: reflow / distill, data.pairs: a folder
from python -m pixelflow_jax.reflow pairs, train.init_from: the checkpoint to start from).

  python train.py CONFIG --out RUN_DIR [--set train.lr=2e-4 data.root=/data/imagenet/train ...]
  python train.py configs/pixelflow_digits_reflow.yaml --out runs/digits-reflow

Running the same command again resumes from RUN_DIR's latest checkpoint, exactly. On a
multi-host TPU slice run the same command on every host. The EMA weights are written to
RUN_DIR/ema at the end (a folder for sample.py --ckpt); --export-ema DIR writes them from the
latest checkpoint at any time. Exit codes: 2 for user mistakes (one line on stderr, before
any work); 3 when a non-finite loss stopped training (the last checkpoint is intact); 143
after SIGTERM, once a checkpoint is saved (schedulers read it as "terminated, retry"; the
same command resumes); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

from pixelflow_jax import cli
from pixelflow_jax.cli import EXIT_NAN, EXIT_PREEMPTED


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags."""
    p = cli.Parser(prog="train.py", doc=__doc__)
    p.add_argument("config", help="a config.yaml (the official layout; train/data keys of ours "
                                  "are listed in README.md)")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="output folder: config.yaml, checkpoints/, metrics.jsonl, samples/, "
                        "ema/ (created if missing)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override config keys, e.g. train.lr=2e-4 train.steps=1000 "
                        "data.source=tfds (values are YAML)")
    p.add_argument("--stop-after", type=cli.positive_int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps in total; rerun to continue")
    p.add_argument("--export-ema", metavar="DIR", default=None,
                   help="do not train: write the EMA weights of RUN_DIR's latest checkpoint to "
                        "DIR as a sampling checkpoint (replacing DIR)")
    cli.add_distributed(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Train (or export); returns the exit code."""
    if args.export_ema:
        cli.check_output(args.export_ema, "--export-ema", "replace")
        cli.check_distinct(args.export_ema, args.out, "--export-ema", "--out")
        cli.check_distinct(args.export_ema, os.path.join(args.out, "checkpoints"),
                           "--export-ema", "RUN_DIR/checkpoints", inside_ok=False)
    else:
        cli.check_output(args.out, "--out", "folder")
    from pixelflow_jax import distributed, runtime
    distributed.initialize(args.distributed)
    runtime.enable_compilation_cache()
    from pixelflow_jax.config import load_config
    from pixelflow_jax.trainer import Trainer, export_checkpoint_ema
    if args.export_ema:
        cli.make_parents(args.export_ema)
        with cli.writing(args.export_ema, unnamed=False):
            path = export_checkpoint_ema(args.out, args.export_ema)
        print(f"wrote {path}", file=sys.stderr)
        return cli.EXIT_OK
    cfg = load_config(args.config, args.overrides)
    with cli.writing(args.out, unnamed=False):
        result = Trainer(cfg, args.out).run(stop_after=args.stop_after)
    return {"nan": EXIT_NAN, "preempted": EXIT_PREEMPTED}.get(result.status, cli.EXIT_OK)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind."""
    if args.export_ema:
        return f"{args.export_ema} was not written"
    return ("rerun the same command to resume from the last saved checkpoint "
            "(train.save_every)")


def main(argv: list[str] | None = None) -> int:
    """Run train.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
