"""Electrode names of real montages: old-name bipolar pairs with ``modern_names=False`` and
Nihon Kohden's ``POL`` prefix (``normalize_channel_name``, ``labram_input_chans``,
``map_channels``)."""

import pytest

from eegfast.data.reading import map_channels
from eegfast.electrodes import LABRAM_CHANNEL_NAMES, labram_input_chans, normalize_channel_name


def _row(name: str) -> int:
    return LABRAM_CHANNEL_NAMES.index(name) + 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("T3-T5", "T7-P7"),
        ("EEG T4-T6", "T8-P8"),
        ("F7-T3", "F7-T7"),  # one side old, one side 10-10
        ("T5-O1", "P7-O1"),
        ("T6-O2", "P8-O2"),
        ("EEG F8-T4-REF", "F8-T8"),
    ],
)
def test_old_name_bipolar_pairs_take_the_table_row_with_old_names(raw, expected):
    """With ``modern_names=False`` (prepare --old-names) the TUH / CHB-MIT style pair 'T3-T5'
    stayed 'T3-T5', a name of no row, and was left out as unknown; with modern names it was
    the table's 'T7-P7'. The table has no old-name pair to keep: both give the same row."""
    assert normalize_channel_name(raw, modern_names=False) == expected
    assert normalize_channel_name(raw, modern_names=True) == expected
    assert labram_input_chans([raw], modern_names=False) == [0, _row(expected)]


def test_old_names_still_keep_single_electrodes_and_pairs_outside_the_table():
    assert normalize_channel_name("T3", modern_names=False) == "T3"
    assert normalize_channel_name("T3-T4", modern_names=False) == "T3-T4"  # no row either way
    # a pair and its old spelling are one derivation: asked for twice
    with pytest.raises(ValueError, match="same electrode appears twice"):
        labram_input_chans(["T3-T5", "T7-P7"], modern_names=False)


def test_map_channels_keeps_old_name_pairs_with_old_names():
    m = map_channels(["FP1-F7", "F7-T3", "T3-T5", "T5-O1", "T3"], modern_names=False)
    assert m.names == ("FP1-F7", "F7-T7", "T7-P7", "P7-O1", "T3")
    assert m.unknown == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("POL Fp1-Ref", "FP1"),
        ("POL T3", "T7"),
        ("POL Cz", "CZ"),
        ("POL:O2", "O2"),
        ("POL A1-Ref", "A1"),
        ("POLE", "POLE"),  # no separator: not a prefix
    ],
)
def test_nihon_kohden_pol_prefix(raw, expected):
    """EDF files exported from Nihon Kohden systems name channels 'POL Fp1-Ref' (the polygraph
    inputs, beside 'EEG Fp1-Ref'): the scalp electrodes were all left out as unknown."""
    assert normalize_channel_name(raw) == expected


def test_nihon_kohden_pol_channels_mapped_and_non_eeg_typed():
    names = ["POL Fp1-Ref", "POL F3-Ref", "POL EKG1", "POL DC01", "POL E", "EEG C3-Ref"]
    m = map_channels(names)
    assert m.names == ("FP1", "F3", "C3")
    assert m.excluded["POL EKG1"] == "ecg channel"
    assert m.excluded["POL DC01"] == "stim channel"  # a DC input, typed by its name
    assert m.unknown == ("POL E",)
