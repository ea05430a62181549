#!/usr/bin/env python3
"""Serve the PixelFlow generation page (Gradio): pick a class, press Generate, see 4 images.

Examples:
  python app.py                       # the embedded digits model on http://127.0.0.1:7860
  python app.py --ckpt CKPT_DIR --host 0.0.0.0 --port 8080

The page is up at once and says "warming up" while the model compiles (once, for
every setting: changing class, solver, steps, guidance, shift or seed never
recompiles). Requests queue and run one at a time. The same endpoint is an API
(/generate; see "Use via API" at the bottom of the page). User mistakes on the
command line end with one line on stderr and exit code 2.
"""

import argparse
import os
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

# Before gradio is imported: no usage reports or version checks leave this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TITLE = "PixelFlow"
# Tiny images (32 px) are upscaled by the browser; keep their pixels sharp.
CSS = "#samples img { image-rendering: pixelated; }"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="app.py", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", metavar="DIR", default=None,
        help="class-conditional checkpoint folder (config.yaml + params/, optionally "
             "class_names.txt with one name per line); default: the embedded digits model")
    add("--host", default="127.0.0.1",
        help="address to listen on; 0.0.0.0 serves other machines too (default 127.0.0.1)")
    add("--port", type=int, default=7860, help="TCP port to listen on (default 7860)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    add("--attention", choices=["auto", "xla", "cudnn", "chunked"], default="auto",
        help="attention kernel; auto = cuDNN flash attention on GPU in bf16, else XLA")
    return p


def option_label(class_id: int, name: str) -> str:
    """The class drop-down's text for one class: "seven (7)", or "7" for unnamed classes."""
    return name if name == str(class_id) else f"{name} ({class_id})"


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (shorter, and it
    keeps the machine's folder layout off the page)."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def describe(result: Any) -> str:
    """The status line under the images for one result."""
    r = result.request
    how = ("Dopri5 (adaptive)" if r.dopri5 else
           f"Euler {'+'.join(map(str, r.steps))} steps, shift {r.shift:g}")
    return (f"{len(result.images)} images of **{result.class_name}** (class {r.class_id}) in "
            f"{result.seconds:.2f} s: {how}, guidance {r.guidance:g}, seed {r.seed}; "
            f"{result.evaluations} velocity evaluations per image; compiled programs: "
            f"{result.num_compilations}")


def build_ui(demo: Any, started: float) -> Any:
    """The Gradio page around a :class:`~pixelflow_jax.demo.PixelFlowDemo`."""
    import gradio as gr

    from pixelflow_jax import demo as demo_lib
    from pixelflow_jax.errors import UserError

    choices = [(option_label(i, name), i) for i, name in enumerate(demo.names)]
    default_class = 207 if demo.num_classes == 1000 else 0  # golden retriever
    resolutions = demo.euler.resolutions

    def status() -> str:
        if demo.warm_up_error is not None:
            return f"**Warm-up failed:** {demo.warm_up_error}"
        if not demo.ready:
            return (f"⏳ **Warming up: compiling the model…** ({time.time() - started:.0f} s "
                    "so far; this happens once, then every request costs only the sampling)")
        return (f"**Ready.** Compiled in {demo.compile_seconds:.1f} s; changing any setting "
                "never recompiles.")

    def refresh() -> tuple:
        done = demo.wait_until_warm(0)
        text = ("Generate" if demo.ready else
                "Unavailable" if demo.warm_up_error is not None else "Warming up…")
        button = gr.Button(text, interactive=demo.ready)
        return status(), button, gr.Timer(active=not done)

    # The last error of each browser session, for the status line (the toast fades).
    errors: OrderedDict[str, str] = OrderedDict()
    errors_lock = threading.Lock()

    # Gradio injects the request by its position and annotation (before the inputs).
    def generate(request: gr.Request, class_: Any, dopri5: Any, shift: Any, guidance: Any,
                 seed: Any, *steps: Any) -> tuple:
        try:
            result = demo.generate(class_, dopri5=dopri5, steps=list(steps),
                                   guidance=guidance, shift=shift, seed=seed)
        except UserError as e:
            with errors_lock:
                errors[request.session_hash or ""] = str(e)
                while len(errors) > 1000:  # API clients never read theirs back
                    errors.popitem(last=False)
            # gr.Error: a toast in the page, and an error API clients can read.
            raise gr.Error(str(e), title="Cannot generate", print_exception=False) from None
        images = [img[..., 0] if img.shape[-1] == 1 else img for img in result.images]
        return images, describe(result)

    def show_error(request: gr.Request) -> str:
        with errors_lock:
            text = errors.pop(request.session_hash or "", "the request failed")
        return f"**Cannot generate:** {text}"

    with gr.Blocks(title=TITLE, analytics_enabled=False,
                   delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# {TITLE}\nCascaded pixel-space flow matching: "
                    f"{demo.resolution} px images in {demo.num_stages} stages "
                    f"({' → '.join(f'{r} px' for r in resolutions)}), "
                    f"{demo.num_classes} classes. Checkpoint: `{shown_path(demo.ckpt_dir)}`")
        with gr.Row():
            with gr.Column(scale=1):
                class_box = gr.Dropdown(choices, value=default_class, label="Class",
                                        elem_id="class")
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
        button.click(generate, inputs=[class_box, dopri5, shift, guidance, seed, *steps],
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
    from pixelflow_jax import runtime
    from pixelflow_jax.default_model import default_checkpoint
    from pixelflow_jax.demo import PixelFlowDemo
    from pixelflow_jax.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    started = time.time()
    runtime.enable_compilation_cache()
    demo = PixelFlowDemo(args.ckpt or default_checkpoint(), dtype=args.dtype,
                         attention=args.attention)
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
        blocks.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    from pixelflow_jax.errors import UserError
    try:
        return run(args)
    except UserError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
