"""The Flax T5 encoder and the TextEncoder facade against transformers' PyTorch T5 and the
official 512-token padding (DESIGN §7)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from conftest import ROOT, TINY_T2I, make_pair, rel_err
from test_hf_weights import hf_config, oracle, position_rel_err, randomized, sample_inputs
from test_tokenizer import make_tokenizer_folder
from pixelflow_jax.errors import UserError
from pixelflow_jax.hf_weights import load_t5_encoder
from pixelflow_jax.model import count_params
from pixelflow_jax.t5 import T5Config, abstract_encoder, relative_position_buckets
from pixelflow_jax.text_encoder import TextEncoder, bucket_length

# google/flan-t5-xl's config.json (encoder fields and a few others it carries).
FLAN_T5_XL = {"d_ff": 5120, "d_kv": 64, "d_model": 2048, "feed_forward_proj": "gated-gelu",
              "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24,
              "num_heads": 32, "num_layers": 24, "relative_attention_max_distance": 128,
              "relative_attention_num_buckets": 32, "vocab_size": 32128,
              "tie_word_embeddings": False}


@pytest.mark.parametrize("length,buckets,distance", [(600, 32, 128), (40, 16, 16), (70, 8, 20)])
def test_relative_position_buckets_match_transformers(length, buckets, distance):
    pos = torch.arange(length)
    want = HFT5Attention._relative_position_bucket(pos[None, :] - pos[:, None], True,
                                                   buckets, distance)
    got = relative_position_buckets(length, buckets, distance)
    np.testing.assert_array_equal(got, want.numpy())
    assert got.max() == buckets - 1  # the far buckets are reached


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(feed_forward_proj, tmp_path):
    """Every position (masked ones included) within 1e-5 of T5EncoderModel, float32."""
    model = randomized(transformers.T5EncoderModel(hf_config(feed_forward_proj=feed_forward_proj)))
    model.save_pretrained(tmp_path)
    ids, mask = sample_inputs()
    want = oracle(model, ids, mask)
    graphdef, state = nnx.split(load_t5_encoder(tmp_path))
    run = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    got = run(state, ids, mask)
    assert position_rel_err(got, want) <= 1e-5
    # The mask matters here: without it the padded rows change.
    unmasked = run(state, ids, np.ones_like(mask))
    assert position_rel_err(unmasked[1:], want[1:]) > 1e-2


def test_flan_t5_xl_size_and_dtypes():
    config = T5Config.from_dict(FLAN_T5_XL)
    assert (config.is_gated, config.activation) == (True, "gelu_new")
    enc = abstract_encoder(config)  # nothing allocated
    assert count_params(enc) == 1_223_527_424  # DESIGN §7
    assert enc.block.SelfAttention.q.kernel.shape == (24, 2048, 2048)
    assert enc.block.DenseReluDense.wi_0.kernel.shape == (24, 2048, 5120)
    assert abstract_encoder(config, dtype=jnp.bfloat16).shared.embedding.dtype == jnp.bfloat16
    for bad in (jnp.float16, "float16", jnp.int32):
        with pytest.raises(UserError):
            abstract_encoder(config, dtype=bad)


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 64, 65, 300, 512)] == \
        [16, 16, 32, 64, 128, 512, 512]
    assert [bucket_length(n, 77) for n in (16, 17, 64, 65, 77)] == [16, 32, 64, 77, 77]


# ----------------------------------------------------------------------------- TextEncoder

PROMPTS = ["a photo of a cat", "",
           "an oil painting of a dragon over the castle at night, watercolor garden, "
           "snow in winter, ocean wave under the cloud"]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A Hugging Face T5 folder: tiny random encoder + tokenizer (tokenizer.json)."""
    root = str(tmp_path_factory.mktemp("t5"))
    folder = make_tokenizer_folder(root)
    model = randomized(transformers.T5EncoderModel(hf_config()))
    model.save_pretrained(folder)
    return folder, model


def official_features(folder, model, prompts):
    """The official pipeline: AutoTokenizer at 512 with padding, T5 in float32, with mask."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)(
        prompts, padding="max_length", max_length=512, truncation=True, return_tensors="np")
    mask = tok["attention_mask"]
    return oracle(model, tok["input_ids"], mask), mask


def test_bucketed_features_equal_the_512_padded_ones(text_folder):
    folder, model = text_folder
    features, mask = TextEncoder.from_folder(folder).encode(PROMPTS)
    want, want_mask = official_features(folder, model, PROMPTS)
    n = want_mask.sum(axis=1)
    assert n.max() > 32 and features.shape == (3, 64, 32)  # the bucket above the longest
    np.testing.assert_array_equal(mask, want_mask[:, :64])
    assert not want_mask[:, 64:].any()
    for i in range(3):
        assert position_rel_err(features[i, :n[i]], want[i, :n[i]]) <= 1e-5
    assert not features[mask == 0].any()
    assert np.abs(want[want_mask == 0]).min() > 0  # T5 itself writes non-zero pads

    # PixelFlow's cross-attention masks the pads (bias (1 - m) * -10000): same velocity.
    pixelflow = make_pair(dict(TINY_T2I, cross_attention_dim=32)).model()
    graphdef, state = nnx.split(pixelflow)

    @jax.jit  # one program for the three calls (compiling is most of this test's time)
    def velocities(state, x, t, official, official_mask, ours, our_mask):
        model = nnx.merge(graphdef, state)
        return (model(x, t, context=official, context_mask=official_mask),
                model(x, t, context=ours, context_mask=our_mask),
                model(x, t, context=official))

    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    t = jnp.array([100.0, 500.0, 900.0])
    official, ours, unmasked = velocities(state, x, t, want, want_mask, features, mask)
    assert rel_err(ours, official) <= 1e-6
    # Not vacuous: unmasked, the 512-padded features give another velocity.
    assert rel_err(unmasked, official) > 1e-3


def test_cache_and_compilations(text_folder):
    folder, _ = text_folder
    enc = TextEncoder.from_folder(folder)
    alone, _ = enc.encode(["a photo of a cat"])
    enc.encode(["a dog"])
    assert enc.encoded_rows == 2 and enc._forward._cache_size() == 1  # same (1 row, 16)
    batch, mask = enc.encode(["a photo of a cat", "", "a photo of a cat", "a dog"])
    assert enc.encoded_rows == 3  # only "" was new
    np.testing.assert_array_equal(batch[0], alone[0])
    np.testing.assert_array_equal(batch[2], alone[0])
    assert mask[1].tolist()[:2] == [1, 0]
    enc.encode(["", "a dog"])
    assert enc.encoded_rows == 3 and enc._forward._cache_size() == 1

    # A prompt's features do not depend on its batch or bucket (float rounding aside).
    fresh = TextEncoder.from_folder(folder)
    together, _ = fresh.encode([PROMPTS[2], "a photo of a cat"])
    assert together.shape[1] == 64
    assert position_rel_err(together[1, :mask[0].sum()], alone[0, :mask[0].sum()]) <= 1e-6
    # 3 new prompts -> one call of 4 rows (padded from 3).
    fresh.encode(["x", "y", "z"])
    assert fresh.encoded_rows == 5 and fresh._forward._cache_size() == 2


def test_no_torch_at_run_time(text_folder):
    """Loading and encoding import neither PyTorch nor transformers nor sentencepiece."""
    code = ("import sys; from pixelflow_jax.text_encoder import TextEncoder; "
            f"f, m = TextEncoder.from_folder({text_folder[0]!r}).encode(['a cat', '']); "
            "assert f.shape == (2, 16, 32), f.shape; "
            "print(sorted(k for k in ('torch', 'transformers', 'sentencepiece') "
            "if k in sys.modules))")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
