"""The web demo's model side, free of any web framework (``app.py`` is the page).

:class:`PixelFlowDemo` loads a class-conditional checkpoint, compiles an Euler
and a Dopri5 sampler for one batch of :data:`NUM_IMAGES` images once
(:meth:`PixelFlowDemo.warm_up`), and then answers requests: class, solver,
steps per stage, guidance, shift and seed are all traced inputs of those two
programs, so no request ever compiles again. Requests are checked first
(:meth:`PixelFlowDemo.parse`); a bad one raises :class:`UserError` with a
message fit to show to the person who sent it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import threading
import time
from typing import Any, Sequence

import numpy as np

from pixelflow_jax import defaults
from pixelflow_jax.class_names import class_names
from pixelflow_jax.errors import UserError

NUM_IMAGES = 4
MAX_STEPS = 100       # the Euler tables are compiled this wide: any 1..100 steps reuse them
STEPS_RANGE = (1, MAX_STEPS)
GUIDANCE_RANGE = (1.0, 25.0)
SHIFT_RANGE = (1.0, 100.0)
SEED_LIMIT = 2 ** 32
DEFAULT_STEPS = defaults.STEPS
DEFAULT_GUIDANCE = defaults.GUIDANCE
DEFAULT_SHIFT = defaults.SHIFT
DEFAULT_SEED = defaults.SEED
QUOTE_LIMIT = 60  # characters of a bad value quoted back in a message


@dataclasses.dataclass(frozen=True)
class DemoRequest:
    """A checked request: what :meth:`PixelFlowDemo.generate` draws."""

    class_id: int
    dopri5: bool
    steps: tuple[int, ...]   # one per stage (ignored by Dopri5, as the official code)
    guidance: float
    shift: float             # Euler only
    seed: int


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """:data:`NUM_IMAGES` uint8 images [N, R, R, C] and how they were made."""

    images: np.ndarray
    request: DemoRequest
    class_name: str
    seconds: float           # sampling wall time, compilation excluded
    evaluations: int         # velocity evaluations per image (the most any image needed)
    num_compilations: int    # compiled programs so far, both samplers together


def _quoted(value: Any) -> str:
    """``repr(value)``, cut to :data:`QUOTE_LIMIT` characters: a request may send a megabyte
    of text, and a message must not echo it back whole."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float; bools and text are rejected with a named message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{name} must be a number, got {_quoted(value)}") from None
        else:
            raise UserError(f"{name} must be a number, got {_quoted(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return value


def _integer(name: str, value: Any) -> int:
    """``value`` as an int; floats are accepted only when whole (web forms send 42.0)."""
    number = _number(name, value)
    if number != int(number):
        raise UserError(f"{name} must be a whole number, got {_quoted(value)}")
    return int(number)


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise UserError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


def _demo_mesh():
    """The local devices that split a batch of :data:`NUM_IMAGES` evenly (1 on CPU)."""
    import jax

    from pixelflow_jax import distributed

    devices = jax.local_devices()
    count = max(d for d in range(1, len(devices) + 1) if NUM_IMAGES % d == 0)
    return distributed.data_mesh(devices[:count])


class PixelFlowDemo:
    """A loaded checkpoint with both samplers, ready to serve requests one at a time.

    Args:
      ckpt_dir: a class-conditional checkpoint folder (``config.yaml`` + ``params/``,
        optionally ``class_names.txt``).
      dtype: compute dtype name (``auto``, ``float32``, ``bfloat16``).
      attention: attention kernel (see ``sample.py --attention``).

    Construction loads the weights; :meth:`warm_up` compiles. :meth:`generate`
    is safe to call from several threads: requests run one after another.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, *, dtype: str = "auto",
                 attention: str = "auto"):
        from pixelflow_jax import runtime
        from pixelflow_jax.checkpoint import load_checkpoint
        from pixelflow_jax.sampling import Sampler
        from pixelflow_jax.scheduler import schedule_from_config
        from pixelflow_jax.solvers import Dopri5Config

        self.ckpt_dir = str(ckpt_dir)
        model, cfg = load_checkpoint(ckpt_dir, dtype=runtime.compute_dtype(dtype),
                                     attention_impl=attention)
        p = cfg.params
        if p.num_classes == 0:
            raise UserError(f"{ckpt_dir} is a text-to-image model; the demo draws "
                            "class-conditional images")
        self.num_classes = p.num_classes
        self.names = class_names(ckpt_dir, p.num_classes)
        self._by_name: dict[str, int | None] = {}
        for i, name in enumerate(self.names):
            key = name.casefold()
            # ImageNet repeats two names (crane, maillot): those need the class id.
            self._by_name[key] = None if key in self._by_name else i
        self.resolution = cfg.data.resolution
        self.channels = p.in_channels
        self.schedule = schedule_from_config(cfg.scheduler)
        self.num_stages = self.schedule.num_stages
        mesh = _demo_mesh()
        self.euler = Sampler(model, self.schedule, self.resolution, solver="euler",
                             max_steps=MAX_STEPS, mesh=mesh)
        self.dopri5 = Sampler(model, self.schedule, self.resolution, solver="dopri5",
                              dopri5=Dopri5Config(), mesh=mesh)
        self.compile_seconds: float | None = None
        self.warm_up_error: str | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start-up

    def warm_up(self) -> float:
        """Compile both samplers for :data:`NUM_IMAGES` images; returns the seconds spent.

        Safe to call again (nothing recompiles). If compiling fails, the error is kept
        in :attr:`warm_up_error` (shown by the page) and raised.
        """
        with self._lock:
            if self._ready.is_set():
                return self.compile_seconds or 0.0
            try:
                start = time.perf_counter()
                self.euler.precompile(NUM_IMAGES, DEFAULT_STEPS)
                self.dopri5.precompile(NUM_IMAGES)
                self.compile_seconds = time.perf_counter() - start
            except Exception as e:
                self.warm_up_error = f"{type(e).__name__}: {e}"
                raise
            finally:
                # Waiters wake up either way; `ready` says which way it went.
                self._ready.set()
        return self.compile_seconds

    @property
    def ready(self) -> bool:
        """Warm-up finished successfully."""
        return self._ready.is_set() and self.warm_up_error is None

    def wait_until_warm(self, timeout: float | None = None) -> bool:
        """Block until warm-up has ended (either way); False on timeout."""
        return self._ready.wait(timeout)

    @property
    def num_compilations(self) -> int:
        """Compiled programs of both samplers (2 after warm-up, and it stays 2)."""
        return self.euler.num_compilations + self.dopri5.num_compilations

    # ------------------------------------------------------------------ requests

    def class_id(self, value: Any) -> int:
        """A class id from an id (int or digits) or a class name (case-insensitive)."""
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                value = int(text)
            else:
                key = text.casefold()
                if key not in self._by_name:
                    raise UserError(f"unknown class {_quoted(value)}: choose a name from the "
                                    f"list or an id from 0 to {self.num_classes - 1}")
                found = self._by_name[key]
                if found is None:
                    ids = [i for i, n in enumerate(self.names) if n.casefold() == key]
                    raise UserError(f"class name {_quoted(value)} is used by ids "
                                    f"{', '.join(map(str, ids))}: give the id")
                return found
        if value is None:
            raise UserError("choose a class")
        class_id = _integer("class", value)
        if not 0 <= class_id < self.num_classes:
            raise UserError(f"class id {class_id} is outside 0..{self.num_classes - 1}")
        return class_id

    def parse(self, class_: Any, *, dopri5: Any = False,
              steps: int | Sequence[Any] = DEFAULT_STEPS, guidance: Any = DEFAULT_GUIDANCE,
              shift: Any = DEFAULT_SHIFT, seed: Any = DEFAULT_SEED) -> DemoRequest:
        """Check a request (values as a web form or API client sends them).

        ``steps``: one number for every stage or exactly one per stage, each 1..100;
        guidance 1..25; shift 1..100; seed a whole number in [0, 2^32). Raises
        :class:`UserError` naming the first bad field.
        """
        class_id = self.class_id(class_)
        if not isinstance(dopri5, (bool, np.bool_)):
            raise UserError(f"dopri5 must be true or false, got {_quoted(dopri5)}")
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
            steps = [steps] * self.num_stages
        if len(steps) != self.num_stages:
            raise UserError(f"give steps for each of the {self.num_stages} stages, "
                            f"got {len(steps)}")
        per_stage = []
        for s, n in enumerate(steps):
            n = _integer(f"steps of stage {s + 1}", n)
            _in_range(f"steps of stage {s + 1}", n, *STEPS_RANGE)
            per_stage.append(n)
        guidance = _number("guidance", guidance)
        _in_range("guidance", guidance, *GUIDANCE_RANGE)
        shift = _number("shift", shift)
        _in_range("shift", shift, *SHIFT_RANGE)
        seed = _integer("seed", seed)
        if not 0 <= seed < SEED_LIMIT:
            raise UserError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, "
                            f"got {seed}")
        return DemoRequest(class_id=class_id, dopri5=bool(dopri5), steps=tuple(per_stage),
                           guidance=guidance, shift=shift, seed=seed)

    def generate(self, class_: Any, *, dopri5: Any = False,
                 steps: int | Sequence[Any] = DEFAULT_STEPS, guidance: Any = DEFAULT_GUIDANCE,
                 shift: Any = DEFAULT_SHIFT, seed: Any = DEFAULT_SEED,
                 warm_up_timeout: float | None = None) -> DemoResult:
        """Draw :data:`NUM_IMAGES` images of one class (see :meth:`parse` for the inputs).

        Image i's noise comes from ``(seed, i)`` alone, so a request always returns the
        same images. Waits for warm-up (at most ``warm_up_timeout`` seconds).
        """
        import jax

        from pixelflow_jax.sampling import to_images

        request = self.parse(class_, dopri5=dopri5, steps=steps, guidance=guidance,
                             shift=shift, seed=seed)
        if not self.wait_until_warm(warm_up_timeout):
            raise UserError("the model is still warming up (compiling); try again shortly")
        if self.warm_up_error is not None:
            raise UserError(f"the model failed to compile at start-up: {self.warm_up_error}")
        labels = np.full(NUM_IMAGES, request.class_id, np.int32)
        indices = np.arange(NUM_IMAGES, dtype=np.int32)
        with self._lock:
            start = time.perf_counter()
            if request.dopri5:
                samples = self.dopri5.sample(request.seed, indices, labels=labels,
                                             guidance=request.guidance)
            else:
                samples = self.euler.sample(request.seed, indices, labels=labels,
                                            steps=list(request.steps),
                                            guidance=request.guidance, shift=request.shift)
            images = np.asarray(jax.device_get(to_images(samples.x)))
            finished = np.asarray(jax.device_get(samples.stats.finished))
            evaluations = np.asarray(jax.device_get(samples.stats.evaluations))
            seconds = time.perf_counter() - start
        if not finished.all():
            raise UserError(f"the Dopri5 solver did not finish within "
                            f"{self.dopri5.dopri5.max_steps} steps per stage; try Euler")
        return DemoResult(images=images, request=request,
                          class_name=self.names[request.class_id], seconds=seconds,
                          evaluations=int(evaluations.sum(axis=0).max()),
                          num_compilations=self.num_compilations)
