"""The web demo's model side, free of any web framework (``app.py`` is the page).

Two kinds of checkpoint, one interface (``demo.kind``, ``demo.generate(...)``):

- :class:`PixelFlowDemo` (``kind == "class"``) loads a class-conditional checkpoint,
  compiles an Euler and a Dopri5 sampler for one batch of :data:`NUM_IMAGES` images
  once (:meth:`warm_up`), and then answers requests: class, solver, steps per stage,
  guidance, shift and seed are all traced inputs of those two programs, so no
  request ever compiles again.
- :class:`TextDemo` (``kind == "text"``) loads a text-to-image checkpoint and its T5
  encoder (DESIGN §7). A prompt's features are cut to a length bucket
  (``text_encoder.BUCKETS``: 16 ... 512 tokens), so programs are compiled per
  bucket, never per prompt: warm-up compiles the encoder and the Euler sampler for
  the first bucket; a longer prompt compiles its bucket once (one encoder and one
  sampler program), and Dopri5 compiles on its first use per bucket.

:func:`load_demo` picks the kind from the checkpoint's config. Requests are checked
first (``parse``); a bad one raises :class:`UserError` with a message fit to show to
the person who sent it. A setting a request leaves out takes the model's own default
(:attr:`_Demo.defaults`: the checkpoint's ``sample:`` section, DESIGN §11, else
:mod:`pixelflow_jax.defaults`), so a one-step student draws one step per stage, unguided.

One page may offer several class-conditional models (:func:`embedded_models`, the
embedded ones this copy ships; :func:`load_demos`): each is its own demo, and models of
one network (a student beside its teacher) run the same two compiled programs, each
with its own weights.
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
# A request's text is bounded (a request may send megabytes); T5 reads 511 tokens, a
# few thousand characters, so this cuts nothing the encoder would have read.
MAX_PROMPT_CHARS = 20_000


class _ModelDefault:
    """The value of a request setting left out: the model's own default (``demo.defaults``)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT: Any = _ModelDefault()


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """A model's default request settings, and the page's initial slider values.

    From the checkpoint's ``sample:`` section (``carried`` True), else
    :mod:`pixelflow_jax.defaults`, as ``sample.py`` takes them (DESIGN §11), fitted to
    what the page offers: Dopri5 for ``solver: dopri5`` (Euler for ``euler`` and
    ``euler-diffrax``, the same steps), guidance 0 (the official "no guidance") as 1
    (the same images), and values past a slider's end at that end.
    """

    dopri5: bool
    steps: tuple[int, ...]   # one per stage
    guidance: float
    shift: float
    carried: bool = False

    def summary(self) -> str:
        """E.g. "Euler 1+1+1 steps, shift 1, guidance 1"."""
        solver = ("Dopri5" if self.dopri5 else
                  f"Euler {'+'.join(map(str, self.steps))} steps, shift {self.shift:g}")
        return f"{solver}, guidance {self.guidance:g}"


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def sampling_defaults(cfg: Any, num_stages: int, where: str = "the checkpoint") -> SamplingDefaults:
    """:class:`SamplingDefaults` of a checkpoint's config (``cfg.sample``) for a cascade of
    ``num_stages`` stages. A ``sample.steps`` list of another length than one or
    ``num_stages`` is a :class:`UserError` naming ``where`` (the folder)."""
    from pixelflow_jax.config import SampleConfig
    from pixelflow_jax.sample_run import SampleRequest, with_checkpoint_defaults

    r = with_checkpoint_defaults(SampleRequest(out="", out_kind="grid"), cfg.sample)
    steps = list(r.steps) * num_stages if len(r.steps) == 1 else list(r.steps)
    if len(steps) != num_stages:
        raise UserError(f"{where}: config.yaml's sample.steps gives {len(r.steps)} step "
                        f"counts for a model of {num_stages} stages: give one, or one per "
                        "stage")
    return SamplingDefaults(
        dopri5=r.solver == "dopri5",
        steps=tuple(int(_clamp(n, *STEPS_RANGE)) for n in steps),
        guidance=_clamp(float(r.cfg) or 1.0, *GUIDANCE_RANGE),  # g = 0 draws as g = 1
        shift=_clamp(float(r.shift), *SHIFT_RANGE),
        carried=cfg.sample != SampleConfig())


@dataclasses.dataclass(frozen=True)
class DemoRequest:
    """A checked request: what ``generate`` draws. ``class_id`` for class models,
    ``prompt`` and ``negative_prompt`` for text models."""

    dopri5: bool
    steps: tuple[int, ...]   # one per stage (ignored by Dopri5, as the official code)
    guidance: float
    shift: float             # Euler only
    seed: int
    class_id: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """:data:`NUM_IMAGES` uint8 images [N, R, R, C] and how they were made."""

    images: np.ndarray
    request: DemoRequest
    seconds: float           # the whole request (text encoding and any compiling included)
    evaluations: int         # velocity evaluations per image (the most any image needed)
    num_compilations: int    # compiled programs so far, all of this demo's together
    class_name: str | None = None
    compile_seconds: float = 0.0   # of ``seconds``: compiling programs new to this request
    new_programs: int = 0
    encode_seconds: float = 0.0    # text: tokenizing and encoding (any compiling included)
    context_length: int | None = None   # text: the bucket the prompts were padded to
    prompt_tokens: int | None = None    # text: tokens T5 read, </s> included
    truncated: tuple[str, ...] = ()     # text: "prompt" / "negative prompt" cut to T5's limit


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


def _text(name: str, value: Any) -> str:
    """A prompt field as a string (None is the empty prompt), at most
    :data:`MAX_PROMPT_CHARS` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, got {_quoted(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise UserError(f"{name} is {len(value):,} characters long; at most "
                        f"{MAX_PROMPT_CHARS:,} (T5 reads only its first 511 tokens anyway)")
    return value


def _demo_mesh():
    """The local devices that split a batch of :data:`NUM_IMAGES` evenly (1 on CPU)."""
    import jax

    from pixelflow_jax import distributed

    devices = jax.local_devices()
    count = max(d for d in range(1, len(devices) + 1) if NUM_IMAGES % d == 0)
    return distributed.data_mesh(devices[:count])


def _peek_config(ckpt_dir: str):
    """The checkpoint's config when its ``config.yaml`` exists (cheap: no weights read),
    else None (loading the folder then names what is wrong with it)."""
    from pixelflow_jax.checkpoint import CONFIG_FILE
    from pixelflow_jax.config import load_config

    path = os.path.join(ckpt_dir, CONFIG_FILE)
    return load_config(path) if os.path.isfile(path) else None


class _Demo:
    """What both kinds share: the samplers, warm-up, the request lock, the settings."""

    kind = ""

    def _setup(self, ckpt_dir: str | os.PathLike, model: Any, cfg: Any,
               program_key: Any = None, share: Sequence["_Demo"] = ()) -> None:
        """``program_key``: what decides the compiled programs besides the weights; the
        first demo of ``share`` with an equal key lends its samplers (see
        :class:`PixelFlowDemo`)."""
        from pixelflow_jax.sampling import Sampler
        from pixelflow_jax.scheduler import schedule_from_config
        from pixelflow_jax.solvers import Dopri5Config

        self.ckpt_dir = str(ckpt_dir)
        self.resolution = cfg.data.resolution
        self.channels = cfg.params.in_channels
        self.schedule = schedule_from_config(cfg.scheduler)
        self.num_stages = self.schedule.num_stages
        self.defaults = sampling_defaults(cfg, self.num_stages, self.ckpt_dir)
        self.compile_seconds: float | None = None
        self.warm_up_error: str | None = None
        self._ready = threading.Event()
        self._program_key = program_key
        # The weights this demo swaps into samplers it shares (None: it shares none).
        self._params: Any = None
        self.shares_programs_of: _Demo | None = None
        lender = next((d for d in share if program_key is not None
                       and d._program_key == program_key), None)
        if lender is not None:
            import jax
            from flax import nnx

            from pixelflow_jax import distributed

            self.euler, self.dopri5, self._lock = lender.euler, lender.dopri5, lender._lock
            self.shares_programs_of = lender.shares_programs_of or lender
            with self._lock:
                if lender._params is None:
                    lender._params = lender.euler.state
            self._params = jax.device_put(nnx.to_pure_dict(nnx.state(model)),
                                          distributed.replicated(self.euler.mesh))
            return
        mesh = _demo_mesh()
        self.euler = Sampler(model, self.schedule, self.resolution, solver="euler",
                             max_steps=MAX_STEPS, mesh=mesh)
        self.dopri5 = Sampler(model, self.schedule, self.resolution, solver="dopri5",
                              dopri5=Dopri5Config(), mesh=mesh)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start-up

    def _compile_programs(self) -> None:
        raise NotImplementedError

    def warm_up(self) -> float:
        """Compile the programs every request needs; returns the seconds spent.

        Safe to call again (nothing recompiles). If compiling fails, the error is kept
        in :attr:`warm_up_error` (shown by the page) and raised.
        """
        with self._lock:
            if self._ready.is_set():
                return self.compile_seconds or 0.0
            try:
                start = time.perf_counter()
                self._compile_programs()
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
        """Compiled programs of both samplers (and of the text encoder)."""
        return self.euler.num_compilations + self.dopri5.num_compilations

    # ------------------------------------------------------------------ requests

    def _settings(self, dopri5: Any, steps: Any, guidance: Any, shift: Any,
                  seed: Any) -> dict[str, Any]:
        """The solver settings of a request, checked (see ``parse``); those left at
        :data:`MODEL_DEFAULT` are the model's (:attr:`defaults`)."""
        d = self.defaults
        unset = lambda value: value is MODEL_DEFAULT
        dopri5 = d.dopri5 if unset(dopri5) else dopri5
        steps = d.steps if unset(steps) else steps
        guidance = d.guidance if unset(guidance) else guidance
        shift = d.shift if unset(shift) else shift
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
        return dict(dopri5=bool(dopri5), steps=tuple(per_stage), guidance=guidance,
                    shift=shift, seed=seed)

    def _check_warm(self, timeout: float | None) -> None:
        if not self.wait_until_warm(timeout):
            raise UserError("the model is still warming up (compiling); try again shortly")
        if self.warm_up_error is not None:
            raise UserError(f"the model failed to compile at start-up: {self.warm_up_error}")

    def _draw(self, request: DemoRequest, **conditioning: Any) -> tuple[np.ndarray, int]:
        """(uint8 images, evaluations per image) of a checked request; call under the lock."""
        import jax

        from pixelflow_jax.sampling import to_images

        indices = np.arange(NUM_IMAGES, dtype=np.int32)
        if self._params is not None:  # samplers shared with another model: its weights out
            (self.dopri5 if request.dopri5 else self.euler).set_params(self._params)
        if request.dopri5:
            samples = self.dopri5.sample(request.seed, indices, guidance=request.guidance,
                                         **conditioning)
        else:
            samples = self.euler.sample(request.seed, indices, steps=list(request.steps),
                                        guidance=request.guidance, shift=request.shift,
                                        **conditioning)
        images = np.asarray(jax.device_get(to_images(samples.x)))
        finished = np.asarray(jax.device_get(samples.stats.finished))
        evaluations = np.asarray(jax.device_get(samples.stats.evaluations))
        if not finished.all():
            raise UserError(f"the Dopri5 solver did not finish within "
                            f"{self.dopri5.dopri5.max_steps} steps per stage; try Euler")
        return images, int(evaluations.sum(axis=0).max())


class PixelFlowDemo(_Demo):
    """A class-conditional checkpoint with both samplers, ready to serve requests.

    Args:
      ckpt_dir: a class-conditional checkpoint folder (``config.yaml`` + ``params/``,
        optionally ``class_names.txt``).
      dtype: compute dtype name (``auto``, ``float32``, ``bfloat16``).
      attention: attention kernel (see ``sample.py --attention``).
      share: demos whose compiled programs this one may use: the first with the same
        network, cascade, resolution, dtype and attention (a student and its teacher)
        lends its two samplers, and each request swaps this model's weights in
        (``Sampler.set_params``; the weights are the programs' arguments, so nothing
        compiles again). Its requests and the lender's then run one after another.

    Construction loads the weights; :meth:`warm_up` compiles. :meth:`generate`
    is safe to call from several threads: requests run one after another.
    """

    kind = "class"

    def __init__(self, ckpt_dir: str | os.PathLike, *, dtype: str = "auto",
                 attention: str = "auto", share: Sequence[_Demo] = ()):
        from pixelflow_jax import runtime
        from pixelflow_jax.checkpoint import load_checkpoint

        compute_dtype = runtime.compute_dtype(dtype)
        model, cfg = load_checkpoint(ckpt_dir, dtype=compute_dtype, attention_impl=attention)
        p = cfg.params
        if p.cross_attention_dim is not None or p.num_classes == 0:
            raise UserError(f"{ckpt_dir} is not a class-conditional model (use "
                            "demo.load_demo, which serves text-to-image models too)")
        self.num_classes = p.num_classes
        self.names = class_names(ckpt_dir, p.num_classes)
        self._by_name: dict[str, int | None] = {}
        for i, name in enumerate(self.names):
            key = name.casefold()
            # ImageNet repeats two names (crane, maillot): those need the class id.
            self._by_name[key] = None if key in self._by_name else i
        program_key = (p, cfg.scheduler, cfg.data.resolution, np.dtype(compute_dtype).name,
                       attention)
        self._setup(ckpt_dir, model, cfg, program_key, share)

    def _compile_programs(self) -> None:
        self.euler.precompile(NUM_IMAGES, DEFAULT_STEPS)
        self.dopri5.precompile(NUM_IMAGES)

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

    def parse(self, class_: Any, *, dopri5: Any = MODEL_DEFAULT,
              steps: int | Sequence[Any] = MODEL_DEFAULT, guidance: Any = MODEL_DEFAULT,
              shift: Any = MODEL_DEFAULT, seed: Any = DEFAULT_SEED) -> DemoRequest:
        """Check a request (values as a web form or API client sends them).

        ``steps``: one number for every stage or exactly one per stage, each 1..100;
        guidance 1..25; shift 1..100; seed a whole number in [0, 2^32). The solver
        settings left out are the model's own (:attr:`defaults`). Raises
        :class:`UserError` naming the first bad field.
        """
        class_id = self.class_id(class_)
        return DemoRequest(class_id=class_id,
                           **self._settings(dopri5, steps, guidance, shift, seed))

    def generate(self, class_: Any, *, dopri5: Any = MODEL_DEFAULT,
                 steps: int | Sequence[Any] = MODEL_DEFAULT, guidance: Any = MODEL_DEFAULT,
                 shift: Any = MODEL_DEFAULT, seed: Any = DEFAULT_SEED,
                 warm_up_timeout: float | None = None) -> DemoResult:
        """Draw :data:`NUM_IMAGES` images of one class (see :meth:`parse` for the inputs).

        Image i's noise comes from ``(seed, i)`` alone, so a request always returns the
        same images. Waits for warm-up (at most ``warm_up_timeout`` seconds).
        """
        request = self.parse(class_, dopri5=dopri5, steps=steps, guidance=guidance,
                             shift=shift, seed=seed)
        self._check_warm(warm_up_timeout)
        labels = np.full(NUM_IMAGES, request.class_id, np.int32)
        with self._lock:
            start = time.perf_counter()
            images, evaluations = self._draw(request, labels=labels)
            seconds = time.perf_counter() - start
        return DemoResult(images=images, request=request,
                          class_name=self.names[request.class_id], seconds=seconds,
                          evaluations=evaluations, num_compilations=self.num_compilations)


class TextDemo(_Demo):
    """A text-to-image checkpoint with its T5 encoder, ready to serve prompts.

    Args:
      ckpt_dir: a text-to-image checkpoint folder.
      text_encoder: a Hugging Face T5 folder (e.g. ``google/flan-t5-xl``); default the
        checkpoint's ``text_encoder/`` folder (``convert_torch.py --text-encoder``).
      dtype, attention: as :class:`PixelFlowDemo`. The encoder runs in float32, as in
        the official pipeline.

    Prompts over T5's limit are cut to their first 511 tokens, as the official
    pipeline does; the result says so (:attr:`DemoResult.truncated`).
    """

    kind = "text"

    def __init__(self, ckpt_dir: str | os.PathLike, *, text_encoder: str | None = None,
                 dtype: str = "auto", attention: str = "auto"):
        from pixelflow_jax import runtime
        from pixelflow_jax.checkpoint import load_checkpoint
        from pixelflow_jax.hf_weights import read_t5_config
        from pixelflow_jax.prompts import text_encoder_folder
        from pixelflow_jax.text_encoder import BUCKETS, TextEncoder

        ckpt_dir = str(ckpt_dir)
        load = lambda: load_checkpoint(ckpt_dir, dtype=runtime.compute_dtype(dtype),
                                       attention_impl=attention)
        model, cfg = None, _peek_config(ckpt_dir)
        if cfg is None:  # a broken folder: loading it names the problem
            model, cfg = load()
        # What can be refused cheaply comes before any weights are read.
        if cfg.params.cross_attention_dim is None:
            raise UserError(f"{ckpt_dir} is a class-conditional model, not a text-to-image "
                            "one")
        self.encoder_dir = text_encoder_folder(ckpt_dir, text_encoder)
        width = read_t5_config(self.encoder_dir).d_model
        if width != cfg.params.cross_attention_dim:
            raise UserError(f"the text encoder {self.encoder_dir} gives {width}-wide features "
                            "but the model's cross-attention takes "
                            f"{cfg.params.cross_attention_dim}: not the encoder it was "
                            "trained with")
        self.encoder = TextEncoder.from_folder(self.encoder_dir)  # the smaller load first
        if model is None:
            model, cfg = load()
        self.cross_attention_dim = cfg.params.cross_attention_dim
        self.first_bucket = BUCKETS[0]
        self._setup(ckpt_dir, model, cfg)

    def _compile_programs(self) -> None:
        # The empty negative prompt (kept for the encoder's life) compiles the encoder's
        # first bucket; the Euler sampler follows for the same length. Dopri5 and longer
        # buckets compile on first use: compiling all of them would take minutes.
        length = self.encoder.encode([""])[0].shape[1]
        self.euler.compile(NUM_IMAGES, DEFAULT_STEPS, context_length=length)

    @property
    def num_compilations(self) -> int:
        """Compiled programs of both samplers and of the text encoder."""
        return super().num_compilations + self.encoder.num_compilations

    def parse(self, prompt: Any, negative_prompt: Any = "", *, dopri5: Any = MODEL_DEFAULT,
              steps: int | Sequence[Any] = MODEL_DEFAULT, guidance: Any = MODEL_DEFAULT,
              shift: Any = MODEL_DEFAULT, seed: Any = DEFAULT_SEED) -> DemoRequest:
        """Check a request. ``prompt``: text with something other than whitespace;
        ``negative_prompt``: text, default empty (as the official pipeline); both at
        most :data:`MAX_PROMPT_CHARS` characters. The other settings as
        :meth:`PixelFlowDemo.parse`. Raises :class:`UserError` naming the first bad field.
        """
        prompt = _text("prompt", prompt)
        if not prompt.strip():
            raise UserError("the prompt is empty: describe the image to draw")
        negative_prompt = _text("negative prompt", negative_prompt)
        return DemoRequest(prompt=prompt, negative_prompt=negative_prompt,
                           **self._settings(dopri5, steps, guidance, shift, seed))

    def over_limit(self, prompt: str, negative_prompt: str = "") -> tuple[str, ...]:
        """Which of "prompt" and "negative prompt" T5 reads only in part: more than the
        511 tokens (and ``</s>``) of the official ``max_length=512``; the rest is cut."""
        from pixelflow_jax.tokenizer import DEFAULT_MAX_LENGTH

        # One longer than T5's limit: a full mask there means the text was cut.
        _, mask = self.encoder.tokenizer([prompt, negative_prompt], DEFAULT_MAX_LENGTH + 1)
        return tuple(name for name, m in zip(("prompt", "negative prompt"), mask) if m.all())

    def generate(self, prompt: Any, negative_prompt: Any = "", *, dopri5: Any = MODEL_DEFAULT,
                 steps: int | Sequence[Any] = MODEL_DEFAULT, guidance: Any = MODEL_DEFAULT,
                 shift: Any = MODEL_DEFAULT, seed: Any = DEFAULT_SEED,
                 warm_up_timeout: float | None = None) -> DemoResult:
        """Draw :data:`NUM_IMAGES` images of one prompt (see :meth:`parse`).

        Image i's noise comes from ``(seed, i)`` alone, so the images are those of
        ``sample.py --prompt PROMPT --num-images 4`` with the same settings (to float
        rounding: the encoder's batch differs). Guidance g applies at every stage;
        g = 1 skips the unconditional pass (DESIGN §4, §7).
        """
        from pixelflow_jax.prompts import PromptConditioning

        request = self.parse(prompt, negative_prompt, dopri5=dopri5, steps=steps,
                             guidance=guidance, shift=shift, seed=seed)
        self._check_warm(warm_up_timeout)
        texts = [request.prompt, request.negative_prompt]
        with self._lock:
            start = time.perf_counter()
            compiled = self.num_compilations
            encoder_programs = self.encoder.num_compilations
            truncated = self.over_limit(request.prompt, request.negative_prompt)
            # One prompt per encoder call: one encoder program per bucket, whichever of
            # the two the cache already holds.
            for text in texts:
                self.encoder.encode([text])
            inputs = PromptConditioning(self.encoder, [request.prompt],
                                        request.negative_prompt, self.cross_attention_dim)(
                np.zeros(NUM_IMAGES, np.int64))
            encode_seconds = time.perf_counter() - start
            compile_seconds = encode_seconds \
                if self.encoder.num_compilations > encoder_programs else 0.0
            length = inputs["context"].shape[1]
            sampler = self.dopri5 if request.dopri5 else self.euler
            compile_seconds += sampler.compile(NUM_IMAGES, DEFAULT_STEPS,
                                               context_length=length)
            images, evaluations = self._draw(request, **inputs)
            seconds = time.perf_counter() - start
        return DemoResult(images=images, request=request, seconds=seconds,
                          evaluations=evaluations, num_compilations=self.num_compilations,
                          compile_seconds=compile_seconds,
                          new_programs=self.num_compilations - compiled,
                          encode_seconds=encode_seconds, context_length=length,
                          prompt_tokens=int(inputs["context_mask"][0].sum()),
                          truncated=truncated)


def load_demo(ckpt_dir: str | os.PathLike, *, text_encoder: str | None = None,
              dtype: str = "auto", attention: str = "auto") -> PixelFlowDemo | TextDemo:
    """The demo for a checkpoint: :class:`TextDemo` for a text-to-image model, else
    :class:`PixelFlowDemo`. ``text_encoder`` is refused for a class-conditional model,
    and a text model needs one (or its ``text_encoder/`` folder), both before any
    weights are read."""
    ckpt_dir = str(ckpt_dir)
    cfg = _peek_config(ckpt_dir)
    if cfg is not None and cfg.params.cross_attention_dim is not None:
        return TextDemo(ckpt_dir, text_encoder=text_encoder, dtype=dtype, attention=attention)
    if text_encoder is not None and cfg is not None:
        raise UserError(f"{ckpt_dir} is a class-conditional model: --text-encoder is only "
                        "for text-to-image checkpoints")
    return PixelFlowDemo(ckpt_dir, dtype=dtype, attention=attention)  # names a broken folder


def embedded_models() -> dict[str, str]:
    """The embedded models this copy of the package ships, short name -> folder, in
    ``default_model.SHORT_NAMES`` order (the default model, ``digits``, first)."""
    from pixelflow_jax import default_model

    found = {}
    for name in default_model.SHORT_NAMES:
        try:
            found[name] = default_model.embedded_checkpoint(name)
        except UserError:  # not shipped
            continue
    return found


def load_demos(ckpts: dict[str, str], *, dtype: str = "auto",
               attention: str = "auto") -> dict[str, PixelFlowDemo]:
    """Several class-conditional models for one page: name -> checkpoint folder in,
    name -> :class:`PixelFlowDemo` out (loaded, not compiled), in the same order.
    Models of one architecture share their compiled programs (``share``): a one-step
    student beside its teacher compiles nothing more.

    A text-to-image checkpoint is refused before any weights are read (it is served
    alone, :func:`load_demo`), and so is a folder that cannot be loaded.
    """
    configs = {name: _peek_config(path) for name, path in ckpts.items()}
    for name, cfg in configs.items():
        if cfg is None:  # a missing or broken folder: loading it names the problem
            PixelFlowDemo(ckpts[name])
        elif cfg.params.cross_attention_dim is not None:
            raise UserError(f"{ckpts[name]} is a text-to-image model: serve it alone "
                            f"(app.py --ckpt {ckpts[name]}); a choice of models holds "
                            "class-conditional models only")
    demos: dict[str, PixelFlowDemo] = {}
    for name, path in ckpts.items():
        demos[name] = PixelFlowDemo(path, dtype=dtype, attention=attention,
                                    share=list(demos.values()))
    return demos
