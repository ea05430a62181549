#!/usr/bin/env python3
"""Serve the PixelFlow generation page (Gradio): pick a class or type a prompt, press
Generate, see 4 images.

Examples:
  python app.py                       # the embedded models on http://127.0.0.1:7860
  python app.py --ckpt digits-1step   # one model: the one-step student alone
  python app.py --models digits RUN/ema --host 0.0.0.0 --port 8080
  python app.py --ckpt T2I_DIR --text-encoder FLAN_T5_XL_DIR   # a text-to-image model

Without --ckpt or --models the page offers every embedded model this copy ships
(digits and digits-1step, those present) in a Model drop-down; --models chooses
the class-conditional checkpoints offered instead, --ckpt serves one (a
text-to-image checkpoint is always served alone). Choosing a model sets the solver,
steps, guidance and shift to its defaults: those of its config.yaml's sample:
section (a one-step student: 1 Euler step per stage, guidance 1), else the official
ones (Euler, 10 steps per stage, guidance 4, shift 1). On a page with a model
choice the API's first value is the model's name.

The page is up at once and says "warming up" while the models compile (each once,
one after the other at start-up, the one shown first first; a model is usable as
soon as it is compiled, and models of one network, such as a student and its
teacher, share their programs): changing model, class, solver, steps, guidance,
shift or seed never recompiles. A text-to-image checkpoint gets a prompt and a
negative-prompt box instead of the class list; prompts are padded to a length
bucket (16, 32, ... 512 tokens), and a new prompt never recompiles: only the first
prompt of a longer bucket, and the first Dopri5 request of a bucket, compile once.
Prompts longer than T5's 511 tokens are cut there, as in the official pipeline, and
the page says so. Requests queue and run one at a time. The same endpoint is an API
(/generate; see "Use via API" at the bottom of the page). User mistakes on the
command line (a bad --host or --port, a short name not shipped, a text checkpoint
without an encoder or among --models, --text-encoder for a class checkpoint) end
with one line on stderr and exit code 2, before the models load;
Ctrl-C stops the server with exit code 130.
"""

import argparse
import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from pixelflow_jax import cli

# Before gradio is imported: no usage reports or version checks leave this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TITLE = "PixelFlow"
# Tiny images (32 px) are upscaled by the browser; keep their pixels sharp.
CSS = "#samples img { image-rendering: pixelated; }"


def build_parser() -> argparse.ArgumentParser:
    """app.py's flags."""
    p = cli.Parser(prog="app.py", doc=__doc__)
    cli.add_ckpt(p, default="without --ckpt or --models the page offers every embedded model")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME_OR_DIR",
                   help="class-conditional checkpoints to offer in a Model drop-down, each a "
                        "folder or a short name (digits, digits-1step); the first is shown "
                        "first (default without --ckpt: every embedded model shipped)")
    p.add_argument("--text-encoder", default=None, metavar="HF_T5_DIR",
                   help="text-to-image checkpoints: the T5 encoder's Hugging Face folder "
                        "(config.json, tokenizer.json, weights), e.g. google/flan-t5-xl "
                        "(default: the checkpoint's text_encoder/ folder); refused for "
                        "class-conditional checkpoints")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves other machines too "
                        "(default %(default)s)")
    p.add_argument("--port", type=cli.port, default=7860,
                   help="TCP port to listen on (default %(default)s)")
    cli.add_dtype(p)
    cli.add_attention(p)
    return p


def check_address(host: str, port: int) -> None:
    """Refuse, before anything loads, an address this machine cannot listen on; the
    message blames the host or the port, whichever it is. Raises UserError."""
    from pixelflow_jax.errors import UserError

    try:
        ipaddress.ip_address(host)
        numeric = socket.AI_NUMERICHOST
    except ValueError:
        # "999.1.1.1" is no address, and no host name either (a resolver would try DNS).
        if not host:
            raise UserError("--host is empty: give an address such as 127.0.0.1") from None
        if all(c.isdigit() or c in ".:" for c in host):
            raise UserError(f"--host {host}: not a valid IP address") from None
        numeric = 0
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | numeric)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address or known host name "
                        f"({getattr(e, 'strerror', None) or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        # As the server will (uvicorn): a port in TIME_WAIT after a restart is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: not an address of this machine "
                                f"({e.strerror})") from None
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise UserError(f"--port {port}: {e.strerror}; choose another --port") from None
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e})") from None


def option_label(class_id: int, name: str) -> str:
    """The class drop-down's text for one class: "seven (7)", or "7" for unnamed classes."""
    return name if name == str(class_id) else f"{name} ({class_id})"


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (shorter, and it
    keeps the machine's folder layout off the page)."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|<>~&")
PROMPT_SHOWN = 200  # characters of a prompt repeated in the status line


def markdown_text(text: str, limit: int = PROMPT_SHOWN) -> str:
    """``text`` as literal Markdown: special characters escaped, lines joined, cut to
    ``limit`` characters (a prompt must not format, link or inject HTML into the page)."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)


def describe(result: Any, model: str | None = None) -> str:
    """The status line under the images for one result: what was drawn (by ``model``,
    on a page with a model choice), the request's time and velocity evaluations, and
    the compiled programs (of that model)."""
    r = result.request
    how = ("Dopri5 (adaptive)" if r.dopri5 else
           f"Euler {'+'.join(map(str, r.steps))} steps, shift {r.shift:g}")
    if r.prompt is None:
        what = f"**{result.class_name}** (class {r.class_id})"
        if model:
            what += f" from **{markdown_text(model)}**"
        timing = f"{result.seconds:.2f} s"
    else:
        what = f"“{markdown_text(r.prompt)}”"
        if r.negative_prompt:
            what += f" (negative prompt “{markdown_text(r.negative_prompt)}”)"
        timing = f"{result.seconds:.2f} s (text encoding {result.encode_seconds:.2f} s"
        if result.new_programs:
            timing += (f"; compiling {result.new_programs} new program"
                       f"{'s' if result.new_programs > 1 else ''} "
                       f"{result.compile_seconds:.1f} s, once")
        timing += ")"
    line = (f"{len(result.images)} images of {what} in {timing}: {how}, guidance "
            f"{r.guidance:g}, seed {r.seed}; {result.evaluations} velocity evaluations per "
            f"image; compiled programs: {result.num_compilations}")
    if r.prompt is not None:
        line += (f"; the prompt is {result.prompt_tokens} tokens (end token included), "
                 f"padded to {result.context_length}")
        if result.truncated:
            line += (f"\n\n**Note:** the {' and the '.join(result.truncated)} "
                     f"{'is' if len(result.truncated) == 1 else 'are'} longer than T5's "
                     "511 tokens: only the first 511 were used (as in the official pipeline)")
    return line


def output_images(result: Any) -> list:
    """The gallery's images; a text result's PNGs carry their prompt (``prompt`` text
    chunk, and ``negative_prompt`` when there is one), as ``sample.py``'s do."""
    from PIL import Image

    r = result.request
    out = []
    for img in result.images:
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        if r.prompt is not None:  # Gradio writes str entries of `info` as PNG text chunks
            img.info["prompt"] = r.prompt
            if r.negative_prompt:
                img.info["negative_prompt"] = r.negative_prompt
        out.append(img)
    return out


def describe_model(demo: Any) -> str:
    """The page's heading text for a loaded demo (either kind)."""
    resolutions = demo.euler.resolutions
    what = (f"text-to-image, prompts read by the T5 encoder `{shown_path(demo.encoder_dir)}`"
            if demo.kind == "text" else f"{demo.num_classes} classes")
    stages = f"{demo.num_stages} stage{'s' if demo.num_stages != 1 else ''}"
    text = (f"Cascaded pixel-space flow matching: {demo.resolution} px images in "
            f"{stages} ({' → '.join(f'{r} px' for r in resolutions)}), "
            f"{what}. Checkpoint: `{shown_path(demo.ckpt_dir)}`")
    if demo.defaults.carried:
        text += f"; its default settings (config.yaml): {demo.defaults.summary()}"
    return text


def condition_inputs(demo: Any) -> list:
    """What the images are of: the class list, or the prompt and negative-prompt boxes.
    Their values are ``demo.generate``'s positional arguments, in order."""
    import gradio as gr

    if demo.kind == "text":
        return [gr.Textbox(label="Prompt", lines=2, max_lines=8, elem_id="prompt",
                           placeholder="describe the image, e.g. a photo of a cat on a mat"),
                gr.Textbox("", label="Negative prompt", lines=1, max_lines=4,
                           elem_id="negative",
                           placeholder="empty by default, as in the official pipeline")]
    choices = [(option_label(i, name), i) for i, name in enumerate(demo.names)]
    return [gr.Dropdown(choices, value=default_class(demo), label="Class", elem_id="class")]


def ready_text(demo: Any, model: str | None = None, lender: str | None = None) -> str:
    """The status line once warm-up has succeeded (of ``model``, on a page with a model
    choice; ``lender``: the model whose compiled programs it uses)."""
    if demo.kind == "text":
        from pixelflow_jax.text_encoder import BUCKETS

        longer = ", ".join(str(b) for b in BUCKETS if b > demo.first_bucket)
        return (f"**Ready.** Compiled in {demo.compile_seconds:.1f} s for prompts of up to "
                f"{demo.first_bucket} tokens; a new prompt never recompiles. The first "
                f"longer prompt of each length bucket ({longer} tokens), and the first Dopri5 "
                "request of a bucket, compile once.")
    if lender:
        return (f"**Ready.** {markdown_text(model or '')} runs the programs compiled for "
                f"{markdown_text(lender)} (the same network, its own weights); changing any "
                "setting never recompiles.")
    what = f"{markdown_text(model)} compiled" if model else "Compiled"
    return (f"**Ready.** {what} in {demo.compile_seconds:.1f} s; changing any setting "
            "never recompiles.")


def build_ui(demos: Any, started: float) -> Any:
    """The Gradio page around loaded demos: the class page or the prompt page, with the
    same solver controls.

    ``demos``: one demo (:func:`pixelflow_jax.demo.load_demo`), or name -> demo
    (:func:`pixelflow_jax.demo.load_demos`, class-conditional; more than one gets a Model
    drop-down, the first shown first, and the API's first value is the model's name).
    Each model's controls start at its own defaults (``demo.defaults``), and choosing a
    model resets them to that model's.
    """
    import gradio as gr

    from pixelflow_jax import demo as demo_lib
    from pixelflow_jax.errors import UserError

    if not isinstance(demos, dict):
        demos = {"": demos}
    names = list(demos)
    first = demos[names[0]]
    choose = len(demos) > 1
    num_sliders = max(d.num_stages for d in demos.values())

    def pick(name: Any) -> Any:
        """The demo of a model name sent by the page or an API client."""
        if not choose:
            return first
        if not isinstance(name, str) or name not in demos:
            raise UserError(f"unknown model {demo_lib._quoted(name)}: choose one of "
                            f"{', '.join(names)}")
        return demos[name]

    def lender_of(d: Any) -> str | None:
        """The name of the model whose programs ``d`` runs, if another's."""
        lender = getattr(d, "shares_programs_of", None)
        return next((n for n, other in demos.items() if other is lender), None)

    def status(name: str) -> str:
        d = demos[name]
        which = f" of {markdown_text(name)}" if choose else ""
        if d.warm_up_error is not None:
            return f"**Warm-up{which} failed:** {d.warm_up_error}"
        if not d.ready:
            what = markdown_text(name) if choose else "the model"
            return (f"⏳ **Warming up: compiling {what}…** ({time.time() - started:.0f} s "
                    "so far; this happens once, then every request costs only the sampling)")
        return ready_text(d, name if choose else None, lender_of(d))

    def controls(name: str) -> tuple:
        """The button and the timer for the model shown: the timer ticks while it warms."""
        d = demos[name]
        done = d.wait_until_warm(0)
        text = ("Generate" if d.ready else
                "Unavailable" if d.warm_up_error is not None else "Warming up…")
        return gr.Button(text, interactive=d.ready), gr.Timer(active=not done)

    def refresh(*selected: Any) -> tuple:
        name = selected[0] if choose and selected and selected[0] in demos else names[0]
        return (status(name), *controls(name))

    def switch(name: Any, class_value: Any) -> tuple:
        """Another model: its heading, classes and default settings."""
        if name not in demos:
            name = names[0]
        d, defaults = demos[name], demos[name].defaults
        labels = [option_label(i, n) for i, n in enumerate(d.names)]
        keep = isinstance(class_value, int) and 0 <= class_value < d.num_classes
        classes = gr.Dropdown(list(zip(labels, range(d.num_classes))),
                              value=class_value if keep else default_class(d))
        steps_ = [gr.Slider(value=defaults.steps[s], visible=True,
                            label=f"Steps, stage {s + 1} ({d.euler.resolutions[s]} px)")
                  if s < d.num_stages else gr.Slider(visible=False)
                  for s in range(num_sliders)]
        chosen = (f"Model **{markdown_text(name)}**: the settings are its defaults "
                  f"({defaults.summary()}).")
        return (heading(d), classes, gr.Checkbox(value=defaults.dopri5),
                gr.Slider(value=defaults.shift), gr.Slider(value=defaults.guidance), *steps_,
                f"{chosen} {status(name)}", *controls(name))

    # The last error of each browser session, for the status line (the toast fades).
    errors: OrderedDict[str, str] = OrderedDict()
    errors_lock = threading.Lock()

    # Gradio injects the request by its position and annotation (before the inputs): the
    # model's name (with a model choice), the condition's values, then dopri5, shift,
    # guidance, seed and the steps per stage (one slider per stage of the largest model).
    def generate(request: gr.Request, *values: Any) -> tuple:
        try:
            name, values = (values[0], values[1:]) if choose else (None, values)
            d = pick(name)
            condition, (dopri5, shift, guidance, seed, *steps) = \
                values[:len(conditions)], values[len(conditions):]
            result = d.generate(*condition, dopri5=dopri5, steps=list(steps[:d.num_stages]),
                                guidance=guidance, shift=shift, seed=seed)
        except UserError as e:
            with errors_lock:
                errors[request.session_hash or ""] = str(e)
                while len(errors) > 1000:  # API clients never read theirs back
                    errors.popitem(last=False)
            # gr.Error: a toast in the page, and an error API clients can read.
            raise gr.Error(str(e), title="Cannot generate", print_exception=False) from None
        return output_images(result), describe(result, name)

    def show_error(request: gr.Request) -> str:
        with errors_lock:
            text = errors.pop(request.session_hash or "", "the request failed")
        return f"**Cannot generate:** {text}"

    def heading(d: Any) -> str:
        return f"# {TITLE}\n{describe_model(d)}"

    defaults = first.defaults
    with gr.Blocks(title=TITLE, analytics_enabled=False,
                   delete_cache=(3600, 3600)) as blocks:
        title = gr.Markdown(heading(first), elem_id="heading")
        with gr.Row():
            with gr.Column(scale=1):
                model = [gr.Dropdown(names, value=names[0], label="Model",
                                     elem_id="model")] if choose else []
                conditions = condition_inputs(first)
                dopri5 = gr.Checkbox(defaults.dopri5, label="Dopri5 solver (adaptive; ignores "
                                     "steps and shift)", elem_id="dopri5")
                shift = gr.Slider(*demo_lib.SHIFT_RANGE, value=defaults.shift, step=1,
                                  label="Noise shift", elem_id="shift")
                guidance = gr.Slider(*demo_lib.GUIDANCE_RANGE, value=defaults.guidance,
                                     step=0.1, label="Classifier-free guidance",
                                     elem_id="guidance")
                resolutions = first.euler.resolutions
                steps = [gr.Slider(*demo_lib.STEPS_RANGE,
                                   value=defaults.steps[min(s, first.num_stages - 1)], step=1,
                                   label=f"Steps, stage {s + 1} "
                                         f"({resolutions[min(s, first.num_stages - 1)]} px)",
                                   visible=s < first.num_stages, elem_id=f"steps{s + 1}")
                         for s in range(num_sliders)]
                seed = gr.Number(demo_lib.DEFAULT_SEED, label="Seed", precision=0,
                                 minimum=0, maximum=demo_lib.SEED_LIMIT - 1, elem_id="seed")
                button = gr.Button("Warming up…", variant="primary", interactive=False,
                                   elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=demo_lib.NUM_IMAGES,
                                     format="png", object_fit="contain", height="auto",
                                     elem_id="samples")
                message = gr.Markdown(status(names[0]), elem_id="status")
        timer = gr.Timer(1.0)
        timer.tick(refresh, inputs=model, outputs=[message, button, timer],
                   concurrency_limit=None, show_progress="hidden", api_visibility="private")
        blocks.load(refresh, inputs=model, outputs=[message, button, timer],
                    concurrency_limit=None, show_progress="hidden", api_visibility="private")
        if choose:
            model[0].change(switch, inputs=[model[0], conditions[0]],
                            outputs=[title, conditions[0], dopri5, shift, guidance, *steps,
                                     message, button, timer],
                            concurrency_limit=None, show_progress="hidden",
                            api_visibility="private")
        # preprocess=False: the raw values reach demo.parse, whose messages name the field
        # (Gradio's own range checks would say only "Value 0 is less than minimum value 1").
        button.click(generate,
                     inputs=[*model, *conditions, dopri5, shift, guidance, seed, *steps],
                     outputs=[gallery, message], api_name="generate", preprocess=False,
                     concurrency_limit=1, show_progress_on=gallery).failure(
            show_error, outputs=message, concurrency_limit=None, show_progress="hidden",
            api_visibility="private")
    return blocks


def default_class(demo: Any) -> int:
    """The class shown first: golden retriever (207) for ImageNet models, else 0."""
    return 207 if demo.num_classes == 1000 else 0


def warm_up(demos: dict[str, Any]) -> None:
    """Compile in the background, one model after the other (the one shown first
    first), reporting on stderr (the page shows it too)."""
    names = {id(demo): name for name, demo in demos.items()}
    for name, demo in demos.items():
        which = f" {name}" if len(demos) > 1 else ""
        try:
            seconds = demo.warm_up()
        except Exception as e:  # shown on the page; the server keeps serving it
            print(f"app.py: warm-up{which} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        lender = getattr(demo, "shares_programs_of", None)
        how = (f"runs the programs of {names[id(lender)]}" if id(lender) in names else
               f"compiled in {seconds:.1f} s")
        print(f"app.py:{which} ready ({how})", file=sys.stderr)


def model_folders(ckpt: str | None, models: list[str] | None) -> dict[str, str]:
    """The checkpoints a page serves, name -> folder: ``--ckpt``'s alone, ``--models``',
    else every embedded model this copy ships. Short names resolve to their embedded
    folders (``default_model.resolve_checkpoint``); a folder is named by its last path
    component (its path, when two share it). Nothing is read but the folder names."""
    from pixelflow_jax import default_model
    from pixelflow_jax.demo import embedded_models
    from pixelflow_jax.errors import UserError

    if ckpt is not None and models is not None:
        raise UserError("give --ckpt (one model) or --models (a choice), not both")
    if ckpt is None and models is None:
        found = embedded_models()
        return found or {"digits": default_model.default_checkpoint()}  # names the loss
    folders: dict[str, str] = {}
    for arg in [ckpt] if ckpt is not None else models:
        path = default_model.resolve_checkpoint(arg)
        name = arg if path != arg else os.path.basename(os.path.normpath(path)) or path
        for other_name, other in folders.items():
            if os.path.realpath(other) == os.path.realpath(path):
                raise UserError(f"--models: {arg} is given twice (as {other_name})")
        if name in folders:
            name = shown_path(path)
        folders[name] = path
    return folders


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; returns the exit code."""
    folders = model_folders(args.ckpt, args.models)
    check_address(args.host, args.port)
    from pixelflow_jax import runtime
    from pixelflow_jax.demo import load_demo, load_demos
    from pixelflow_jax.errors import UserError

    started = time.time()
    runtime.enable_compilation_cache()
    if len(folders) == 1:
        demos = {name: load_demo(path, text_encoder=args.text_encoder, dtype=args.dtype,
                                 attention=args.attention) for name, path in folders.items()}
    else:
        if args.text_encoder is not None:
            raise UserError("--text-encoder is for one text-to-image checkpoint (--ckpt), "
                            "not for a choice of class-conditional models")
        demos = load_demos(folders, dtype=args.dtype, attention=args.attention)
    blocks = build_ui(demos, started)
    blocks.queue(default_concurrency_limit=1)
    try:
        blocks.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                      show_error=True, quiet=True, ssr_mode=False, css=CSS,
                      footer_links=["api"])
    except OSError as e:
        reason = str(e).split(". ")[0]  # Gradio adds advice about its own env variables
        raise UserError(f"cannot serve on {args.host}:{args.port} ({reason}); choose another "
                        "--port") from None
    shown = ", ".join(f"{name}: {d.ckpt_dir}" for name, d in demos.items()) \
        if len(demos) > 1 else next(iter(demos.values())).ckpt_dir
    print(f"app.py: serving http://{args.host}:{args.port} ({shown}); warming up...",
          file=sys.stderr)
    threading.Thread(target=warm_up, args=(demos,), daemon=True, name="warm-up").start()
    try:
        # Not blocks.block_thread(): it swallows Ctrl-C, and Ctrl-C must exit with 130.
        while blocks.is_running:
            time.sleep(0.1)
    finally:
        blocks.close(verbose=False)
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run app.py with ``argv``; returns the exit code."""
    return cli.run_main(build_parser(), run, argv, interrupted="the server stopped")


if __name__ == "__main__":
    sys.exit(main())
