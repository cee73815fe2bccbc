import mne
import pytest

from eegfast.data.reading import (
    BadRecording,
    check_edf_size,
    guess_channel_type,
    map_channels,
    read_recording,
)
from eegfast.electrodes import labram_input_chans

EEGMAT_NAMES = [
    "EEG Fp1", "EEG Fp2", "EEG F3", "EEG F4", "EEG F7", "EEG F8", "EEG T3", "EEG T4", "EEG C3",
    "EEG C4", "EEG T5", "EEG T6", "EEG P3", "EEG P4", "EEG O1", "EEG O2", "EEG Fz", "EEG Cz",
    "EEG Pz", "EEG A2-A1", "ECG ECG",
]  # fmt: skip


def test_eegmat_channels_typed_and_reported(sample_files):
    raw = mne.io.read_raw(sample_files["Subject00_1.edf"], verbose="error")
    assert raw.ch_names == EEGMAT_NAMES
    assert set(raw.get_channel_types()) == {"eeg"}  # MNE types ECG as EEG here
    m = map_channels(raw.ch_names, raw.get_channel_types())
    assert len(m.picks) == 19
    assert m.excluded["ECG ECG"] == "ecg channel"
    assert m.unknown == ("EEG A2-A1",)
    assert "A2-A1" in m.excluded["EEG A2-A1"]
    assert m.names[6:8] == ("T7", "T8") and m.names[10:12] == ("P7", "P8")
    labram_input_chans(m.names)  # all usable


def test_eegmmidb_channels_all_mapped(sample_files):
    raw = mne.io.read_raw(sample_files["S001R04.edf"], verbose="error")
    m = map_channels(raw.ch_names, raw.get_channel_types())
    assert len(m.picks) == 64 and not m.excluded
    assert m.names[:3] == ("FC5", "FC3", "FC1")


def test_map_channels_rules():
    names = ["Fp1", "EOG left", "EMG chin", "EKG", "X1", "T3", "T7", "P4-O2", "Fp1-F7", "STI 014"]
    m = map_channels(names, ["eeg"] * 9 + ["stim"])
    assert m.names == ("FP1", "T7", "FP1-F7")
    assert m.excluded["EOG left"] == "eog channel"
    assert m.excluded["EMG chin"] == "emg channel"
    assert m.excluded["EKG"] == "ecg channel"
    assert m.excluded["STI 014"] == "stim channel"
    assert "unknown electrode" in m.excluded["X1"]
    assert "duplicate of 'T3'" in m.excluded["T7"]
    assert "past the 129-row" in m.excluded["P4-O2"]
    assert set(m.unknown) == {"X1", "P4-O2"}
    ext = map_channels(["P4-O2"], allow_extended=True)
    assert ext.names == ("P4-O2",)


def test_map_channels_requested_order():
    m = map_channels(["Fp1", "Cz", "O1"], channels=["o1", "FP1"])
    assert m.names == ("O1", "FP1") and m.picks == (2, 0)
    assert m.excluded["Cz"] == "not in --channels"
    with pytest.raises(BadRecording, match=r"missing requested electrodes \['PZ'\]"):
        map_channels(["Fp1"], channels=["Pz"])


def test_guess_type_keeps_mne_type():
    assert guess_channel_type("Fp1", "misc") == "misc"
    assert guess_channel_type("Fp1") == "eeg"
    assert guess_channel_type("ECG ECG") == "ecg"


def test_montage_style_non_eeg_names_are_typed():
    """TUH-style names wrap the signal in 'EEG ...-REF': they are typed by what is inside, not
    reported as unknown electrodes; real electrodes in that style stay EEG."""
    names = ["EEG FP1-REF", "EEG EKG1-REF", "EEG ROC-REF", "EEG LOC-REF", "EEG PHOTIC-REF"]
    m = map_channels(names)
    assert m.names == ("FP1",) and m.unknown == ()
    assert m.excluded == {
        "EEG EKG1-REF": "ecg channel",
        "EEG ROC-REF": "eog channel",
        "EEG LOC-REF": "eog channel",
        "EEG PHOTIC-REF": "stim channel",
    }


def test_edf_size_checks(sample_files, tmp_path):
    good = sample_files["S001R04.edf"]
    check_edf_size(good)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.edf"
    truncated.write_bytes(data[: len(data) - 30000])
    with pytest.raises(BadRecording, match="truncated EDF: .* announces 125 records"):
        check_edf_size(truncated)
    header_only = tmp_path / "header.edf"
    header_only.write_bytes(data[:1000])
    with pytest.raises(BadRecording, match="truncated EDF"):
        check_edf_size(header_only)
    garbage = tmp_path / "garbage.edf"
    garbage.write_bytes(b"x" * 5000)
    with pytest.raises(BadRecording, match="corrupt EDF header"):
        check_edf_size(garbage)
    tiny = tmp_path / "tiny.edf"
    tiny.write_bytes(b"0" * 10)
    with pytest.raises(BadRecording, match="shorter than the 256-byte header"):
        check_edf_size(tiny)


def test_read_recording_errors(tmp_path):
    with pytest.raises(BadRecording, match="file not found"):
        read_recording(tmp_path / "missing.edf")
    empty = tmp_path / "empty.edf"
    empty.write_bytes(b"")
    with pytest.raises(BadRecording, match="empty file"):
        read_recording(empty)
    junk = tmp_path / "junk.fif"
    junk.write_bytes(b"not a fif file" * 100)
    with pytest.raises(BadRecording, match="unreadable"):
        read_recording(junk)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(BadRecording) as info:
        read_recording(notes)
    reason = str(info.value)
    assert reason.startswith("unreadable: ") and not reason.endswith(":")
    assert ".txt: not a recording format MNE reads" in reason and ".edf" in reason
    with pytest.raises(BadRecording) as info:  # a known extension gets no such note
        read_recording(junk)
    assert "not a recording format" not in str(info.value)


def test_biosemi_letter_number_caps_are_not_read_as_10_20_sites():
    """BioSemi's 128-channel cap (A1..D32) put A1, A2, C1..C6 on the earlobe and 10-20 rows,
    sites elsewhere on the head; a recording whose names are that layout now has none of its
    letter-number names mapped. A 10-20 recording with A1/A2/C3 keeps them."""
    cap = [f"{letter}{i}" for letter in "ABCD" for i in range(1, 33)]
    m = map_channels([*cap, "EXG1"])
    assert m.names == ()
    assert "BioSemi-style cap position" in m.excluded["C3"] and "C3" in m.unknown
    ten_twenty = map_channels(["Fp1", "C3", "C4", "F1", "A1", "A2", "Cz", "O1"])
    assert ten_twenty.names == ("FP1", "C3", "C4", "F1", "A1", "A2", "CZ", "O1")
