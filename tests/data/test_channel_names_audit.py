"""Channel names of real public datasets -> LaBraM electrode rows (``map_channels``,
``normalize_channel_name``): every convention either lands on the row of its scalp site or is
left out with a reason the report shows, never mapped to a nearby name."""

from pathlib import Path

import numpy as np
import pytest

from eegfast.data.reading import BadRecording, map_channels, read_recording
from eegfast.electrodes import LABRAM_CHANNEL_NAMES, labram_input_chans, normalize_channel_name

# An AASM sleep montage as PSG software exports it (Compumedics Profusion, ...): E1/E2 are the
# two EOG electrodes, M1/M2 the mastoids.
PSG = ["F3", "F4", "C3", "C4", "O1", "O2", "M1", "M2", "E1", "E2", "Chin1-Chin2", "ECG", "A1"]

# CHB-MIT (chb01_03.edf): the file holds T8-P8 twice, which MNE renames T8-P8-0 / T8-P8-1.
CHB_MIT = [
    "FP1-F7", "F7-T7", "T7-P7", "P7-O1", "FP1-F3", "F3-C3", "C3-P3", "P3-O1", "FP2-F4", "F4-C4",
    "C4-P4", "P4-O2", "FP2-F8", "F8-T8", "T8-P8-0", "P8-O2", "FZ-CZ", "CZ-PZ", "P7-T7", "T7-FT9",
    "FT9-FT10", "FT10-T8", "T8-P8-1",
]  # fmt: skip


def _edf(path: Path, labels: list[bytes], seconds: int = 2, sfreq: int = 100) -> Path:
    """A plain EDF file whose 16-byte labels are written as given (``labels`` padded with NULs
    to 16 bytes, as some writers do, instead of blanks); random µV-scale data."""
    ns = len(labels)

    def field(value, width: int) -> bytes:
        return str(value).encode("ascii").ljust(width)

    header = [
        field(0, 8), field("X X X X", 80), field("Startdate 01-JAN-2020 X X X", 80),
        field("01.01.20", 8), field("00.00.00", 8), field(256 * (ns + 1), 8), field("", 44),
        field(seconds, 8), field(1, 8), field(ns, 4),
        *(label.ljust(16, b"\x00") for label in labels),
        *[field("", 80)] * ns, *[field("uV", 8)] * ns, *[field(-3276.8, 8)] * ns,
        *[field(3276.7, 8)] * ns, *[field(-32768, 8)] * ns, *[field(32767, 8)] * ns,
        *[field("", 80)] * ns, *[field(sfreq, 8)] * ns, *[field("", 32)] * ns,
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((seconds, ns, sfreq)) * 200).astype("<i2")
    path.write_bytes(b"".join(header) + data.tobytes())
    return path


def test_psg_eog_e1_e2_do_not_make_10_20_sites_cap_positions():
    """E1 and E2 (the AASM EOG names) were taken for BioSemi letter-number cap positions, and
    then F3, F4, C3, C4 and A1 of the sleep recording were left out as cap positions too."""
    m = map_channels(PSG)
    assert m.names == ("F3", "F4", "C3", "C4", "O1", "O2", "M1", "M2", "A1")
    assert "not in the LaBraM table" in m.excluded["E1"] and "E2" in m.unknown
    assert not any("BioSemi" in reason for reason in m.excluded.values())


@pytest.mark.parametrize("letters", ["A", "AB", "ABCD", "ABCDEFGH"])
def test_biosemi_caps_are_still_recognised(letters):
    cap = [f"{letter}{i}" for letter in letters for i in range(1, 33)]
    m = map_channels([*cap, "EXG1", "Status"], ["eeg"] * (len(cap) + 1) + ["stim"])
    assert m.names == ()
    assert all("BioSemi" in m.excluded[name] for name in cap)


def test_mne_running_numbers_of_a_repeated_name_map_to_that_name():
    """CHB-MIT's second T8-P8 (MNE: 'T8-P8-0', 'T8-P8-1') lost the derivation altogether: both
    were 'unknown electrodes', though T8-P8 has row 127 of the 129-row table."""
    m = map_channels(CHB_MIT)
    kept = ("FP1-F7", "F7-T7", "T7-P7", "P7-O1", "FP2-F8", "F8-T8", "T8-P8", "P8-O2")
    assert m.names == kept
    assert m.picks[m.names.index("T8-P8")] == CHB_MIT.index("T8-P8-0")
    assert m.excluded["T8-P8-1"] == "duplicate of 'T8-P8-0' (both are T8-P8)"
    assert "T8-P8-1" not in m.unknown
    # the reversed pair is another signal (sign), the extended pairs stay past the table
    assert "P7-T7" in m.unknown and "past the 129-row" in m.excluded["FP1-F3"]
    assert labram_input_chans(m.names)[1:] == [LABRAM_CHANNEL_NAMES.index(n) + 1 for n in m.names]


def test_running_numbers_of_names_not_in_the_table_stay_unknown():
    # BCI IV 2a's own labels EEG-0, EEG-1 ... are no renamed 'EEG' (not an electrode anyway)
    m = map_channels(["EEG-Fz", "EEG-0", "EEG-1", "EEG-C3", "EOG-left", "--0", "--1"])
    assert m.names == ("FZ", "C3")
    assert m.excluded["EEG-0"] == "unknown electrode ('EEG-0' is not in the LaBraM table)"
    assert m.excluded["EOG-left"] == "eog channel"
    assert set(m.unknown) == {"EEG-0", "EEG-1", "--0", "--1"}


def test_edf_labels_padded_with_nuls_and_repeated(tmp_path):
    """Read through MNE: NUL-padded labels came back as 'Fp1\\x00\\x00...', and a recording of
    such labels was refused as 'only unknown electrodes'."""
    path = _edf(tmp_path / "nul.edf", [b"Fp1", b"EEG Cz", b"T8-P8", b"T8-P8", b"A3", b"B1"])
    raw = read_recording(path)
    assert raw.ch_names[0].startswith("Fp1\x00")  # what MNE's reader gives
    m = map_channels(raw.ch_names, raw.get_channel_types())
    assert m.names == ("FP1", "CZ", "T8-P8")
    assert m.picks == (0, 1, 2)
    assert "duplicate" in m.excluded[raw.ch_names[3]]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Fp1\x00\x00\x00", "FP1"),
        ("EEG T3-REF\x00\x00", "T7"),
        ("Cz\x00junk", "CZ"),  # a C string: the name ends at its NUL
        ("\uff26\uff50\uff11", "FP1"),  # full-width 'Fp1'
        ("EEG\u00a0Fp1", "FP1"),  # no-break space
    ],
)
def test_normalize_padding_and_unicode_forms(raw, expected):
    assert normalize_channel_name(raw) == expected


def test_biosemi_cap_with_nul_padded_labels_still_recognised():
    cap = [f"{letter}{i}\x00\x00" for letter in "AB" for i in range(1, 33)]
    m = map_channels(cap)
    assert m.names == () and "BioSemi" in m.excluded["A1\x00\x00"]


def test_requested_channels_twice_is_an_error_naming_channels():
    """T3 and T7 are one electrode: the channel was picked twice (two rows of T7)."""
    with pytest.raises(ValueError, match=r"channels: .*twice.*'T7'"):
        map_channels(["Fp1", "T7"], channels=["T3", "T7"])


def test_requested_channel_left_out_says_why():
    """A channel the recording has, but typed EOG by its reader (BIDS channels.tsv), was only
    'missing requested electrodes'."""
    with pytest.raises(BadRecording, match=r"missing requested electrodes \['FP1'\].*'Fp1': eog"):
        map_channels(["Fp1", "Cz"], ["eog", "eeg"], channels=["Fp1", "Cz"])
    with pytest.raises(BadRecording, match=r"missing requested electrodes \['PZ'\]$"):
        map_channels(["Fp1", "Cz"], channels=["Pz"])


@pytest.mark.parametrize(
    ("names", "kept"),
    [
        # TUH (AR and LE montages): references stripped, old names on the 10-10 rows
        (
            ["EEG FP1-REF", "EEG T3-REF", "EEG T1-REF", "EEG A1-REF", "EEG EKG1-REF",
             "EEG ROC-REF", "PHOTIC-REF", "IBI", "BURSTS", "EEG 26-REF"],
            ("FP1", "T7", "T1", "A1"),
        ),
        (["EEG FP1-LE", "EEG T5-LE", "EEG OZ-LE"], ("FP1", "P7", "OZ")),
        # Sleep-EDF: Fpz-Cz and Pz-Oz are derivations of no table row
        (
            ["EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal", "EMG submental",
             "Event marker"],
            (),
        ),
        # eegmmidb dots, BrainVision case
        (
            ["Fc5.", "Fcz.", "Af3.", "T9..", "T10.", "Iz.."],
            ("FC5", "FCZ", "AF3", "T9", "T10", "IZ"),
        ),
        (["Fp1", "FP1", "fp1"], ("FP1",)),
        # mastoid/ear references are not electrodes of the pair's first name
        (["EEG C3-A2", "C4-M1", "O1-Cz", "EEG A2-A1", "Cz"], ("CZ",)),
        # EGI nets
        (["E1", "E2", "E3", "E128", "VREF", "Cz"], ("CZ",)),
    ],
)  # fmt: skip
def test_dataset_conventions(names, kept):
    m = map_channels(names)
    assert m.names == kept
    assert set(m.excluded) == set(names) - {names[i] for i in m.picks}


def test_the_report_lists_channels_left_out_as_a_second_channel_of_one_electrode(tmp_path):
    """T3 and T7 are one electrode: the second is left out, and report.json / report.md say so
    (only each recording's record did, so one of two different signals was lost unseen)."""
    import json

    import mne

    from eegfast.data.prepare import Settings, prepare

    x = np.random.default_rng(0).normal(size=(4, 200 * 12)) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(["Fp1", "T3", "T7", "Cz"], 200.0, "eeg"),
                          verbose="error")  # fmt: skip
    path = tmp_path / "both_raw.fif"
    raw.save(path, verbose="error")
    prepare([str(path)], tmp_path / "out", Settings(), progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["excluded_duplicate_channels"] == {"T7: duplicate of 'T3' (both are T7)": 1}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "second channel of one electrode" in text and "`T7: duplicate of 'T3'" in text
