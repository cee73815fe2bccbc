"""LaBraM models: meta-device construction, signal arguments and config checks (audit)."""

import pytest
import torch

from eegfast.models import create_model, get_config, load_checkpoint

NAMES = ["Fp1", "Cz", "O2", "T7"]


def test_a_model_made_on_the_meta_device_keeps_its_electrode_rows():
    """``to_empty`` (the way out of the meta device for a large model) left the default
    electrode rows uninitialised, and ``load_state_dict`` does not restore them (they are not
    saved): every electrode took the same arbitrary pos_embed row, silently."""
    source = create_model("labram_tiny", num_classes=2, ch_names=NAMES).eval()
    with torch.no_grad():
        source.pos_embed.normal_()  # distinct electrode rows, so a wrong row shows
    expected_rows = torch.tensor(source.config.input_chans)
    x = torch.randn(2, len(NAMES), 2, 200)
    with torch.no_grad():
        expected = source(x)
    meta = create_model("labram_tiny", num_classes=2, ch_names=NAMES, device="meta")
    with torch.device("meta"):  # the default-device form (it failed in torch.linspace)
        meta_default = create_model("labram_tiny", num_classes=2, ch_names=NAMES)
    for model in (meta, meta_default):
        model = model.to_empty(device="cpu")
        assert torch.equal(model.default_input_chans, expected_rows)
        assert load_checkpoint(model, source.state_dict()).ok
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected)


def test_n_times_is_checked_against_the_models_own_number_of_patches():
    """``n_times`` was checked against the registered 16 patches even when ``max_patches``
    was given: a 20 s model (e.g. for braindecode weights with a 21-row temporal embedding)
    could not be built with its n_times, and a 1-patch model took n_times=400."""
    assert get_config("labram_tiny", n_times=4000, max_patches=21).max_patches == 21
    pretrain = get_config("labram_tiny_pretrain", n_times=4000, max_patches=21)
    assert pretrain.backbone.max_patches == 21
    with pytest.raises(ValueError, match="n_times must be a multiple of 200 up to 200"):
        get_config("labram_tiny", n_times=400, max_patches=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_times": "800"}, "n_times must be a positive int, got '800'"),
        ({"n_times": 800.5}, "n_times must be a positive int"),
        ({"n_chans": 0}, "n_chans must be a positive int, got 0"),
        ({"n_chans": -3}, "n_chans must be a positive int, got -3"),
        ({"sfreq": "200 Hz"}, "sfreq must be a number"),
        ({"chs_info": [{"name": "Fp1"}]}, r"chs_info\[0\] must be a dict with a 'ch_name' key"),
    ],
)
def test_bad_signal_arguments_are_refused_by_name(kwargs, message):
    """These gave "not all arguments converted during string formatting", "could not
    convert string to float", KeyError 'ch_name', or were accepted (a negative n_chans)."""
    with pytest.raises(ValueError, match=message):
        get_config("labram_tiny", **kwargs)


def test_integral_signal_arguments_of_other_types_are_accepted():
    import numpy as np

    config = get_config("labram_tiny", n_times=800.0, n_chans=np.int64(2), ch_names=NAMES[:2])
    assert config.input_chans == (0, 1, 42)


@pytest.mark.parametrize("field_name", ["num_heads", "max_patches", "pos_rows", "embed_dim"])
def test_config_sizes_must_be_positive_ints(field_name):
    """num_heads=0 was a ZeroDivisionError; max_patches=0 or pos_rows=0 built a model that
    no input can run."""
    with pytest.raises(ValueError, match=f"{field_name} must be an int >= 1, got 0"):
        get_config("labram_tiny", **{field_name: 0})
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        get_config("labram_tiny", depth=-1)


def test_input_chans_of_any_integer_sequence_become_a_tuple():
    """A tensor failed with "Boolean value of Tensor ... is ambiguous" and a list made the
    frozen config unhashable."""
    import numpy as np

    for given in ([0, 1, 42], torch.tensor([0, 1, 42]), np.array([0, 1, 42])):
        config = get_config("labram_tiny", input_chans=given)
        assert config.input_chans == (0, 1, 42) and isinstance(config.input_chans[1], int)
        hash(config)
    for bad in ((0, 1.5), "012"):
        with pytest.raises(ValueError, match="input_chans must be a sequence of int rows"):
            get_config("labram_tiny", input_chans=bad)


def test_non_integer_input_chans_are_refused_in_forward():
    """A float row tensor was truncated (1.7 -> row 1) and a bool one read as rows 0/1."""
    model = create_model("labram_tiny", num_classes=2).eval()
    x = torch.randn(1, 2, 1, 200)
    for bad in (torch.tensor([0.0, 1.7, 2.0]), torch.tensor([False, True, True]), [0, 1.7, 2]):
        with pytest.raises(ValueError, match="input_chans must hold integer rows"):
            model(x, bad)
    assert model(x, torch.tensor([0, 1, 2], dtype=torch.int32)).shape == (1, 2)
