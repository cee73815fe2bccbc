"""Audit of time axes, dates and units across the formats `eegfast prepare` reads, with real MNE
round trips: where events, BAD spans and discontinuities land in the windows of each format."""

import mne
import numpy as np

from eegfast.data.labels import LabelRules, is_discontinuity_mark
from eegfast.data.prepare import Settings, discover, process_file
from eegfast.data.reading import bdf_trigger_values
from tests.data.test_formats_audit import _write_brainvision


def _record(path, out, **settings):
    return process_file(discover([str(path)])[0], Settings(**settings), str(out))


def _paused_brainvision(path, sfreq: float = 500.0):
    """40 s of BrainVision data, recorded in two parts: paused after 18 s (a 300 µV offset jump
    where the second part starts, marked ``New Segment`` as BrainVision Recorder marks it)."""
    rng = np.random.default_rng(3)
    data = rng.normal(0, 20, (3, int(40 * sfreq)))
    data[:, int(18 * sfreq) :] += 300.0
    markers = [("New Segment", "", int(18 * sfreq) + 1, 1)]
    return _write_brainvision(path, data, sfreq, markers)


def test_brainvision_new_segment_is_a_discontinuity(tmp_path):
    """A BrainVision recording paused and resumed has a ``New Segment`` marker where its data
    jump: windows spanned it (16-20 s) and the filters smeared the jump over both parts, as
    at an EDF+D gap or EEGLAB's ``boundary``; the marker was listed as an onset marker to label
    windows with --event-duration."""
    path = _paused_brainvision(tmp_path / "paused.vhdr")
    raw = mne.io.read_raw(path, verbose="error")
    assert 18.0 in raw.annotations.onset[raw.annotations.description == "New Segment/"]
    record = _record(path, tmp_path / "a")
    assert record["status"] == "ok", record.get("reason")
    assert record["discontinuities"] == 1
    assert [s / 200 for s in record["starts"]] == [0, 4, 8, 12, 18, 22, 26, 30, 34]
    assert record["skipped_onset_markers"] == {}
    assert is_discontinuity_mark("New Segment/") and is_discontinuity_mark("new segment")


def test_brainvision_new_segment_labels_no_window(tmp_path):
    """With --event-duration every onset marker labels windows: ``New Segment`` did too."""
    path = _paused_brainvision(tmp_path / "paused.vhdr")
    record = _record(path, tmp_path / "a", labels=LabelRules(event_duration=4.0))
    assert record["status"] == "ok", record.get("reason")
    assert "New Segment/" not in record["label_names"]
    assert record["label_source"] == "none"


def _fif(path, annotations, seconds: float = 60.0):
    """A ``seconds``-long 200-Hz FIF of three electrodes; annotations (onset, duration, text)."""
    x = np.random.default_rng(4).normal(size=(3, int(seconds * 200))) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(["FP1", "CZ", "O1"], 200.0, "eeg"), verbose="error")
    onset, duration, description = zip(*annotations, strict=True)
    raw.set_annotations(mne.Annotations(onset, duration, description))
    raw.save(path, verbose="error")
    return path


def test_an_annotation_without_a_description_labels_nothing(tmp_path):
    """An annotation of blank description was an event labelled '' (unlabelled): its windows
    counted as events, and a recording with only such annotations no longer took the label
    of its file-name rule."""
    path = _fif(tmp_path / "rec_1_raw.fif", [(5.0, 8.0, "A"), (30.0, 8.0, " ")])
    record = _record(path, tmp_path / "a")
    assert record["starts"] == [1000, 1800] and record["label_names"] == ["A", "A"]
    path = _fif(tmp_path / "rest_raw.fif", [(5.0, 8.0, "  ")])
    rules = LabelRules(filename_rules=(("rest", "rest"),))
    record = _record(path, tmp_path / "b", labels=rules)
    assert record["label_source"] == "filename" and set(record["label_names"]) == {"rest"}


def _status_raw(sfreq: float = 512.0, seconds: float = 40.0) -> mne.io.RawArray:
    """Three electrodes (~10 µV noise) and a ``Status`` channel: code 3 for six samples at 2 s,
    code 4 for one sample at 10 s."""
    n = int(seconds * sfreq)
    data = np.vstack([np.random.default_rng(5).normal(0, 1e-5, (3, n)), np.zeros((1, n))])
    data[3, int(2 * sfreq) : int(2 * sfreq) + 6] = 3
    data[3, int(10 * sfreq)] = 4
    info = mne.create_info(["Fz", "Cz", "Pz", "Status"], sfreq, ["eeg"] * 3 + ["stim"])
    return mne.io.RawArray(data, info, verbose="error")


def test_an_exported_bdf_status_channel_keeps_its_codes(tmp_path):
    """``mne.export`` writes a BDF's Status channel scaled (physical 0..4 over the whole digital
    range); MNE reads a BDF Status as raw BioSemi codes whatever the scale: codes 3 and 4 were
    the events "1", "65535", "1" (the last where nothing happens)."""
    path = tmp_path / "exported.bdf"
    mne.export.export_raw(path, _status_raw(), verbose="error")
    record = _record(path, tmp_path / "a", labels=LabelRules(event_duration=4.0))
    assert record["status"] == "ok", record.get("reason")
    assert record["stim_channel"] == "Status" and record["label_names"] == ["3", "4"]
    assert record["starts"] == [400, 2000]


def test_a_biosemi_status_channel_is_read_as_mne_reads_it(tmp_path):
    """A BioSemi Status (physical range = digital range: raw codes, system bits above bit 15)
    is left to MNE's reader."""
    import edfio

    raw = _status_raw()
    status = raw.get_data(picks=[3])[0] + 65536 * 2  # bit 17 high: a system bit
    full = (-8388608, 8388607)
    signals = [
        edfio.BdfSignal(
            x * 1e6, 512.0, label=name, physical_dimension="uV", physical_range=(-1e5, 1e5)
        )
        for name, x in zip(raw.ch_names[:3], raw.get_data(picks=[0, 1, 2]), strict=True)
    ] + [edfio.BdfSignal(status, 512.0, label="Status", physical_range=full, digital_range=full)]
    path = tmp_path / "biosemi.bdf"
    edfio.Bdf(signals, data_record_duration=1.0).write(path)
    assert bdf_trigger_values(path, "Status") is None
    record = _record(path, tmp_path / "a", labels=LabelRules(event_duration=4.0))
    assert record["status"] == "ok", record.get("reason")
    assert record["label_names"] == ["3", "4"] and record["starts"] == [400, 2000]


def test_one_sample_markers_of_a_fif_stay_onset_markers(tmp_path):
    """FIF keeps each annotation's onset and end as float32: a 160-Hz recording's one-sample
    stimulus markers (a BrainVision file saved as FIF) read back 1.00006 samples long at 10 s,
    past the one-sample rule's 1e-6: events no window fits, and the recording was refused."""
    sfreq = 160.0
    x = np.random.default_rng(5).normal(size=(3, int(60 * sfreq))) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(["FP1", "CZ", "O1"], sfreq, "eeg"), verbose="error")
    raw.set_annotations(mne.Annotations([10.0, 20.0, 30.0], [1 / sfreq] * 3, ["S  1"] * 3))
    path = tmp_path / "markers_raw.fif"
    raw.save(path, verbose="error")
    durations = mne.io.read_raw_fif(path, verbose="error").annotations.duration
    assert (durations * sfreq > 1 + 1e-6).any()  # (the float32 round trip this is about)
    record = _record(path, tmp_path / "a")
    assert record["status"] == "ok", record.get("reason")
    assert record["skipped_onset_markers"] == {"S  1": 3}
    assert len(record["starts"]) == 15 and record["label_source"] == "none"
