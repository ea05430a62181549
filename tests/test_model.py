"""The NNX model against the independent float64 PyTorch oracle (DESIGN §2, §5)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_reference as ref
from conftest import ROOT, TINY_C2I, jit_call, make_pair, rel_err
from pixelflow_jax.checkpoint import model_from_tree, param_tree
from pixelflow_jax.config import ModelParams
from pixelflow_jax.convert import nnx_to_official, official_layout, official_to_nnx
from pixelflow_jax.model import abstract_model, count_params, init_model


def run_both(pair, x, T, dtype=jnp.float32, **inputs):
    """(JAX output, oracle output), both NCHW float64."""
    want = ref.forward(pair.sd, pair.params, torch.tensor(x), torch.tensor(T),
                       **{k: torch.tensor(v) for k, v in inputs.items()}).numpy()
    model = pair.model(dtype=dtype)
    got = jit_call(model, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                   jnp.asarray(T, jnp.float32), **{k: jnp.asarray(v) for k, v in inputs.items()})
    return np.asarray(got, np.float64).transpose(0, 3, 1, 2), want


@pytest.mark.parametrize("side", [4, 8, 16, 32])  # the four stages of a 32 px cascade
def test_class_model_matches_oracle(c2i, side):
    rng = np.random.default_rng(side)
    x = rng.standard_normal((4, 3, side, side))
    T = np.array([0.0, 174.825, 612.3, 999.0])
    labels = np.array([0, 10, 3, 9])  # 10 = the null label
    got, want = run_both(c2i, x, T, class_labels=labels)
    assert rel_err(got, want) <= 1e-5


def test_text_model_matches_oracle(t2i):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 16, 16))
    context = rng.standard_normal((3, 7, 12))
    mask = np.ones((3, 7))
    mask[0, 4:] = 0
    mask[1, 1:] = 0  # a single visible token
    got, want = run_both(t2i, x, np.array([3.0, 400.0, 998.0]), context=context,
                         context_mask=mask)
    assert rel_err(got, want) <= 1e-5
    got, want = run_both(t2i, x, np.array([3.0, 400.0, 998.0]), context=context)  # no mask
    assert rel_err(got, want) <= 1e-5


def test_bfloat16_compute_stays_close(c2i):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 16, 16))
    got, want = run_both(c2i, x, np.array([10.0, 700.0]), dtype=jnp.bfloat16,
                         class_labels=np.array([1, 2]))
    assert rel_err(got, want) <= 2e-2
    model = c2i.model(dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(param_tree(model)))


def test_patch_orders(c2i):
    """Input patch features are (c, py, px); output features are (py, px, c)."""
    p = ModelParams(**TINY_C2I)
    sd = {k: v.numpy().copy() for k, v in c2i.sd.items()}
    sd["proj_out_2.weight"][:] = 0
    sd["proj_out_2.bias"][:] = np.arange(12)  # p*p*C = 2*2*3
    model = model_from_tree(official_to_nnx(sd, p), c2i.config)
    out = np.asarray(jit_call(model, jnp.zeros((1, 4, 4, 3)), jnp.zeros(1),
                              jnp.zeros(1, jnp.int32)))
    for py in range(2):
        for px in range(2):
            for c in range(3):
                assert out[0, 2 + py, 2 + px, c] == (py * 2 + px) * 3 + c
    # Patch input: one nonzero conv weight at [e, c, py, px] reads pixel (py, px) of channel c.
    w = np.zeros((16, 3, 2, 2), np.float32)
    w[5, 2, 1, 0] = 1.0
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = w, np.zeros(16, np.float32)
    model = model_from_tree(official_to_nnx(sd, p), c2i.config)
    img = np.zeros((1, 4, 4, 3), np.float32)
    img[0, 2 + 1, 0 + 0, 2] = 7.0  # patch (1, 0), pixel (py=1, px=0), channel 2
    tokens = np.asarray(model.patch_embed(jnp.asarray(img)))
    assert tokens[0, 2, 5] == 7.0 and np.count_nonzero(tokens) == 1  # token 2 = (y=1, x=0)


# TINY_C2I's NNX parameters, written out by hand: E = 2 x 8 = 16, patch 2, 3 channels, 10
# classes (+ the null row), depth 2 stacked on a leading axis; linear kernels are [in, out],
# the patch conv kernel [p, p, C, E] (DESIGN §1, §2).
TINY_C2I_NNX = {
    "patch_embed.proj.kernel": (2, 2, 3, 16), "patch_embed.proj.bias": (16,),
    "timestep_embedder.linear_1.kernel": (256, 16), "timestep_embedder.linear_1.bias": (16,),
    "timestep_embedder.linear_2.kernel": (16, 16), "timestep_embedder.linear_2.bias": (16,),
    "latent_size_embedder.linear_1.kernel": (256, 16),
    "latent_size_embedder.linear_1.bias": (16,),
    "latent_size_embedder.linear_2.kernel": (16, 16),
    "latent_size_embedder.linear_2.bias": (16,),
    "class_embedder.embedding_table.embedding": (11, 16),
    "transformer_blocks.norm1.linear.kernel": (2, 16, 96),
    "transformer_blocks.norm1.linear.bias": (2, 96),
    "transformer_blocks.attn1.q_proj.kernel": (2, 16, 16),
    "transformer_blocks.attn1.q_proj.bias": (2, 16),
    "transformer_blocks.attn1.k_proj.kernel": (2, 16, 16),
    "transformer_blocks.attn1.k_proj.bias": (2, 16),
    "transformer_blocks.attn1.v_proj.kernel": (2, 16, 16),
    "transformer_blocks.attn1.v_proj.bias": (2, 16),
    "transformer_blocks.attn1.o_proj.kernel": (2, 16, 16),
    "transformer_blocks.attn1.o_proj.bias": (2, 16),
    "transformer_blocks.attn1.q_norm.weight": (2, 16),
    "transformer_blocks.attn1.k_norm.weight": (2, 16),
    "transformer_blocks.norm3.weight": (2, 16),
    "transformer_blocks.mlp.fc1.kernel": (2, 16, 64), "transformer_blocks.mlp.fc1.bias": (2, 64),
    "transformer_blocks.mlp.fc2.kernel": (2, 64, 16), "transformer_blocks.mlp.fc2.bias": (2, 16),
    "proj_out_1.kernel": (16, 32), "proj_out_1.bias": (32,),
    "proj_out_2.kernel": (16, 12), "proj_out_2.bias": (12,),
}
# By hand: patch 192 + 16; two embedders 2 x (4096 + 16 + 256 + 16); class table 11 x 16;
# per block 1632 (norm1) + 4 x 272 (attn1) + 32 (q/k norms) + 16 (norm3) + 1088 + 1040 (mlp);
# proj_out_1 544, proj_out_2 204: 208 + 8768 + 176 + 2 x 4896 + 544 + 204.
TINY_C2I_COUNT = 19_692


def test_parameter_names_mirror_official():
    p = ModelParams(**TINY_C2I)
    model = init_model(p)
    flat = {".".join(map(str, k)): v.get_value().shape
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert flat == TINY_C2I_NNX
    assert count_params(model) == TINY_C2I_COUNT
    # The official initialisation: zero adaLN and output layers, so the output is 0.
    out = jit_call(model, jnp.ones((1, 8, 8, 3)), jnp.ones(1), jnp.zeros(1, jnp.int32))
    assert np.all(np.asarray(out) == 0)
    # Back to official names: the oracle's list (written from DESIGN §1, checked against the
    # official XL key files in tests/test_torch_reference.py), names, order and shapes.
    back = nnx_to_official(param_tree(model), p)
    assert [(k, tuple(v.shape)) for k, v in back.items()] == \
        list(ref.state_dict_keys(TINY_C2I).items())


def test_xl_layout_matches_reference_files():
    for name, extra in [("c2i", {}), ("t2i", {"num_classes": 0, "cross_attention_dim": 2048})]:
        params = dict(num_attention_heads=16, attention_head_dim=72, in_channels=3,
                      out_channels=3, depth=28, num_classes=1000, patch_size=4,
                      attention_bias=True) | extra
        path = os.path.join(ROOT, "tests", "data", f"pixelflow_xl_{name}_keys.tsv")
        rows = [line.split("\t") for line in open(path) if not line.startswith("#")]
        want = {r[0]: tuple(int(v) for v in r[1].strip("[]").split(", ")) for r in rows
                if r[0] != "TOTAL"}
        assert official_layout(ModelParams(**params)) == want
        model = abstract_model(ModelParams(**params))
        total = int([r for r in rows if r[0] == "TOTAL"][0][1])
        assert count_params(model) == total  # 676,611,120 and 882,122,160


def test_input_errors(c2i, t2i):
    m = c2i.model()
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="needs class_labels"):
        m(x, jnp.zeros(1))
    with pytest.raises(ValueError, match="multiple of 2"):
        m(jnp.zeros((1, 7, 7, 3)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="needs context"):
        t2i.model()(x, jnp.zeros(1))


def test_attention_bias_false_variant():
    pair = make_pair(dict(TINY_C2I, attention_bias=False, num_attention_heads=1,
                          attention_head_dim=12), seed=5)
    rng = np.random.default_rng(2)
    got, want = run_both(pair, rng.standard_normal((2, 3, 8, 8)), np.array([1.0, 900.0]),
                         class_labels=np.array([4, 10]))
    assert rel_err(got, want) <= 1e-5
