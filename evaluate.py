#!/usr/bin/env python3
"""Score generated images with the ADM suite: FID, sFID, Inception Score, precision, recall.

Examples:
  python evaluate.py fid50k.npz VIRTUAL_imagenet256_labeled.npz \
      --inception pt_inception-2015-12-05-6726825d.pth
  python evaluate.py fid50k/ VIRTUAL_imagenet256_labeled.npz \
      --inception classify_image_graph_def.pb --json scores.json

SAMPLES and REF are each an .npz holding arr_0 (uint8 images [N, H, W, 3], as
sample.py --fid-samples and ADM's reference batches store them) or a folder of
PNGs (as sample.py writes them). A reference .npz may also hold ADM's
whole-dataset statistics mu, sigma, mu_s, sigma_s: FID and sFID then use them
as they are (never recomputed); precision and recall always use its images.

The numbers reproduce OpenAI's guided-diffusion evaluations/evaluator.py
(DESIGN §12): the TF FID Inception (any of classify_image_graph_def.pb,
pt_inception-2015-12-05-6726825d.pth, weights-inception-2015-12-05-6726825d.pth)
with TF1's bilinear resize to 299; FID on pool_3, sFID on mixed_6/conv's first 7
channels, Inception Score over splits of 5,000, precision and recall with k = 3.
Images run in batches sharded over every device (and every host: run the same
command on each). Each set's features and statistics are cached beside it
(PATH.adm-stats.npz; a changed file or other weights invalidate it), so scoring
the same samples against another reference does not run the network again.

Mistakes (a missing arr_0 or statistic, images that are not uint8 [N, H, W, 3],
fewer than 4 images, resolutions that differ, unreadable weights) end with one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from pixelflow_jax import cli


def build_parser() -> argparse.ArgumentParser:
    """evaluate.py's flags."""
    p = cli.Parser(prog="evaluate.py", doc=__doc__)
    add = p.add_argument
    add("samples", metavar="SAMPLES",
        help="the generated images: an .npz with arr_0 uint8 [N, H, W, 3], or a folder of PNGs")
    add("reference", metavar="REF",
        help="the reference batch: an .npz with arr_0 (and optionally ADM's mu, sigma, mu_s, "
             "sigma_s), or a folder of PNGs")
    add("--inception", required=True, metavar="WEIGHTS",
        help="the FID Inception weights: classify_image_graph_def.pb (TF, as ADM), "
             "pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
             "weights-inception-2015-12-05-6726825d.pth (torch-fidelity); read without "
             "TensorFlow or PyTorch and cached as a converted folder after the first read")
    add("--json", metavar="PATH", default=None,
        help="also write {fid, sfid, inception_score, precision, recall} as JSON to PATH")
    add("--batch", type=cli.positive_int, default=None, metavar="N",
        help="images per batch across all devices, rounded up to a multiple of the device "
             "count (default: 64 per device)")
    add("--dtype", choices=("float32", "bfloat16"), default="float32",
        help="the network's compute dtype; bfloat16 is faster on GPU/TPU but moves the "
             "scores, so it is not for reported numbers (default %(default)s)")
    add("--no-cache", action="store_true",
        help="neither read nor write the PATH.adm-stats.npz statistics caches")
    add("--any-resolution", action="store_true",
        help="score SAMPLES and REF of different resolutions (refused by default: ADM "
             "resizes both to 299, so such scores compare unlike images)")
    cli.add_distributed(p)
    add("--quiet", action="store_true", help="print only the scores and errors")
    return p


def run(args: argparse.Namespace) -> int:
    """Start multi-host JAX if launched so, then score (pixelflow_jax.evaluate_run)."""
    from pixelflow_jax import distributed
    from pixelflow_jax.evaluate_run import EvaluateRequest, run_evaluation

    request = EvaluateRequest(
        samples=args.samples, reference=args.reference, inception=args.inception,
        json=args.json, batch=args.batch, dtype=args.dtype, cache=not args.no_cache,
        any_resolution=args.any_resolution, quiet=args.quiet)
    distributed.initialize(args.distributed)
    return run_evaluation(request)


def main(argv: list[str] | None = None) -> int:
    """Run evaluate.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv,
                        interrupted="nothing was written; the same command starts over")


if __name__ == "__main__":
    sys.exit(main())
