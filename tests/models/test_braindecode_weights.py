"""braindecode ``Labram`` weights in eegfast's LaBraM (eegfast.models.load_checkpoint).

braindecode's Labram (neural-tokenizer mode, ``use_mean_pooling=True``) is the reference
classifier under other key names. The key names below are braindecode 1.8.1's, written out; the
test with a real braindecode model runs in ``make timm-check`` (build/venv-timm has braindecode),
and skips elsewhere with the reason.
"""

from __future__ import annotations

import pytest
import torch

from eegfast.models import CheckpointMismatchError, create_model, load_checkpoint
from eegfast.models.checkpoint import (
    braindecode_to_eegfast_state_dict,
    is_braindecode_labram_state_dict,
)
from tests._braindecode import braindecode_labram

NAMES = ["FP1", "FZ", "T3", "O2"]  # T3: braindecode takes the table's own T3 row

# eegfast key -> braindecode 1.8.1 key, for Labram(num_layers=1, qkv_bias=True,
# use_mean_pooling=True) (printed from braindecode's own model).
BRAINDECODE_KEYS = {
    "cls_token": "cls_token",
    "pos_embed": "position_embedding",
    "time_embed": "temporal_embedding",
    **{
        f"patch_embed.{layer}.{kind}": f"patch_embed.temporal_conv.{layer}.{kind}"
        for layer in ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3")
        for kind in ("weight", "bias")
    },
    "blocks.0.gamma_1": "blocks.0.gamma_1",
    "blocks.0.gamma_2": "blocks.0.gamma_2",
    "blocks.0.norm1.weight": "blocks.0.norm1.weight",
    "blocks.0.norm1.bias": "blocks.0.norm1.bias",
    "blocks.0.attn.q_bias": "blocks.0.attn.q_bias",
    "blocks.0.attn.v_bias": "blocks.0.attn.v_bias",
    "blocks.0.attn.qkv.weight": "blocks.0.attn.qkv.weight",
    "blocks.0.attn.q_norm.weight": "blocks.0.attn.q_norm.weight",
    "blocks.0.attn.q_norm.bias": "blocks.0.attn.q_norm.bias",
    "blocks.0.attn.k_norm.weight": "blocks.0.attn.k_norm.weight",
    "blocks.0.attn.k_norm.bias": "blocks.0.attn.k_norm.bias",
    "blocks.0.attn.proj.weight": "blocks.0.attn.proj.weight",
    "blocks.0.attn.proj.bias": "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight": "blocks.0.norm2.weight",
    "blocks.0.norm2.bias": "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight": "blocks.0.mlp.0.weight",
    "blocks.0.mlp.fc1.bias": "blocks.0.mlp.0.bias",
    "blocks.0.mlp.fc2.weight": "blocks.0.mlp.2.weight",
    "blocks.0.mlp.fc2.bias": "blocks.0.mlp.2.bias",
    "fc_norm.weight": "fc_norm.weight",
    "fc_norm.bias": "fc_norm.bias",
    "head.weight": "final_layer.weight",
    "head.bias": "final_layer.bias",
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _eegfast_labram(depth: int, max_patches: int = 3, seed: int = 0) -> torch.nn.Module:
    model = create_model("labram_base", n_outputs=3, ch_names=NAMES, modern_names=False,
                         depth=depth, qkv_bias=True, max_patches=max_patches)  # fmt: skip
    return _randomise(model, seed).eval()


def test_braindecode_key_names_load_into_labram(tmp_path):
    source = _eegfast_labram(depth=1)
    assert set(source.state_dict()) == set(BRAINDECODE_KEYS)
    state = {BRAINDECODE_KEYS[k]: v.clone() for k, v in source.state_dict().items()}
    assert is_braindecode_labram_state_dict(state)
    assert set(braindecode_to_eegfast_state_dict(state)) == set(BRAINDECODE_KEYS)
    # skorch / DDP style wrappers around it still unwrap.
    path = tmp_path / "braindecode_labram.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)

    model = _eegfast_labram(depth=1, seed=1)
    report = load_checkpoint(model, path)
    assert report.ok and len(report.loaded) == len(BRAINDECODE_KEYS)
    x = torch.randn(2, 4, 400, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_braindecode_state_dicts_eegfast_cannot_run_say_which_option():
    state = {BRAINDECODE_KEYS[k]: v for k, v in _eegfast_labram(depth=1).state_dict().items()}
    model = _eegfast_labram(depth=1, max_patches=16)
    with pytest.raises(
        CheckpointMismatchError, match="create the eegfast model with max_patches=3"
    ):
        load_checkpoint(model, state)

    model = _eegfast_labram(depth=1)
    cls_pooled = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    cls_pooled.update({"norm.weight": state["fc_norm.weight"], "norm.bias": state["fc_norm.bias"]})
    with pytest.raises(CheckpointMismatchError, match="use_mean_pooling=False"):
        load_checkpoint(model, cls_pooled)
    # The backbone still loads, as the hint says.
    report = load_checkpoint(model, cls_pooled, strict=False, exclude=("fc_norm.", "head."))
    assert report.unexpected == ["norm.weight", "norm.bias"] and not report.missing

    decoder = dict(state)
    decoder["blocks.0.attn.relative_position_bias_table"] = torch.zeros(6, 10)
    with pytest.raises(CheckpointMismatchError, match="neural_tokenizer=False"):
        load_checkpoint(model, decoder)

    # Reference key names are not taken for braindecode's.
    reference = _eegfast_labram(depth=1).state_dict()
    assert not is_braindecode_labram_state_dict(reference)
    assert load_checkpoint(model, reference).ok


def test_real_braindecode_labram_weights_give_the_same_outputs_in_eegfast(tmp_path):
    Labram = braindecode_labram()
    torch.manual_seed(0)
    braindecode = Labram(n_times=400, n_chans=4, n_outputs=3, num_layers=2, qkv_bias=True,
                         use_mean_pooling=True)  # fmt: skip
    braindecode = _randomise(braindecode).eval()
    path = tmp_path / "labram.pt"
    torch.save(braindecode.state_dict(), path)

    model = _eegfast_labram(depth=2, seed=1)
    report = load_checkpoint(model, path)
    assert report.ok and len(report.loaded) == len(model.state_dict())
    x = torch.randn(2, 4, 400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), braindecode(x, ch_names=NAMES), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            model.forward_patch_tokens(x),
            braindecode(x, ch_names=NAMES, return_features=True)["features"],  # fc_norm'ed
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip

    # braindecode's default (cls-token pooling) is refused with the option to change.
    default = Labram(n_times=400, n_chans=4, n_outputs=3, num_layers=2, qkv_bias=True)
    with pytest.raises(CheckpointMismatchError, match="use_mean_pooling=False"):
        load_checkpoint(_eegfast_labram(depth=2), default.state_dict())
