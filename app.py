#!/usr/bin/env python3
"""Serve the PixelFlow generation page (Gradio): pick a class or type a prompt, press
Generate, see 4 images.

Examples:
  python app.py                       # the embedded digits model on http://127.0.0.1:7860
  python app.py --ckpt CKPT_DIR --host 0.0.0.0 --port 8080
  python app.py --ckpt T2I_DIR --text-encoder FLAN_T5_XL_DIR   # a text-to-image model

The page is up at once and says "warming up" while the model compiles (once, for
every setting: changing class, solver, steps, guidance, shift or seed never
recompiles). A text-to-image checkpoint gets a prompt and a negative-prompt box
instead of the class list; prompts are padded to a length bucket (16, 32, ... 512
tokens), and a new prompt never recompiles: only the first prompt of a longer
bucket, and the first Dopri5 request of a bucket, compile once. Prompts longer than
T5's 511 tokens are cut there, as in the official pipeline, and the page says so.
Requests queue and run one at a time. The same endpoint is an API (/generate; see
"Use via API" at the bottom of the page). User mistakes on the command line (a bad
--host or --port, a text checkpoint without an encoder, --text-encoder for a class
checkpoint) end with one line on stderr and exit code 2, before the model loads;
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
    cli.add_ckpt(p)
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


def describe(result: Any) -> str:
    """The status line under the images for one result: what was drawn, the request's
    time and velocity evaluations, and the compiled programs."""
    r = result.request
    how = ("Dopri5 (adaptive)" if r.dopri5 else
           f"Euler {'+'.join(map(str, r.steps))} steps, shift {r.shift:g}")
    if r.prompt is None:
        what = f"**{result.class_name}** (class {r.class_id})"
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
    return (f"Cascaded pixel-space flow matching: {demo.resolution} px images in "
            f"{stages} ({' → '.join(f'{r} px' for r in resolutions)}), "
            f"{what}. Checkpoint: `{shown_path(demo.ckpt_dir)}`")


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
    default_class = 207 if demo.num_classes == 1000 else 0  # golden retriever
    return [gr.Dropdown(choices, value=default_class, label="Class", elem_id="class")]


def ready_text(demo: Any) -> str:
    """The status line once warm-up has succeeded."""
    if demo.kind == "text":
        from pixelflow_jax.text_encoder import BUCKETS

        longer = ", ".join(str(b) for b in BUCKETS if b > demo.first_bucket)
        return (f"**Ready.** Compiled in {demo.compile_seconds:.1f} s for prompts of up to "
                f"{demo.first_bucket} tokens; a new prompt never recompiles. The first "
                f"longer prompt of each length bucket ({longer} tokens), and the first Dopri5 "
                "request of a bucket, compile once.")
    return (f"**Ready.** Compiled in {demo.compile_seconds:.1f} s; changing any setting "
            "never recompiles.")


def build_ui(demo: Any, started: float) -> Any:
    """The Gradio page around a loaded demo (:func:`pixelflow_jax.demo.load_demo`): the
    class page or the prompt page, with the same solver controls."""
    import gradio as gr

    from pixelflow_jax import demo as demo_lib
    from pixelflow_jax.errors import UserError

    resolutions = demo.euler.resolutions

    def status() -> str:
        if demo.warm_up_error is not None:
            return f"**Warm-up failed:** {demo.warm_up_error}"
        if not demo.ready:
            return (f"⏳ **Warming up: compiling the model…** ({time.time() - started:.0f} s "
                    "so far; this happens once, then every request costs only the sampling)")
        return ready_text(demo)

    def refresh() -> tuple:
        done = demo.wait_until_warm(0)
        text = ("Generate" if demo.ready else
                "Unavailable" if demo.warm_up_error is not None else "Warming up…")
        button = gr.Button(text, interactive=demo.ready)
        return status(), button, gr.Timer(active=not done)

    # The last error of each browser session, for the status line (the toast fades).
    errors: OrderedDict[str, str] = OrderedDict()
    errors_lock = threading.Lock()

    # Gradio injects the request by its position and annotation (before the inputs):
    # the condition's values, then dopri5, shift, guidance, seed and the steps per stage.
    def generate(request: gr.Request, *values: Any) -> tuple:
        condition, (dopri5, shift, guidance, seed, *steps) = \
            values[:len(conditions)], values[len(conditions):]
        try:
            result = demo.generate(*condition, dopri5=dopri5, steps=list(steps),
                                   guidance=guidance, shift=shift, seed=seed)
        except UserError as e:
            with errors_lock:
                errors[request.session_hash or ""] = str(e)
                while len(errors) > 1000:  # API clients never read theirs back
                    errors.popitem(last=False)
            # gr.Error: a toast in the page, and an error API clients can read.
            raise gr.Error(str(e), title="Cannot generate", print_exception=False) from None
        return output_images(result), describe(result)

    def show_error(request: gr.Request) -> str:
        with errors_lock:
            text = errors.pop(request.session_hash or "", "the request failed")
        return f"**Cannot generate:** {text}"

    with gr.Blocks(title=TITLE, analytics_enabled=False,
                   delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# {TITLE}\n{describe_model(demo)}")
        with gr.Row():
            with gr.Column(scale=1):
                conditions = condition_inputs(demo)
                dopri5 = gr.Checkbox(False, label="Dopri5 solver (adaptive; ignores steps "
                                     "and shift)", elem_id="dopri5")
                shift = gr.Slider(*demo_lib.SHIFT_RANGE, value=demo_lib.DEFAULT_SHIFT, step=1,
                                  label="Noise shift", elem_id="shift")
                guidance = gr.Slider(*demo_lib.GUIDANCE_RANGE, value=demo_lib.DEFAULT_GUIDANCE,
                                     step=0.1, label="Classifier-free guidance",
                                     elem_id="guidance")
                steps = [gr.Slider(*demo_lib.STEPS_RANGE, value=demo_lib.DEFAULT_STEPS, step=1,
                                   label=f"Steps, stage {s + 1} ({r} px)",
                                   elem_id=f"steps{s + 1}")
                         for s, r in enumerate(resolutions)]
                seed = gr.Number(demo_lib.DEFAULT_SEED, label="Seed", precision=0,
                                 minimum=0, maximum=demo_lib.SEED_LIMIT - 1, elem_id="seed")
                button = gr.Button("Warming up…", variant="primary", interactive=False,
                                   elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=demo_lib.NUM_IMAGES,
                                     format="png", object_fit="contain", height="auto",
                                     elem_id="samples")
                message = gr.Markdown(status(), elem_id="status")
        timer = gr.Timer(1.0)
        timer.tick(refresh, outputs=[message, button, timer], concurrency_limit=None,
                   show_progress="hidden", api_visibility="private")
        blocks.load(refresh, outputs=[message, button, timer], concurrency_limit=None,
                    show_progress="hidden", api_visibility="private")
        # preprocess=False: the raw values reach demo.parse, whose messages name the field
        # (Gradio's own range checks would say only "Value 0 is less than minimum value 1").
        button.click(generate, inputs=[*conditions, dopri5, shift, guidance, seed, *steps],
                     outputs=[gallery, message], api_name="generate", preprocess=False,
                     concurrency_limit=1, show_progress_on=gallery).failure(
            show_error, outputs=message, concurrency_limit=None, show_progress="hidden",
            api_visibility="private")
    return blocks


def warm_up(demo: Any) -> None:
    """Compile in the background, reporting on stderr (the page shows it too)."""
    try:
        seconds = demo.warm_up()
    except Exception as e:  # shown on the page; the server keeps serving it
        print(f"app.py: warm-up failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    print(f"app.py: ready (compiled in {seconds:.1f} s)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; returns the exit code."""
    check_address(args.host, args.port)
    from pixelflow_jax import runtime
    from pixelflow_jax.default_model import default_checkpoint
    from pixelflow_jax.demo import load_demo
    from pixelflow_jax.errors import UserError

    started = time.time()
    runtime.enable_compilation_cache()
    demo = load_demo(args.ckpt or default_checkpoint(), text_encoder=args.text_encoder,
                     dtype=args.dtype, attention=args.attention)
    blocks = build_ui(demo, started)
    blocks.queue(default_concurrency_limit=1)
    try:
        blocks.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                      show_error=True, quiet=True, ssr_mode=False, css=CSS,
                      footer_links=["api"])
    except OSError as e:
        reason = str(e).split(". ")[0]  # Gradio adds advice about its own env variables
        raise UserError(f"cannot serve on {args.host}:{args.port} ({reason}); choose another "
                        "--port") from None
    print(f"app.py: serving http://{args.host}:{args.port} ({demo.ckpt_dir}); warming up...",
          file=sys.stderr)
    threading.Thread(target=warm_up, args=(demo,), daemon=True, name="warm-up").start()
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
