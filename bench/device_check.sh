#!/usr/bin/env bash
# One device check: every GPU figure the issues ask for, appended to BENCHMARKS.md.
#
#   bash bench/device_check.sh                          # XL on one H100/H200, under 8 minutes
#   bash bench/device_check.sh --smoke --out FILE       # tiny configs on CPU (CI)
#   bash bench/device_check.sh --budget 300 --parts euler train
#   bash bench/device_check.sh --budget 300 --parts t5 t2i     # the text path alone
#   bash bench/device_check.sh --budget 130 --parts inception  # FID Inception, 50k estimate
#
# Run from anywhere; works in the repository root. PYTHON picks the interpreter (default
# python3, the one with jax and torch on the device machine). The parts, their timeouts and
# the appended section are described in bench/device_check.py.
set -u
cd "$(dirname "$0")/.."
# Training tries the largest batch XLA's plan fits: let the allocator have most of the card
# (the PyTorch baseline runs in its own process, after the JAX worker has exited).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/device_check.py "$@"
