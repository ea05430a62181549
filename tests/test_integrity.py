"""Damaged files are caught and named: checkpoint checksums, truncation, empty files.

The oracle for every checksum is zlib.crc32 over arrays read back by orbax
(the writer's own reader), not by the tensorstore reader under test.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT
from pixelflow_jax.checkpoint import (CHECKSUM_FILE, add_checksums, load_checkpoint,
                                      load_param_tree, param_tree, save_checkpoint)
from pixelflow_jax.default_model import DEFAULT_CHECKPOINT
from pixelflow_jax.errors import CheckpointError, UserError
from pixelflow_jax.torch_format import CheckpointFormatError, read_state_dict


def orbax_arrays(directory) -> dict[str, np.ndarray]:
    """Dotted name -> stored array (stored dtype), read by orbax itself."""
    import orbax.checkpoint as ocp
    path = os.path.join(directory, "params")
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    with ocp.PyTreeCheckpointer() as c:
        tree = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {".".join(str(k.key) for k in p): a
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def crc_of(a: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(a).tobytes()):08x}"


def recorded(directory) -> dict[str, str]:
    with open(os.path.join(directory, CHECKSUM_FILE)) as f:
        return json.load(f)["params"]


def biggest_param_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, "params"))
             for f in fs]
    return max(files, key=os.path.getsize)


def flip_middle(path, size=4096) -> None:
    n = os.path.getsize(path)
    size = min(size, n // 2)
    with open(path, "r+b") as f:
        f.seek(n // 2 - size // 2)
        old = f.read(size)
        f.seek(n // 2 - size // 2)
        f.write(bytes(b ^ 0xFF for b in old))  # every byte changes


def damaged_copy(src, dst) -> str:
    shutil.copytree(src, dst)
    flip_middle(biggest_param_file(dst))
    return str(dst)


@pytest.mark.parametrize("dtype", [None, ml_dtypes.bfloat16])
def test_checksums_are_crc32_of_the_stored_arrays(c2i, tmp_path, dtype):
    save_checkpoint(tmp_path / "ck", c2i.tree, c2i.config, dtype=dtype)
    stored = orbax_arrays(tmp_path / "ck")
    assert {a.dtype for a in stored.values()} == {np.dtype(dtype or np.float32)}
    assert recorded(tmp_path / "ck") == {n: crc_of(a) for n, a in stored.items()}
    load_checkpoint(tmp_path / "ck")  # verifies


def test_flipped_bytes_name_exactly_the_damaged_entries(ckpt_dir, tmp_path):
    bad = damaged_copy(ckpt_dir, tmp_path / "bad")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(bad)
    assert "damaged: checksum mismatch; re-download or re-convert" in msg
    # The entries named are the ones whose bytes changed, as orbax reads them.
    before, after = orbax_arrays(ckpt_dir), orbax_arrays(bad)
    changed = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    assert changed and re.findall(r"params/([\w.]+)", msg) == changed[:3]
    assert (f"and {len(changed) - 3} more" in msg) == (len(changed) > 3)
    verb = "is" if len(changed) == 1 else "are"
    assert f"{verb} damaged: checksum mismatch" in msg
    with pytest.raises(CheckpointError) as e2:
        load_param_tree(bad)  # what convert_torch.py --export reads
    assert str(e2.value) == msg


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_file_is_one_line_naming_the_folder(ckpt_dir, tmp_path, keep):
    bad = tmp_path / "cut"
    shutil.copytree(ckpt_dir, bad)
    path = biggest_param_file(bad)
    os.truncate(path, int(os.path.getsize(path) * keep))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    assert msg.startswith(f"{bad}: params/ is damaged or truncated:")
    assert "cannot be read" in msg and "pybind" not in msg and "TensorStore" not in msg


def test_damaged_metadata_files_are_named(ckpt_dir, tmp_path):
    for name, message in ((CHECKSUM_FILE, "checksums.json is damaged"),
                          ("params/_METADATA", "_METADATA is damaged"),
                          ("params/manifest.ocdbt", "params/ is damaged or truncated: no "
                                                    "parameter array can be read")):
        bad = tmp_path / name.replace("/", "_")
        shutil.copytree(ckpt_dir, bad)
        with open(bad / name, "r+b") as f:
            f.truncate(os.path.getsize(bad / name) // 2)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(bad)


def test_checksums_that_do_not_list_the_params_are_refused(ckpt_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    record = json.load(open(bad / CHECKSUM_FILE))
    record["params"]["extra.kernel"] = record["params"].pop("proj_out_1.kernel")
    json.dump(record, open(bad / CHECKSUM_FILE, "w"))
    with pytest.raises(CheckpointError, match=r"checksums.json does not match params/ \(lists "
                                              r"no params/proj_out_1.kernel; lists unknown "
                                              r"params/extra.kernel\)"):
        load_checkpoint(bad)


def test_folder_without_checksums_loads_unverified_until_added(c2i, ckpt_dir, tmp_path):
    old = damaged_copy(ckpt_dir, tmp_path / "old")
    os.unlink(os.path.join(old, CHECKSUM_FILE))  # as written before checksums existed
    model, _ = load_checkpoint(old)  # no check: the damage goes through
    assert not jax.tree.all(jax.tree.map(np.array_equal, param_tree(model), c2i.tree))

    fine = tmp_path / "fine"
    shutil.copytree(ckpt_dir, fine)
    os.unlink(fine / CHECKSUM_FILE)
    add_checksums(fine)
    assert recorded(fine) == recorded(ckpt_dir)
    with pytest.raises(UserError, match="has checksums.json already"):
        add_checksums(fine)
    flip_middle(biggest_param_file(fine))
    with pytest.raises(CheckpointError, match="damaged: checksum mismatch"):
        load_checkpoint(fine)


def test_shipped_digits_model_is_verified(tmp_path):
    stored = orbax_arrays(DEFAULT_CHECKPOINT)
    assert recorded(DEFAULT_CHECKPOINT) == {n: crc_of(a) for n, a in stored.items()}
    load_checkpoint(DEFAULT_CHECKPOINT)
    bad = damaged_copy(DEFAULT_CHECKPOINT, tmp_path / "digits")
    with pytest.raises(CheckpointError, match="damaged: checksum mismatch"):
        load_checkpoint(bad)


def test_sample_py_refuses_a_damaged_checkpoint(ckpt_dir, tmp_path):
    bad = damaged_copy(ckpt_dir, tmp_path / "bad")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", bad,
                          "--out", str(tmp_path / "x.png"), "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [l for l in run.stderr.splitlines() if "damaged" in l]
    assert len(lines) == 1 and lines[0].startswith(f"sample.py: error: {bad}: params/")
    assert "checksum mismatch" in lines[0]
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_empty_torch_file_is_called_empty(tmp_path):
    for name in ("model.pt", "model.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointFormatError, match=f"{name}: empty file"):
            read_state_dict(tmp_path / name)
