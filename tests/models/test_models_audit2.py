"""Second audit of the LaBraM models and the masked-pretraining model."""

import pytest
import torch

from eegfast.models import create_model


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, "0.1", True])
def test_drop_path_rate_outside_0_1_is_refused_by_name(rate):
    """drop_path_rate=1 gave NaN logits in training (the last block's keep scale 0 / 0), 1.5
    a RuntimeError from bernoulli_ only in forward, -0.1 silently no stochastic depth."""
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("labram_tiny", num_classes=2, drop_path_rate=rate)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("labram_tiny_pretrain", drop_path_rate=rate)


def test_drop_path_rate_just_below_1_trains_to_finite_logits():
    model = create_model("labram_tiny", num_classes=2, drop_path_rate=0.99).train()
    assert torch.isfinite(model(torch.randn(2, 3, 2, 200), torch.arange(4))).all()


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        (dict(vocab_size=256.0), "vocab_size"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(mask_ratio="0.5"), "mask_ratio"),
        (dict(mask_ratio=None), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(backbone={"depth": 1}), "backbone"),
    ],
)
def test_bad_pretraining_config_values_are_refused_by_name(kwargs, field_name):
    """A float vocab_size failed deep in nn.Linear ("empty(): argument 'size' ..."), a string
    mask_ratio with "'<' not supported", a dict backbone with "'dict' object has no attribute
    'pos_rows'": none named the field."""
    with pytest.raises(ValueError, match=field_name):
        create_model("labram_tiny_pretrain", **kwargs)


def test_a_dict_encoder_of_the_tokenizer_is_refused_by_name():
    with pytest.raises(ValueError, match="encoder must be a LaBraMConfig"):
        create_model("vqnsp_tiny", encoder={"depth": 1})


def test_x_with_other_electrodes_than_the_default_list_names_both_counts():
    """The message was "input_chans must have shape (C + 1,) ... got shape (5,)", naming an
    argument the caller never passed."""
    model = create_model("labram_tiny", n_outputs=2, ch_names=["Fp1", "Fp2", "Cz", "Pz"])
    with pytest.raises(ValueError, match="x has 3 electrodes but the model's default electrode"):
        model(torch.randn(1, 3, 2, 200))
    assert model(torch.randn(1, 3, 2, 200), [0, 1, 3, 42]).shape == (1, 2)  # given: fine
    assert model(torch.randn(1, 4, 2, 200)).shape == (1, 2)
