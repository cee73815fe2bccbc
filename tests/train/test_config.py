"""Run configuration: files, overrides, unknown keys, types, the saved copy."""

from __future__ import annotations

import pytest
import yaml

from eegfast.train.config import (
    LIMITS,
    ConfigError,
    RunConfig,
    config_to_yaml,
    parse_override,
    resolve_config,
    valid_keys,
)


def test_overrides_are_typed_and_later_sources_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nlr = 0.01\nbetas = [0.9, 0.95]\n[train]\nepochs = 4\n")
    config = resolve_config(
        RunConfig(), toml, ["optim.lr=1e-3", "train.compile=true", "data.roots=[a, b]"]
    )
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)  # "1e-3" read as float
    assert config.optim.betas == (0.9, 0.95)
    assert config.train.epochs == 4 and config.train.compile is True
    assert config.data.roots == ("a", "b")
    assert RunConfig().optim.lr == 5e-4  # frozen defaults untouched


def test_yaml_file_and_round_trip_of_the_saved_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 7\nupcycle:\n  layers: [0, -1]\n")
    config = resolve_config(RunConfig(), path)
    assert config.train.batch_size == 7 and config.upcycle.layers == (0, -1)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(config))
    assert resolve_config(RunConfig(), saved) == config
    assert yaml.safe_load(saved.read_text())["train"]["batch_size"] == 7


def test_optional_keys_take_none_or_a_typed_value(tmp_path):
    assert RunConfig().vq.beta is None  # the model config's value
    config = resolve_config(RunConfig(), None, ["vq.beta=0.1", "vq.dead_code_threshold=0"])
    assert config.vq.beta == 0.1 and config.vq.dead_code_threshold == 0.0
    assert isinstance(config.vq.dead_code_threshold, float)
    assert resolve_config(config, None, ["vq.beta=", "vq.dead_code_threshold=null"]).vq == (
        RunConfig().vq
    )
    with pytest.raises(ConfigError, match="vq.beta: expected float"):
        resolve_config(RunConfig(), None, ["vq.beta=low"])
    saved = tmp_path / "config.yaml"  # None and values survive the saved copy
    for values in (config, RunConfig()):
        saved.write_text(config_to_yaml(values))
        assert resolve_config(RunConfig(), saved) == values


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*optim\.lr"):
        RunConfig().with_overrides({"optim.learning_rate": 1.0})
    path = tmp_path / "bad.toml"
    path.write_text("[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*'trian.epochs'.*train\.epochs"):
        resolve_config(RunConfig(), path)
    assert "finetune.folds" in valid_keys() and "pretrain.objective" in valid_keys()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=two", "train.epochs: expected int"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("train.compile=maybe", "train.compile: expected bool"),
        ("optim=1", "optim is a section"),
        ("novalue", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(RunConfig(), None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=0", r"train.batch_size must be >= 1, got 0"),
        ("train.log_every=0", r"train.log_every must be >= 1"),
        ("optim.lr=0", r"optim.lr must be > 0"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas must be in \[0, 1\), got \(0.9, 1.0\)"),
        ("optim.layer_decay=0", r"optim.layer_decay must be in \(0, 1\]"),
        ("pretrain.mask_ratio=1", r"pretrain.mask_ratio must be in \(0, 1\)"),
        ("train.device=gpu", r"train.device must be one of auto, cpu, cuda, got 'gpu'"),
        ("train.precision=fp8", r"train.precision must be one of auto, bf16, fp16, fp32"),
        ("finetune.folds=1", r"finetune.folds must be >= 2"),
        ("vq.beta=-1", r"vq.beta must be >= 0, got -1.0"),
        ("vq.dead_code_threshold=2", r"vq.dead_code_threshold must be in \[0, 1\], got 2.0"),
        # (2^62 had failed in the data order's generator: "Overflow when unpacking long long")
        (f"train.seed={2**62}", r"train.seed must be in \[0, 4294967296\), got 4611686018"),
        ("train.seed=-1", r"train.seed must be in \[0, 4294967296\), got -1"),
        ("upcycle.top_k=9", r"upcycle.top_k \(9\) must be <= upcycle.num_experts \(8\)"),
    ],
)
def test_values_outside_their_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(RunConfig(), None, [override])


def test_every_range_names_a_key_and_the_defaults_are_inside_them(tmp_path):
    assert set(LIMITS) <= set(valid_keys())
    # in a file too
    path = tmp_path / "run.toml"
    path.write_text("[train]\nkeep_last = 0\n")
    with pytest.raises(ConfigError, match=r"run.toml: train.keep_last must be >= 1"):
        resolve_config(RunConfig(), path)
    # the commands' defaults are built by with_overrides, which checks them on import
    from eegfast.train.commands import finetune, pretrain, tokenizer

    for module in (finetune, pretrain, tokenizer):
        assert module.DEFAULTS.with_overrides({}) == module.DEFAULTS
    # optional keys may be None; a bool for a string key is its YAML spelling
    assert resolve_config(RunConfig(), None, ["vq.beta="]).vq.beta is None
    assert resolve_config(RunConfig(), None, ["optim.fused=false"]).optim.fused == "false"


def test_missing_or_unsupported_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(RunConfig(), tmp_path / "nope.toml")
    other = tmp_path / "run.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml or \.yml"):
        resolve_config(RunConfig(), other)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_hybrid_mask_weight_reaches_the_hybrid_model():
    from eegfast.train.arch import build_model
    from eegfast.train.config import RunConfig

    config = RunConfig().with_overrides({"pretrain.hybrid_mask_weight": 0.3})
    assert config.pretrain.hybrid_mask_weight == 0.3
    arch = {
        "kind": "hybrid",
        "name": "labram_tiny_pretrain",
        "kwargs": {"hybrid": {"mask_weight": config.pretrain.hybrid_mask_weight}},
    }
    assert build_model(arch).config.mask_weight == 0.3


def test_tuple_keys_take_comma_lists_and_typos_get_a_suggestion():
    """`--set upcycle.layers=1,2` (a comma list of numbers; empty for none); names and paths
    are not split (`data.roots=/data/a,b` is one folder); an unknown key names the closest
    valid one."""
    from eegfast.train.config import ConfigError, RunConfig, resolve_config

    config = resolve_config(
        RunConfig(), None, ["upcycle.layers=1, 2", "data.roots=/data/a,b", "optim.betas=0.9,0.95"]
    )
    assert config.upcycle.layers == (1, 2) and config.data.roots == ("/data/a,b",)
    assert config.optim.betas == (0.9, 0.95)
    assert resolve_config(RunConfig(), None, ["upcycle.layers="]).upcycle.layers == ()
    with pytest.raises(ConfigError, match="upcycle.layers: expected int, got 'x'"):
        resolve_config(RunConfig(), None, ["upcycle.layers=1,x"])
    for listed in ("1,", "1,,2"):  # was "expected int, got None"
        with pytest.raises(ConfigError, match="upcycle.layers: empty item in the comma list"):
            resolve_config(RunConfig(), None, [f"upcycle.layers={listed}"])
    with pytest.raises(
        ConfigError, match=r"'train.max_stpes' \(did you mean 'train.max_steps'\?\)"
    ):
        resolve_config(RunConfig(), None, ["train.max_stpes=3"])


def test_a_retired_key_is_ignored_with_a_warning_and_old_run_configs_still_load(tmp_path):
    """model.tokenizer_name was accepted and written to every config.yaml but never read
    (setting it did nothing): it is no longer a key; an older run's config.yaml holding it
    still loads, with a warning, and a resume does not count it as a changed setting."""
    from eegfast.train.engine import config_changes

    assert "model.tokenizer_name" not in valid_keys()
    path = tmp_path / "config.yaml"
    path.write_text(
        "model:\n  name: labram_tiny\n  tokenizer_name: vqnsp_base\noptim:\n  lr: 0.01\n"
    )
    with pytest.warns(UserWarning, match="model.tokenizer_name is ignored"):
        config = resolve_config(RunConfig(), path)
    assert config.optim.lr == 0.01
    with pytest.warns(UserWarning, match="model.tokenizer_name is ignored"):
        resolve_config(RunConfig(), None, ["model.tokenizer_name=vqnsp_base"])
    saved = {"model": {"name": "labram_tiny", "tokenizer_name": "vqnsp_tiny"}, "optim": {"lr": 1}}
    now = {"model": {"name": "labram_tiny"}, "optim": {"lr": 2}, "train": {"new_key": 3}}
    assert config_changes(saved, now) == ["optim.lr: 1 -> 2"]
