import json
from pathlib import Path

import pytest

from eegfast.electrodes import (
    LABRAM_CHANNEL_NAMES,
    LABRAM_EXTENDED_TABLE_ROWS,
    LABRAM_TABLE_ROWS,
    is_labram_channel,
    labram_channel_index,
    labram_input_chans,
    normalize_channel_name,
    split_bipolar,
)

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "labram_state_dicts.json"


def test_table_matches_reference_list():
    if not SPEC.exists():
        pytest.skip(f"reference spec not available at {SPEC}")
    reference = json.loads(SPEC.read_text())["pos_embed_channel_names"]
    assert list(LABRAM_CHANNEL_NAMES) == [n.upper() for n in reference]


def test_table_shape():
    assert len(LABRAM_CHANNEL_NAMES) == 136
    assert len(set(LABRAM_CHANNEL_NAMES)) == 136
    assert LABRAM_TABLE_ROWS == 129
    assert LABRAM_EXTENDED_TABLE_ROWS == 137
    assert all(n == n.upper() for n in LABRAM_CHANNEL_NAMES)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Fp1", "FP1"),
        ("Fc5.", "FC5"),
        ("Cz..", "CZ"),
        ("T10.", "T10"),
        (" fpz ", "FPZ"),
        ("EEG Fp1", "FP1"),
        ("EEG FP1-REF", "FP1"),
        ("EEG Fp1-LE", "FP1"),
        ("EEG:Cz", "CZ"),
        ("EEG-O2", "O2"),
        ("EEG T3", "T7"),
        ("T4", "T8"),
        ("t5", "P7"),
        ("EEG T6-REF", "P8"),
        ("EEG A2-A1", "A2-A1"),
        ("Fp1-F7", "FP1-F7"),
        ("T3-T5", "T7-P7"),
        ("ftt9h", "FTT9H"),
        ("ECG ECG", "ECG ECG"),
        ("EOG-L", "EOG-L"),
    ],
)
def test_normalize(raw, expected):
    assert normalize_channel_name(raw) == expected


def test_normalize_keeps_old_names_on_request():
    assert normalize_channel_name("EEG T3-REF", modern_names=False) == "T3"
    # the table spells its pairs with 10-10 names only: an old-name pair has no row of its own
    assert normalize_channel_name("T3-T5", modern_names=False) == "T7-P7"


def test_normalize_is_idempotent_on_table_names():
    for name in LABRAM_CHANNEL_NAMES:
        once = normalize_channel_name(name)
        assert normalize_channel_name(once) == once


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="raw"):
        normalize_channel_name(3)


def test_split_bipolar():
    assert split_bipolar("Fp1-F7") == ("FP1", "F7")
    assert split_bipolar("A2-A1") == ("A2", "A1")
    assert split_bipolar("FP1-REF") is None
    assert split_bipolar("FP1") is None
    assert split_bipolar("A-B-C") is None


def test_input_chans_indices():
    names = ["Fp1", "EEG Cz-REF", "O2"]
    expected = [0] + [LABRAM_CHANNEL_NAMES.index(n) + 1 for n in ("FP1", "CZ", "O2")]
    assert labram_input_chans(names) == expected
    # T3 goes to the T7 row, not the old T3 row
    assert labram_input_chans(["T3"]) == [0, LABRAM_CHANNEL_NAMES.index("T7") + 1]
    assert labram_input_chans([]) == [0]


def test_input_chans_old_names_keep_old_rows():
    # what normalize_channel_name(..., modern_names=False) keeps (prepare --old-names) must get
    # the old rows, not be renamed to T7/T8/P7/P8 again
    old = [normalize_channel_name(n, modern_names=False) for n in ("EEG T3-REF", "T5", "Cz")]
    assert old == ["T3", "T5", "CZ"]
    rows = labram_input_chans(old, modern_names=False)
    assert rows == [0] + [LABRAM_CHANNEL_NAMES.index(n) + 1 for n in ("T3", "T5", "CZ")]
    assert labram_input_chans(["T3", "T7"], modern_names=False) == [0, 89, 38]


def test_input_chans_unknown_named():
    with pytest.raises(ValueError, match=r"unknown electrode names \['ECG ECG', 'EEG A2-A1'\]"):
        labram_input_chans(["Fp1", "ECG ECG", "EEG A2-A1"])


def test_input_chans_past_table():
    last_ok = LABRAM_CHANNEL_NAMES[127]
    assert labram_input_chans([last_ok]) == [0, 128]
    past = LABRAM_CHANNEL_NAMES[128]  # FP1-F3
    with pytest.raises(ValueError, match="past the 129-row"):
        labram_input_chans([past])
    assert labram_input_chans([past], allow_extended=True) == [0, 129]
    all_rows = labram_input_chans(LABRAM_CHANNEL_NAMES[:88], allow_extended=True)
    assert max(all_rows) < LABRAM_EXTENDED_TABLE_ROWS


def test_input_chans_duplicates():
    with pytest.raises(ValueError, match="twice"):
        labram_input_chans(["T3", "T7"])


def test_input_chans_rejects_str():
    with pytest.raises(TypeError, match="names"):
        labram_input_chans("FP1")


def test_usable_and_index():
    assert is_labram_channel("CZ")
    assert not is_labram_channel("P4-O2")
    assert is_labram_channel("P4-O2", allow_extended=True)
    assert not is_labram_channel("Cz")  # not normalised
    assert labram_channel_index("FP1") == 0
    with pytest.raises(ValueError, match="'XYZ'"):
        labram_channel_index("XYZ")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("EEG Fp1 - REF", "FP1"),  # blanks around the reference dash, as around a pair's dash
        ("Fp1- Ref", "FP1"),
        ("EEG T3 - LE", "T7"),
        ("Cz -  AVG", "CZ"),
        ("FP1 - F7", "FP1-F7"),
    ],
)
def test_normalize_reference_suffix_with_blanks(raw, expected):
    assert normalize_channel_name(raw) == expected


def test_normalize_reference_suffix_with_blanks_keeps_old_names():
    assert normalize_channel_name("EEG T3 - REF", modern_names=False) == "T3"
    assert labram_input_chans(["EEG Fp1 - REF"]) == [0, LABRAM_CHANNEL_NAMES.index("FP1") + 1]


def test_real_world_names_keep_distinct_rows():
    # names a prefix/suffix strip could confuse must each keep their own row
    raw = ["T10.", "T1", "FC1", "F1", "FT10", "T9..", "TP9", "M1", "A1", "Fp1.", "FPZ", "Iz.."]
    rows = labram_input_chans(raw)
    expected = ["T10", "T1", "FC1", "F1", "FT10", "T9", "TP9", "M1", "A1", "FP1", "FPZ", "IZ"]
    assert rows == [0] + [LABRAM_CHANNEL_NAMES.index(n) + 1 for n in expected]


@pytest.mark.parametrize("raw", ["E1", "E256", "VREF", "AFF1h", "CCP3h", "OI1h", "C3-M2", "F p1"])
def test_unmapped_names_reported_unknown(raw):
    with pytest.raises(ValueError, match="unknown electrode names"):
        labram_input_chans([raw])


def test_non_str_entries_name_the_argument():
    with pytest.raises(TypeError, match=r"names\[1\]"):
        labram_input_chans(["Fp1", None])
    with pytest.raises(TypeError, match="name"):
        split_bipolar(None)
