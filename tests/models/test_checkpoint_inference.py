"""Which registered model a checkpoint file without an eegfast record is, from its tensor shapes
(eegfast.models.infer_architecture / read_reference_checkpoint): the reference LaBraM layouts,
tiny variants, braindecode names, a named model that must fit, and unknown or ambiguous files."""

from __future__ import annotations

import argparse

import pytest
import torch

import eegfast.models.registry as registry
from eegfast.models import (
    CheckpointMismatchError,
    create_model,
    infer_architecture,
    read_reference_checkpoint,
)
from tests.models._spec import random_reference_state, reference_shapes


def meta_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    return create_model(name, device="meta", **kwargs).state_dict()


@pytest.mark.parametrize(
    ("name", "kind", "kwargs"),
    [
        ("labram_base", "classifier", {"num_classes": 6}),
        ("labram_large", "classifier", {"num_classes": 6}),
        ("labram_huge", "classifier", {"num_classes": 6}),
        ("labram_base_pretrain", "pretrain", {}),
        ("vqnsp_base", "tokenizer", {}),
    ],
)
def test_reference_layouts_are_recognised_from_their_shapes(name, kind, kwargs):
    """The reference's own key layouts (labram_state_dicts.json), as meta tensors."""
    found = infer_architecture(random_reference_state(name, device="meta"), source=f"{name}.pth")
    assert (found.kind, found.name, found.kwargs) == (kind, name, kwargs)
    built = create_model(found.name, device="meta", **found.kwargs).state_dict()
    assert {k: tuple(v.shape) for k, v in built.items()} == reference_shapes(name)


def test_only_models_of_the_files_size_are_built_and_on_the_meta_device(monkeypatch):
    built = []
    real = registry.create_model

    def spy(name, **kwargs):
        built.append((name, kwargs.get("device")))
        return real(name, **kwargs)

    monkeypatch.setattr(registry, "create_model", spy)
    infer_architecture(random_reference_state("labram_base", device="meta"))
    assert built == [("labram_base", "meta")]  # labram_huge never built


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("labram_tiny", {}),
        ("labram_tiny", {"num_classes": 3, "max_patches": 8, "pos_rows": 140}),
        ("labram_tiny", {"qkv_bias": True, "qk_norm": False, "init_values": 0.0}),
        ("labram_tiny_pretrain", {"vocab_size": 64, "max_patches": 4}),
        ("vqnsp_tiny", {"num_codes": 128}),
    ],
)
def test_file_settings_are_read_back(name, kwargs):
    """Classes, vocabulary, codebook size, electrode-table rows, time-embedding length and the
    attention options that change the keys: create_model(name, **kwargs) rebuilds the file."""
    found = infer_architecture(meta_state(name, **kwargs))
    assert (found.name, found.kwargs) == (name, kwargs)


def test_a_named_model_stands_for_its_pretraining_model_and_must_fit():
    state = random_reference_state("labram_base_pretrain", device="meta")
    assert infer_architecture(state, name="labram_base").name == "labram_base_pretrain"
    assert infer_architecture(state, name="labram_base_pretrain").name == "labram_base_pretrain"
    with pytest.raises(CheckpointMismatchError) as error:
        infer_architecture(state, name="labram_large", source="labram-base.pth")
    text = str(error.value)
    assert text.startswith("labram-base.pth: a pretrain checkpoint (embed dim 200, blocks 12)")
    assert "does not fit labram_large_pretrain (embed dim 400, blocks 24)" in text
    assert "student.blocks.{12..23}.attn.qkv.weight" in text  # missing, layers collapsed
    assert "student.cls_token: [1, 1, 400] vs [1, 1, 200]" in text
    assert "... and" in text and len(text.splitlines()) < 60  # not hundreds of shape lines
    with pytest.raises(ValueError, match="vqnsp_base, is a tokenizer model"):
        infer_architecture(state, name="vqnsp_base", source="labram-base.pth")
    with pytest.raises(ValueError, match="'nope', is not registered; available: labram_base"):
        infer_architecture(state, name="nope")


def test_a_file_no_model_fits_is_a_clear_error():
    state = random_reference_state("labram_base", device="meta")
    eleven = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    with pytest.raises(ValueError) as error:
        infer_architecture(eleven, source="cut.pth")
    text = str(error.value)
    assert (
        "cut.pth: a classifier checkpoint (embed dim 200, blocks 11), which no registered" in text
    )
    assert "labram_base: embed dim 200, blocks 12" in text
    other_heads = dict(state, **{"blocks.0.attn.q_norm.weight": torch.empty(25, device="meta")})
    with pytest.raises(CheckpointMismatchError, match=r"q_norm.weight: \[20\] vs \[25\]"):
        infer_architecture(other_heads, source="heads.pth")
    with pytest.raises(ValueError, match="x.pth: not a LaBraM checkpoint eegfast knows.*'fc.w'"):
        infer_architecture({"fc.w": torch.zeros(2)}, source="x.pth")


def test_a_file_several_models_fit_is_ambiguous(monkeypatch):
    twin = registry.MODEL_CONFIGS["labram_tiny"]
    monkeypatch.setitem(registry.MODEL_CONFIGS, "labram_tiny_twin", twin)
    with pytest.raises(ValueError, match="tiny.pth: .* fits several models"):
        infer_architecture(meta_state("labram_tiny"), source="tiny.pth")
    assert infer_architecture(meta_state("labram_tiny"), name="labram_tiny_twin").name == (
        "labram_tiny_twin"
    )


def test_read_reference_checkpoint_unwraps_and_renames(tmp_path):
    """{"model": ...} with DDP prefixes, and braindecode Labram names (renamed to eegfast's)."""
    torch.manual_seed(0)
    state = create_model("labram_tiny", num_classes=3).state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 2}, path)
    found, got = read_reference_checkpoint(path)
    assert (found.kind, found.name, found.kwargs) == (
        "classifier",
        "labram_tiny",
        {"num_classes": 3},
    )
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    renames = {"pos_embed": "position_embedding", "time_embed": "temporal_embedding"}
    braindecode = {}
    for key, value in state.items():
        key = renames.get(key, key)
        key = key.replace("patch_embed.", "patch_embed.temporal_conv.")
        key = key.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
        braindecode[key.replace("head.", "final_layer.")] = value
    torch.save(braindecode, tmp_path / "braindecode.pth")
    found, got = read_reference_checkpoint(tmp_path / "braindecode.pth")
    assert found.name == "labram_tiny" and got.keys() == state.keys()
    create_model(found.name, **found.kwargs).load_state_dict(got)  # strict
    # braindecode's cls-token pooling (its default) has no eegfast counterpart: said so
    del braindecode["fc_norm.weight"], braindecode["fc_norm.bias"]
    braindecode["norm.weight"], braindecode["norm.bias"] = torch.ones(100), torch.zeros(100)
    torch.save(braindecode, tmp_path / "cls-pooling.pth")
    with pytest.raises(CheckpointMismatchError, match="use_mean_pooling=False"):
        read_reference_checkpoint(tmp_path / "cls-pooling.pth")


def test_read_reference_checkpoint_loads_safely(tmp_path):
    path = tmp_path / "pickled.pth"
    state = create_model("labram_tiny").state_dict()
    torch.save({"model": state, "args": argparse.Namespace(model=_Unsafe())}, path)
    with pytest.raises(ValueError, match="refused to unpickle non-tensor objects"):
        read_reference_checkpoint(path)
    # the reference training scripts' own args (plain values) are read and ignored
    torch.save({"model": state, "args": argparse.Namespace(model="labram_tiny")}, path)
    found, got = read_reference_checkpoint(path)
    assert found.name == "labram_tiny" and got.keys() == state.keys()


class _Unsafe:
    """A class no checkpoint reader should construct."""
