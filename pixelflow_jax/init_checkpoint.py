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

import jax
import jax.numpy as jnp
from pixelflow_jax.checkpoint import param_tree, save_checkpoint
from pixelflow_jax.config import load_config
from pixelflow_jax.convert import official_to_nnx
from pixelflow_jax.errors import UserError
from pixelflow_jax.model import init_model
from pixelflow_jax.random_weights import normal_scale_state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelflow_jax.init_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config.yaml (official layout)")
    parser.add_argument("out", help="checkpoint folder to write")
    parser.add_argument("--weights", choices=["official", "normal"], default="normal",
                        help="official from-scratch init, or normal-scale random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.weights == "official":
            tree = param_tree(init_model(cfg.params, seed=args.seed))
        else:
            sd = normal_scale_state_dict(cfg.params, args.seed)
            tree = jax.tree.map(jnp.asarray, official_to_nnx(sd, cfg.params))
        save_checkpoint(args.out, tree, cfg, overwrite=args.overwrite)
    except UserError as e:
        print(f"init_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.weights} random weights, {cfg.params.depth} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
