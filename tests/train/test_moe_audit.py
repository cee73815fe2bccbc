"""Audit of the MoE area: `eegfast upcycle`'s handling of the fine-tuning-only upcycle.* keys."""

from __future__ import annotations

import pytest

from eegfast import cli
from eegfast.train import checkpoint as ckpt
from tests.train.test_upcycle_command import pretrained, upcycle_cli  # noqa: F401


@pytest.mark.parametrize(
    "setting",
    ["upcycle.task_routing=false", "upcycle.router_aux_weight=0.1", "upcycle.router_z_weight=0"],
)
def test_upcycle_says_that_fine_tuning_settings_are_not_its_own(
    pretrained,  # noqa: F811
    tmp_path,
    capsys,
    setting,
):
    """`--set upcycle.task_routing=false --tasks a,b` still built task routing, and aux-loss
    weights set for upcycle were dropped, both silently: finetune alone reads these keys."""
    out = tmp_path / "moe"
    assert upcycle_cli(pretrained, out, "--experts", "2", "--tasks", "a,b", "--set", setting) == 0
    err = capsys.readouterr().err
    key = setting.split("=")[0]
    assert f"warning: {key}=" in err and "give them to eegfast finetune" in err, err
    assert ckpt.read_meta(out)["arch"]["upcycle"]["num_tasks"] == 2  # written as before


def test_upcycle_with_its_own_settings_warns_of_nothing(pretrained, tmp_path, capsys):  # noqa: F811
    assert upcycle_cli(pretrained, tmp_path / "moe", "--experts", "2", "--tasks", "a") == 0
    assert "warning" not in capsys.readouterr().err


def test_upcycle_help_names_the_keys_it_reads(capsys):
    with pytest.raises(SystemExit):
        cli.main(["upcycle", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "upcycle reads upcycle.num_experts, top_k, layers and noise_std" in printed
    assert "router_z_weight are fine-tuning settings" in printed
