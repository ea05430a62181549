"""What a sampling request will cost, estimated before any work, and the limits on it.

``sample.py`` refuses (exit 2, the estimate in the message) a request that would
take more than :data:`MAX_SECONDS` (``--yes`` lifts that limit), needs more disk
than is free where it writes, or whose batch needs more memory than is free.

Assumptions, all chosen so that the estimate errs low (a refusal is then sure):

- Work: the analytic FLOP count of :func:`pixelflow_jax.flops.sampling_flops`
  (norms, softmax and elementwise work not counted), with the requested Euler
  steps per stage, or for Dopri5 :data:`DOPRI5_EVALUATIONS_PER_STAGE` velocity
  evaluations per stage (at most 1 + 6 ``max_steps``). One pass per evaluation
  where a stage's guidance is 1 (its unconditional pass is skipped, DESIGN §4),
  else two. Dopri5's duplicated half costs no model calls (DESIGN §4).
- Speed: on CPU :data:`CPU_FLOPS_PER_CORE` per usable core (BENCHMARKS.md
  measured ~81 GFLOP/s on 2 cores for a compute-bound model; small models reach
  less). On GPU/TPU :data:`ACCELERATOR_UTILIZATION` of the device's dense bf16
  peak (:func:`pixelflow_jax.trainer.peak_flops`; half that in float32), or
  :data:`DEFAULT_ACCELERATOR_FLOPS` for a device of unknown kind.
- Disk: a PNG is at most R*R*C bytes plus its chunk overhead (it compresses, and
  even incompressible noise stays within that), the ``.npz`` exactly R*R*3 per image.
- Memory: the activations of one device's share of the batch at the last stage,
  :data:`ACTIVATION_WIDTHS` tensors of tokens x width per forward row (the
  residual stream and the 4x MLP hidden layer), against free host memory (CPU)
  or the device's free memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

import numpy as np

from pixelflow_jax.config import ModelParams
from pixelflow_jax.errors import UserError
from pixelflow_jax.flops import sampling_flops

MAX_SECONDS = 24 * 3600
DOPRI5_EVALUATIONS_PER_STAGE = 40
CPU_FLOPS_PER_CORE = 25e9
ACCELERATOR_UTILIZATION = 0.5
DEFAULT_ACCELERATOR_FLOPS = 100e12
ACTIVATION_WIDTHS = 6
PNG_OVERHEAD = 1024  # signature, IHDR, IEND, per-row filter bytes of small images


def describe_seconds(seconds: float) -> str:
    """'~40 s', '~12 min', '~5.0 h', '~3,900 days'."""
    if seconds < 90:
        return f"~{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:,.0f} days"


def describe_bytes(n: float) -> str:
    """'512 B', '3.1 MB', '2.9 TB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def evaluations_per_stage(solver: str, steps: Sequence[int], max_steps: int) -> list[float]:
    """Velocity evaluations per stage: the Euler steps, or Dopri5's assumed count."""
    if solver == "dopri5":
        return [float(min(DOPRI5_EVALUATIONS_PER_STAGE, 1 + 6 * max_steps))] * len(steps)
    return [float(n) for n in steps]


def passes_per_stage(weights: Sequence[float], guidance: float) -> list[int]:
    """Forward passes per evaluation: 1 where g_s = (g - 1) w_s + 1 is 1, else 2."""
    return [1 if guidance == 0 or (guidance - 1) * w == 0 else 2 for w in weights]


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_flops(platform: str, kind: str, dtype_name: str) -> float:
    """Assumed sustained FLOP/s of one device (CPU: of the whole machine)."""
    if platform == "cpu":
        return CPU_FLOPS_PER_CORE * usable_cores()
    from pixelflow_jax.trainer import PEAK_FLOPS  # GPU/TPU only: trainer imports optax
    kind = kind.lower()
    peak = next((p for name, p in PEAK_FLOPS if name in kind), DEFAULT_ACCELERATOR_FLOPS)
    return peak * ACCELERATOR_UTILIZATION * (1.0 if dtype_name == "bfloat16" else 0.5)


def free_memory(device) -> float | None:
    """Free bytes where ``device`` computes: host memory for CPU, else the device's."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return float(line.split()[1]) * 1024
        except OSError:
            pass
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def free_disk(path: str) -> float:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return float(shutil.disk_usage(folder).free)


def png_bytes(resolution: int, channels: int) -> int:
    """Upper bound of one PNG's size (see the module docstring)."""
    return resolution * (resolution * channels + 1) + PNG_OVERHEAD


def batch_memory(p: ModelParams, resolution: int, rows_per_device: int, passes: int,
                 dtype_bytes: int) -> float:
    """Activation bytes of one device's rows at the last stage (a lower bound)."""
    tokens = (resolution // p.patch_size) ** 2
    return float(rows_per_device) * passes * tokens * p.embed_dim * ACTIVATION_WIDTHS \
        * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The cost of a request: time on the devices used, disk and batch memory."""

    images: int
    flops_per_image: float
    flops_per_second: float
    where: str
    disk_bytes: float
    memory_bytes: float

    @property
    def seconds(self) -> float:
        return self.images * self.flops_per_image / self.flops_per_second

    def summary(self) -> str:
        """'~12 min on 1 cpu device'."""
        return f"{describe_seconds(self.seconds)} on {self.where}"

    def basis(self) -> str:
        """How the time was estimated, for messages."""
        return (f"{self.images:,} images x {self.flops_per_image:.3g} FLOP at an assumed "
                f"{self.flops_per_second / 1e9:,.0f} GFLOP/s")


def estimate_sampling(p: ModelParams, resolutions: Sequence[int], *, solver: str,
                      steps: Sequence[int], max_steps: int, guidance: float,
                      guidance_weights: Sequence[float], images: int, rows_per_device: int,
                      devices: int, hosts: int = 1, platform: str, kind: str, dtype_name: str,
                      disk_per_image: float, disk_extra: float = 0.0) -> Estimate:
    """The :class:`Estimate` of drawing ``images`` images (see the module docstring)."""
    passes = passes_per_stage(guidance_weights, guidance)
    flops = sampling_flops(p, resolutions, evaluations_per_stage(solver, steps, max_steps),
                           passes)
    # CPU devices of one host share its cores: the machine, not the device, is the unit.
    rate = device_flops(platform, kind, dtype_name) * (hosts if platform == "cpu" else devices)
    dtype_bytes = 2 if dtype_name == "bfloat16" else 4
    return Estimate(
        images=images, flops_per_image=flops, flops_per_second=rate,
        where=f"{devices} {platform} device{'s' if devices != 1 else ''}",
        disk_bytes=images * disk_per_image + disk_extra,
        memory_bytes=batch_memory(p, resolutions[-1], rows_per_device, max(passes),
                                  dtype_bytes))


def check_estimate(est: Estimate, *, disk_free: float, memory_free: float | None,
                   out: str, allow_long: bool, max_seconds: float = MAX_SECONDS) -> None:
    """Raise UserError when ``est`` is over a limit (time only without ``allow_long``)."""
    if not allow_long and est.seconds > max_seconds:
        raise UserError(
            f"this request would take {est.summary()} ({est.basis()}), more than the "
            f"{max_seconds / 3600:g} h limit; draw fewer images or steps, "
            "or pass --yes to run it anyway")
    if est.disk_bytes > disk_free:
        raise UserError(
            f"this request needs up to {describe_bytes(est.disk_bytes)} of disk for "
            f"{est.images:,} images, but {out} has {describe_bytes(disk_free)} free "
            f"(and would take {est.summary()}); draw fewer images or choose another --out")
    if memory_free is not None and est.memory_bytes > memory_free:
        raise UserError(
            f"one batch needs ~{describe_bytes(est.memory_bytes)} of memory per device, more "
            f"than the {describe_bytes(memory_free)} free; lower --batch-size")


def agree_on_all_hosts(problem: UserError | None) -> None:
    """Raise on every host when any host found a problem (hosts must not part ways: the
    ones that carry on would wait forever in a collective)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        flags = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
        if problem is None and flags.any():
            raise UserError(f"host {int(np.flatnonzero(flags)[0])} refused the request "
                            "(see its message)")
    if problem is not None:
        raise problem
