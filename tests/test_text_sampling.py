"""Text-to-image sampling end to end (DESIGN §7): prompts -> tiny T5 -> tiny PixelFlow cascade,
against the PyTorch oracle fed the official 512-padded T5 features; mask alignment across
prompts; and sample.py's prompt flags."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import sample
import torch_dopri5_reference as dref
import torch_reference as ref
from conftest import TINY_T2I, make_pair, nchw, rel_err
from test_t5 import official_features, text_folder  # noqa: F401 (a fixture)
from pixelflow_jax.checkpoint import save_checkpoint
from pixelflow_jax.errors import UserError
from pixelflow_jax.noise import draw_cascade_noise, draw_duplicate_blocks
from pixelflow_jax.prompts import (PromptBlocks, PromptConditioning, PromptCycle,
                                   read_prompts)
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule
from pixelflow_jax.solvers import Dopri5Config
from pixelflow_jax.text_encoder import TextEncoder

SCHEDULE = CascadeSchedule()
CAT = "a photo of a cat"
LONG = ("an oil painting of a dragon over the castle at night, watercolor garden, "
        "snow in winter, ocean wave under the cloud")  # 40-odd tokens: the 64 bucket
DOG = "a dog"
SEED = 7


@pytest.fixture(scope="module")
def pair():
    return make_pair(dict(TINY_T2I, cross_attention_dim=32), seed=3)  # the tiny T5's d_model


@pytest.fixture(scope="module")
def sampler(pair):
    return Sampler(pair.model(), SCHEDULE, 32, max_steps=2)


@pytest.fixture(scope="module")
def encoder(text_folder):  # noqa: F811
    return TextEncoder.from_folder(text_folder[0])


@pytest.mark.parametrize("guidance", [4.0, 1.5])
def test_text_cascade_matches_the_official_pipeline(  # noqa: F811 (text_folder)
        pair, sampler, encoder, text_folder, guidance):
    """Our path (bucketed features, constant guidance) against the oracle cascade fed
    transformers' T5 at the official 512-token padding, the same noise: <= 1e-4."""
    prompts = [CAT, LONG]
    kw = PromptConditioning(encoder, prompts, "", 32)(np.array([0, 1]))
    assert kw["context"].shape == (2, 64, 32) and kw["null_context"].shape == (1, 64, 32)
    indices = np.array([0, 1])
    got = sampler.generate(SEED, indices, guidance=guidance, steps=2, **kw)

    folder, t5 = text_folder
    ctx, mask = official_features(folder, t5, prompts)
    null, null_mask = official_features(folder, t5, [""])
    assert ctx.shape[1] == 512
    noise = draw_cascade_noise(SEED, jnp.asarray(indices), sampler.resolutions, 3,
                               SCHEDULE.gamma)
    t = lambda a: torch.tensor(np.asarray(a, np.float64))
    want = ref.euler_cascade(pair.sd, pair.params, nchw(noise.init),
                             [nchw(b) for b in noise.blocks], guidance=guidance, steps=2,
                             context=t(ctx), context_mask=t(mask), null_context=t(null),
                             null_context_mask=t(null_mask)).numpy()
    assert rel_err(nchw(got), want) <= 1e-4
    # Not vacuous: with the negative prompt's mask dropped the oracle moves.
    unmasked = ref.euler_cascade(pair.sd, pair.params, nchw(noise.init),
                                 [nchw(b) for b in noise.blocks], guidance=guidance, steps=2,
                                 context=t(ctx), context_mask=t(mask),
                                 null_context=t(null)).numpy()
    assert rel_err(unmasked, want) > 1e-3


def test_each_image_gets_its_own_prompts_features_and_mask(sampler, encoder):
    """3 prompts x 2 images in one batch equal each prompt drawn alone (same indices)."""
    prompts = [CAT, LONG, DOG]
    labels = PromptBlocks(3, 2)
    indices = np.arange(6)
    np.testing.assert_array_equal(labels[indices], [0, 0, 1, 1, 2, 2])
    together = np.asarray(sampler.generate(SEED, indices, guidance=4.0, steps=2,
                                           **PromptConditioning(encoder, prompts)(
                                               labels[indices])))
    before = encoder.encoded_rows
    compiled = sampler.num_compilations
    for k, prompt in enumerate(prompts):
        alone = sampler.generate(SEED, indices[2 * k:2 * k + 2], guidance=4.0, steps=2,
                                 **PromptConditioning(encoder, [prompt])(np.zeros(2, int)))
        assert rel_err(together[2 * k:2 * k + 2], alone) <= 1e-5, prompt
    assert encoder.encoded_rows == before  # every prompt was encoded once, then cached
    # CAT and DOG alone are in the 16 bucket, LONG in 64 (already compiled for batch 2).
    assert sampler.num_compilations - compiled <= 2
    # Not vacuous: the same noise under another prompt gives another image.
    other = np.asarray(sampler.generate(SEED, indices[:2], guidance=4.0, steps=2,
                                        **PromptConditioning(encoder, [DOG])(np.zeros(2, int))))
    assert rel_err(other, together[:2]) > 1e-2


# ------------------------------------------------------------------ masks as key/value lengths


def test_prefix_masks_reach_the_model_as_lengths(pair, sampler, encoder):
    """T5 masks become ``context_lengths`` on the host (DESIGN §7): the velocity equals
    the official dense bias's; a mask with holes keeps the bias, and still matches the
    oracle."""
    kw = PromptConditioning(encoder, [CAT, LONG], "", 32)(np.array([0, 1]))
    cond, uncond = sampler.conditioning(**kw)
    np.testing.assert_array_equal(cond["context_lengths"], kw["context_mask"].sum(1))
    np.testing.assert_array_equal(uncond["context_lengths"], [1, 1])  # "" is </s> alone
    assert "context_mask" not in cond and cond["context_lengths"].dtype == np.int32

    model = pair.model()
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    T = jnp.array([100.0, 700.0])
    f = jax.jit(lambda st, **k: nnx.merge(graphdef, st)(x, T, **k))
    by_lengths = f(state, context=kw["context"], context_lengths=cond["context_lengths"])
    by_bias = f(state, context=kw["context"], context_mask=kw["context_mask"])
    np.testing.assert_array_equal(np.asarray(by_lengths), np.asarray(by_bias))
    unmasked = f(state, context=kw["context"])
    assert rel_err(unmasked, by_bias) > 1e-3  # not vacuous: the padding would matter

    holes = kw["context_mask"].astype(np.float32).copy()
    holes[:, 1] = 0  # not a prefix mask: the dense bias, as the official model
    cond, _ = sampler.conditioning(**{**kw, "context_mask": holes})
    assert "context_lengths" not in cond
    np.testing.assert_array_equal(cond["context_mask"], holes)
    got = sampler.generate(SEED, np.array([0, 1]), guidance=4.0, steps=2,
                           **{**kw, "context_mask": holes})
    noise = draw_cascade_noise(SEED, jnp.arange(2), sampler.resolutions, 3, SCHEDULE.gamma)
    t = lambda a: torch.tensor(np.asarray(a, np.float64))
    want = ref.euler_cascade(pair.sd, pair.params, nchw(noise.init),
                             [nchw(b) for b in noise.blocks], guidance=4.0, steps=2,
                             context=t(kw["context"]), context_mask=t(holes),
                             null_context=t(kw["null_context"]),
                             null_context_mask=t(kw["null_context_mask"])).numpy()
    assert rel_err(nchw(got), want) <= 1e-4


# ------------------------------------------------------------------ Dopri5 for text


def test_text_dopri5_cascade_matches_torchdiffeq(pair, encoder, text_folder,  # noqa: F811
                                                 capsys):
    """A whole text-to-image Dopri5 cascade (bucketed features as lengths, guidance 4 at
    every stage, the official duplicated half, batch error control) against torchdiffeq
    driving the oracle network fed transformers' 512-padded T5 features.

    At rtol 1e-5 both solutions are converged, so the comparison does not hinge on the
    float32 step sequence (at the default 1e-3 the two pick different steps after stage 0
    and differ by ~2%, DESIGN §6): measured 5e-6, asserted <= 1e-4.
    """
    prompts, guidance, rtol, atol = [CAT, LONG], 4.0, 1e-5, 1e-8
    sampler = Sampler(pair.model(), SCHEDULE, 16, solver="dopri5",
                      dopri5=Dopri5Config(rtol=rtol, atol=atol))
    kw = PromptConditioning(encoder, prompts, "", 32)(np.array([0, 1]))
    noise = draw_cascade_noise(SEED, jnp.arange(2), sampler.resolutions, 3, SCHEDULE.gamma)
    dup = draw_duplicate_blocks(SEED, jnp.arange(2), sampler.resolutions, 3, SCHEDULE.gamma)
    out = sampler.sample_from_noise(noise, guidance=guidance, dup_blocks=dup, **kw)

    folder, t5 = text_folder
    ctx, mask = official_features(folder, t5, prompts)
    null, null_mask = official_features(folder, t5, [""])
    assert ctx.shape[1] == 512
    t = lambda a: torch.tensor(np.asarray(a, np.float64))
    velocity = dref.text_guided_velocity(pair.sd, pair.params, t(ctx), t(mask), t(null),
                                         t(null_mask))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 ops: one thread is faster, far more so on a busy CPU
    try:
        want, times = dref.dopri5_cascade_of(
            velocity, nchw(noise.init),
            [torch.cat([nchw(b), nchw(d)]) for b, d in zip(noise.blocks, dup)],
            guidance=guidance, labels=torch.arange(2), guidance_weights=[1.0] * 4,
            rtol=rtol, atol=atol)
    finally:
        torch.set_num_threads(threads)
    ours = np.asarray(out.stats.evaluations)[:, 0].tolist()
    theirs = [len(x) for x in times]
    err = rel_err(nchw(out.x), want.numpy())
    with capsys.disabled():
        print(f"\n  text dopri5 cascade (rtol {rtol}), evaluations per stage: ours {ours}, "
              f"torchdiffeq {theirs}; relative difference {err:.1e}")
    assert bool(np.all(np.asarray(out.stats.finished)))
    assert err <= 1e-4
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= max(12, 0.25 * b)
    # Not vacuous: the prompts swapped (same shapes, same program) give other images.
    swapped = sampler.sample_from_noise(noise, guidance=guidance, dup_blocks=dup,
                                        **PromptConditioning(encoder, prompts[::-1], "", 32)(
                                            np.array([0, 1])))
    assert rel_err(nchw(swapped.x), want.numpy()) > 1e-2
    assert sampler.num_compilations == 1


# ------------------------------------------------------------------ --text-dtype


def test_bfloat16_features_stay_near_float32(text_folder, encoder):  # noqa: F811
    """The bfloat16 encoder (parameters and matmuls; norms and softmax float32) against
    float32 on the tiny T5: each prompt's real tokens within 5% relative (measured
    0.3-1.6%; bfloat16 keeps 8 significant bits, 0.4% per rounding)."""
    prompts = [CAT, LONG, ""]
    bf16 = TextEncoder.from_folder(text_folder[0], dtype="bfloat16")
    assert bf16.encoder.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(nnx.state(bf16.encoder, nnx.Param))} == \
        {jnp.dtype(jnp.bfloat16)}
    got, got_mask = bf16.encode(prompts)
    want, want_mask = encoder.encode(prompts)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got_mask, want_mask)
    errs = [rel_err(got[i, want_mask[i] == 1], want[i, want_mask[i] == 1])
            for i in range(len(prompts))]
    print(f"bf16 vs float32 features: {errs}")
    assert max(errs) <= 5e-2
    assert min(errs) > 0  # really another precision


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa cat\r\n\n   \n  café au lait  \n🐱\n".encode("utf-8"))
    assert read_prompts(["x"], str(f)) == ["x", "a cat", "  café au lait  ", "🐱"]
    assert read_prompts(["", "y"], None) == ["", "y"]  # an explicit empty prompt is kept
    f.write_bytes(b"a cat\n\xe9t\xe9\n")
    with pytest.raises(UserError, match="line 2 is not UTF-8"):
        read_prompts(None, str(f))
    f.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(None, str(f))
    with pytest.raises(UserError, match="cannot read"):
        read_prompts(None, str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="no prompt given"):
        read_prompts([], None)
    np.testing.assert_array_equal(PromptCycle(7, 3)[np.arange(7)], [0, 1, 2, 0, 1, 2, 0])


# ------------------------------------------------------------------------------ sample.py


@pytest.fixture(scope="module")
def t2i_ckpt(tmp_path_factory, pair, text_folder):  # noqa: F811
    """(a text checkpoint without an encoder, the same with text_encoder/ inside)."""
    root = tmp_path_factory.mktemp("t2i")
    bare, full = str(root / "bare"), str(root / "full")
    save_checkpoint(bare, pair.tree, pair.config)
    save_checkpoint(full, pair.tree, pair.config)
    shutil.copytree(text_folder[0], os.path.join(full, "text_encoder"))
    return bare, full


def test_cli_writes_pngs_prompts_and_text_chunks(t2i_ckpt, text_folder, tmp_path,  # noqa: F811
                                                 capsys):
    bare, full = t2i_ckpt
    out = tmp_path / "dir"
    args = ["--ckpt", bare, "--text-encoder", text_folder[0], "--prompt", CAT, "--prompt",
            "un café 🐱", "--num-images", "2", "--steps", "1", "--batch-size", "4",
            "--seed", str(SEED), "--quiet"]
    assert sample.main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    names = [f"{i:06d}.png" for i in range(4)]
    assert sorted(os.listdir(out)) == names + ["prompts.jsonl", "run.json"]
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text("utf-8")
               .splitlines()]
    want = [CAT, CAT, "un café 🐱", "un café 🐱"]
    assert records == [{"index": i, "prompt": p, "file": n}
                       for i, (p, n) in enumerate(zip(want, names))]
    for name, prompt in zip(names, want):
        with Image.open(out / name) as img:
            assert img.text["prompt"] == prompt
    pixels = [np.asarray(Image.open(out / n)) for n in names]
    assert not np.array_equal(pixels[0], pixels[2])

    # A resume with other prompts is refused; the same command has nothing to draw.
    assert sample.main([*args[:5], "a dog", *args[6:], "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert sample.main([*args, "--out", str(out)]) == 0

    # The checkpoint's text_encoder/ folder, a prompts file and a grid (one row per prompt).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CAT}\n\nun café 🐱\n", encoding="utf-8")
    grid = tmp_path / "grid.png"
    assert sample.main(["--ckpt", full, "--prompts-file", str(prompts), *args[8:],
                        "--out", str(grid)]) == 0
    with Image.open(grid) as img:
        assert json.loads(img.text["prompts"]) == [CAT, "un café 🐱"]
        cells = np.asarray(img)
    assert cells.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    np.testing.assert_array_equal(cells[36:68, 36:68], pixels[3])  # prompt 2, image 2
    assert os.listdir(tmp_path).count("grid.png") == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]

    # FID-scale: image i has prompt i mod P; the same (seed, index, prompt) as above.
    fid = tmp_path / "fid"
    assert sample.main([*args, "--fid-samples", "4", "--out", str(fid)]) == 0
    records = [json.loads(line) for line in (fid / "prompts.jsonl").read_text("utf-8")
               .splitlines()]
    assert [r["prompt"] for r in records] == [CAT, "un café 🐱"] * 2
    arr = np.load(str(fid) + ".npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(arr[0], pixels[0])  # index 0, prompt 0 in both runs
    np.testing.assert_array_equal(arr[3], pixels[3])  # index 3, prompt 1 in both runs
    assert not np.array_equal(arr[1], pixels[1])      # index 1: prompt 1 here, 0 there


def test_text_dtype_reaches_the_encoder(t2i_ckpt, tmp_path, monkeypatch, capsys):
    """--text-dtype bfloat16 builds the encoder's parameters and matmuls in bfloat16 (the
    default float32), and run.json records it (other features, other images)."""
    made = []
    real = TextEncoder.from_folder.__func__

    def spy(cls, folder, **kwargs):
        made.append(real(cls, folder, **kwargs))
        return made[-1]

    monkeypatch.setattr(TextEncoder, "from_folder", classmethod(spy))
    _, full = t2i_ckpt
    args = ["--ckpt", full, "--prompt", CAT, "--num-images", "1", "--steps", "1",
            "--batch-size", "1", "--quiet"]
    for dtype, flag in [("bfloat16", ["--text-dtype", "bfloat16"]), ("float32", [])]:
        out = tmp_path / dtype
        assert sample.main([*args, *flag, "--out", str(out)]) == 0, capsys.readouterr().err
        enc = made[-1].encoder
        assert enc.dtype == jnp.dtype(dtype)
        assert {a.dtype for a in jax.tree.leaves(nnx.state(enc, nnx.Param))} == \
            {jnp.dtype(dtype)}
        assert json.loads((out / "run.json").read_text())["text_dtype"] == dtype
    assert len(made) == 2


@pytest.fixture
def bad_inputs(t2i_ckpt, ckpt_dir, tmp_path):
    bare, full = t2i_ckpt
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes(b"a cat\n\xe9t\xe9\n")
    return {"bare": bare, "full": full, "c2i": ckpt_dir, "tmp": str(tmp_path)}


BAD = [
    (["--ckpt", "{bare}", "--prompt", "a cat"], "has no text_encoder/ folder: give --text-encoder"),
    (["--ckpt", "{full}"], "text-to-image model: give --prompt TEXT or --prompts-file"),
    (["--ckpt", "{full}", "--classes", "1"], "not --classes"),
    (["--ckpt", "{c2i}", "--prompt", "a cat"], "class-conditional model: it takes --classes, "
                                               "not --prompt"),
    (["--ckpt", "{c2i}", "--negative-prompt", "ugly"], "not --negative-prompt"),
    (["--ckpt", "{c2i}", "--text-dtype", "bfloat16"], "not --text-dtype"),
    (["--ckpt", "{full}", "--prompt", "a", "--text-dtype", "float16"], "invalid choice"),
    (["--ckpt", "{full}", "--prompt", "a", "--classes", "1"], "give one of them"),
    (["--ckpt", "{full}", "--prompts-file", "{tmp}/blank.txt"], "holds no prompt"),
    (["--ckpt", "{full}", "--prompts-file", "{tmp}/latin1.txt"], "line 2 is not UTF-8"),
    (["--ckpt", "{full}", "--prompts-file", "{tmp}/none.txt"], "cannot read it"),
    (["--ckpt", "{full}", "--prompt", "a", "--text-encoder", "{tmp}/none"], "no such folder"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_line_and_exit_2(bad_inputs, capsys, extra, message):
    out = os.path.join(bad_inputs["tmp"], "x.png")
    code = sample.main([a.format(**bad_inputs) for a in extra] + ["--out", out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)
