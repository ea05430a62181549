"""The web demo: class names, request checks, no recompilation, and the page in Chromium.

The browser tests start ``app.py`` on a free loopback port and drive it with
Playwright in Debian's Chromium (``apt-get install chromium``; Playwright's own
browser downloads are not used). They use the embedded model when it is present,
else a tiny random checkpoint, and offer it beside a stand-in one-step student: a copy
of it whose config.yaml carries a ``sample:`` section (the model choice).
"""

import dataclasses
import io
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import app
from conftest import ROOT
from pixelflow_jax import default_model, init_checkpoint, runtime
from pixelflow_jax.class_names import class_names, imagenet_class_names
from pixelflow_jax.config import SampleConfig, load_config
from pixelflow_jax.default_model import DEFAULT_CHECKPOINT
from pixelflow_jax.demo import (NUM_IMAGES, PixelFlowDemo, SamplingDefaults,
                                embedded_models, sampling_defaults)
from pixelflow_jax.errors import UserError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STUDENT = "digits-1step"  # the stand-in student's folder name, its name on the page
STUDENT_SAMPLE = "sample:\n  steps: 1\n  guidance: 1\n  solver: euler\n"
START_TIMEOUT = 240  # seconds for the server to load, serve and compile (cold cache, 2 CPUs)


# ---------------------------------------------------------------------- class names

def test_imagenet_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and all(n == n.strip() and n for n in names)
    assert names[0] == "tench" and names[1] == "goldfish" and names[2] == "great white shark"
    assert names[207] == "golden retriever" and names[360] == "otter"
    assert names[388] == "giant panda" and names[999] == "toilet tissue"


def test_class_names_sources(tmp_path):
    assert class_names(tmp_path, 1000)[207] == "golden retriever"
    assert class_names(tmp_path, 3) == ["0", "1", "2"]
    (tmp_path / "class_names.txt").write_text("cat\ndog\nbird\n")
    assert class_names(tmp_path, 3) == ["cat", "dog", "bird"]
    with pytest.raises(UserError, match=r"class_names\.txt: expected 4 class names.*found 3"):
        class_names(tmp_path, 4)
    (tmp_path / "class_names.txt").write_text("cat\n\nbird\n")
    with pytest.raises(UserError, match=r"class_names\.txt: line 2 is empty"):
        class_names(tmp_path, 3)


# ---------------------------------------------------------------------- the model side

@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory) -> str:
    """The embedded model if it is there, else a tiny random one with digit names."""
    if os.path.isfile(os.path.join(DEFAULT_CHECKPOINT, "config.yaml")):
        return DEFAULT_CHECKPOINT
    path = tmp_path_factory.mktemp("demo") / "tiny"
    assert init_checkpoint.main([os.path.join(ROOT, "configs", "pixelflow_tiny_c2i.yaml"),
                                 str(path)]) == 0
    (path / "class_names.txt").write_text("\n".join(DIGITS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def student_ckpt(demo_ckpt, tmp_path_factory) -> str:
    """The demo model as a one-step student would ship: its copy, with a ``sample:``
    section (the student's sampling defaults) in its config.yaml."""
    path = tmp_path_factory.mktemp("student") / STUDENT
    shutil.copytree(demo_ckpt, path)
    config = (path / "config.yaml").read_text()
    assert "\nsample:" not in config
    (path / "config.yaml").write_text(config + STUDENT_SAMPLE)
    return str(path)


@pytest.fixture(scope="module")
def demo(demo_ckpt) -> PixelFlowDemo:
    runtime.enable_compilation_cache()  # the server below then finds these programs cached
    d = PixelFlowDemo(demo_ckpt)
    assert not d.ready
    d.warm_up()
    assert d.ready and d.num_compilations == 2
    return d


def test_parse_accepts_form_and_api_values(demo):
    S = demo.num_stages
    r = demo.parse("Seven", steps=[3] * S, guidance=4, shift=1, seed=42.0)
    assert (r.class_id, r.steps, r.seed, r.dopri5) == (7, (3,) * S, 42, False)
    assert demo.parse(" 7 ").class_id == demo.parse(7.0).class_id == 7
    assert demo.parse(0, steps=100, guidance=25, shift=100, seed=2 ** 32 - 1).steps == (100,) * S
    assert demo.parse(9, dopri5=True, guidance=1).dopri5


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_=10), r"class id 10 is outside 0\.\.9"),
    (dict(class_=-1), r"class id -1 is outside"),
    (dict(class_="banana"), r"unknown class 'banana'"),
    (dict(class_=None), r"choose a class"),
    (dict(class_=2.5), r"class must be a whole number"),
    (dict(steps=0), r"steps of stage 1 must be between 1 and 100, got 0"),
    (dict(steps=101), r"steps of stage 1 must be between 1 and 100"),
    (dict(steps=[10]), r"give steps for each of the \d stages, got 1"),
    (dict(steps="ten"), r"steps of stage 1 must be a number, got 'ten'"),
    (dict(guidance=0.5), r"guidance must be between 1 and 25, got 0\.5"),
    (dict(guidance=float("nan")), r"guidance must be a finite number"),
    (dict(shift=0), r"shift must be between 1 and 100, got 0"),
    (dict(shift=101), r"shift must be between 1 and 100"),
    (dict(seed=-1), r"seed must be a whole number from 0 to 4294967295, got -1"),
    (dict(seed=2 ** 32), r"seed must be a whole number from 0"),
    (dict(seed=1.5), r"seed must be a whole number, got 1\.5"),
    (dict(seed=None), r"seed must be a number, got None"),
    (dict(dopri5="yes"), r"dopri5 must be true or false"),
])
def test_parse_rejects_bad_input(demo, kwargs, message):
    kwargs = dict(kwargs)
    class_ = kwargs.pop("class_", 3)
    with pytest.raises(UserError, match=message):
        demo.parse(class_, **kwargs)


def test_requests_never_recompile(demo):
    S = demo.num_stages
    R = demo.resolution
    first = demo.generate(3)
    assert first.images.shape == (NUM_IMAGES, R, R, demo.channels)
    assert first.images.dtype == np.uint8 and first.seconds > 0
    assert first.evaluations == 10 * S  # velocity evaluations: one per Euler step
    runs = [demo.generate(3)]  # the same request: the same images
    np.testing.assert_array_equal(runs[0].images, first.images)
    for kwargs in [dict(seed=7), dict(guidance=1.0), dict(guidance=12.5), dict(shift=3.0),
                   dict(steps=[1] + [2] * (S - 1)), dict(steps=[5] * S)]:
        runs.append(demo.generate(3, **kwargs))
    runs.append(demo.generate("eight"))
    runs.append(demo.generate(5, dopri5=True, guidance=1.0, seed=1))
    assert all(r.num_compilations == 2 for r in runs)
    assert demo.num_compilations == 2
    for r in runs[1:]:  # each setting changes the pictures
        assert not np.array_equal(r.images, first.images), r.request
    for a, b in itertools.combinations(first.images, 2):  # four different images
        assert not np.array_equal(a, b)
    assert runs[-1].request.dopri5 and runs[-1].evaluations > 0


def test_images_are_those_of_sample_py(demo, demo_ckpt, tmp_path):
    import sample

    steps = [2] * demo.num_stages
    assert sample.main(["--ckpt", demo_ckpt, "--classes", "4", "--num-images", str(NUM_IMAGES),
                        "--steps", ",".join(map(str, steps)), "--shift", "2", "--cfg", "3",
                        "--seed", "9", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    got = demo.generate(4, steps=steps, shift=2, guidance=3, seed=9).images
    for i in range(NUM_IMAGES):
        want = np.asarray(Image.open(tmp_path / "s" / f"{i:06d}_class4.png"))
        np.testing.assert_array_equal(got[i], want.reshape(got[i].shape))


def test_generate_waits_for_warm_up(demo_ckpt):
    cold = PixelFlowDemo(demo_ckpt)
    with pytest.raises(UserError, match="still warming up"):
        cold.generate(1, warm_up_timeout=0.01)


def test_each_model_has_its_sampling_defaults(demo, student_ckpt):
    S = demo.num_stages
    assert demo.defaults == SamplingDefaults(dopri5=False, steps=(10,) * S, guidance=4.0,
                                             shift=1.0, carried=False)
    assert demo.parse(3).steps == (10,) * S and demo.parse(3).guidance == 4
    student = PixelFlowDemo(student_ckpt)  # loads; compiles nothing
    assert student.defaults == SamplingDefaults(dopri5=False, steps=(1,) * S, guidance=1.0,
                                                shift=1.0, carried=True)
    r = student.parse(3)  # a request leaving the settings out gets the student's
    assert (r.steps, r.guidance, r.dopri5) == ((1,) * S, 1.0, False)
    assert student.parse(3, steps=5, guidance=2).steps == (5,) * S  # given values win
    assert f"its default settings (config.yaml): Euler {'+'.join(['1'] * S)} steps, shift 1, " \
        "guidance 1" in app.describe_model(student)
    assert "default settings" not in app.describe_model(demo)
    # What the page's controls cannot show is fitted to them; a wrong length is named.
    cfg = load_config(os.path.join(student_ckpt, "config.yaml"))
    odd = dataclasses.replace(cfg, sample=SampleConfig(steps=[1, 2, 300][:S], guidance=0,
                                                       solver="dopri5", shift=500))
    assert sampling_defaults(odd, S) == SamplingDefaults(
        dopri5=True, steps=(1, 2, 100)[:S], guidance=1.0, shift=100.0, carried=True)
    with pytest.raises(UserError, match=rf"^CKPT: config.yaml's sample.steps gives {S + 1} "
                                        rf"step counts for a model of {S} stages"):
        sampling_defaults(dataclasses.replace(cfg, sample=SampleConfig(steps=[2] * (S + 1))),
                          S, "CKPT")


def test_a_student_runs_its_teachers_programs(demo, student_ckpt):
    """Models of one network share the two compiled programs; each draws with its own
    weights, swapped in per request."""
    import jax

    student = PixelFlowDemo(student_ckpt, share=[demo])
    assert student.euler is demo.euler and student.shares_programs_of is demo
    student._params = jax.tree.map(lambda a: a * 0.9, student._params)  # other weights
    assert student.warm_up() < 1 and student.ready
    before = demo.generate(3, steps=1, guidance=1)
    mine = student.generate(3)  # its defaults: one unguided step per stage
    assert mine.request.steps == before.request.steps and mine.evaluations == demo.num_stages
    assert not np.array_equal(mine.images, before.images)
    np.testing.assert_array_equal(demo.generate(3, steps=1, guidance=1).images, before.images)
    assert demo.num_compilations == student.num_compilations == 2


def test_model_choice_lists_the_embedded_models(monkeypatch, tmp_path, capsys, demo_ckpt,
                                                 student_ckpt):
    """No --ckpt: every embedded model shipped (the student only once it is there);
    --models and --ckpt take short names and folders."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "digits").symlink_to(demo_ckpt)
    monkeypatch.setattr(default_model, "WEIGHTS", str(weights))
    monkeypatch.chdir(tmp_path)  # no ./digits folder to stand in for the short name
    teacher = str(weights / "digits")
    assert embedded_models() == app.model_folders(None, None) == {"digits": teacher}
    with pytest.raises(UserError, match=r"'digits-1step' \(the embedded one-step digits "
                                        r"student\) is not shipped"):
        app.model_folders(None, ["digits", "digits-1step"])
    assert app.main(["--ckpt", "digits-1step", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not shipped with this copy" in err

    (weights / STUDENT).symlink_to(student_ckpt)
    student = str(weights / STUDENT)
    assert list(app.model_folders(None, None).items()) == [("digits", teacher),
                                                           (STUDENT, student)]
    assert list(app.model_folders(None, [STUDENT, "digits"])) == [STUDENT, "digits"]
    assert app.model_folders(STUDENT, None) == {STUDENT: student}
    # Folders go by their last component, by their path when two share it.
    assert app.model_folders(None, [student_ckpt, "digits"]) == {
        STUDENT: student_ckpt, "digits": teacher}
    (tmp_path / "b" / "digits").mkdir(parents=True)  # only names are read
    assert app.model_folders(None, ["digits", "b/digits"]) == {"digits": teacher,
                                                                "b/digits": "b/digits"}
    with pytest.raises(UserError, match=f"--models: {re.escape(student_ckpt)} is given "
                                        rf"twice \(as {STUDENT}\)"):
        app.model_folders(None, [STUDENT, student_ckpt])
    with pytest.raises(UserError, match="give --ckpt .* or --models .*, not both"):
        app.model_folders("digits", ["digits"])


# ---------------------------------------------------------------------- command line

def test_cli_usage_errors(capsys, tmp_path, demo_ckpt):
    # --help itself: tests/test_cli_layer.py reads every flag's help text from the parser.
    assert app.main(["--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert app.main(["--ckpt", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("app.py: error:") and err.count("\n") == 1
    assert app.main(["--bogus"]) == 2
    capsys.readouterr()
    # A text encoder for a class checkpoint (text checkpoints: tests/test_app_text.py).
    assert app.main(["--ckpt", demo_ckpt, "--text-encoder", str(tmp_path),
                     "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a class-conditional model: --text-encoder is only " \
        "for text-to-image checkpoints" in err


# ---------------------------------------------------------------------- the page

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``app.py`` in a subprocess, its output in a log file."""

    def __init__(self, ckpt: str | list[str], log_path):
        """``ckpt``: one checkpoint (--ckpt), or a list of them (--models)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self._log = open(log_path, "w")
        models = ["--ckpt", ckpt] if isinstance(ckpt, str) else ["--models", *ckpt]
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "app.py"), *models, "--port",
             str(self.port)], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"app.py did not serve within {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(demo_ckpt, student_ckpt, demo, tmp_path_factory):
    # `demo` first: its compilations fill the cache the server then reads (the student's
    # programs are the same programs: the weights are their arguments).
    srv = Server([demo_ckpt, student_ckpt], tmp_path_factory.mktemp("server") / "app.log")
    try:
        srv.wait_serving(START_TIMEOUT)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: install it with "
                    "`sudo apt-get install -y chromium` (Debian/Ubuntu)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: pip install -r requirements-test.txt "
                    "(no `playwright install`: the tests use the system Chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str, outside: list):
    """A fresh browser profile on ``url``; requests leaving the machine are blocked and
    recorded in ``outside`` (the page must work offline)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def route(r):
        if r.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.goto(url)
    return page


def wait_ready(page) -> None:
    page.wait_for_selector("#generate:not([disabled])", timeout=START_TIMEOUT * 1000)


def choose(page, name: str, label: str) -> None:
    """Pick ``label`` in the drop-down ``name`` (Class, Model)."""
    page.get_by_role("combobox", name=name).click()
    page.get_by_role("option", name=label, exact=True).click()
    assert page.get_by_role("combobox", name=name).input_value() == label


def choose_class(page, label: str) -> None:
    choose(page, "Class", label)


def wait_images(page, resolution: int) -> list[np.ndarray]:
    """The gallery's images after a Generate, fetched and decoded."""
    page.wait_for_function(
        "document.querySelectorAll('#samples img').length >= 4 && "
        "document.querySelector('#status').innerText.includes('images of')", timeout=120_000)
    imgs = page.locator("#samples img")
    assert imgs.count() == NUM_IMAGES
    out = []
    for i in range(NUM_IMAGES):
        img = imgs.nth(i)
        img.wait_for(state="visible")
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle())
        # Decoded by the browser ...
        assert img.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [resolution] * 2
        # ... and by PIL.
        body = page.request.get(img.get_attribute("src")).body()
        out.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
    return out


def test_page_generates_four_images(server, browser, demo, tmp_path):
    outside = []
    page = open_page(browser, server.url, outside)
    page.wait_for_selector("#status", state="visible")
    page.wait_for_selector("#generate", state="attached")  # Gradio may render it a bit later
    # One read of both (the page updates them together once a second while warming up).
    status, disabled = page.evaluate("() => [document.querySelector('#status').innerText, "
                                     "document.querySelector('#generate').disabled]")
    if "Warming up" in status:  # loaded before compiling finished: said so, no Generate yet
        assert disabled
    else:
        assert "Ready" in status and not disabled
    wait_ready(page)
    assert "Ready" in page.locator("#status").inner_text()
    for s in range(demo.num_stages):
        assert page.locator(f"#steps{s + 1}").is_visible()
    assert not page.locator(f"#steps{demo.num_stages + 1}").count()
    label = app.option_label(7, demo.names[7])
    choose_class(page, label)
    page.locator("#generate").click()
    images = wait_images(page, demo.resolution)
    status = page.locator("#status").inner_text()
    assert f"of {demo.names[7]} (class 7)" in status and "compiled programs: 2" in status
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(a, b)
    # The page shows what the library draws for the same request.
    want = demo.generate(7).images
    for got, ref in zip(images, want):
        np.testing.assert_array_equal(got, ref if ref.shape[-1] == 3 else ref.repeat(3, -1))
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("PIXELFLOW_SCREENSHOT"):
        target = os.path.abspath(os.environ["PIXELFLOW_SCREENSHOT"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        page.screenshot(path=target, full_page=True)

    # The model choice: the student brings its own settings, and the page shows what its
    # requests cost.
    S = demo.num_stages
    assert page.get_by_role("combobox", name="Model").input_value() == \
        os.path.basename(demo.ckpt_dir)
    choose(page, "Model", STUDENT)
    page.wait_for_function("document.querySelector('#steps1 input[type=number]').value == '1'")
    for s in range(S):
        assert page.locator(f"#steps{s + 1} input[type=number]").input_value() == "1"
    assert float(page.locator("#guidance input[type=number]").input_value()) == 1
    assert STUDENT in page.locator("#heading").inner_text()
    assert page.get_by_role("combobox", name="Class").input_value() == label  # kept
    page.locator("#generate").click()
    page.wait_for_function(f"document.querySelector('#status').innerText.includes("
                           f"'from {STUDENT} in')", timeout=120_000)
    images = wait_images(page, demo.resolution)
    status = page.locator("#status").inner_text()
    one_step = r"\+".join(["1"] * S)
    assert re.search(rf"of {demo.names[7]} \(class 7\) from {STUDENT} in \d+\.\d\d s: "
                     rf"Euler {one_step} steps, shift 1, guidance 1, seed 42; "
                     rf"{S} velocity evaluations per image; compiled programs: 2", status), status
    # The stand-in student is the teacher's weights: its images are the teacher's at
    # one unguided step per stage.
    want = demo.generate(7, steps=[1] * S, guidance=1).images
    for got, ref in zip(images, want):
        np.testing.assert_array_equal(got, ref if ref.shape[-1] == 3 else ref.repeat(3, -1))
    assert outside == [], f"the page tried to reach other machines: {outside}"
    page.context.close()


def test_bad_input_gets_a_readable_error(server, browser, demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    S = demo.num_stages
    client = Client(server.url, verbose=False)
    teacher = os.path.basename(demo.ckpt_dir)

    def call(class_=3, dopri5=False, shift=1, guidance=4, seed=42, steps=None, model=teacher):
        steps = [10] * S if steps is None else steps
        return client.predict(model, class_, dopri5, shift, guidance, seed, *steps,
                              api_name="/generate")

    with pytest.raises(AppError, match=f"unknown model 'nope': choose one of {teacher}, "
                                       f"{STUDENT}"):
        call(model="nope")
    with pytest.raises(AppError, match="steps of stage 1 must be between 1 and 100, got 0"):
        call(steps=[0] + [10] * (S - 1))
    with pytest.raises(AppError, match=r"class id 12 is outside 0\.\.9"):
        call(class_=12)
    with pytest.raises(AppError, match="unknown class 'unicorn'"):
        call(class_="unicorn")
    with pytest.raises(AppError, match="guidance must be between 1 and 25"):
        call(guidance=30)
    # The server keeps serving, and new settings compile nothing.
    for kwargs in [dict(), dict(class_="two", seed=5, guidance=2.5, shift=4, steps=[2] * S)]:
        gallery, status = call(**kwargs)
        assert len(gallery) == NUM_IMAGES and "compiled programs: 2" in status
        for item in gallery:
            assert Image.open(item["image"]).size == (demo.resolution,) * 2
    # In the page, a bad value is explained in the status line.
    page = open_page(browser, server.url, [])
    wait_ready(page)
    page.locator("#seed input").fill("1.5")
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#status').innerText.includes('Cannot generate')")
    assert "seed must be a whole number, got 1.5" in page.locator("#status").inner_text()
    page.locator("#seed input").fill("3")
    page.locator("#generate").click()
    assert len(wait_images(page, demo.resolution)) == NUM_IMAGES
    page.context.close()


def test_two_browsers_at_once(server, browser, demo):
    pages = [open_page(browser, server.url, []) for _ in range(2)]
    for page in pages:
        wait_ready(page)
    choose_class(pages[0], app.option_label(2, demo.names[2]))
    choose_class(pages[1], app.option_label(5, demo.names[5]))
    for page in pages:  # both requests are in the queue together
        page.locator("#generate").click()
    results = [wait_images(page, demo.resolution) for page in pages]
    assert "(class 2)" in pages[0].locator("#status").inner_text()
    assert "(class 5)" in pages[1].locator("#status").inner_text()
    assert not np.array_equal(results[0][0], results[1][0])
    assert server.proc.poll() is None
    for page in pages:
        page.context.close()
