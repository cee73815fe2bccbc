"""`eegfast prepare` labels recordings whose events are only in a stim channel (FIF's STI 014,
an EDF's Status/TRIG, BDF's Status) from those events, and reads an EDF header once.

The recordings are real files written with MNE (FIF, and EDF through ``mne.export``)."""

import json
from pathlib import Path

import mne
import numpy as np
import pytest

from eegfast.cli import main as cli_main
from eegfast.data import reading
from eegfast.data.labels import LabelRules
from eegfast.data.prepare import PROCESSING_REVISION, Settings, _stim_channel_events, prepare
from eegfast.data.reading import read_recording

SFREQ = 200.0
# trigger codes at these samples (one-sample, two-sample and ten-sample pulses)
PULSES = ((1000, 1, 1), (3000, 2, 2), (5000, 10, 1))


def _raw(stim_name: str = "STI 014", seconds: float = 40.0) -> mne.io.RawArray:
    """Three scalp electrodes (~10 µV noise) and a stim channel holding ``PULSES``."""
    n = int(seconds * SFREQ)
    data = np.vstack([np.random.default_rng(0).normal(0, 1e-5, (3, n)), np.zeros((1, n))])
    for sample, length, code in PULSES:
        data[3, sample : sample + length] = code
    info = mne.create_info(["Fz", "Cz", "Pz", stim_name], SFREQ, ["eeg"] * 3 + ["stim"])
    return mne.io.RawArray(data, info, verbose="error")


def _edf(path: Path, stim_name: str = "STI 014") -> Path:
    mne.export.export_raw(path, _raw(stim_name), verbose="error")
    return path


def _fif(path: Path, annotations=None, crop: float = 0.0) -> Path:
    raw = _raw()
    if annotations is not None:
        raw.set_annotations(annotations)
    if crop:
        raw.crop(tmin=crop)  # a FIF whose first sample is not sample 0
    raw.save(path, verbose="error")
    return path


def _record(out: Path) -> dict:
    (path,) = (out / "shards").glob("*.json")
    return json.loads(path.read_text())


def _prepare(out: Path, *argv: str) -> int:
    return cli_main(["prepare", *argv, "--out", str(out), "--workers", "1", "--no-progress"])


@pytest.mark.parametrize("stim_name", ["STI 014", "Status", "TRIG"])
def test_stim_channel_events_of_an_edf_label_windows(tmp_path, stim_name):
    """MNE reads an EDF's ``STI 014`` and ``TRIG`` as EEG (``Status`` as stim): the events are
    read from each, named by their codes, and --event-map selects and renames them."""
    path = _edf(tmp_path / "rec.edf", stim_name)
    argv = [str(path), "--event-duration", "4", "--event-map", "1=left", "--event-map", "2=right"]
    assert _prepare(tmp_path / "out", *argv) == 0
    record = _record(tmp_path / "out")
    assert record["label_source"] == "stim channel"
    assert record["stim_channel"] == stim_name and record["stim_channel_events"] == 3
    assert record["starts"] == [1000, 3000, 5000]  # 5 s, 15 s, 25 s at 200 Hz
    assert record["label_names"] == ["left", "right", "left"]
    assert record["electrodes"] == ["FZ", "CZ", "PZ"]  # the stim channel is no EEG channel
    assert record["excluded"] == {stim_name: "stim channel"}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["tasks"][index["recordings"][0]["task"]]["labels"] == ["left", "right"]


def test_stim_events_onsets_count_from_the_first_sample_of_a_cropped_fif(tmp_path):
    path = _fif(tmp_path / "rec_raw.fif", crop=2.0)
    assert mne.io.read_raw_fif(path, verbose="error").first_samp == 400
    settings = Settings(labels=LabelRules(event_duration=4.0))
    report = prepare([str(path)], tmp_path / "out", settings, progress=False)
    record = _record(tmp_path / "out")
    assert record["starts"] == [600, 2600, 4600]
    assert record["label_names"] == ["1", "2", "1"]
    assert report["labels"] == {record["task"]: {"1": 2, "2": 1}}


def test_annotations_come_before_the_stim_channel(tmp_path):
    annotated = mne.Annotations([20.0], [8.0], ["rest"])
    path = _fif(tmp_path / "annotated_raw.fif", annotations=annotated)
    settings = Settings(labels=LabelRules(event_duration=4.0))
    prepare([str(path)], tmp_path / "out", settings, progress=False)
    record = _record(tmp_path / "out")
    assert record["label_source"] == "annotations" and set(record["label_names"]) == {"rest"}
    assert "stim_channel" not in record  # not even read
    # annotations that label nothing (a BAD mark) leave the stim channel's events to label
    bad = mne.Annotations([36.0], [1.0], ["BAD_blink"])
    path = _fif(tmp_path / "bad_raw.fif", annotations=bad)
    prepare([str(path)], tmp_path / "out2", settings, progress=False)
    assert _record(tmp_path / "out2")["label_names"] == ["1", "2", "1"]


def test_stim_channel_option_none_a_name_and_a_missing_name(tmp_path, capsys):
    path = str(_fif(tmp_path / "rec_raw.fif"))
    assert _prepare(tmp_path / "none", path, "--event-duration", "4", "--stim-channel", "none") == 0
    record = _record(tmp_path / "none")
    assert record["label_source"] == "none" and set(record["label_names"]) == {""}
    # named (case aside)
    argv = [path, "--event-duration", "4", "--stim-channel", "sti 014"]
    assert _prepare(tmp_path / "named", *argv) == 0
    assert _record(tmp_path / "named")["label_names"] == ["1", "2", "1"]
    # a name the recording lacks: the recording is bad, and the reason names the option
    assert _prepare(tmp_path / "missing", path, "--stim-channel", "TRIGGER") == 1
    assert "bad: " in (err := capsys.readouterr().err)
    assert "--stim-channel 'TRIGGER': no such channel" in err
    # --no-annotations ignores the stim channel's events too
    argv = [path, "--event-duration", "4", "--no-annotations"]
    assert _prepare(tmp_path / "plain", *argv) == 0
    assert _record(tmp_path / "plain")["label_source"] == "none"


def test_a_named_stim_channel_is_no_eeg_channel(tmp_path):
    """A channel the user names (``DIN``, which no pattern knows) is read for events and left
    out of the windows, not kept as an unknown electrode."""
    raw = _raw("DIN")
    info = mne.create_info(raw.ch_names, SFREQ, "eeg")  # an EDF types every signal EEG
    raw = mne.io.RawArray(raw.get_data(), info, verbose="error")
    path = tmp_path / "din_raw.fif"
    raw.save(path, verbose="error")
    rules = LabelRules(event_duration=4.0, stim_channel="DIN")
    report = prepare([str(path)], tmp_path / "out", Settings(labels=rules), progress=False)
    record = _record(tmp_path / "out")
    assert record["label_names"] == ["1", "2", "1"]
    assert record["excluded"] == {"DIN": "stim channel"} and record["unknown"] == []
    assert report["excluded_unknown_channels"] == {}


def test_stim_onset_markers_without_event_duration_are_warned_about(tmp_path, capsys):
    assert _prepare(tmp_path / "out", str(_fif(tmp_path / "rec_raw.fif"))) == 0
    err = capsys.readouterr().err
    assert "3 annotation(s) of zero duration (onset markers) in 1 recording(s)" in err
    assert "1 (2), 2 (1) (among them the events of stim channel STI 014)" in err
    assert "--event-duration" in err


def test_stim_codes_are_rounded_before_find_events(tmp_path):
    """A trigger channel read back with scaling reads 0.99998 for 1: MNE's find_events
    truncates it to 0, no event."""
    raw = _raw("STI 014")
    data = raw.get_data()
    data[3] *= 0.99998
    raw = mne.io.RawArray(data, raw.info, verbose="error")
    events = _stim_channel_events(raw, "STI 014")
    assert events == [(5.0, 0.0, "1"), (15.0, 0.0, "2"), (25.0, 0.0, "1")]


def test_a_stim_channel_with_a_misspelled_unit_keeps_its_codes(tmp_path):
    """MNE reads an EDF's Status channel as its stored integers whatever its unit; the unit
    correction scaled one written ``UV`` by 1e-6, and its trigger codes were lost."""
    path = _edf(tmp_path / "rec.edf", "Status")
    head = bytearray(path.read_bytes())
    ns = int(head[252:256])
    at = 256 + 96 * ns + 8 * 3  # the fourth signal's physical dimension
    head[at : at + 8] = b"UV      "
    path.write_bytes(bytes(head))
    raw = read_recording(path)
    assert raw.get_channel_types()[3] == "stim"
    codes = raw.get_data(picks=["Status"])[0]
    assert sorted(set(codes.tolist())) == [0.0, 1.0, 2.0]


def test_an_edf_header_is_read_once(tmp_path, monkeypatch):
    """The size check, the EDF+D check and the unit check each opened the file and read its
    header again: three reads of every EDF, besides MNE's own."""
    path = _edf(tmp_path / "rec.edf")
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(reading, "open", counting_open, raising=False)
    raw = read_recording(path)
    assert opened == [path]
    assert raw.ch_names == ["Fz", "Cz", "Pz", "STI 014"]


def test_outputs_of_the_previous_revision_are_prepared_again(tmp_path):
    path = _fif(tmp_path / "rec_raw.fif")
    settings = Settings(labels=LabelRules(event_duration=4.0))
    prepare([str(path)], tmp_path / "out", settings, progress=False)
    (record_path,) = (tmp_path / "out" / "shards").glob("*.json")
    record = json.loads(record_path.read_text())
    record["revision"] = PROCESSING_REVISION - 1
    record_path.write_text(json.dumps(record))
    report = prepare([str(path)], tmp_path / "out", settings, progress=False)
    assert report["outdated"] == 1 and report["reused"] == 0
    assert _record(tmp_path / "out")["label_source"] == "stim channel"


def test_stim_channel_setting_is_checked_and_default_keeps_the_digest():
    with pytest.raises(ValueError, match="stim_channel"):
        LabelRules(stim_channel="  ")
    assert Settings().digest() == Settings(labels=LabelRules(stim_channel="auto")).digest()
    assert Settings().digest() != Settings(labels=LabelRules(stim_channel=None)).digest()


def test_only_the_trigger_bits_of_a_biosemi_status_channel_are_codes(tmp_path):
    """BioSemi's Status channel keeps system bits above its 16 trigger bits, and MNE's BDF reader
    leaves bit 16 (a new epoch): with it set, code 1 was read as "65537", and each return to
    65536 as one more event."""
    raw = _raw("Status")
    data = raw.get_data()
    data[3] += 65536.0  # bit 16 high ...
    data[3, 7000:] -= 65536.0  # ... until here (no trigger: no event)
    path = tmp_path / "biosemi_raw.fif"
    mne.io.RawArray(data, raw.info, verbose="error").save(path, verbose="error")
    settings = Settings(labels=LabelRules(event_duration=4.0))
    prepare([str(path)], tmp_path / "out", settings, progress=False)
    record = _record(tmp_path / "out")
    assert record["stim_channel"] == "Status" and record["stim_channel_events"] == 3
    assert record["starts"] == [1000, 3000, 5000] and record["label_names"] == ["1", "2", "1"]
