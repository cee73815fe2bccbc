"""Run configuration: frozen dataclasses, read from TOML/YAML files and ``--set key=value``.

One schema serves every training command; each command starts from its own defaults
(:func:`RunConfig.replace_paths`), then applies the file, then the command-line overrides, so
the later source wins. Keys are dotted paths (``optim.lr``); an unknown key is an error that
lists the valid ones. The resolved configuration is written into every run folder
(``config.yaml``), and that file can be passed back with ``--config`` to repeat the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class DataConfig:
    roots: tuple[str, ...] = ()  # prepared folders (``eegfast prepare`` outputs), used together
    tasks: tuple[str, ...] = ()  # task names to use; () = all in the folder
    num_workers: int = 0
    # tokenizer/pretrain: this share of the recordings (whole subjects when there are several)
    # is held out, chosen from train.seed, and evaluated at every checkpoint (val/loss, which
    # then picks the best checkpoint); see eegfast.train.validation
    val_fraction: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "labram_tiny"
    init: str = ""  # checkpoint (folder or .safetensors) to start from
    tokenizer: str = ""  # trained tokenizer checkpoint, for masked pretraining targets
    drop_path: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0
    # used when warmup_steps is 0; a resume keeps the warm-up's length in steps that the run
    # had (a longer train.max_steps does not restart it) unless optim.warmup_* changes
    warmup_fraction: float = 0.1
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (fine-tuning)
    clip_grad: float = 3.0  # 0 disables clipping
    fused: str = "auto"  # auto (fused AdamW on CUDA and CPU) | true | false


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    # optimiser steps; 0 = epochs x steps per epoch (a resume trains the epochs left, in the
    # steps an epoch has now: another batch_size or more data change it)
    max_steps: int = 0
    batch_size: int = 32  # global samples per optimiser step (all ranks, all micro-batches)
    grad_accum: int = 1
    # auto (bf16 on GPUs of sm_80 on, fp16 with loss scaling on older ones, fp32 on CPU) |
    # bf16 | fp16 | fp32
    precision: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int = 0  # optimiser steps; 0 = once per epoch
    keep_last: int = 3
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard; for Large/Huge)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    objective: str = "masked"  # masked | hybrid (see eegfast.train.objectives)
    mask_ratio: float = 0.5
    # hybrid only: loss = hybrid_mask_weight * masked + (1 - hybrid_mask_weight) * forecast
    hybrid_mask_weight: float = 0.5
    # Keep the frozen tokenizer's codes of each window (host memory, 512 bytes per window of
    # 256 patches) so that epochs after the first skip its forward.
    cache_targets: bool = True
    # The cache's limit per process (rows with bookkeeping take ~700 bytes a window of 256
    # patches); windows past it run the tokenizer every epoch.
    cache_targets_max_mb: float = 4096.0


@dataclass(frozen=True)
class UpcycleConfig:
    num_experts: int = 8
    top_k: int = 2
    layers: tuple[int, ...] = ()  # () = every block
    noise_std: float = 0.0
    router_aux_weight: float = 0.01
    router_z_weight: float = 0.001
    task_routing: bool = True  # pass the task id to the router in fine-tuning


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "full"  # full | linear (frozen features + logistic regression)
    folds: int = 5
    group_by: str = "subject"  # subject | recording (when a task has too few subjects)
    multitask: bool = True
    single_task_baseline: bool = True  # also train each task alone (negative-transfer report)
    band_power_baseline: bool = True


@dataclass(frozen=True)
class VQConfig:
    """The tokenizer's quantizer (``eegfast tokenizer``); None keeps the model config's value."""

    # commitment loss weight: loss = beta * commitment + amplitude + phase (1.0 in vqnsp_base,
    # as the reference; lower it when the tokenizer's train/feature_spread falls towards 0)
    beta: float | None = None
    # re-seed codes whose EMA count falls below this, in [0, 1] (0: never)
    dead_code_threshold: float | None = None


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    vq: VQConfig = field(default_factory=VQConfig)

    def with_overrides(self, values: dict[str, Any], *, check: bool = True) -> RunConfig:
        """A copy with dotted keys (``{"optim.lr": 1e-3}``) or nested dicts applied; a value
        outside its key's range (:data:`LIMITS`) is a :class:`ConfigError`. ``check=False``
        leaves the ranges to the last of several steps (a file's ``upcycle.num_experts: 1``
        is valid once a later ``--set upcycle.top_k=1`` applies)."""
        config = _apply(self, _flatten(values), prefix="")
        if check:
            check_values(config)
        return config


class ConfigError(ValueError):
    """A configuration file or override names an unknown key, gives a value of the wrong type,
    or one outside the key's range."""


def _at_least(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _above(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v > low), f"> {low}"


def _fraction(*, zero: bool = True, one: bool = False) -> tuple[typing.Callable[[Any], bool], str]:
    """In [0, 1) by default; ``zero=False`` leaves 0 out, ``one=True`` lets 1 in."""
    text = ("[0" if zero else "(0") + ", " + ("1]" if one else "1)")
    return (lambda v: (v >= 0 if zero else v > 0) and (v <= 1 if one else v < 1)), f"in {text}"


def _below(high: float, low: float = 0) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: low <= v < high), f"in [{low}, {high})"


def _one_of(*choices: str) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


# The range of every numeric or choice key (each element of a tuple is checked; None, where a
# key is optional, always passes). Checked whenever a config is built from a file, --set or
# with_overrides, so a bad value fails before any data is read, naming its key.
LIMITS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.num_workers": _at_least(0),
    "data.val_fraction": _fraction(),
    "model.drop_path": _fraction(),
    "optim.lr": _above(0),
    "optim.min_lr": _at_least(0),
    "optim.weight_decay": _at_least(0),
    "optim.betas": _fraction(),
    "optim.eps": _above(0),
    "optim.warmup_steps": _at_least(0),
    "optim.warmup_fraction": _fraction(one=True),
    "optim.layer_decay": _fraction(zero=False, one=True),
    "optim.clip_grad": _at_least(0),
    "optim.fused": _one_of("auto", "true", "false"),
    "train.epochs": _at_least(1),
    # NumPy's seed range; the data order's generator takes seed x 100003 + epoch (2^62 and
    # above had failed there with "Overflow when unpacking long long")
    "train.seed": _below(2**32),
    "train.max_steps": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.grad_accum": _at_least(1),
    "train.precision": _one_of("auto", "bf16", "fp16", "fp32"),
    "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(0),
    "train.keep_last": _at_least(1),
    "train.strategy": _one_of("ddp", "fsdp"),
    "train.device": _one_of("auto", "cpu", "cuda"),
    "pretrain.mask_ratio": _fraction(zero=False),
    "pretrain.hybrid_mask_weight": _fraction(one=True),
    "pretrain.cache_targets_max_mb": _at_least(0),
    "upcycle.num_experts": _at_least(1),
    "upcycle.top_k": _at_least(1),
    "upcycle.noise_std": _at_least(0),
    "upcycle.router_aux_weight": _at_least(0),
    "upcycle.router_z_weight": _at_least(0),
    "finetune.mode": _one_of("full", "linear"),
    "finetune.folds": _at_least(2),
    "finetune.group_by": _one_of("subject", "recording"),
    "vq.beta": _at_least(0),
    # a restarted code starts from an EMA count of 1: above 1 it is re-seeded at every step
    "vq.dead_code_threshold": _fraction(one=True),
}


def check_values(config: RunConfig) -> None:
    """Raises :class:`ConfigError` naming the first key whose value is outside :data:`LIMITS`
    (or ``upcycle.top_k`` above ``upcycle.num_experts``)."""
    for key, (ok, allowed) in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        for item in value if isinstance(value, tuple) else (value,):
            if item is not None and not ok(item):
                err = ConfigError(f"{key} must be {allowed}, got {value!r}")
                err.keys = (key,)  # (for resolve_config: which step set it)
                raise err
    if config.upcycle.top_k > config.upcycle.num_experts:
        err = ConfigError(
            f"upcycle.top_k ({config.upcycle.top_k}) must be <= upcycle.num_experts "
            f"({config.upcycle.num_experts})"
        )
        err.keys = ("upcycle.top_k", "upcycle.num_experts")
        raise err


def valid_keys(config: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``["data.root", ..., "optim.lr", ...]``."""
    config = RunConfig() if config is None else config
    keys = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            keys += valid_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + str(key) + "."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field's type, converting only where that loses nothing."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and not value.strip()):
            # `--set data.tasks=` or `tasks:` (null) in a file: none, not one empty name
            value = []
        elif isinstance(value, str) and args[0] is not str:
            # `--set upcycle.layers=1,2` (or `=` for none). Not for names and paths, which may
            # hold commas: those take a list (`data.roots=[a, b]`) or one value.
            items = value.split(",") if value.strip() else []
            if any(not item.strip() for item in items):
                raise ConfigError(f"{key}: empty item in the comma list {value!r}")
            value = [yaml.safe_load(item) for item in items]
        elif not isinstance(value, list | tuple):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], v) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        # only optional fields (X | None): None, or an empty value (`--set key=`, `key=null`)
        args = typing.get_args(annotation)
        present = [a for a in args if a is not type(None)]
        if len(present) != 1 or len(args) != 2:
            raise ConfigError(f"{key}: union types other than X | None are not in the schema")
        if value is None or value == "":
            return None
        return _coerce(key, present[0], value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads `--set optim.fused=false` as a bool
            return str(value).lower()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


# Keys that are no longer settings, with why: still read (the config.yaml of older runs holds
# them) but ignored, with a warning.
RETIRED_KEYS = {
    "model.tokenizer_name": "it was never read; model.tokenizer names the trained tokenizer",
}


def _apply(config: Any, flat: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in fields(config)}
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if prefix + key in RETIRED_KEYS:
            warnings.warn(
                f"config key {prefix + key} is ignored: {RETIRED_KEYS[prefix + key]}", stacklevel=2
            )
            continue
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(_unknown(prefix + key))
        if is_dataclass(getattr(config, head)):
            if not rest:
                raise ConfigError(
                    f"{prefix + key} is a section; set one of its keys, e.g. "
                    f"{valid_keys(getattr(config, head), prefix + head + '.')[0]}"
                )
            nested.setdefault(head, {})[rest] = value
        else:
            if rest:
                raise ConfigError(_unknown(prefix + key))
            changes[head] = _coerce(prefix + key, hints[head], value)
    for head, sub in nested.items():
        changes[head] = _apply(getattr(config, head), sub, prefix + head + ".")
    return dataclasses.replace(config, **changes)


def _unknown(key: str) -> str:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys are: " + ", ".join(keys)


def _schema_type(key: str) -> Any:
    """The type of the dotted ``key`` in :class:`RunConfig`; None for a key not in it."""
    owner: Any = RunConfig
    *sections, name = key.split(".")
    for section in sections:
        owner = typing.get_type_hints(owner).get(section) if is_dataclass(owner) else None
    return typing.get_type_hints(owner).get(name) if is_dataclass(owner) else None


def _takes_text(annotation: Any) -> bool:
    """Whether a key holds names or paths: ``str`` or ``tuple[str, ...]``."""
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0] is str
    return annotation is str


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", "1e-3")``, a float once applied; the value is
    read as YAML, but for names and paths (``str`` keys) as written: YAML would turn
    ``model.init=0123`` into the octal number 83 and ``data.tasks=[01]`` into ``[1]``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if _takes_text(_schema_type(key)) and value is not None and not isinstance(value, bool):
            # (`=null` stays none; `optim.fused=false`, or `=no`, stays the bool's name)
            value = yaml.load(raw, Loader=yaml.BaseLoader)  # every scalar as written
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: cannot read the value: {err}") from err
    except RecursionError:  # (YAML's reader recurses per level: `=[[[[...`)
        raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    if value is None:
        value = ""
    return key, value


def _keep_text_as_written(typed: dict, raw: dict, prefix: str = "") -> None:
    """Names and paths of a YAML file as written (``raw``: every scalar a string), as
    :func:`parse_override` takes them: YAML 1.1 read ``init: 0123`` as the octal number 83
    and ``tasks: [01]`` as ``[1]``. In place; null and booleans stay as YAML read them."""
    for key, value in typed.items():
        name, written = f"{prefix}{key}", raw.get(str(key)) if isinstance(raw, dict) else None
        if isinstance(value, dict):
            _keep_text_as_written(value, written, name + ".")
        elif (
            written is not None
            and value is not None
            and not isinstance(value, bool)
            and _takes_text(_schema_type(name))
        ):
            typed[key] = written


# A YAML config may repeat a section through aliases (`finetune: *common`) up to this many
# values in all, however short its text.
MIN_CONFIG_VALUES = 10_000


def _more_values_than(data: Any, limit: int) -> bool:
    """Whether the mappings and lists of ``data`` hold more than ``limit`` values (keys and
    items, counted at every place an alias puts them), counted without recursion and stopping
    at ``limit``: a file written out holds at most one value per character."""
    count, todo = 0, [data] if isinstance(data, dict | list) else []
    while todo:
        node = todo.pop()
        for child in node.values() if isinstance(node, dict) else node:
            count += 1
            if count > limit:
                return True
            if isinstance(child, dict | list):
                todo.append(child)
    return False


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file as a dict."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            # A file saved as "UTF-8 with BOM" (Windows Notepad, PowerShell 5's
            # `Set-Content -Encoding UTF8`) starts with a byte-order mark, which tomllib
            # refuses as "Invalid statement (at line 1, column 1)"; YAML skips it itself.
            data = tomllib.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
        elif suffix in {".yaml", ".yml"}:
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
            if _more_values_than(data, max(len(text), MIN_CONFIG_VALUES)):
                # YAML aliases repeat a mapping without its text: nine levels of eight `*a`
                # in a 600-byte file are 8**9 values, which the walks below (and _flatten)
                # visited one by one, for hours, then ran out of memory
                raise ConfigError(
                    f"config file {path}: holds more values than its {len(text)} characters "
                    "can write out (aliases `*name` repeating mappings or lists); write the "
                    "values out"
                )
            if isinstance(data, dict):
                _keep_text_as_written(data, yaml.load(text, Loader=yaml.BaseLoader) or {})
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path}: {err}") from err
    except RecursionError:  # both readers recurse per level: `a: [[[[...` ended in a traceback
        raise ConfigError(f"config file {path}: values nested too deeply") from None
    except UnicodeDecodeError as err:  # (a ValueError: it named no file)
        raise ConfigError(f"config file {path}: not UTF-8 text ({err})") from err
    except OSError as err:  # no permission to read it
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table/mapping")
    return data


def resolve_config(
    defaults: RunConfig,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then the file, then ``flags`` (a command's own options, dotted keys), then
    ``key=value`` overrides (later wins). The ranges (:data:`LIMITS`) are checked once, on
    the result: each step alone may be out of range (a file's ``upcycle.num_experts: 1`` is
    valid once ``--set upcycle.top_k=1`` applies). A range error of a value the file set
    names the file."""
    config, from_file = defaults, set()
    if config_file:
        try:
            values = _flatten(read_config_file(config_file))
            config = config.with_overrides(values, check=False)
        except ConfigError as err:
            raise ConfigError(f"{config_file}: {err}") from err
        from_file = set(values)
    later = {**(flags or {}), **dict(parse_override(text) for text in overrides)}
    config = config.with_overrides(later, check=False)
    try:
        check_values(config)
    except ConfigError as err:
        keys = set(getattr(err, "keys", ()))
        if keys & from_file and not keys & set(_flatten(later)):
            raise ConfigError(f"{config_file}: {err}") from err
        raise
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), ready for YAML/JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        f.name: config_to_dict(getattr(config, f.name))
        if is_dataclass(getattr(config, f.name))
        else plain(getattr(config, f.name))
        for f in fields(config)
    }


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
