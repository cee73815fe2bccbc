"""Second reviewer's audit of the day-28 changes (git diff ad6f94a..HEAD): regressions that
the day's commits brought into paths they did not test."""

from __future__ import annotations

import torch

from eegfast.train import finetune
from eegfast.train.config import RunConfig


def test_cross_validate_takes_a_backbone_upcycled_with_noise(tmp_path, monkeypatch):
    """cross_validate builds the backbone on the meta device to check the data's electrodes
    against its embedding table (d59798f). An upcycled backbone records its experts' noise
    (``upcycle.noise_std`` > 0, as `eegfast upcycle --set upcycle.noise_std=...` writes it),
    scaled by the dense weights' std, which meta tensors cannot give: `eegfast finetune` and
    the linear probe of `eegfast evaluate` from such a checkpoint stopped before any fold with
    "Tensor.item() cannot be called on meta tensors"."""
    from tests.train.test_finetune import make_data, stub_training

    data = make_data([("mi", f"s{i % 4}", f"r{i % 4}", (i // 4) % 2) for i in range(16)])
    trained = stub_training(monkeypatch)
    config = RunConfig().with_overrides(
        {"finetune.folds": 2, "finetune.band_power_baseline": False}
    )
    arch = {
        "kind": "classifier",
        "name": "labram_tiny",
        "kwargs": {"num_classes": 0},
        "upcycle": {"num_experts": 2, "top_k": 1, "layers": [-1], "noise_std": 0.01},
    }
    backbone = finetune.Backbone(arch, None, [])
    runtime = type("Runtime", (), {"device": torch.device("cpu")})()
    finetune.cross_validate(data, config, tmp_path, runtime, backbone)
    assert [run_dir.name for run_dir in trained] == ["single-mi", "single-mi"]
    assert arch["upcycle"]["noise_std"] == 0.01  # the backbone's record is left as it was
