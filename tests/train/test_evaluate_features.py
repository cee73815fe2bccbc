"""``eegfast evaluate --export-features``: the backbone's pooled features of every window, for
every kind of model evaluate takes (a pretraining run, the reference's pretraining file, an
upcycled backbone, a fine-tuned model), with each window's task, label, subject and recording
and the class names its label ids index. On cuts of the real sample (4-s windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eegfast.cli import main as cli
from eegfast.models import create_model, pretrain_to_classifier_state_dict
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import build_model
from eegfast.train.data import load_data
from tests.train.test_run_folder import prepared  # noqa: F401

PRETRAIN = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {}}


def _random(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict with random values (not its initialisation, whose zero biases
    and unit norms would hide keys loaded into the wrong place)."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items()}


def _run_folder(folder: Path, weights: dict[str, torch.Tensor], meta: dict) -> Path:
    """A run folder as the training commands leave it: one checkpoint with its meta.json."""
    checkpoint = folder / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    save_file(weights, str(checkpoint / ckpt.WEIGHTS))
    (checkpoint / ckpt.META).write_text(json.dumps(meta))
    return folder


def _export(model: Path, data: Path, out: Path, capsys) -> dict[str, np.ndarray]:
    path = out / "features.npz"
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out / "eval")]
    argv += ["--export-features", str(path), "--include-training-windows"]
    argv += ["--set", "finetune.band_power_baseline=false", "--no-progress"]
    assert cli(argv) == 0, capsys.readouterr().err
    with np.load(path) as archive:  # plain arrays: no pickle needed
        return dict(archive)


def _expected(backbone: torch.nn.Module, data_root: Path, task_id: int | None = None):
    """``backbone.forward_features`` of every window, one window at a time, and the data."""
    data = load_data([data_root])
    backbone.eval()
    rows = []
    with torch.no_grad():
        for i in range(len(data)):
            item = data.dataset[i]
            kwargs = {} if task_id is None else {"task_id": torch.tensor([task_id])}
            rows.append(
                backbone.forward_features(item["x"][None], item["input_chans"][None], **kwargs)[0]
            )
    return torch.stack(rows).numpy(), data


def _check(exported: dict[str, np.ndarray], expected: np.ndarray, data) -> None:
    assert exported["features"].shape == expected.shape and exported["features"].dtype == np.float32
    np.testing.assert_allclose(exported["features"], expected, atol=2e-5, rtol=1e-4)
    assert exported["task"].tolist() == [i.task for i in data.items]
    assert exported["subject"].tolist() == [i.subject for i in data.items]
    assert exported["recording"].tolist() == [i.recording for i in data.items]
    assert exported["label"].tolist() == [i.label for i in data.items]
    # the label ids name their classes (rest = Subject00_1, task = Subject00_2)
    names = exported["label_names/arith"]
    assert names.tolist() == ["rest", "task"]
    for label, recording in zip(exported["label"], exported["recording"], strict=True):
        assert names[label] == ("rest" if "_1_cut" in recording else "task")


@pytest.mark.parametrize("saved_as", ["run", "reference"])
def test_features_of_a_pretraining_checkpoint(saved_as, prepared, tmp_path, capsys):  # noqa: F811
    """It stopped with AttributeError: 'LaBraMPretrain' object has no attribute
    'forward_features'. The features are its classifier backbone's (as the linear probe
    takes it: the pretraining keys mapped, fc_norm as initialised)."""
    state = _random(create_model("labram_tiny_pretrain"), seed=11)
    if saved_as == "run":
        model = _run_folder(tmp_path / "pre", state, {"arch": PRETRAIN, "command": "pretrain"})
    else:  # the reference's file: wrapped, DDP prefixes, no meta.json
        model = tmp_path / "labram-base.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, model)
    backbone = create_model("labram_tiny", num_classes=0)
    missing, unexpected = backbone.load_state_dict(
        pretrain_to_classifier_state_dict(state), strict=False
    )
    assert not unexpected and set(missing) == {"fc_norm.weight", "fc_norm.bias"}
    expected, data = _expected(backbone, prepared)
    _check(_export(model, prepared, tmp_path, capsys), expected, data)


def _upcycled(tmp_path, capsys):
    """An upcycled run folder of a random pretraining backbone (tasks other, arith), its
    experts made to differ (upcycled, they are copies, and routing would change nothing),
    and the backbone with its weights."""
    state = _random(create_model("labram_tiny_pretrain"), seed=12)
    pre = _run_folder(tmp_path / "pre", state, {"arch": PRETRAIN, "command": "pretrain"})
    moe = tmp_path / "moe"
    argv = ["upcycle", "--model", str(pre), "--out", str(moe), "--experts", "2"]
    assert cli([*argv, "--tasks", "other,arith"]) == 0, capsys.readouterr().err
    weights_path = ckpt.resolve_weights_path(moe)
    torch.manual_seed(14)
    weights = {
        k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in load_file(str(weights_path)).items()
    }
    save_file(weights, str(weights_path))
    backbone = build_model(ckpt.read_meta(moe)["arch"])
    backbone.load_state_dict(weights, strict=True)
    return moe, backbone


def test_features_of_an_upcycled_backbone(prepared, tmp_path, capsys):  # noqa: F811
    """Routed by the window's task id, as the linear probe routes them."""
    moe, backbone = _upcycled(tmp_path, capsys)
    expected, data = _expected(backbone, prepared, task_id=1)
    unrouted, _ = _expected(backbone, prepared, task_id=0)
    assert np.abs(unrouted - expected).max() > 1e-3  # the check below can tell the routes
    _check(_export(moe, prepared, tmp_path, capsys), expected, data)


def test_features_of_a_fine_tuned_model_are_its_backbones(prepared, tmp_path, capsys):  # noqa: F811
    """Its backbone's pooled features (not its logits); the npz names the label ids' classes
    (it held the ids alone, whose meaning depends on how each folder numbered its classes)."""
    arch = {
        "kind": "classifier",
        "name": "labram_tiny",
        "kwargs": {"num_classes": 0},
        "heads": {"arith": 2},
    }
    model = build_model(arch)
    state = _random(model, seed=13)
    model.load_state_dict(state)
    meta = {"arch": arch, "command": "finetune", "label_names": {"arith": ["rest", "task"]}}
    run = _run_folder(tmp_path / "ft", state, meta)
    expected, data = _expected(model.backbone, prepared)
    _check(_export(run, prepared, tmp_path, capsys), expected, data)


def test_features_of_an_upcycled_backbone_probed_without_task_routing(prepared, tmp_path, capsys):  # noqa: F811
    """With ``upcycle.task_routing=false`` the linear probe takes the features without task
    ids; the export routed them by task all the same, so the exported features were not the
    ones the probe fits on."""
    moe, backbone = _upcycled(tmp_path, capsys)
    expected, data = _expected(backbone, prepared)
    routed, _ = _expected(backbone, prepared, task_id=1)
    assert np.abs(routed - expected).max() > 1e-3  # the check below can tell the routes
    path = tmp_path / "features.npz"
    argv = ["evaluate", "--model", str(moe), "--data", str(prepared), "--out", str(tmp_path / "e")]
    argv += ["--export-features", str(path), "--include-training-windows", "--no-progress"]
    argv += ["--set", "finetune.band_power_baseline=false", "--set", "upcycle.task_routing=false"]
    assert cli(argv) == 0, capsys.readouterr().err
    with np.load(path) as archive:
        _check(dict(archive), expected, data)
