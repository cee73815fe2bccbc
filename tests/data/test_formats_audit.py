"""Audit of `eegfast prepare` on the other formats it claims to read, written by hand here
(MNE's exporters for them need pybv/eeglabio): BrainVision markers, EEGLAB events, what a re-run
sees of a recording's companion files, EGI's .mff folders."""

import os

import mne
import numpy as np
import pytest
from scipy.io import savemat

from eegfast.data.labels import LabelRules
from eegfast.data.prepare import Settings, discover, prepare, process_file

NAMES = ("Fp1", "Fp2", "Cz")


def _write_brainvision(path, data_uv, sfreq, markers=()):
    """``path`` (.vhdr) + .eeg (float32, multiplexed) + .vmrk; ``data_uv`` (C, T) µV;
    ``markers``: (type, description, 1-based sample, length in samples)."""
    stem = path.stem
    channels = [f"Ch{i + 1}={name},,1,µV" for i, name in enumerate(NAMES[: len(data_uv)])]
    path.write_text(
        "\n".join([
            "Brain Vision Data Exchange Header File Version 1.0", "", "[Common Infos]",
            "Codepage=UTF-8", f"DataFile={stem}.eeg", f"MarkerFile={stem}.vmrk",
            "DataFormat=BINARY", "DataOrientation=MULTIPLEXED",
            f"NumberOfChannels={len(data_uv)}", f"SamplingInterval={1e6 / sfreq:g}", "",
            "[Binary Infos]", "BinaryFormat=IEEE_FLOAT_32", "", "[Channel Infos]", *channels,
        ]) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    _write_markers(path.with_suffix(".vmrk"), markers)
    data_uv.T.astype("<f4").tofile(path.with_suffix(".eeg"))
    return path


def _write_markers(path, markers):
    lines = [
        "Brain Vision Data Exchange Marker File, Version 1.0", "", "[Common Infos]",
        "Codepage=UTF-8", f"DataFile={path.stem}.eeg", "", "[Marker Infos]",
        "Mk1=New Segment,,1,1,0,20200101000000000000",
    ]  # fmt: skip
    lines += [f"Mk{i + 2}={t},{d},{s},{n},0" for i, (t, d, s, n) in enumerate(markers)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_eeglab(path, data_uv, sfreq, events=(), *, fdt=False):
    """An EEGLAB ``.set`` (data inside it, or in a ``.fdt`` beside it); ``events``: (type,
    1-based latency in samples, duration in samples)."""
    chanlocs = np.zeros((1, len(data_uv)), dtype=[("labels", object), ("type", object)])
    for i, name in enumerate(NAMES[: len(data_uv)]):
        chanlocs[0, i] = (name, "EEG")
    event = np.zeros((1, len(events)), dtype=[(k, object) for k in ("type", "latency", "duration")])
    for i, (kind, latency, duration) in enumerate(events):
        event[0, i] = (kind, float(latency), float(duration))
    eeg = {
        "nbchan": float(len(data_uv)), "pnts": float(data_uv.shape[1]), "trials": 1.0,
        "srate": float(sfreq), "xmin": 0.0, "xmax": (data_uv.shape[1] - 1) / sfreq,
        "chanlocs": chanlocs, "event": event, "data": data_uv,
    }  # fmt: skip
    if fdt:
        data_uv.T.astype("<f4").tofile(path.with_suffix(".fdt"))  # column-major (nbchan, pnts)
        eeg["data"] = path.with_suffix(".fdt").name
    savemat(path, {"EEG": eeg}, appendmat=False)
    return path


def _noise(seconds, sfreq, seed=0):
    return np.random.default_rng(seed).normal(0, 20, (3, int(seconds * sfreq)))


def _record(path, out, **settings):
    return process_file(discover([str(path)])[0], Settings(**settings), str(out))


def test_brainvision_stimulus_markers_are_onset_markers(tmp_path):
    """MNE gives a BrainVision marker (one sample long) a duration of 1/sfreq s: each became an
    event no window fits, the recording was refused as having no complete window, no warning
    said why, and --event-duration (meant for onset markers) did not apply."""
    markers = [("Stimulus", "S  1", 5 * 500 + 1, 1), ("Stimulus", "S  2", 15 * 500 + 1, 1)]
    path = _write_brainvision(tmp_path / "rec.vhdr", _noise(30, 500.0), 500.0, markers)
    # (MNE < 1.10 also keeps the first "New Segment" marker, likewise one sample long)
    annotations = mne.io.read_raw(path, verbose="error").annotations
    stimuli = [d.startswith("Stimulus/") for d in annotations.description]
    assert annotations.duration[stimuli].tolist() == [0.002] * 2
    record = _record(path, tmp_path / "a")
    assert record["status"] == "ok", record.get("reason")
    assert record["label_source"] == "none" and record["n_windows"] == 7
    assert record["skipped_onset_markers"] == {"Stimulus/S  1": 1, "Stimulus/S  2": 1}
    record = _record(path, tmp_path / "b", labels=LabelRules(event_duration=4.0))
    assert record["status"] == "ok", record.get("reason")
    assert record["starts"] == [5 * 200, 15 * 200]
    assert record["label_names"] == ["Stimulus/S  1", "Stimulus/S  2"]


def test_brainvision_marker_of_several_samples_is_an_event(tmp_path):
    """Markers with a length (a segment marked in the recording software) stay events."""
    markers = [("Comment", "rest", 2 * 500 + 1, 8 * 500)]
    path = _write_brainvision(tmp_path / "rec.vhdr", _noise(30, 500.0), 500.0, markers)
    record = _record(path, tmp_path)
    assert record["starts"] == [400, 1200] and record["label_names"] == ["Comment/rest"] * 2


def _touch_later(path):
    """Move ``path``'s modification time on, as an edit a while after the first run does."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_a_rerun_sees_an_edited_brainvision_marker_file(tmp_path):
    """The output was reused while the header (.vhdr) was unchanged: markers added to the .vmrk
    afterwards (or a replaced .eeg) were never seen, and the old windows stayed."""
    path = _write_brainvision(tmp_path / "rec.vhdr", _noise(30, 500.0), 500.0)
    first = prepare([str(path)], tmp_path / "out", progress=False)
    assert first["windows"] == 7 and set(next(iter(first["labels"].values()))) == {"(none)"}
    _write_markers(path.with_suffix(".vmrk"), [("Comment", "rest", 2 * 500 + 1, 8 * 500)])
    _touch_later(path.with_suffix(".vmrk"))
    second = prepare([str(path)], tmp_path / "out", progress=False)
    assert second["reused"] == 0 and second["windows"] == 2
    assert set(next(iter(second["labels"].values()))) == {"Comment/rest"}
    third = prepare([str(path)], tmp_path / "out", progress=False)
    assert third["reused"] == 1  # unchanged files: still reused


def test_a_rerun_sees_a_replaced_eeglab_data_file(tmp_path):
    path = _write_eeglab(tmp_path / "rec.set", _noise(30, 250.0), 250.0, fdt=True)
    assert prepare([str(path)], tmp_path / "out", progress=False)["windows"] == 7
    _noise(10, 250.0).T.astype("<f4").tofile(path.with_suffix(".fdt"))  # shorter now
    _touch_later(path.with_suffix(".fdt"))
    report = prepare([str(path)], tmp_path / "out", progress=False)
    assert report["reused"] == 0 and report["usable"] == 0  # the .set no longer fits its .fdt


def test_mff_folders_are_recordings(tmp_path):
    """EGI's .mff recording is a folder: a folder scan skipped it (only files were recordings)
    and named as SRC it was searched for recordings inside ('no recordings MNE can read')."""
    mff = tmp_path / "data" / "rec.mff"
    mff.mkdir(parents=True)
    (mff / "info.xml").write_text("<fileInfo/>")
    (mff / "signal1.bin").write_bytes(b"\0" * 16)
    (tmp_path / "data" / "notes.txt").write_text("not a recording")
    for source in (tmp_path / "data", mff):
        jobs = discover([str(source)])
        assert [j.path for j in jobs] == [str(mff)]
    record = _record(mff, tmp_path / "out")  # not a real MFF: MNE's reason, never a crash
    assert record["status"] == "bad" and record["reason"].startswith("unreadable")


def test_brainvision_data_file_beside_an_ahdr_header_is_no_recording(tmp_path):
    for name in ("rec.ahdr", "rec.eeg", "rec.amrk"):
        (tmp_path / name).write_bytes(b"x")
    assert [j.path for j in discover([str(tmp_path)])] == [str(tmp_path / "rec.ahdr")]


@pytest.mark.parametrize("sfreq", [128.0, 999.9, 2048.0])
def test_brainvision_rates_and_onsets(tmp_path, sfreq):
    """Events land on the 200 Hz grid at their times whatever the input rate."""
    data = _noise(20, sfreq)
    if sfreq < 150:  # 128 Hz cannot carry the 75 Hz band: named as the reason
        path = _write_brainvision(tmp_path / "slow.vhdr", data, sfreq)
        assert "sample rate 128 Hz is too low" in _record(path, tmp_path)["reason"]
        return
    onset = int(round(6 * sfreq))
    markers = [("Comment", "task", onset + 1, int(round(8 * sfreq)))]
    path = _write_brainvision(tmp_path / "rec.vhdr", data, sfreq, markers)
    record = _record(path, tmp_path)
    assert record["status"] == "ok", record.get("reason")
    assert record["starts"] == [round(onset / sfreq * 200), round(onset / sfreq * 200) + 800]


def test_a_rerun_sees_bad_channels_marked_in_a_bids_channels_tsv(tmp_path):
    """Marking a channel bad in BIDS ``channels.tsv`` after a run: the re-run reused the output
    with that channel still in it (only the recording file itself was compared)."""
    mne_bids = pytest.importorskip("mne_bids")
    info = mne.create_info(["FP1", "CZ", "O1"], 250.0, "eeg")
    raw = mne.io.RawArray(_noise(30, 250.0) * 1e-6, info, verbose="error")
    raw.info["line_freq"] = 50
    root = tmp_path / "bids"
    path = mne_bids.BIDSPath(subject="01", task="rest", root=root, datatype="eeg")
    mne_bids.write_raw_bids(raw, path, format="EDF", allow_preload=True, verbose="error")
    first = prepare([str(root)], tmp_path / "out", progress=False)
    assert first["usable"] == 1
    tsv = next((root / "sub-01" / "eeg").glob("*_channels.tsv"))
    lines = tsv.read_text().splitlines()
    status = lines[0].split("\t").index("status")
    for i, line in enumerate(lines):
        cells = line.split("\t")
        if cells[0] == "CZ":
            cells[status] = "bad"
            lines[i] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    _touch_later(tsv)
    second = prepare([str(root)], tmp_path / "out", progress=False)
    assert second["reused"] == 0
    record = next(iter((tmp_path / "out" / "shards").glob("*.json"))).read_text()
    assert '"CZ": "marked bad in the recording"' in record
