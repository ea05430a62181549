"""Write a randomly initialised checkpoint folder for a config.

    python -m pixelflow_jax.init_checkpoint CONFIG OUT_DIR [--weights official|normal]

``official`` is the official from-scratch initialisation (zero output layer:
the model predicts 0, so samples are the initial noise); ``normal`` draws every
weight at normal scale (linears N(0, 1/fan_in), biases N(0, 0.1^2), norms
1 + N(0, 0.2^2)), which exercises every layer: useful for smoke tests and
benchmarks. Neither draws pictures; trained weights come from convert_torch.py
or train.py.
"""

from __future__ import annotations

import argparse
import sys

from pixelflow_jax import cli

PROG = "python -m pixelflow_jax.init_checkpoint"


def build_parser() -> argparse.ArgumentParser:
    """init_checkpoint's flags."""
    p = cli.Parser(prog=PROG, doc=__doc__)
    p.add_argument("config", help="a config.yaml (official layout)")
    p.add_argument("out", help="checkpoint folder to write (missing parent folders are "
                               "created)")
    p.add_argument("--weights", choices=["official", "normal"], default="normal",
                   help="official from-scratch init, or normal-scale random weights "
                        "(default %(default)s)")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="random seed of the weights (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint; returns the exit code."""
    cli.check_output(args.out, "OUT", "replace", overwrite=args.overwrite)
    cli.check_distinct(args.out, args.config, "OUT", "CONFIG")
    import jax
    import jax.numpy as jnp

    from pixelflow_jax.checkpoint import param_tree, save_checkpoint
    from pixelflow_jax.config import load_config
    from pixelflow_jax.convert import official_to_nnx
    from pixelflow_jax.model import init_model
    from pixelflow_jax.random_weights import normal_scale_state_dict

    cfg = load_config(args.config)
    if args.weights == "official":
        tree = param_tree(init_model(cfg.params, seed=args.seed))
    else:
        sd = normal_scale_state_dict(cfg.params, args.seed)
        tree = jax.tree.map(jnp.asarray, official_to_nnx(sd, cfg.params))
    cli.make_parents(args.out)
    with cli.writing(args.out):
        save_checkpoint(args.out, tree, cfg, overwrite=args.overwrite)
    print(f"wrote {args.out} ({args.weights} random weights, {cfg.params.depth} blocks)")
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the tool with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted="OUT was not written")


if __name__ == "__main__":
    sys.exit(main())
