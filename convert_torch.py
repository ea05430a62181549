#!/usr/bin/env python3
"""Convert the official PixelFlow PyTorch checkpoints into pixelflow-jax checkpoints, and back.

  python convert_torch.py SRC DST              # official folder (model.pt + config.yaml) -> DST
  python convert_torch.py model.pt DST --config config.yaml
  python convert_torch.py SRC DST --text-encoder FLAN_T5_DIR  # + DST/text_encoder/
  python convert_torch.py --to-torch SRC DST   # pixelflow-jax folder -> model.pt + config.yaml

PyTorch is not needed, and a checkpoint cannot run code: the pickle inside
model.pt may name only what a plain state dict needs. Every problem is
reported at once, and nothing is left in DST on failure. Bad input (DST is
checked before anything is read) ends with one line and exit code 2; Ctrl-C
with 130.
"""

from __future__ import annotations

import argparse
import sys

from pixelflow_jax import cli, defaults


def build_parser() -> argparse.ArgumentParser:
    """convert_torch.py's flags."""
    p = cli.Parser(prog="convert_torch.py", doc=__doc__)
    p.add_argument("src", help="official checkpoint folder (model.pt + config.yaml), a "
                               ".pt/.pth/.safetensors file (with --config), or with --to-torch "
                               "a pixelflow-jax checkpoint folder")
    p.add_argument("dst", help="output folder (written beside, then renamed into place; "
                               "missing parent folders are created)")
    p.add_argument("--config", help="config.yaml for a bare weights file, or to override the "
                                    "folder's")
    p.add_argument("--dtype", choices=[d for d in defaults.DTYPES if d != "auto"],
                   default="float32",
                   help="dtype of the stored parameters (the model computes with float32 "
                        "parameters either way; bfloat16 halves the folder) "
                        "(default %(default)s)")
    p.add_argument("--to-torch", action="store_true",
                   help="convert a pixelflow-jax checkpoint back to model.pt (float32) + "
                        "config.yaml, loadable by the official code with strict=True")
    p.add_argument("--text-encoder", metavar="HF_T5_DIR",
                   help="a Hugging Face T5 folder (google/flan-t5-xl for PixelFlow-Text2Image): "
                        "its encoder weights, config and tokenizer go into DST/text_encoder/, "
                        "so DST samples from prompts alone (the decoder is left out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit code."""
    from pixelflow_jax.errors import UserError

    if args.to_torch and (args.config or args.dtype != "float32"):
        raise UserError("--to-torch writes float32 with the checkpoint's own config; "
                        "--config and --dtype do not apply")
    if args.to_torch and args.text_encoder:
        raise UserError("--text-encoder does not apply to --to-torch (model.pt holds the "
                        "transformer only)")
    cli.check_output(args.dst, "DST", "replace", overwrite=args.overwrite)
    cli.check_distinct(args.dst, args.src, "DST", "SRC")
    if args.config:
        cli.check_distinct(args.dst, args.config, "DST", "--config")
    if args.text_encoder:
        cli.check_distinct(args.dst, args.text_encoder, "DST", "--text-encoder")
    from pixelflow_jax.torch_checkpoint import export_torch_checkpoint, import_torch_checkpoint

    cli.make_parents(args.dst)
    with cli.writing(args.dst, unnamed=False):
        if args.to_torch:
            report = export_torch_checkpoint(args.src, args.dst, overwrite=args.overwrite)
        else:
            report = import_torch_checkpoint(args.src, args.dst, config=args.config,
                                             dtype=args.dtype, overwrite=args.overwrite,
                                             text_encoder=args.text_encoder)
    print(f"wrote {args.dst}: {report.tensors} tensors, {report.parameters:,} parameters "
          f"in {report.seconds:.1f} s")
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run convert_torch.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted="DST was not written")


if __name__ == "__main__":
    sys.exit(main())
