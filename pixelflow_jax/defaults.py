"""Sampling defaults and option lists, defined once for the library, the CLIs and the demo.

The values are the official sampler's (guidance 4, 10 Euler steps per stage, shift 1)
and the project's seed 42; the FID recipe overrides guidance (2.4) and the solver.
"""

from __future__ import annotations

GUIDANCE = 4.0          # classifier-free guidance g (0 disables it)
STEPS = 10              # Euler steps per stage
SHIFT = 1.0             # Euler noise shift
SEED = 42
SOLVERS = ("euler", "euler-diffrax", "dopri5")
DTYPES = ("auto", "float32", "bfloat16")
# Dopri5 (the published FID recipe; torchdiffeq's defaults in the official sampler)
RTOL = 1e-3
ATOL = 1e-6
MAX_SOLVER_STEPS = 1000  # per stage
ERROR_CONTROLS = ("batch", "image")
