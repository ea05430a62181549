"""Checkpoint folders: round trip, atomic writes, and every mismatch named."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_C2I, make_config
from pixelflow_jax.checkpoint import load_checkpoint, param_tree, save_checkpoint
from pixelflow_jax.config import load_config, save_config
from pixelflow_jax.errors import CheckpointError, UserError


def same_tree(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_round_trip(c2i, ckpt_dir):
    model, cfg = load_checkpoint(ckpt_dir)
    assert cfg == c2i.config
    assert same_tree(param_tree(model), c2i.tree)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(param_tree(model)))
    assert sorted(os.listdir(ckpt_dir)) == ["checksums.json", "config.yaml", "params"]


@pytest.mark.parametrize("ocdbt,zarr3", [(False, False), (True, True), (False, True)])
def test_other_orbax_layouts_load(c2i, tmp_path, ocdbt, zarr3):
    """Folders in orbax's other storage layouts (written by orbax itself) read the same."""
    import orbax.checkpoint as ocp
    os.makedirs(tmp_path / "ck")
    save_config(c2i.config, tmp_path / "ck" / "config.yaml")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt,
                                                      use_zarr3=zarr3)) as checkpointer:
        checkpointer.save(tmp_path / "ck" / "params", args=ocp.args.PyTreeSave(c2i.tree))
    model, _ = load_checkpoint(tmp_path / "ck")
    assert same_tree(param_tree(model), c2i.tree)


def test_bfloat16_storage_loads_as_float32(c2i, tmp_path):
    save_checkpoint(tmp_path / "bf16", c2i.tree, c2i.config, dtype=jnp.bfloat16)
    model, _ = load_checkpoint(tmp_path / "bf16")
    for got, want in zip(jax.tree.leaves(param_tree(model)), jax.tree.leaves(c2i.tree)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-6)


def test_existing_destination_is_refused_then_replaced(c2i, tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, c2i.tree, c2i.config)
    with pytest.raises(UserError, match="exists already"):
        save_checkpoint(path, c2i.tree, c2i.config)
    other = make_config(dict(TINY_C2I, num_classes=5))
    tree = jax.tree.map(lambda a: a, c2i.tree)
    tree["class_embedder"]["embedding_table"]["embedding"] = np.zeros((6, 16), np.float32)
    save_checkpoint(path, tree, other, overwrite=True)
    assert load_checkpoint(path)[1].params.num_classes == 5
    assert os.listdir(tmp_path) == ["ck"]  # no temporary or old folder left behind


def test_folder_problems(ckpt_dir, tmp_path):
    def fails(path, message):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)

    fails(tmp_path / "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    fails(tmp_path / "file", "is not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "has no config.yaml")
    torch_like = tmp_path / "official"
    torch_like.mkdir()
    shutil.copy(os.path.join(ckpt_dir, "config.yaml"), torch_like)
    (torch_like / "model.pt").write_bytes(b"")
    fails(torch_like, "official PyTorch checkpoint.*convert_torch.py")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt_dir, broken)
    shutil.rmtree(broken / "params")
    (broken / "params").mkdir()
    (broken / "params" / "junk").write_text("not orbax")
    fails(broken, "not a readable orbax checkpoint")


def test_tree_mismatch_names_every_entry(ckpt_dir, tmp_path):
    path = tmp_path / "mismatch"
    shutil.copytree(ckpt_dir, path)
    cfg = load_config(path / "config.yaml")
    # More heads (wider), one more class, and cross-attention: missing, extra and shapes.
    save_config(cfg.replace_params(num_classes=11, cross_attention_dim=4, attention_bias=False),
                path / "config.yaml")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "missing: " in msg and "transformer_blocks.attn2.q_proj.kernel" in msg
    assert "transformer_blocks.norm2.weight" in msg
    assert "unexpected: " in msg and "transformer_blocks.attn1.q_proj.bias" in msg
    assert "class_embedder.embedding_table.embedding has shape [11, 16], expected [12, 16]" in msg


def test_bad_config_in_folder(ckpt_dir, tmp_path):
    path = tmp_path / "badcfg"
    shutil.copytree(ckpt_dir, path)
    text = (path / "config.yaml").read_text().replace("depth:", "depht:")
    (path / "config.yaml").write_text(text)
    with pytest.raises(UserError, match="unknown key 'model.params.depht'.*|"
                                        ".*config.yaml: unknown key"):
        load_checkpoint(path)
