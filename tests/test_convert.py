"""convert_torch.py: torch.save files in and out without torch, proven equal to the oracle."""

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert_torch
import torch_reference as ref
from conftest import ROOT, TINY_C2I, TINY_T2I, jit_call, make_config, rel_err
from pixelflow_jax.checkpoint import load_checkpoint, param_tree
from pixelflow_jax.config import save_config
from pixelflow_jax.noise import draw_cascade_noise
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule
from pixelflow_jax.torch_format import (CheckpointFormatError, UnsafeCheckpointError,
                                        read_state_dict, write_state_dict)


def official_folder(path, params, seed=1):
    """What a user downloads: model.pt (torch.save of a float32 state dict) + config.yaml."""
    os.makedirs(path)
    sd = ref.random_state_dict(params, seed=seed, dtype=torch.float32)
    torch.save(sd, os.path.join(path, "model.pt"))
    save_config(make_config(params), os.path.join(path, "config.yaml"))
    return sd


def convert(*args):
    return convert_torch.main([str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (official state dict, params, converted model)} for c2i and t2i."""
    out = {}
    for name, params in [("c2i", TINY_C2I), ("t2i", TINY_T2I)]:
        root = tmp_path_factory.mktemp(name)
        sd = official_folder(root / "official", params)
        assert convert(root / "official", root / "jax") == 0
        out[name] = (sd, params, load_checkpoint(root / "jax")[0], root)
    return out


# ----------------------------------------------------------------------------- file format


def tricky_state_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return collections.OrderedDict(
        w=torch.randn(3, 5), transposed=base.t(), offset_view=base[1:3], column=base[:, 2],
        bf16=torch.randn(7, dtype=torch.bfloat16), f16=torch.randn(2, 2, dtype=torch.float16),
        f64=torch.randn(3, dtype=torch.float64), i64=torch.arange(5), flag=torch.tensor([True]),
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3))


def test_reader_equals_torch_load_bit_for_bit(tmp_path):
    sd = tricky_state_dict()
    torch.save(sd, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    ours = read_state_dict(tmp_path / "m.pt")
    assert list(ours) == list(loaded)
    for name, t in loaded.items():
        a = ours[name].read()
        assert a.shape == tuple(t.shape) and a.flags.c_contiguous
        assert a.tobytes() == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_writer_is_read_by_torch_load_weights_only(tmp_path):
    sd = tricky_state_dict()
    arrays = collections.OrderedDict((k, v.float().numpy() if v.dtype == torch.bfloat16
                                      else v.numpy()) for k, v in sd.items())
    arrays["transposed_view"] = arrays["w"].T  # written from a non-contiguous view
    write_state_dict(tmp_path / "out.pt", arrays)
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert torch.equal(back[name], torch.from_numpy(np.asarray(a, order="C"))), name
        assert tuple(back[name].shape) == a.shape


def test_safetensors(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[a.dtype.name],
                        "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    raw = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    ours = read_state_dict(tmp_path / "m.safetensors")
    for name, a in arrays.items():
        np.testing.assert_array_equal(ours[name].read(), a)


def test_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="asks for '(posix|os).system'"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    torch.save(tricky_state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.pt"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointFormatError, match="legacy pre-1.6"):
        read_state_dict(tmp_path / "legacy.pt")
    with pytest.raises(CheckpointFormatError, match="no such file"):
        read_state_dict(tmp_path / "none.pt")


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_class_forward_equals_the_torch_model(converted, side):
    sd, params, model, _ = converted["c2i"]
    rng = np.random.default_rng(side)
    x = rng.standard_normal((4, 3, side, side)).astype(np.float32)
    T = np.array([0.0, 250.5, 719.0, 999.0], np.float32)
    labels = np.array([10, 0, 7, 10])  # 10 = the null label
    with torch.no_grad():
        want = ref.forward(sd, params, torch.tensor(x), torch.tensor(T),
                           class_labels=torch.tensor(labels)).numpy()
    got = jit_call(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T),
                   jnp.asarray(labels))
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-5


def test_text_forward_with_masks_equals_the_torch_model(converted):
    sd, params, model, _ = converted["t2i"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((3, 6, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.float32)
    T = np.array([5.0, 480.0, 990.0], np.float32)
    with torch.no_grad():
        want = ref.forward(sd, params, torch.tensor(x), torch.tensor(T),
                           context=torch.tensor(ctx), context_mask=torch.tensor(mask)).numpy()
    got = jit_call(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T), None,
                   jnp.asarray(ctx), jnp.asarray(mask))
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-5


def test_euler_cascade_equals_the_torch_model(converted):
    sd, params, model, _ = converted["c2i"]
    sampler = Sampler(model, CascadeSchedule(), 32)
    noise = draw_cascade_noise(9, jnp.arange(2), sampler.resolutions, 3, -1 / 3)
    labels = np.array([3, 8])
    got = sampler.generate_from_noise(noise, labels=labels, guidance=4.0, steps=[2, 3, 2, 3],
                                      shift=2.0)
    t = lambda a: torch.tensor(np.asarray(a).transpose(0, 3, 1, 2))
    with torch.no_grad():
        want = ref.euler_cascade(sd, params, t(noise.init), [t(b) for b in noise.blocks],
                                 guidance=4.0, steps=[2, 3, 2, 3], shift=2.0,
                                 class_labels=torch.tensor(labels)).numpy()
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-4


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_round_trip_is_bit_identical(converted, variant):
    sd, params, _, root = converted[variant]
    assert convert("--to-torch", root / "jax", root / "back") == 0
    assert sorted(os.listdir(root / "back")) == ["config.yaml", "model.pt"]
    back = torch.load(root / "back" / "model.pt", weights_only=True)
    # What load_state_dict(strict=True) needs: the same names, in order, shapes and dtypes.
    assert list(back) == list(sd) == list(ref.state_dict_keys(params))
    for name, tensor in sd.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name
    assert (root / "back" / "config.yaml").read_text() == \
        (root / "official" / "config.yaml").read_text()


def test_bfloat16_storage(converted, tmp_path):
    _, _, model, root = converted["c2i"]
    assert convert(root / "official", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    half, _ = load_checkpoint(tmp_path / "bf16")
    for a, b in zip(jax_leaves(param_tree(half)), jax_leaves(param_tree(model))):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=8e-3, atol=1e-6)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def official(tmp_path):
    official_folder(tmp_path / "official", TINY_C2I)
    return tmp_path / "official"


def edit_weights(folder, change):
    sd = torch.load(folder / "model.pt", weights_only=True)
    change(sd)
    torch.save(sd, folder / "model.pt")


def failure(capsys, *args):
    code = convert(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_every_problem_in_one_message(official, tmp_path, capsys):
    def damage(sd):
        del sd["transformer_blocks.1.mlp.fc1.bias"]
        sd["extra.weight"] = torch.zeros(1)
        sd["proj_out_1.bias"] = torch.zeros(5)
        sd["patch_embed.proj.bias"] = sd["patch_embed.proj.bias"].long()

    edit_weights(official, damage)
    err = failure(capsys, official, tmp_path / "out")
    for part in ("missing: transformer_blocks.1.mlp.fc1.bias", "unexpected: extra.weight",
                 "proj_out_1.bias has shape [5], expected [32]",
                 "patch_embed.proj.bias has non-floating dtype int64"):
        assert part in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_config_that_disagrees_with_the_weights(official, tmp_path, capsys):
    save_config(make_config(dict(TINY_C2I, num_classes=1000, depth=3, cross_attention_dim=8)),
                official / "config.yaml")
    err = failure(capsys, official, tmp_path / "out")
    assert "config model.params.num_classes = 1000 but the weights have 10 " \
           "(class_embedder.embedding_table.weight is [11, 16])" in err
    assert "config model.params.depth = 3 but the weights have 2" in err
    assert "config model.params.cross_attention_dim = 8 but the weights have None" in err


def test_destination_and_source_errors(official, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert "exists already (pass --overwrite" in failure(capsys, official, tmp_path / "taken")
    assert convert(official, tmp_path / "taken", "--overwrite") == 0
    assert "params" in os.listdir(tmp_path / "taken")
    assert "pass --config" in failure(capsys, official / "model.pt", tmp_path / "x")
    assert "no such file or folder" in failure(capsys, tmp_path / "nothing", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    assert "has none of model.pt" in failure(capsys, tmp_path / "empty", tmp_path / "x")
    assert "already a pixelflow-jax checkpoint" in failure(capsys, tmp_path / "taken",
                                                           tmp_path / "x")
    assert convert(official / "model.pt", tmp_path / "bare", "--config",
                   official / "config.yaml") == 0
    data = (official / "model.pt").read_bytes()
    (official / "model.pt").write_bytes(data[:1000])
    assert "model.pt" in failure(capsys, official, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_library_and_converter_never_import_torch(official, tmp_path):
    code = ("import sys\n"
            "class NoTorch:\n"  # any `import torch` now fails
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import runpy, pixelflow_jax.sampling, pixelflow_jax.checkpoint\n"
            f"sys.argv = ['convert_torch.py', {str(official)!r}, {str(tmp_path / 'o')!r}]\n"
            "try:\n"
            "    runpy.run_path('convert_torch.py', run_name='__main__')\n"
            "finally:\n"
            "    assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isdir(tmp_path / "o" / "params")
