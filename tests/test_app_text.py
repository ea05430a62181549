"""The prompt page: app.py with a text-to-image checkpoint (DESIGN §7).

A tiny text checkpoint (1 stage, 8 px, so that each compilation takes seconds) and a
tiny random T5 folder (a sentencepiece vocabulary trained here, saved by transformers)
are built in the test. The model side is checked in-process: request checks, the
compiled-program counts across prompts and length buckets (and JAX's own trace and
compile events), the truncation note; then ``app.py`` is started on them and driven in
Debian's Chromium, as tests/test_app.py does for the class page.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import shutil

import jax.monitoring
import numpy as np
import pytest
import transformers
from PIL import Image

import app
import torch_reference as ref
from conftest import TINY_T2I, make_config
from test_app import (START_TIMEOUT, Server, browser, free_port,  # noqa: F401 (a fixture)
                      open_page, wait_ready)
from test_hf_weights import hf_config, randomized
from test_tokenizer import make_tokenizer_folder
from pixelflow_jax import runtime
from pixelflow_jax.checkpoint import save_checkpoint
from pixelflow_jax.convert import official_to_nnx
from pixelflow_jax.demo import NUM_IMAGES, TextDemo, load_demo
from pixelflow_jax.errors import UserError
from pixelflow_jax.prompts import TEXT_ENCODER_FOLDER

# Token counts with the test vocabulary (</s> included): 6, 7 and 8 (the 16 bucket),
# 22 and 25 (the 32 bucket); asserted below through the results' context lengths.
CAT = "a photo of a cat"
DOG = "a dog sitting on a mat"
BLURRY = "blurry"
LONG = "an oil painting of a dragon over the castle at night, watercolor garden, snow in winter"
LONG2 = "portrait of a cat sitting on the mat in the garden under the cloud, oil painting"
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                "/jax/core/compile/backend_compile_duration")


def tiny_checkpoint(path: str, cross_attention_dim: int) -> str:
    """A random text checkpoint: 1 stage at 8 px (the tiny transformer, normal-scale weights)."""
    params = dict(TINY_T2I, cross_attention_dim=cross_attention_dim)
    cfg = make_config(params, resolution=8, num_stages=1)
    sd = ref.random_state_dict(params, seed=3)
    save_checkpoint(path, official_to_nnx({k: v.numpy() for k, v in sd.items()}, cfg.params),
                    cfg)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(T5 folder, text checkpoint without an encoder, the same with text_encoder/,
    a checkpoint whose cross-attention is narrower than the encoder)."""
    root = str(tmp_path_factory.mktemp("t2i"))
    t5 = make_tokenizer_folder(root)
    randomized(transformers.T5EncoderModel(hf_config())).save_pretrained(t5)  # d_model 32
    bare = tiny_checkpoint(os.path.join(root, "bare"), 32)
    full = os.path.join(root, "full")
    shutil.copytree(bare, full)
    shutil.copytree(t5, os.path.join(full, TEXT_ENCODER_FOLDER))
    narrow = tiny_checkpoint(os.path.join(root, "narrow"), 12)
    return t5, bare, full, narrow


@pytest.fixture(scope="module")
def demo(folders) -> TextDemo:
    runtime.enable_compilation_cache()  # the server below then finds these programs cached
    d = load_demo(folders[2])
    assert isinstance(d, TextDemo) and d.kind == "text" and not d.ready
    d.warm_up()
    # Warm-up: the encoder and the Euler sampler for the first bucket; Dopri5 waits.
    assert d.ready and (d.encoder.num_compilations, d.euler.num_compilations,
                        d.dopri5.num_compilations) == (1, 1, 0)
    assert d.num_compilations == 2
    return d


class CompileEvents:
    """Counts JAX's trace and backend-compile events while open (any jit, any thread)."""

    def __enter__(self):
        self.events: list[str] = []
        self._listener = lambda event, duration, **kw: (
            self.events.append(event) if event in TRACE_EVENTS else None)
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def programs(demo) -> tuple[int, int, int]:
    return (demo.encoder.num_compilations, demo.euler.num_compilations,
            demo.dopri5.num_compilations)


# ---------------------------------------------------------------------- the model side

def test_parse(demo):
    r = demo.parse(CAT, "", steps=[3], guidance=4, shift=2, seed=7.0)
    assert (r.prompt, r.negative_prompt, r.steps, r.seed, r.class_id) == (CAT, "", (3,), 7, None)
    assert demo.parse("  spaced\tprompt ", None).prompt == "  spaced\tprompt "  # kept as typed
    assert demo.parse(CAT).negative_prompt == ""


@pytest.mark.parametrize("args, kwargs, message", [
    (("",), {}, r"the prompt is empty: describe the image to draw"),
    ((" \n\t ",), {}, r"the prompt is empty"),
    ((None,), {}, r"the prompt is empty"),
    ((42,), {}, r"prompt must be text, got 42"),
    (("x" * 20_001,), {}, r"prompt is 20,001 characters long; at most 20,000"),
    ((CAT, 5), {}, r"negative prompt must be text, got 5"),
    ((CAT, "y" * 20_001), {}, r"negative prompt is 20,001 characters long"),
    ((CAT,), dict(guidance=0.5), r"guidance must be between 1 and 25, got 0\.5"),
    ((CAT,), dict(steps=0), r"steps of stage 1 must be between 1 and 100, got 0"),
    ((CAT,), dict(seed=-1), r"seed must be a whole number from 0"),
])
def test_parse_rejects_bad_input(demo, args, kwargs, message):
    with pytest.raises(UserError, match=message):
        demo.parse(*args, **kwargs)
    with pytest.raises(UserError, match=message):  # generate checks before drawing
        demo.generate(*args, **kwargs)


def test_new_prompts_never_recompile(demo):
    """Same bucket: not one trace or compilation anywhere in JAX. A new bucket: exactly
    one encoder and one sampler program. Dopri5: one program on its first use."""
    S, R = demo.num_stages, demo.resolution
    first = demo.generate(CAT)
    assert first.images.shape == (NUM_IMAGES, R, R, 3) and first.images.dtype == np.uint8
    assert first.evaluations == 10 * S and first.seconds > 0
    assert (first.context_length, first.prompt_tokens, first.truncated) == (16, 6, ())
    assert first.new_programs == 0 and first.num_compilations == 2
    for a, b in itertools.combinations(first.images, 2):  # four different images
        assert not np.array_equal(a, b)

    runs = []
    with CompileEvents() as events:
        runs.append(demo.generate(DOG))
        runs.append(demo.generate(DOG, BLURRY))           # a new negative prompt
        runs.append(demo.generate(BLURRY, seed=3, guidance=1.0, shift=3, steps=4))
    assert events.events == []
    assert programs(demo) == (1, 1, 0)
    assert all(r.new_programs == 0 and r.num_compilations == 2 and r.context_length == 16
               for r in runs)
    assert [r.prompt_tokens for r in runs] == [7, 7, 8]
    for r in runs:  # each prompt changes the pictures
        assert not np.array_equal(r.images, first.images), r.request
    assert not np.array_equal(runs[0].images, runs[1].images)  # so does the negative prompt

    # A prompt of the 32 bucket: one encoder and one Euler program, then none.
    long = demo.generate(LONG)
    assert (long.context_length, long.prompt_tokens) == (32, 22)
    assert programs(demo) == (2, 2, 0) and long.new_programs == 2
    assert long.compile_seconds > 0 and long.seconds >= long.compile_seconds
    with CompileEvents() as events:
        long2 = demo.generate(LONG2, DOG)
        again = demo.generate(CAT)  # the 16 bucket's programs are still there
    assert events.events == []
    assert (long2.context_length, long2.prompt_tokens, long2.new_programs) == (32, 25, 0)
    assert programs(demo) == (2, 2, 0)
    np.testing.assert_array_equal(again.images, first.images)

    # Dopri5 compiles on its first use for a bucket, once.
    d1 = demo.generate(CAT, dopri5=True)
    assert d1.new_programs == 1 and programs(demo) == (2, 2, 1) and d1.evaluations > 0
    with CompileEvents() as events:
        d2 = demo.generate(DOG, dopri5=True, seed=5)
    assert events.events == [] and d2.new_programs == 0 and programs(demo) == (2, 2, 1)
    assert not np.array_equal(d1.images, d2.images)


def test_prompts_over_t5s_limit_are_cut_and_named(demo):
    """T5 reads 511 tokens and </s> (official max_length=512): exactly 511 is not cut,
    512 is; the page says which field was cut."""
    tokenizer = demo.encoder.tokenizer
    texts = ["cat " * n for n in range(400, 700)]
    counts = tokenizer(texts, 4096)[1].sum(axis=1) - 1  # tokens before </s>, uncut
    exact = {int(c): t for c, t in zip(counts, texts)}
    assert {510, 511, 512, 513} <= set(exact)
    assert demo.over_limit(exact[511]) == ()
    assert demo.over_limit(exact[512]) == ("prompt",)
    assert demo.over_limit(CAT, exact[513]) == ("negative prompt",)
    assert demo.over_limit(exact[513], exact[512]) == ("prompt", "negative prompt")
    # The page's status line says it (the result of a drawn request, marked cut).
    result = dataclasses.replace(demo.generate(CAT), truncated=("prompt",))
    line = app.describe(result)
    assert "the prompt is longer than T5's 511 tokens: only the first 511 were used" in line


def test_status_line_shows_the_time_and_escapes_the_prompt(demo):
    result = demo.generate("*a* [b](c) <i>", "_under_")
    assert result.context_length == 16 and result.new_programs == 0
    line = app.describe(result)
    assert r"“\*a\* \[b\]\(c\) \<i\>”" in line
    assert r"negative prompt “\_under\_”" in line
    assert f"in {result.seconds:.2f} s (text encoding {result.encode_seconds:.2f} s)" in line
    assert f"{result.evaluations} velocity evaluations per image" in line
    assert app.markdown_text("a\n\nb   c" + "d" * 300, 10) == "a b cdddd…"


def test_generate_waits_for_warm_up(folders):
    cold = TextDemo(folders[2])
    with pytest.raises(UserError, match="still warming up"):
        cold.generate(CAT, warm_up_timeout=0.01)


# ---------------------------------------------------------------------- command line

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("app.py: error: ") and err.count("\n") == 1, err
    return err


def test_cli_start_up_errors(folders, ckpt_dir, capsys, tmp_path, monkeypatch):
    """Each refused before any weights are read: one line, exit 2."""
    from pixelflow_jax import checkpoint, text_encoder

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the mistake was found")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_loading)
    monkeypatch.setattr(text_encoder, "load_t5_encoder", no_loading)
    t5, bare, full, narrow = folders
    port = str(free_port())
    cases = [
        (["--ckpt", bare], f"{bare} is a text-to-image model and has no text_encoder/ folder: "
                           "give --text-encoder HF_T5_DIR"),
        (["--ckpt", bare, "--text-encoder", str(tmp_path / "nope")],
         f"--text-encoder {tmp_path / 'nope'}: no such folder"),
        (["--ckpt", ckpt_dir, "--text-encoder", t5],
         f"{ckpt_dir} is a class-conditional model: --text-encoder is only for "
         "text-to-image checkpoints"),
        (["--ckpt", narrow, "--text-encoder", t5],
         "gives 32-wide features but the model's cross-attention takes 12"),
        (["--ckpt", bare, "--text-encoder", bare], f"{bare} has no config.json"),
    ]
    for argv, message in cases:
        assert app.main(argv + ["--port", port]) == 2, argv
        assert message in one_error_line(capsys), argv


# ---------------------------------------------------------------------- the page

@pytest.fixture(scope="module")
def server(folders, demo, tmp_path_factory):
    # `demo` first: its compilations fill the cache the server then reads.
    srv = Server(folders[2], tmp_path_factory.mktemp("server") / "app.log")
    try:
        srv.wait_serving(START_TIMEOUT)
        yield srv
    finally:
        srv.stop()


def generate_and_wait(page, marker: str) -> list[Image.Image]:
    """Click Generate, wait for a status line holding ``marker``; the gallery's PNGs."""
    page.locator("#generate").click()
    page.wait_for_function(
        "m => document.querySelector('#status').innerText.includes(m) && "
        "document.querySelectorAll('#samples img').length >= 4", arg=marker, timeout=120_000)
    imgs = page.locator("#samples img")
    assert imgs.count() == NUM_IMAGES
    out = []
    for i in range(NUM_IMAGES):
        img = imgs.nth(i)
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle())
        out.append(Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())))
    return out


def test_prompt_page(server, browser, demo):  # noqa: F811 (browser)
    outside = []
    page = open_page(browser, server.url, outside)
    wait_ready(page)
    assert "Ready" in page.locator("#status").inner_text()
    assert page.locator("#prompt textarea").is_visible()
    assert page.locator("#negative textarea").input_value() == ""
    assert not page.locator("#class").count()  # no class list on the prompt page
    for s in range(demo.num_stages):
        assert page.locator(f"#steps{s + 1}").is_visible()

    # Type a prompt, get four images carrying it, as the library draws them.
    page.locator("#prompt textarea").fill(CAT)
    images = generate_and_wait(page, CAT)
    status = page.locator("#status").inner_text()
    assert "compiled programs: 2" in status and "velocity evaluations per image" in status
    want = demo.generate(CAT).images
    for got, ref_image in zip(images, want):
        assert got.text["prompt"] == CAT and "negative_prompt" not in got.text
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), ref_image)

    # Another prompt and a negative prompt: new images, no new program.
    page.locator("#prompt textarea").fill(DOG)
    page.locator("#negative textarea").fill(BLURRY)
    images2 = generate_and_wait(page, DOG)
    status = page.locator("#status").inner_text()
    assert "compiled programs: 2" in status and "compiling" not in status
    assert f"negative prompt “{BLURRY}”" in status
    assert images2[0].text["prompt"] == DOG and images2[0].text["negative_prompt"] == BLURRY
    assert not np.array_equal(np.asarray(images2[0]), np.asarray(images[0]))

    # An empty prompt is named; the next one draws again.
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#status').innerText.includes('Cannot generate')")
    assert "the prompt is empty: describe the image to draw" in \
        page.locator("#status").inner_text()
    page.locator("#prompt textarea").fill(BLURRY)
    assert len(generate_and_wait(page, "“" + BLURRY)) == NUM_IMAGES
    assert outside == [], f"the page tried to reach other machines: {outside}"
    assert server.proc.poll() is None
    page.context.close()


def test_api_bad_input_is_named(server, demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False)
    call = lambda prompt, negative="": client.predict(
        prompt, negative, False, 1, 4, 42, *[10] * demo.num_stages, api_name="/generate")
    with pytest.raises(AppError, match="the prompt is empty"):
        call("")
    with pytest.raises(AppError, match="prompt is 20,001 characters long"):
        call("z" * 20_001)
    gallery, status = call(DOG)
    assert len(gallery) == NUM_IMAGES and "compiled programs: 2" in status
    assert Image.open(gallery[0]["image"]).text["prompt"] == DOG
