"""Progress display for long jitted work, fed from inside the computation.

Jitted code calls :func:`report` through ``jax.debug.callback``; the callback
target is this module's fixed function, so swapping displays never changes a
traced program (no recompilation). With no display active, reports are dropped.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_lock = threading.Lock()
_active: "CascadeProgress | None" = None


def report(stage, step) -> None:
    """Host-side target of ``jax.debug.callback``: stage ``stage`` finished step ``step``."""
    display = _active
    if display is not None:
        display.update(int(stage), int(step))


class CascadeProgress:
    """One line per stage: steps done, elapsed time and images/s at its end.

    Use as a context manager around one call of a jitted cascade::

        with CascadeProgress(steps=[10, 10, 10, 10], batch=8, label="batch 1/4"):
            images = sampler.generate(...)
    """

    def __init__(self, steps: list[int], batch: int, label: str = "",
                 stream: TextIO | None = None, min_interval: float = 0.2):
        self.steps, self.batch, self.label = list(steps), batch, label
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = min_interval
        self._stage, self._step, self._last_draw = 0, 0, 0.0
        self._stage_start = self._start = 0.0
        self.stage_seconds: list[float] = []

    def __enter__(self) -> "CascadeProgress":
        global _active
        with _lock:
            _active = self
        self._start = self._stage_start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        with _lock:
            _active = None
        if exc[0] is None:
            total = time.perf_counter() - self._start
            self._write(f"{self._prefix()}done in {total:.2f} s "
                        f"({self.batch / max(total, 1e-9):.2f} images/s)", final=True)

    def _prefix(self) -> str:
        return f"{self.label}: " if self.label else ""

    def _write(self, text: str, final: bool) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, stage: int, step: int) -> None:
        now = time.perf_counter()
        S = len(self.steps)
        if stage < self._stage or (stage == self._stage and step < self._step):
            return  # unordered callbacks: never move backwards
        self._stage, self._step = stage, step
        n = self.steps[stage]
        if step + 1 >= n:
            seconds = now - self._stage_start
            self.stage_seconds.append(seconds)
            self._stage_start = now
            self._write(f"{self._prefix()}stage {stage + 1}/{S}: {n} steps in {seconds:.2f} s "
                        f"({self.batch / max(seconds, 1e-9):.2f} images/s)", final=True)
        elif now - self._last_draw >= self.min_interval:
            self._last_draw = now
            bar = "#" * int(20 * (step + 1) / n)
            self._write(f"{self._prefix()}stage {stage + 1}/{S} [{bar:<20}] {step + 1}/{n} "
                        f"({now - self._stage_start:.1f} s)", final=False)
