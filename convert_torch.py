#!/usr/bin/env python3
"""Convert the official PixelFlow PyTorch checkpoints into pixelflow-jax checkpoints, and back.

  python convert_torch.py SRC DST              # official folder (model.pt + config.yaml) -> DST
  python convert_torch.py model.pt DST --config config.yaml
  python convert_torch.py --to-torch SRC DST   # pixelflow-jax folder -> model.pt + config.yaml

PyTorch is not needed, and a checkpoint cannot run code: the pickle inside
model.pt may name only what a plain state dict needs. Every problem is
reported at once, and nothing is left in DST on failure. Bad input ends with
exit code 2.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_torch.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", help="official checkpoint folder (model.pt + config.yaml), a "
                               ".pt/.pth/.safetensors file (with --config), or with --to-torch "
                               "a pixelflow-jax checkpoint folder")
    p.add_argument("dst", help="output folder (written beside, then renamed into place)")
    p.add_argument("--config", help="config.yaml for a bare weights file, or to override the "
                                    "folder's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the stored parameters (the model computes with float32 "
                        "parameters either way; bfloat16 halves the folder)")
    p.add_argument("--to-torch", action="store_true",
                   help="convert a pixelflow-jax checkpoint back to model.pt (float32) + "
                        "config.yaml, loadable by the official code with strict=True")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from pixelflow_jax.errors import UserError
    from pixelflow_jax.torch_checkpoint import export_torch_checkpoint, import_torch_checkpoint
    try:
        if args.to_torch:
            if args.config or args.dtype != "float32":
                raise UserError("--to-torch writes float32 with the checkpoint's own config; "
                                "--config and --dtype do not apply")
            report = export_torch_checkpoint(args.src, args.dst, overwrite=args.overwrite)
        else:
            report = import_torch_checkpoint(args.src, args.dst, config=args.config,
                                             dtype=args.dtype, overwrite=args.overwrite)
    except UserError as e:
        print(f"convert_torch.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert_torch.py: interrupted; DST was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.dst}: {report.tensors} tensors, {report.parameters:,} parameters "
          f"in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
