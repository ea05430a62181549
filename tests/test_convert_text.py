"""convert_torch.py --text-encoder: one self-contained text-to-image folder (DESIGN §7)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import convert_torch
import sample
from conftest import TINY_C2I, TINY_T2I
from test_convert import official_folder
from test_hf_weights import full_t5
from test_tokenizer import make_tokenizer_folder
from pixelflow_jax.prompts import TEXT_ENCODER_FOLDER
from pixelflow_jax.text_encoder import TextEncoder
from pixelflow_jax.torch_format import read_state_dict

PROMPTS = ["a photo of a cat", "", "un café 🐱"]


def convert(*args):
    return convert_torch.main([str(a) for a in args])


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A whole seq2seq T5 as downloaded (decoder, lm_head), in sharded safetensors."""
    root = str(tmp_path_factory.mktemp("t5"))
    folder = os.path.join(root, "flan")
    shutil.copytree(make_tokenizer_folder(root), folder)
    model = full_t5()
    model.save_pretrained(folder, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    return folder, model


def test_text_encoder_goes_into_the_checkpoint(t5_folder, tmp_path, capsys):
    folder, model = t5_folder
    official_folder(tmp_path / "official", dict(TINY_T2I, cross_attention_dim=32))
    dst = tmp_path / "out"
    assert convert(tmp_path / "official", dst, "--text-encoder", folder) == 0, \
        capsys.readouterr().err
    enc_dir = dst / TEXT_ENCODER_FOLDER
    files = set(os.listdir(enc_dir))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors"} <= files
    assert not [f for f in files if "index" in f or f.startswith("model-")]

    # Only the encoder's tensors, bit-equal to the model's, the decoder dropped.
    stored = read_state_dict(enc_dir / "model.safetensors")
    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("decoder.") for k in hf) and "lm_head.weight" in hf
    want = sorted(k for k in hf if k.startswith("encoder.")
                  and k != "encoder.embed_tokens.weight") + ["shared.weight"]
    assert sorted(stored) == sorted(want)
    for name, t in stored.items():
        np.testing.assert_array_equal(t.read(), hf[name])

    got = TextEncoder.from_folder(enc_dir).encode(PROMPTS)
    original = TextEncoder.from_folder(folder).encode(PROMPTS)
    for a, b in zip(got, original):
        np.testing.assert_array_equal(a, b)
    assert np.abs(got[0]).max() > 0

    # sample.py finds DST/text_encoder by itself.
    assert sample.main(["--ckpt", str(dst), "--prompt", "a b", "--steps", "1", "--quiet",
                        "--out", str(tmp_path / "grid.png")]) == 0, capsys.readouterr().err
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("params, extra, message", [
    (dict(TINY_T2I, cross_attention_dim=16), [], "its d_model is 32 but the checkpoint's "
                                                 "cross_attention_dim is 16"),
    (TINY_C2I, [], "class-conditional"),
    (dict(TINY_T2I, cross_attention_dim=32), ["--to-torch"], "does not apply to --to-torch"),
])
def test_bad_text_encoder_is_refused_and_nothing_written(t5_folder, tmp_path, capsys, params,
                                                         extra, message):
    official_folder(tmp_path / "official", params)
    dst = tmp_path / "out"
    assert convert(tmp_path / "official", dst, "--text-encoder", t5_folder[0], *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["official"]


def test_an_encoder_with_a_missing_tensor_is_named(t5_folder, tmp_path, capsys):
    """The folder is checked by hf_weights before anything is written."""
    folder = tmp_path / "t5"
    os.makedirs(folder)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(t5_folder[0], f), folder / f)
    sd = {k: v for k, v in t5_folder[1].state_dict().items()
          if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    from safetensors.torch import save_file
    save_file({k: v.clone() for k, v in sd.items()}, str(folder / "model.safetensors"))
    official_folder(tmp_path / "official", dict(TINY_T2I, cross_attention_dim=32))
    assert convert(tmp_path / "official", tmp_path / "out", "--text-encoder", folder) == 2
    assert "missing encoder.block.1.layer.1.DenseReluDense.wo.weight" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["official", "t5"]
