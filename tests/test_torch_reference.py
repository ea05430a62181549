"""Tests of the PyTorch oracle itself (tests/torch_reference.py) against the check values of
docs/DESIGN.md and the official key lists in tests/data/."""

import ast
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as R  # noqa: E402

# The official XL state-dict key lists (DESIGN §1), shipped with the tests.
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

XL_C2I = dict(num_attention_heads=16, attention_head_dim=72, in_channels=3, out_channels=3,
              depth=28, num_classes=1000, patch_size=4, attention_bias=True)
XL_T2I = dict(XL_C2I, num_classes=0, cross_attention_dim=2048)

SMALL_C2I = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                 depth=2, num_classes=10, patch_size=2, attention_bias=True)
SMALL_T2I = dict(SMALL_C2I, num_classes=0, cross_attention_dim=12)


def _read_tsv(name):
    path = os.path.join(DATA_DIR, name)
    header_params, rows = None, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("#"):
                if "PixelFlowModel params:" in line:
                    header_params = ast.literal_eval(line.split("params:", 1)[1].strip())
                continue
            if line.startswith("TOTAL"):
                continue
            key, shape, numel = line.split("\t")
            shape = tuple(int(v) for v in shape.strip("[]").split(","))
            assert int(numel) == math.prod(shape)
            rows.append((key, shape))
    return header_params, rows


# DESIGN §1: 491 tensors and 676,611,120 parameters (class-to-image); the text-to-image
# model adds norm2 and attn2 (11 tensors) to each of the 28 blocks and has no class table:
# 491 + 308 - 1 = 798 tensors, 882,122,160 parameters.
@pytest.mark.parametrize("tsv,params,tensors,total",
                         [("pixelflow_xl_c2i_keys.tsv", XL_C2I, 491, 676_611_120),
                          ("pixelflow_xl_t2i_keys.tsv", XL_T2I, 798, 882_122_160)])
def test_state_dict_keys_match_tsv(tsv, params, tensors, total):
    header_params, rows = _read_tsv(tsv)
    assert header_params == params
    assert len(rows) == tensors and sum(math.prod(s) for _, s in rows) == total
    got = list(R.state_dict_keys(params).items())
    assert got == rows          # names, order and shapes


def test_state_dict_keys_no_bias_no_classes():
    p = dict(SMALL_C2I, attention_bias=False, num_classes=0)
    keys = R.state_dict_keys(p)
    assert not any("class_embedder" in k for k in keys)
    assert not any(".attn1." in k and k.endswith(".bias") for k in keys)
    assert "transformer_blocks.0.mlp.fc1.bias" in keys      # non-attention biases stay


def test_random_state_dict_deterministic_and_scaled():
    a = R.random_state_dict(SMALL_T2I, seed=3)
    b = R.random_state_dict(SMALL_T2I, seed=3)
    c = R.random_state_dict(SMALL_T2I, seed=4)
    f32 = R.random_state_dict(SMALL_T2I, seed=3, dtype=torch.float32)
    assert list(a) == list(R.state_dict_keys(SMALL_T2I))
    for k in a:
        assert a[k].dtype == torch.float64 and f32[k].dtype == torch.float32
        assert tuple(a[k].shape) == R.state_dict_keys(SMALL_T2I)[k]
        assert torch.equal(a[k], b[k])
        assert torch.equal(a[k].float(), f32[k])
    assert not torch.equal(a["proj_out_2.weight"], c["proj_out_2.weight"])
    # normal scale: the final projection and norm weights are not zero / not tiny
    assert a["proj_out_2.weight"].abs().mean() > 0.05
    assert (a["transformer_blocks.0.norm3.weight"] - 1).abs().max() > 0.05


# ----------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------

def test_stage_schedule_check_values():
    st = R.stage_schedule()
    assert len(st) == 4
    np.testing.assert_allclose([s["start_t"] for s in st], [0, 1 / 7, 1 / 3, 0.6], atol=1e-12)
    np.testing.assert_allclose([s["original_start_t"] for s in st], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose([s["end_t"] for s in st], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose([(s["T_first"], s["T_last"]) for s in st],
                               [(0, 174.825), (175, 425.749), (426, 718.707), (719, 999)],
                               atol=1e-9)
    np.testing.assert_allclose([s["alpha"] for s in st[1:]], [0.5714, 0.6667, 0.8], atol=5e-5)
    np.testing.assert_allclose([s["beta"] for s in st[1:]], [0.7423, 0.5774, 0.3464], atol=5e-5)
    np.testing.assert_allclose([s["weight"] for s in st], [0, 1 / 6, 2 / 3, 1])


def test_inference_timesteps_check_values():
    st = R.stage_schedule()
    T, t = R.inference_timesteps(st[0], 10, 1.0)
    assert T.dtype == np.float64 and t.dtype == np.float64
    assert T.shape == (10,) and t.shape == (11,)
    np.testing.assert_allclose(T, np.arange(10) * 19.425, atol=1e-9)
    np.testing.assert_allclose(t, list(np.arange(10) * 0.111) + [1.0], atol=1e-12)

    T, t = R.inference_timesteps(st[2], 7, 3.0)
    np.testing.assert_allclose(
        T, [426, 444.2919, 467.8033, 499.1402, 542.9892, 608.7135, 718.1228], atol=1e-4)
    assert t[0] == 0 and t[-1] == 1.0 and np.all(np.diff(t) > 0)


# ----------------------------------------------------------------------------------------
# network pieces
# ----------------------------------------------------------------------------------------

def test_sinusoid_cosines_first():
    e = R.sinusoid(torch.tensor([0.0, 5.0]), torch.float64)
    assert e.shape == (2, 256)
    assert torch.equal(e[0, :128], torch.ones(128, dtype=torch.float64))
    assert torch.equal(e[0, 128:], torch.zeros(128, dtype=torch.float64))
    # k = 0 frequency is 1, k = 127 frequency is 1e-4
    assert abs(e[1, 0].item() - math.cos(5.0)) < 1e-12
    assert abs(e[1, 128].item() - math.sin(5.0)) < 1e-12
    assert abs(e[1, 255].item() - math.sin(5e-4)) < 1e-9


def test_rope_relative_and_axes():
    D, n = 8, 4
    cos, sin = R.rope_tables(n, D, torch.float64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(D, generator=g, dtype=torch.float64)
    k = torch.randn(D, generator=g, dtype=torch.float64)

    def rot(v, y, x):
        j = y * n + x
        return R.apply_rope(v[None, None, None, :], cos[j], sin[j])[0, 0, 0]

    # the score depends only on the relative offset
    s1 = rot(q, 1, 2) @ rot(k, 0, 1)
    s2 = rot(q, 3, 3) @ rot(k, 2, 2)
    assert abs(s1 - s2) < 1e-12
    # rotation preserves the norm
    assert abs(rot(q, 3, 1).norm() - q.norm()) < 1e-12
    # first D/2 channels move with x only, last D/2 with y only
    assert torch.allclose(rot(q, 0, 2)[D // 2:], q[D // 2:])
    assert torch.allclose(rot(q, 2, 0)[:D // 2], q[:D // 2])
    # pair (0, 1) at x = 1 rotates by angle 1 (w_0 = 1)
    r = rot(q, 0, 1)
    assert abs(r[0] - (q[0] * math.cos(1) - q[1] * math.sin(1))) < 1e-12
    assert abs(r[1] - (q[1] * math.cos(1) + q[0] * math.sin(1))) < 1e-12


def _inputs(params, B=2, H=16, seed=1, L=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, params["in_channels"], H, H, generator=g, dtype=torch.float64)
    T = torch.tensor([37.5, 812.0][:B], dtype=torch.float64)
    kw = {}
    if params.get("num_classes", 0):
        kw["class_labels"] = torch.tensor([3, params["num_classes"]][:B])
    if params.get("cross_attention_dim") is not None:
        kw["context"] = torch.randn(B, L, params["cross_attention_dim"], generator=g,
                                    dtype=torch.float64)
        mask = torch.ones(B, L)
        mask[0, 3:] = 0
        mask[1, 1] = 0
        kw["context_mask"] = mask
    return x, T, kw


@pytest.mark.parametrize("params", [SMALL_C2I, SMALL_T2I])
def test_forward_shape_and_finite(params):
    sd = R.random_state_dict(params, seed=0)
    x, T, kw = _inputs(params)
    out = R.forward(sd, params, x, T, **kw)
    assert out.shape == (2, params["out_channels"], 16, 16)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert out.std() > 0.05          # non-trivial output from normal-scale weights
    # float32 weights give a float32 result close to the float64 one
    sd32 = R.random_state_dict(params, seed=0, dtype=torch.float32)
    out32 = R.forward(sd32, params, x.float(), T, **kw)
    assert out32.dtype == torch.float32
    assert (out32.double() - out).abs().max() < 1e-4 * out.abs().max()


def test_forward_out_channels_differ():
    params = dict(SMALL_C2I, out_channels=5)
    sd = R.random_state_dict(params)
    x, T, kw = _inputs(params)
    assert R.forward(sd, params, x, T, **kw).shape == (2, 5, 16, 16)


@pytest.mark.parametrize("params", [SMALL_C2I, SMALL_T2I])
def test_zero_proj_out_2_gives_zero(params):
    sd = R.random_state_dict(params, seed=0)
    sd["proj_out_2.weight"].zero_()
    sd["proj_out_2.bias"].zero_()
    x, T, kw = _inputs(params)
    out = R.forward(sd, params, x, T, **kw)
    assert torch.equal(out, torch.zeros_like(out))


def test_unpatchify_feature_order():
    """proj_out_2 features per token are ordered (py, px, c)."""
    params = SMALL_C2I
    p, C = params["patch_size"], params["out_channels"]
    sd = R.random_state_dict(params, seed=0)
    sd["proj_out_2.weight"].zero_()
    sd["proj_out_2.bias"].copy_(torch.arange(p * p * C, dtype=torch.float64))
    x, T, kw = _inputs(params)
    out = R.forward(sd, params, x, T, **kw)
    for c in range(C):
        for yy in range(16):
            for xx in range(16):
                expect = (yy % p) * p * C + (xx % p) * C + c
                assert out[1, c, yy, xx].item() == expect


def _swap_patches(img, p, a, b):
    """Swap the p x p patches at token coordinates a = (y, x) and b."""
    img = img.clone()
    (ya, xa), (yb, xb) = a, b
    pa = img[..., ya * p:(ya + 1) * p, xa * p:(xa + 1) * p].clone()
    pb = img[..., yb * p:(yb + 1) * p, xb * p:(xb + 1) * p].clone()
    img[..., ya * p:(ya + 1) * p, xa * p:(xa + 1) * p] = pb
    img[..., yb * p:(yb + 1) * p, xb * p:(xb + 1) * p] = pa
    return img


@pytest.mark.parametrize("params", [SMALL_C2I, SMALL_T2I])
def test_rope_makes_output_position_dependent(params, monkeypatch):
    sd = R.random_state_dict(params, seed=0)
    x, T, kw = _inputs(params)
    p = params["patch_size"]
    a, b = (0, 1), (5, 3)
    out = R.forward(sd, params, x, T, **kw)
    out_sw = R.forward(sd, params, _swap_patches(x, p, a, b), T, **kw)
    diff = (out_sw - _swap_patches(out, p, a, b)).abs().max()
    assert diff > 1e-3 * out.abs().max()

    # control: without RoPE the network is token-permutation equivariant
    monkeypatch.setattr(R, "apply_rope", lambda t, cos, sin: t)
    out = R.forward(sd, params, x, T, **kw)
    out_sw = R.forward(sd, params, _swap_patches(x, p, a, b), T, **kw)
    assert (out_sw - _swap_patches(out, p, a, b)).abs().max() < 1e-12


def test_masked_context_has_no_influence():
    params = SMALL_T2I
    sd = R.random_state_dict(params, seed=0)
    x, T, kw = _inputs(params)
    out = R.forward(sd, params, x, T, **kw)
    ctx = kw["context"].clone()
    masked = kw["context_mask"] == 0
    ctx[masked] = 100.0 * torch.randn(int(masked.sum()), ctx.shape[-1], dtype=torch.float64)
    out2 = R.forward(sd, params, x, T, **dict(kw, context=ctx))
    assert (out2 - out).abs().max() < 1e-12
    # but unmasked tokens do matter, and so does the mask itself
    ctx3 = kw["context"].clone()
    ctx3[0, 0] += 1.0
    out3 = R.forward(sd, params, x, T, **dict(kw, context=ctx3))
    assert (out3 - out)[0].abs().max() > 1e-6
    out4 = R.forward(sd, params, x, T, **dict(kw, context_mask=torch.ones_like(kw["context_mask"])))
    assert (out4 - out).abs().max() > 1e-6


def test_conditioning_matters():
    params = SMALL_C2I
    sd = R.random_state_dict(params, seed=0)
    x, T, kw = _inputs(params)
    out = R.forward(sd, params, x, T, **kw)
    assert (R.forward(sd, params, x, T + 1.0, **kw) - out).abs().max() > 1e-6
    lab = kw["class_labels"].clone()
    lab[0] = 4
    assert (R.forward(sd, params, x, T, class_labels=lab) - out)[0].abs().max() > 1e-6


# ----------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------

def _cascade_noise(B, C, h0, S=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(B, C, h0, h0, generator=g, dtype=torch.float64)
    noise = [torch.randn(B, C, h0 * 2 ** s, h0 * 2 ** s, generator=g, dtype=torch.float64)
             for s in range(1, S)]
    return init, noise


def test_euler_cascade_c2i():
    params = SMALL_C2I
    sd = R.random_state_dict(params, seed=0)
    init, noise = _cascade_noise(2, 3, 2)            # 2 px at stage 0 -> 16 px at stage 3
    labels = torch.tensor([1, 7])
    x = R.euler_cascade(sd, params, init, noise, guidance=4.0, steps=2, class_labels=labels)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    img = R.to_image(x)
    assert img.min() >= 0 and img.max() <= 1

    # guidance 1 means g_s = 1 at every stage: same as the conditional-only path
    x1 = R.euler_cascade(sd, params, init, noise, guidance=1.0, steps=[2, 2, 2, 2],
                         class_labels=labels)
    x0 = R.euler_cascade(sd, params, init, noise, guidance=0.0, steps=2, class_labels=labels)
    assert (x1 - x0).abs().max() < 1e-10
    assert (x - x0).abs().max() > 1e-6


def test_euler_cascade_t2i():
    params = SMALL_T2I
    sd = R.random_state_dict(params, seed=0)
    init, noise = _cascade_noise(2, 3, 2)
    _, _, kw = _inputs(params)
    null_ctx = torch.zeros(1, 5, params["cross_attention_dim"], dtype=torch.float64)
    null_mask = torch.tensor([[1, 0, 0, 0, 0]])
    x = R.euler_cascade(sd, params, init, noise, guidance=3.0, steps=2, shift=2.0,
                        null_context=null_ctx, null_context_mask=null_mask, **kw)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    x1 = R.euler_cascade(sd, params, init, noise, guidance=1.0, steps=2, shift=2.0, **kw)
    assert torch.isfinite(x1).all() and (x - x1).abs().max() > 1e-6


def test_euler_cascade_single_step_by_hand():
    """One Euler step per stage, guidance off: replay the cascade by hand."""
    params = SMALL_C2I
    sd = R.random_state_dict(params, seed=2)
    init, noise = _cascade_noise(1, 3, 2)
    labels = torch.tensor([5])
    got = R.euler_cascade(sd, params, init, noise, guidance=0.0, steps=1, class_labels=labels)
    x = init
    for s, st in enumerate(R.stage_schedule()):
        if s:
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            x = st["alpha"] * x + st["beta"] * noise[s - 1]
        # N = 1: t = [0, 1], T = [T_first]
        x = x + 1.0 * R.forward(sd, params, x, torch.tensor([st["T_first"]]), class_labels=labels)
    assert (got - x).abs().max() < 1e-12
