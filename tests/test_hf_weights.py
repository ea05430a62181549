"""pixelflow_jax.hf_weights on Hugging Face T5 folders written here by transformers and
torch.save, in every layout a download comes in (DESIGN §7). The oracle is the PyTorch
T5 encoder holding the same weights."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pixelflow_jax.errors import CheckpointError, ConfigError, UserError
from pixelflow_jax.hf_weights import load_t5_encoder

# Tiny, but with sequences (40) beyond the max distance (16), so the log buckets and the
# clamp are used; vocab above the test tokenizer's 205 tokens.
TINY = dict(vocab_size=224, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
            num_decoder_layers=1, relative_attention_num_buckets=16,
            relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0)


def hf_config(**changes) -> transformers.T5Config:
    config = transformers.T5Config(**{**TINY, **changes})
    config._attn_implementation = "eager"  # the official pipeline's attention
    return config


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Normal-scale random weights: every layer, norm and the bias table does real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * z)
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(z)
            else:
                p.copy_(z / p.shape[1] ** 0.5)
    return model.eval()


def full_t5(seed: int = 0, **changes) -> transformers.T5ForConditionalGeneration:
    """A whole seq2seq T5 (decoder and lm_head too), as the flan-t5 downloads are."""
    return randomized(transformers.T5ForConditionalGeneration(
        hf_config(tie_word_embeddings=False, **changes)), seed)


def sample_inputs(seed: int = 0, n: int = 3, length: int = 40, vocab: int = 224):
    """Token ids with three masks: full, 25 tokens then pads, only the first token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (n, length))
    mask = np.ones((n, length), np.int64)
    mask[1, 25:] = 0
    mask[2, 1:] = 0
    return ids, mask


def oracle(encoder: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return encoder(input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def position_rel_err(got, want) -> float:
    """The worst relative error over positions (masked positions included)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float((np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)).max())


def write_bin(folder, state_dict: dict, shards: int | None) -> None:
    """``pytorch_model.bin``, or ``pytorch_model-0000k-of-0000n.bin`` + index, as HF wrote."""
    os.makedirs(folder, exist_ok=True)
    if shards is None:
        torch.save(state_dict, os.path.join(folder, "pytorch_model.bin"))
        return
    names = list(state_dict)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state_dict[n] for n in names[k::shards]}
        torch.save(part, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def write_folder(model, folder, layout: str) -> None:
    """The model saved as ``layout``: safetensors sharded or single, .bin sharded or single
    (the last with the token table only under ``encoder.embed_tokens.weight``)."""
    folder = str(folder)
    if layout == "safetensors_sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
    elif layout == "safetensors_single":
        model.save_pretrained(folder)
    else:
        sd = dict(model.state_dict())
        if layout == "bin_embed_tokens_only":
            del sd["shared.weight"]
        write_bin(folder, sd, shards=3 if layout == "bin_sharded" else None)
        model.config.to_json_file(os.path.join(folder, "config.json"))


def stored_names(folder) -> list[str]:
    from pixelflow_jax.hf_weights import weight_files
    from pixelflow_jax.torch_format import read_state_dict
    return [n for f in weight_files(folder) for n in read_state_dict(f)]


@pytest.fixture(scope="module")
def model():
    return full_t5()


@pytest.mark.parametrize("layout", ["safetensors_sharded", "safetensors_single", "bin_sharded",
                                    "bin_embed_tokens_only"])
def test_each_layout_loads_the_encoder(model, layout, tmp_path):
    write_folder(model, tmp_path, layout)
    names = stored_names(tmp_path)
    assert any(n.startswith("decoder.") for n in names)  # skipped, not refused
    if layout.endswith("sharded"):
        assert len([f for f in os.listdir(tmp_path) if "-of-" in f]) >= 3
    if layout.startswith("bin"):
        assert "lm_head.weight" in names and "encoder.embed_tokens.weight" in names
    assert ("shared.weight" in names) == (layout != "bin_embed_tokens_only")
    ids, mask = sample_inputs()
    got = load_t5_encoder(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    assert position_rel_err(got, oracle(model.get_encoder(), ids, mask)) <= 1e-5


def test_bfloat16_load(model, tmp_path):
    write_folder(model, tmp_path, "safetensors_single")
    enc = load_t5_encoder(tmp_path, dtype=jnp.bfloat16)
    table = np.asarray(enc.shared.embedding[...])
    assert table.dtype == jnp.bfloat16
    # Rounded as PyTorch rounds float32 to bfloat16 (to nearest even).
    want = model.shared.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(table.view(np.int16), want)
    assert enc.block.DenseReluDense.wo.kernel[...].dtype == jnp.bfloat16
    ids, mask = sample_inputs()
    got = enc(jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    assert position_rel_err(got, oracle(model.get_encoder(), ids, mask)) <= 5e-2


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_problem_named_in_one_message(model, fmt, tmp_path):
    missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    misshaped = "encoder.block.2.layer.0.SelfAttention.k.weight"
    extra = "encoder.block.3.layer.0.SelfAttention.q.weight"  # a fourth block
    if fmt == "safetensors":
        write_folder(model, tmp_path, "safetensors_sharded")
        with open(tmp_path / "model.safetensors.index.json") as f:
            weight_map = json.load(f)["weight_map"]

        def edit_shard(name, change):
            shard = str(tmp_path / weight_map[name])
            tensors = load_file(shard)
            change(tensors)
            save_file(tensors, shard, metadata={"format": "pt"})

        edit_shard(missing, lambda t: t.__setitem__(extra, t.pop(missing)))
        edit_shard(misshaped, lambda t: t.__setitem__(misshaped, t[misshaped][:-1].contiguous()))
    else:
        sd = dict(model.state_dict())
        sd[extra] = sd.pop(missing)
        sd[misshaped] = sd[misshaped][:-1].clone()
        write_bin(tmp_path, sd, shards=2)
        model.config.to_json_file(tmp_path / "config.json")
    names = stored_names(tmp_path)
    assert missing not in names and extra in names
    with pytest.raises(CheckpointError) as e:
        load_t5_encoder(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert f"missing {missing}" in message
    assert f"{misshaped} has shape [31, 32], config.json means [32, 32]" in message
    assert f"unexpected {extra}" in message


def test_folder_errors(model, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_t5_encoder(tmp_path)
    model.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no T5 weights: looked for "
                       "model.safetensors.index.json, model.safetensors, "
                       "pytorch_model.bin.index.json, pytorch_model.bin"):
        load_t5_encoder(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing: model-00001-of-00002.safetensors"):
        load_t5_encoder(tmp_path)
    with pytest.raises(UserError, match="float16"):
        load_t5_encoder(tmp_path, dtype=jnp.float16)

    config = json.loads((tmp_path / "config.json").read_text())
    for change, error in [({"model_type": "bert"}, "not a T5 encoder"),
                          ({"d_model": None}, "missing d_model"),
                          ({"num_heads": 0}, "num_heads must be a positive integer"),
                          ({"feed_forward_proj": "gated-mish"}, "activation 'mish'"),
                          ({"dense_act_fn": "relu"}, "disagrees with feed_forward_proj")]:
        bad = {k: v for k, v in {**config, **change}.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=error):
            load_t5_encoder(tmp_path)
