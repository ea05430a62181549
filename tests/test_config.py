"""Config files: the official layout reads unchanged; every bad key is named."""

import os

import pytest
import yaml

from conftest import ROOT
from pixelflow_jax.config import load_config, save_config
from pixelflow_jax.errors import ConfigError

XL = os.path.join(ROOT, "configs", "pixelflow_xl_c2i.yaml")


def write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def official():
    with open(XL) as f:
        return yaml.safe_load(f)


def test_official_xl_config_reads_unchanged():
    cfg = load_config(XL)
    p = cfg.params
    assert (p.num_attention_heads, p.attention_head_dim, p.depth, p.patch_size) == (16, 72, 28, 4)
    assert p.embed_dim == 1152 and p.num_classes == 1000 and p.attention_bias
    assert p.cross_attention_dim is None
    assert cfg.scheduler.num_stages == 4 and cfg.scheduler.num_train_timesteps == 1000
    assert cfg.train.lr == pytest.approx(1e-4)  # "1e-4" is a YAML 1.1 string
    assert cfg.data.resolution == 256 and cfg.data.expand_ratio == 1.125 and cfg.seed == 42


def test_text_config_reads():
    cfg = load_config(os.path.join(ROOT, "configs", "pixelflow_xl_t2i.yaml"))
    assert cfg.params.cross_attention_dim == 2048 and cfg.params.num_classes == 0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["params"].update(depthh=3), "unknown key 'model.params.depthh'"),
    (lambda d: d.update(extra={"a": 1}), "unknown key 'extra'"),
    (lambda d: d["model"]["params"].pop("depth"), "missing key 'model.params.depth'"),
    (lambda d: d.pop("scheduler"), "missing key 'scheduler'"),
    (lambda d: d["data"].pop("resolution"), "missing key 'data.resolution'"),
    (lambda d: d["model"]["params"].update(depth="28"), "'model.params.depth' must be an integer"),
    (lambda d: d["model"]["params"].update(attention_bias=1),
     "'model.params.attention_bias' must be true or false"),
    (lambda d: d["train"].update(lr="fast"), "'train.lr' must be a number"),
    (lambda d: d["model"].update(target="x.Y"), "model.target must be"),
    (lambda d: d["model"]["params"].update(attention_head_dim=70), "multiple of 4"),
    (lambda d: d["scheduler"].update(num_stages=0), "num_stages must be >= 1"),
    (lambda d: d.update(model=[1, 2]), "section 'model' must be a mapping"),
])
def test_bad_keys_name_key_and_file(tmp_path, edit, message):
    data = official()
    edit(data)
    path = write(tmp_path, data, "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and "bad.yaml" in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a list\n"))


def test_save_keeps_the_official_layout(tmp_path):
    cfg = load_config(XL)
    save_config(cfg, tmp_path / "out.yaml")
    saved = yaml.safe_load((tmp_path / "out.yaml").read_text())
    want = official()
    want["train"]["lr"] = 1e-4
    assert saved == want  # same keys, same values, nothing of ours added
    assert list(saved) == list(want) and load_config(tmp_path / "out.yaml") == cfg


def test_dropout_must_be_zero(tmp_path):
    """The model has no dropout layers: a non-zero rate would be silently ignored."""
    data = official()
    data["model"]["params"]["dropout"] = 0.0  # as the official configs carry it
    assert load_config(write(tmp_path, data, "zero.yaml")).params.dropout == 0.0
    data["model"]["params"]["dropout"] = 0.1
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data, "dropout.yaml"))
    assert "model.params.dropout = 0.1 is not supported" in str(e.value)
    assert "dropout.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="model.params.dropout"):
        load_config(XL, ["model.params.dropout=0.5"])


def test_duplicate_keys_are_refused(tmp_path):
    text = open(XL).read()
    # PyYAML alone keeps the last value silently.
    doubled = text.replace("  params:\n", "  params:\n    depth: 12\n", 1)
    assert yaml.safe_load(doubled)["model"]["params"]["depth"] == 28
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, doubled, "dup.yaml"))
    msg = str(e.value)
    assert "dup.yaml" in msg and "duplicate key 'model.params.depth'" in msg, msg
    top = text + "\nseed: 7\n"
    with pytest.raises(ConfigError, match=r"top\.yaml: duplicate key 'seed' \(lines \d+ and \d+"):
        load_config(write(tmp_path, top, "top.yaml"))
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(XL, ["model.params={a: 1, a: 2}"])
    # Not duplicates: the same name in different mappings, 1 and '1', and YAML merge keys.
    from pixelflow_jax.config import load_yaml
    assert load_yaml("a: {x: 1}\nb: {x: 2}\n1: i\n'1': s\nbase: &b {x: 1}\nc: {<<: *b, x: 3}") \
        == {"a": {"x": 1}, "b": {"x": 2}, 1: "i", "1": "s", "base": {"x": 1}, "c": {"x": 3}}
