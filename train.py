#!/usr/bin/env python3
"""Train PixelFlow (class-conditional) on an image folder or a TFDS dataset.

  python train.py CONFIG --out RUN_DIR [--set train.lr=2e-4 data.root=/data/imagenet/train ...]

Running the same command again resumes from RUN_DIR's latest checkpoint, exactly. On a
multi-host TPU slice run the same command on every host. The EMA weights are written to
RUN_DIR/ema at the end (a folder for sample.py --ckpt); --export-ema DIR writes them from the
latest checkpoint at any time. User mistakes end with one line and exit code 2; a non-finite
loss stops training with exit code 3.
"""

from __future__ import annotations

import argparse
import sys

EXIT_NAN = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a config.yaml (the official layout; train/data keys of ours "
                                  "are listed in README.md)")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="output folder: config.yaml, checkpoints/, metrics.jsonl, samples/, ema/")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override config keys, e.g. train.lr=2e-4 train.steps=1000 "
                        "data.source=tfds (values are YAML)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps in total; rerun to continue")
    p.add_argument("--export-ema", metavar="DIR", default=None,
                   help="do not train: write the EMA weights of RUN_DIR's latest checkpoint to "
                        "DIR as a sampling checkpoint")
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="call jax.distributed.initialize(): auto = when launched on several "
                        "hosts (multi-host TPU slice, SLURM, MPI, or a coordinator address)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from pixelflow_jax.errors import UserError
    try:
        from pixelflow_jax import distributed, runtime
        distributed.initialize(args.distributed)
        runtime.enable_compilation_cache()
        from pixelflow_jax.config import load_config
        from pixelflow_jax.trainer import Trainer, export_checkpoint_ema
        if args.export_ema:
            path = export_checkpoint_ema(args.out, args.export_ema)
            print(f"wrote {path}", file=sys.stderr)
            return 0
        if args.stop_after is not None and args.stop_after < 1:
            raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
        cfg = load_config(args.config, args.overrides)
        result = Trainer(cfg, args.out).run(stop_after=args.stop_after)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; rerun the same command to resume from the last "
              "checkpoint", file=sys.stderr)
        return 130
    return EXIT_NAN if result.status == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
