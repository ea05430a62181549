"""Typed configuration that reads the official PixelFlow ``config.yaml`` unchanged.

The official layout (DESIGN §1)::

    model: {target: pixelflow.model.PixelFlowModel, params: {...}}
    scheduler: {num_train_timesteps, num_stages, pyramid_shift}
    train: {lr, weight_decay, epochs}
    data: {root, center_crop, resolution, expand_ratio, num_workers, batch_size}
    seed: 42

Every key is checked: an unknown key, a missing required key or a value of the
wrong type raises :class:`~pixelflow_jax.errors.ConfigError` naming the key and
the file. Keys with a default may be left out (the official constructor has
the same defaults).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import yaml

from pixelflow_jax.errors import ConfigError

OFFICIAL_TARGET = "pixelflow.model.PixelFlowModel"
OBJECTIVES = ("flow", "reflow", "distill")
T_DENSITIES = ("uniform", "u_shaped")
DISTILL_LOSSES = ("l2", "pseudo_huber")
SAMPLE_SOLVERS = ("euler", "euler-diffrax", "dopri5")  # defaults.SOLVERS (no import cycle)
# Keys the official files never write: saved only when they differ from the default,
# so a config we save stays byte-for-byte in the official layout.
_OMIT_DEFAULT = {"omit_default": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelParams:
    """``model.params``: the constructor arguments of the official model."""

    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    depth: int
    patch_size: int
    num_classes: int = 0
    attention_bias: bool = True
    cross_attention_dim: int | None = None
    dropout: float = dataclasses.field(default=0.0, metadata=_OMIT_DEFAULT)  # must be 0

    @property
    def embed_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        for name in ("num_attention_heads", "attention_head_dim", "in_channels",
                     "out_channels", "depth", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.params.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ConfigError(f"model.params.num_classes must be >= 0, got {self.num_classes}")
        if self.attention_head_dim % 4:
            raise ConfigError(
                "model.params.attention_head_dim must be a multiple of 4 for the 2-D rotary "
                f"embedding, got {self.attention_head_dim}")
        if self.cross_attention_dim is not None and self.cross_attention_dim < 1:
            raise ConfigError(
                f"model.params.cross_attention_dim must be >= 1, got {self.cross_attention_dim}")
        if self.dropout != 0.0:
            # The official configs carry dropout: 0; any other value would be silently
            # ignored, so training would not be what the file says.
            raise ConfigError(f"model.params.dropout = {self.dropout} is not supported: this "
                              "model has no dropout layers; set it to 0 or remove the key")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    target: str
    params: ModelParams

    def validate(self) -> None:
        if self.target != OFFICIAL_TARGET:
            raise ConfigError(f"model.target must be {OFFICIAL_TARGET!r}, got {self.target!r}")
        self.params.validate()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """``scheduler``. ``pyramid_shift`` is read but unused, as in the official code."""

    num_train_timesteps: int
    num_stages: int
    pyramid_shift: bool = False
    gamma: float = dataclasses.field(default=-1.0 / 3.0, metadata=_OMIT_DEFAULT)

    def validate(self) -> None:
        if self.num_stages < 1:
            raise ConfigError(f"scheduler.num_stages must be >= 1, got {self.num_stages}")
        if self.num_train_timesteps < 2:
            raise ConfigError(
                f"scheduler.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not self.gamma < 0:
            raise ConfigError(f"scheduler.gamma must be negative, got {self.gamma}")


def _ours(default: Any) -> Any:
    """A key of our own (absent from official files): written only when changed."""
    return dataclasses.field(default=default, metadata=_OMIT_DEFAULT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``train``: the official keys, then ours (see README.md, "Training")."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 10
    steps: int | None = _ours(None)  # total optimizer steps; default: epochs of the data
    warmup_steps: int = _ours(0)
    schedule: str = _ours("constant")  # or "cosine" (to 0 at the last step, after warm-up)
    grad_clip: float = _ours(1.0)
    ema_decay: float = _ours(0.9999)
    # None: 0.1 for the flow objective (official), 0 for reflow / distill (DESIGN §11: the
    # guidance is baked into the pairs and the student samples unguided).
    label_dropout: float | None = _ours(None)
    dtype: str = _ours("auto")  # compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU
    remat: bool = _ours(False)  # rematerialise each block in the backward pass
    fsdp: int = _ours(1)  # devices per parameter shard (the mesh's fsdp axis)
    log_every: int = _ours(10)
    save_every: int = _ours(1000)
    keep: int = _ours(3)  # checkpoints kept
    sample_every: int = _ours(0)  # EMA sample grid every N steps (0: never)
    # DESIGN §11: flow (§5, the official objective), reflow or distill (both read data.pairs).
    objective: str = _ours("flow")
    init_from: str | None = _ours(None)  # a checkpoint folder (or short name) to start from
    t_density: str = _ours("uniform")  # reflow's t: uniform or u_shaped (arXiv 2405.20320)
    distill_loss: str = _ours("l2")  # distill: l2 or pseudo_huber (arXiv 2310.14189)

    @property
    def dropout(self) -> float:
        """The label-dropout rate in effect (``label_dropout``, or its objective's default)."""
        if self.label_dropout is not None:
            return self.label_dropout
        return 0.1 if self.objective == "flow" else 0.0

    def validate(self) -> None:
        for name in ("epochs", "log_every", "save_every", "keep", "fsdp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.warmup_steps < 0 or self.sample_every < 0:
            raise ConfigError("train.warmup_steps and train.sample_every must be >= 0")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("train.lr and train.grad_clip must be > 0, "
                              "train.weight_decay >= 0")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("train.ema_decay and train.label_dropout must be in [0, 1)")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.schedule must be constant or cosine, got {self.schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name, allowed in (("objective", OBJECTIVES), ("t_density", T_DENSITIES),
                              ("distill_loss", DISTILL_LOSSES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be {' or '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    root: str | None = None
    center_crop: bool = False
    resolution: int
    expand_ratio: float = 1.125
    num_workers: int = 4
    batch_size: int = 4  # per device, as the official per-GPU batch
    source: str = _ours("imagefolder")  # or "tfds"
    tfds_name: str = _ours("imagenet2012")
    tfds_data_dir: str | None = _ours(None)
    split: str = _ours("train")
    hflip: bool = _ours(True)  # random horizontal flips (off for digits, text, ...)
    pairs: str | None = _ours(None)  # reflow / distill: a pair folder (DESIGN §11)

    def validate(self) -> None:
        if self.resolution < 1:
            raise ConfigError(f"data.resolution must be >= 1, got {self.resolution}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")
        if self.source not in ("imagefolder", "tfds"):
            raise ConfigError(f"data.source must be imagefolder or tfds, got {self.source!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """``sample`` (ours): sampling defaults a checkpoint carries (DESIGN §11).

    ``sample.py`` uses them where its flag is not given (a one-step student:
    ``steps: 1, guidance: 1``); unset keys fall back to ``pixelflow_jax.defaults``.
    """

    steps: int | list[int] | None = None  # Euler steps, one number or one per stage
    guidance: float | None = None
    solver: str | None = None
    shift: float | None = None

    def validate(self) -> None:
        steps = [self.steps] if isinstance(self.steps, int) else self.steps
        if steps is not None and (not steps or min(steps) < 1):
            raise ConfigError(f"sample.steps must be integers >= 1, got {self.steps}")
        if self.guidance is not None and not self.guidance >= 0:
            raise ConfigError(f"sample.guidance must be >= 0, got {self.guidance}")
        if self.solver is not None and self.solver not in SAMPLE_SOLVERS:
            raise ConfigError(f"sample.solver must be {', '.join(SAMPLE_SOLVERS)}, "
                              f"got {self.solver!r}")
        if self.shift is not None and not self.shift > 0:
            raise ConfigError(f"sample.shift must be > 0, got {self.shift}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PixelFlowConfig:
    """A whole config file. ``model``, ``scheduler`` and ``data`` are required."""

    model: ModelConfig
    scheduler: SchedulerConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig
    seed: int = 42
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig,
                                             metadata=_OMIT_DEFAULT)

    def validate(self) -> None:
        self.model.validate()
        self.scheduler.validate()
        self.data.validate()
        self.train.validate()
        self.sample.validate()
        if self.train.objective != "flow" and not self.data.pairs:
            raise ConfigError(f"train.objective = {self.train.objective} trains on teacher "
                              "pairs: set data.pairs to a pair folder (python -m "
                              "pixelflow_jax.reflow pairs ...)")

    @property
    def params(self) -> ModelParams:
        return self.model.params

    def replace_params(self, **changes: Any) -> "PixelFlowConfig":
        """A copy with some ``model.params`` changed (validated)."""
        cfg = dataclasses.replace(
            self, model=dataclasses.replace(
                self.model, params=dataclasses.replace(self.model.params, **changes)))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The official layout as plain Python data (unset optional keys omitted)."""
        def keep(obj: Any, f: dataclasses.Field) -> bool:
            value = getattr(obj, f.name)
            if value is None:
                return False
            default = f.default_factory() if f.default is dataclasses.MISSING \
                and f.default_factory is not dataclasses.MISSING else f.default
            return not (f.metadata.get("omit_default") and value == default)

        def clean(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name: clean(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                        if keep(obj, f)}
            return obj
        return clean(self)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for alternative in inner:  # e.g. int | list[int]: the first that fits
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                pass
        names = " or ".join({int: "an integer", float: "a number", str: "a string"}.get(
            a, "a list" if typing.get_origin(a) is list else _type_name(a)) for a in inner)
        raise ConfigError(f"key '{key}' must be {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; the official loader accepts it.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"key '{key}' must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config annotation {_type_name(tp)} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = f"section '{prefix}'" if prefix else "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: str(k))
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key '{dotted(unknown[0])}' (known keys in {where}: "
                          f"{', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], dotted(name))
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise ConfigError(f"missing key '{dotted(name)}'")
    return cls(**kwargs)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error
    (PyYAML silently keeps the last value, so a config would not be what it reads as)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", set())
        return self.construct_document(node)


def _check_unique_keys(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node checked already (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": overrides are meant
                _check_unique_keys(value_node, prefix, seen)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: never a config key
            key = (key_node.tag, key_node.value)  # 1 and "1" are different keys
            dotted = f"{prefix}.{key_node.value}" if prefix else key_node.value
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"duplicate key '{dotted}' (lines {lines[key]} and {line}); "
                                  "give each key once")
            lines[key] = line
            _check_unique_keys(value_node, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix}[{i}]", seen)


def load_yaml(stream: Any) -> Any:
    """Parse YAML like ``yaml.safe_load``, refusing duplicate keys (ConfigError)."""
    loader = UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def config_from_dict(data: Any, source: str = "<dict>") -> PixelFlowConfig:
    """Build and validate a config from parsed YAML; errors name ``source``."""
    try:
        cfg = _build(PixelFlowConfig, data, "")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def apply_overrides(data: Any, overrides: list[str], source: str = "--set") -> Any:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to raw config data."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: cannot read the value of {key!r}: {text!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: the value of {key!r}: {e}") from None
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key!r} does not name a config key")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key!r} does not name a config key")
        node[leaf] = value
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PixelFlowConfig:
    """Read a ``config.yaml`` (official layout), apply ``overrides``, validate every key."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except ConfigError as e:  # a duplicate key
        raise ConfigError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        apply_overrides(data, overrides)
        path = f"{path} (with --set {' '.join(overrides)})"
    return config_from_dict(data, path)


def save_config(cfg: PixelFlowConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` in the official layout (readable by the official code)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
