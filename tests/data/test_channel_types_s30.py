"""Channel typing by name (``guess_channel_type``), MNE's renamed repeats of a name and the
BioSemi cap evidence of prefixed labels (``map_channels``)."""

import json

import numpy as np
import pytest

from eegfast.data.reading import guess_channel_type, map_channels
from eegfast.electrodes import LABRAM_CHANNEL_NAMES

# Sleep (PSG) signals that EDF files type EEG: they were left out as "unknown electrode" (and
# listed among the report's unknown electrodes) instead of with their type.
PSG_SIGNALS = [
    ("HEO", "eog"), ("VEO", "eog"), ("LEOG", "eog"), ("REOG", "eog"), ("E1-M2", "eog"),
    ("E2-M1", "eog"), ("EEG E1-M2", "eog"), ("E1-A2", "eog"), ("Pulse", "ecg"), ("HR", "ecg"),
    ("Snore", "resp"), ("Snoring", "resp"), ("Thor", "resp"), ("Effort THO", "resp"),
    ("Effort ABD", "resp"), ("Flow", "resp"), ("Thermistor", "resp"), ("PTAF", "resp"),
    ("Cannula", "resp"), ("CPAP", "resp"), ("OSAT", "resp"), ("Light", "misc"),
    ("Position", "misc"), ("Body", "misc"), ("Temp rectal", "misc"), ("Mic", "misc"),
    ("LLEG", "emg"), ("RLEG", "emg"), ("LAT1-LAT2", "emg"), ("RAT1-RAT2", "emg"),
    ("POL HR", "ecg"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "kind"), PSG_SIGNALS)
def test_sleep_montage_signals_are_typed_by_name(raw, kind):
    assert guess_channel_type(raw) == kind
    m = map_channels([raw, "Cz"])
    assert m.excluded[raw] == f"{kind} channel" and m.unknown == () and m.n_eeg == 1


def test_no_table_electrode_is_typed_non_eeg_in_any_usual_spelling():
    spellings = []
    for name in LABRAM_CHANNEL_NAMES:
        for base in {name, name.lower(), name.capitalize()}:
            for prefix in ("", "EEG ", "POL ", "EEG:", "EEG-"):
                for suffix in ("", "-REF", "-Ref", "-LE", "-AVG", ".", " - REF"):
                    spellings.append(prefix + base + suffix)
    assert [s for s in spellings if guess_channel_type(s) != "eeg"] == []
    # EGI nets' E1..E257 and E1/E2 not referenced to a mastoid or ear stay EEG
    assert {guess_channel_type(n) for n in ("E1", "E2", "EEG E1-REF", "E128", "E2-Cz")} == {"eeg"}


def test_report_lists_sleep_signals_by_type_not_as_unknown_electrodes(tmp_path):
    import mne

    from eegfast.data.prepare import SHARD_DIR, Settings, prepare

    names = ["Fp1", "Cz", "HEO", "Snore", "E1-M2"]
    x = np.random.default_rng(0).normal(size=(len(names), 200 * 12)) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(names, 200.0, "eeg"), verbose="error")
    path = tmp_path / "psg_raw.fif"
    raw.save(path, verbose="error")
    prepare([str(path)], tmp_path / "out", Settings(), progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["usable"] == 1 and report["excluded_unknown_channels"] == {}
    (record_path,) = (tmp_path / "out" / SHARD_DIR).glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["excluded"] == {"HEO": "eog channel", "Snore": "resp channel",
                                  "E1-M2": "eog channel"}  # fmt: skip


@pytest.mark.parametrize(
    "names",
    [
        ["Cz-1", "Cz-2", "Pz"],  # no Cz-0: MNE counts from 0
        ["Cz-0", "Cz-2", "Pz"],  # a gap
        ["Cz", "Cz-0", "Cz-1"],  # beside Cz: MNE renames every copy of a repeated name
        ["Cz-00", "Cz-01", "Pz"],  # MNE writes the index without leading zeros
    ],
)
def test_numbered_names_that_cannot_be_mne_renamed_repeats_keep_their_names(names):
    """'Cz-1' and 'Cz-2' were taken for MNE's renamed copies of 'Cz': the first was kept as
    electrode Cz, though MNE names the copies Cz-0, Cz-1, ..."""
    m = map_channels(names)
    numbered = [n for n in names if "-" in n]
    assert all("not in the LaBraM table" in m.excluded[n] for n in numbered)
    assert set(numbered) <= set(m.unknown)


def test_mne_renamed_repeats_still_map_to_their_name():
    m = map_channels(["Pz", "Cz-1", "Cz-0", "EEG T8-P8-REF-0", "EEG T8-P8-REF-1", "Cz-2"])
    # Cz-0..Cz-2 are one group (in any order); a genuine 'Cz-0'/'Cz-1' cannot be told apart
    assert m.names == ("PZ", "CZ", "T8-P8")
    assert m.picks == (0, 1, 3)
    assert m.excluded["Cz-0"] == "duplicate of 'Cz-1' (both are CZ)"


@pytest.mark.parametrize("spell", ["POL {}", "EEG {}-Ref", "EEG {}-REF", "{}-REF"])
def test_biosemi_cap_recognised_through_prefix_and_reference_suffix(spell):
    """'POL C17' or 'EEG C17-Ref' never counted as cap evidence: a cap's C1..C6 and A1/A2 were
    mapped to the 10-20 sites of those names, elsewhere on the head."""
    cap = [spell.format(f"{letter}{i}") for letter in "ABC" for i in range(1, 33)]
    m = map_channels(cap)
    assert m.names == ()
    assert all("BioSemi" in m.excluded[name] for name in cap)


def test_prefixed_ten_twenty_recording_is_no_cap():
    names = ["POL Fp1", "POL C3", "POL C4", "POL A1", "POL A2", "POL E", "POL DC01", "POL EKG1"]
    m = map_channels(names)
    assert m.names == ("FP1", "C3", "C4", "A1", "A2")
