"""Second reviewer's audit of the day's changes (resume with changed settings, hostile-input
checks of checkpoints and prepared folders, CUDA-only paths): paths the changes made refuse
valid input, or that do not do what their documentation says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eegfast.models.checkpoint import CheckpointMismatchError
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import backbone_from_checkpoint, build_model, load_trained

# An upcycled, fine-tuned model as `eegfast upcycle` (with upcycle.noise_std > 0) and
# `eegfast finetune` record it: the experts are copies of the dense MLP plus noise.
NOISY_MOE = {
    "kind": "classifier",
    "name": "labram_tiny",
    "kwargs": {"num_classes": 0},
    "upcycle": {"num_experts": 4, "top_k": 2, "layers": [-1], "noise_std": 0.01},
    "heads": {"mi": 2},
}


def _saved(root: Path, arch: dict, weights: dict[str, torch.Tensor] | None = None) -> Path:
    torch.manual_seed(0)
    weights = build_model(arch).state_dict() if weights is None else weights
    ckpt.save_checkpoint(root / "checkpoints", 1, weights, {}, {"arch": arch})
    return root


def test_a_model_upcycled_with_noise_loads(tmp_path):
    """check_fits builds the arch on the meta device to compare shapes; the experts' noise is
    scaled by the dense weights' std, read back with float(), which meta tensors refuse: every
    checkpoint upcycled with noise_std > 0 (and every model fine-tuned from one) was refused
    by predict, evaluate, finetune and upcycle as 'its architecture record (arch) cannot be
    built: Tensor.item() cannot be called on meta tensors'."""
    run = _saved(tmp_path / "run", NOISY_MOE)
    saved = ckpt.load_weights(run)
    model, meta = load_trained(run)
    assert meta["arch"] == NOISY_MOE
    for key, value in model.state_dict().items():  # the saved weights, not fresh noise
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    arch, weights, _ = backbone_from_checkpoint(run)
    assert arch["upcycle"] == NOISY_MOE["upcycle"]
    assert any(key.endswith(".mlp.router.weight") for key in weights)  # the MoE layer


def test_weights_that_do_not_fit_a_noisy_upcycle_record_are_still_refused(tmp_path):
    """The shapes are compared for such a record too (the noise is left out of the meta
    build only): a record of 8 experts beside 4 experts' weights names the file."""
    weights = build_model(NOISY_MOE).state_dict()
    record = {**NOISY_MOE, "upcycle": {**NOISY_MOE["upcycle"], "num_experts": 8}}
    run = _saved(tmp_path / "run", record, weights)
    for load in (lambda: load_trained(run), lambda: backbone_from_checkpoint(run)):
        with pytest.raises(CheckpointMismatchError, match="does not hold the weights"):
            load()
