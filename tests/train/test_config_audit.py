"""Config overrides and the CLI's errors: cases found in an audit."""

from __future__ import annotations

import argparse

import pytest

from eegfast import cli
from eegfast.train.commands import tokenizer
from eegfast.train.commands.common import resolve
from eegfast.train.config import ConfigError, RunConfig, parse_override, resolve_config


@pytest.mark.parametrize("override", ["data.tasks=", "data.tasks=null", "data.roots="])
def test_an_empty_name_list_is_none_not_one_empty_name(override):
    # `=` meant none for number lists only: a name list got ("",), a task or folder named ""
    key = override.partition("=")[0]
    section, name = key.split(".")
    config = resolve_config(RunConfig(), None, [override])
    assert getattr(getattr(config, section), name) == ()


def test_a_yaml_file_may_leave_a_name_list_empty(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  tasks:\n  roots: [a]\n")  # `tasks:` is null in YAML
    config = resolve_config(RunConfig(), path)
    assert config.data.tasks == () and config.data.roots == ("a",)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.init=0123", "0123"),  # YAML 1.1: the octal number 83
        ("model.init=1_000", "1_000"),  # YAML: 1000
        ("model.init=2024-01-01", "2024-01-01"),  # YAML: a date, refused as not a str
        ("model.name=1.50", "1.50"),  # YAML: 1.5
    ],
)
def test_names_and_paths_are_taken_as_written(override, expected):
    key = override.partition("=")[0]
    section, name = key.split(".")
    config = resolve_config(RunConfig(), None, [override])
    assert getattr(getattr(config, section), name) == expected


def test_name_lists_keep_their_items_as_written():
    config = resolve_config(RunConfig(), None, ["data.tasks=[01, on]", "data.roots=007"])
    assert config.data.tasks == ("01", "on") and config.data.roots == ("007",)


def test_typed_keys_still_read_yaml_values():
    config = resolve_config(
        RunConfig(),
        None,
        ["optim.fused=no", "model.init=null", "upcycle.layers=0,1", "optim.lr=1e-3"],
    )
    assert config.optim.fused == "false" and config.model.init == ""
    assert config.upcycle.layers == (0, 1) and config.optim.lr == 1e-3
    assert parse_override("train.compile=yes") == ("train.compile", True)


@pytest.mark.parametrize("value", ["-5", ".nan"])
def test_the_target_cache_limit_is_checked_with_the_other_ranges(value):
    # checked by `pretrain` only after the data was read, and NaN passed it
    with pytest.raises(ConfigError, match="pretrain.cache_targets_max_mb must be >= 0"):
        resolve_config(RunConfig(), None, [f"pretrain.cache_targets_max_mb={value}"])


def test_bench_out_that_is_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("")
    assert cli.main(["bench", "--suite", "vq", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"eegfast bench: --out {out}: exists and is not a folder"
    )
    assert cli.main(["bench", "--suite", "vq", "--out", str(out / "sub")]) == 2
    assert f"--out {out / 'sub'}: cannot make the folder" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_config_file_that_is_not_text_names_the_file(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_bytes(b"\xff\xfe\x00bad")
    # a UnicodeDecodeError before: a ValueError saying "'utf-8' codec can't decode", no file
    with pytest.raises(ConfigError, match=rf"config file {path}: not UTF-8 text"):
        resolve_config(RunConfig(), path)


def test_a_config_folder_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=rf"config file {folder}: is a folder"):
        resolve_config(RunConfig(), folder)


def test_ranges_are_checked_on_the_resolved_config_not_on_each_step(tmp_path):
    # a file's upcycle.num_experts: 1 was refused while the file was applied (the default
    # top_k is 2), before the --set upcycle.top_k=1 that makes it valid
    path = tmp_path / "run.yaml"
    path.write_text("upcycle:\n  num_experts: 1\n")
    config = resolve_config(RunConfig(), path, ["upcycle.top_k=1"])
    assert (config.upcycle.num_experts, config.upcycle.top_k) == (1, 1)
    with pytest.raises(ConfigError, match=r"upcycle.top_k \(2\) must be <= upcycle.num_experts"):
        resolve_config(RunConfig(), path)  # still checked on the result
    # a command's config: file, then flags, then --set, one check at the end
    parser = argparse.ArgumentParser()
    tokenizer.configure_parser(parser)
    args = parser.parse_args(
        ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)]
        + ["--set", "upcycle.top_k=1", "--device", "cpu"]
    )
    config = resolve(args, RunConfig())
    assert (config.upcycle.num_experts, config.upcycle.top_k) == (1, 1)


def test_a_yaml_file_keeps_names_and_paths_as_written(tmp_path):
    # as --set does: YAML 1.1 read `init: 0123` as the octal number 83, `tasks: [01, on]` as
    # ["1", "true"]; typed keys still read YAML values
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  init: 0123\n  name: 1.50\ndata:\n  tasks: [01, on]\n"
        "optim:\n  lr: 1e-3\ntrain:\n  progress: no\n"
    )
    config = resolve_config(RunConfig(), path)
    assert config.model.init == "0123" and config.model.name == "1.50"
    assert config.data.tasks == ("01", "on")
    assert config.optim.lr == 1e-3 and config.train.progress is False
