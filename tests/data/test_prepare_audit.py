"""Audit of `eegfast prepare` on real and hand-made recordings: EDF+D gaps, EDGE/boundary marks,
split FIF files, EDF units MNE misreads, the mains frequency, --reference names."""

import json

import mne
import numpy as np
import pytest

from eegfast.data.labels import LabelRules
from eegfast.data.prepare import Settings, discover, prepare, process_file
from eegfast.data.preprocess import PreprocessConfig, preprocess_reference
from eegfast.data.reading import EDF_GAP_DESCRIPTION, edf_record_onsets, read_recording


def _field(value, width: int) -> bytes:
    text = value if isinstance(value, bytes) else str(value).encode("ascii")
    assert len(text) <= width, (value, width)
    return text.ljust(width, b" ")


def _write_edf_plus(
    path, data_uv, sfreq, record_onsets, annotations=(), *, continuous=False, unit=b"uV"
):
    """An EDF+ file of 1-s data records: ``data_uv`` (C, T) µV; ``record_onsets``: the time
    stamp of each record in s (the file's time, gaps included); ``annotations``: (onset in the
    file's time, duration, description), written into the first record's TAL; ``unit``: the
    physical dimension of every channel (the values are written in µV whatever it says)."""
    n_ch = data_uv.shape[0]
    spr = int(sfreq)
    n_rec = data_uv.shape[1] // spr
    assert len(record_onsets) == n_rec
    tal_bytes = 120
    tals = []
    for r, onset in enumerate(record_onsets):
        tal = f"+{onset:g}\x14\x14\x00".encode()
        for a_onset, a_duration, description in annotations if r == 0 else ():
            tal += f"+{a_onset:g}\x15{a_duration:g}\x14{description}\x14\x00".encode()
        tals.append(tal.ljust(tal_bytes, b"\x00"))
    ns = n_ch + 1
    names = [f"EEG {c}" for c in ("Fp1", "Fp2", "C3", "C4", "O1", "O2")[:n_ch]]
    header = [
        _field("0", 8), _field("X X X X", 80), _field("Startdate 01-JAN-2020 X X X", 80),
        _field("01.01.20", 8), _field("00.00.00", 8), _field(256 * (ns + 1), 8),
        _field("EDF+C" if continuous else "EDF+D", 44), _field(n_rec, 8), _field(1, 8),
        _field(ns, 4),
    ]  # fmt: skip
    for column in (
        [_field(n, 16) for n in [*names, "EDF Annotations"]],
        [_field("", 80)] * ns,
        [_field(unit, 8)] * n_ch + [_field("", 8)],
        [_field(-3276.8, 8)] * n_ch + [_field(-1, 8)],
        [_field(3276.7, 8)] * n_ch + [_field(1, 8)],
        [_field(-32768, 8)] * ns,
        [_field(32767, 8)] * ns,
        [_field("", 80)] * ns,
        [_field(spr, 8)] * n_ch + [_field(tal_bytes // 2, 8)],
        [_field("", 32)] * ns,
    ):
        header += column
    digital = np.clip(np.round(data_uv * 10), -32768, 32767).astype("<i2")
    records = [
        b"".join(digital[c, r * spr : (r + 1) * spr].tobytes() for c in range(n_ch)) + tals[r]
        for r in range(n_rec)
    ]
    path.write_bytes(b"".join(header) + b"".join(records))
    return path


def _edf_with_gap(path, gap_s: float):
    """20 one-second records at 200 Hz, the last 10 recorded ``gap_s`` s after the first 10
    ended; a T2 event at 2 s (before the gap) and a T1 event at 11 s of data (after it)."""
    data = np.random.default_rng(0).normal(0, 20, (6, 20 * 200))
    onsets = [*range(10), *(10 + gap_s + r for r in range(10))]
    events = [(2, 4, "T2"), (11 + gap_s, 4, "T1")]
    return _write_edf_plus(path, data, 200.0, onsets, events)


def _record(path, out, **settings):
    return process_file(discover([str(path)])[0], Settings(**settings), str(out))


@pytest.mark.parametrize("gap_s", [5.0, 90.0])
def test_edf_plus_d_events_after_a_gap_are_where_their_data_are(tmp_path, gap_s):
    """MNE reads an EDF+D file's records back to back but keeps its annotations at their times
    in the file: the T1 event after the gap had windows from 5 s later (or, past the data's end,
    none at all)."""
    record = _record(_edf_with_gap(tmp_path / "gap.edf", gap_s), tmp_path)
    assert record["status"] == "ok", record.get("reason")
    assert record["starts"] == [2 * 200, 11 * 200]
    assert record["label_names"] == ["T2", "T1"]


def test_edf_plus_d_windows_do_not_join_the_two_sides_of_a_gap(tmp_path):
    record = _record(
        _edf_with_gap(tmp_path / "gap.edf", 5.0), tmp_path, labels=LabelRules(use_annotations=False)
    )
    # 10 s on either side: windows at 0 and 4 s, then again from the first sample after the gap
    assert [s / 200 for s in record["starts"]] == [0, 4, 10, 14]
    assert record["discontinuities"] == 1


def test_edf_plus_without_gaps_is_read_unchanged(tmp_path):
    data = np.random.default_rng(1).normal(0, 20, (3, 12 * 200))
    events = [(2, 4, "T1")]
    plus_d = _write_edf_plus(tmp_path / "d.edf", data, 200.0, list(range(12)), events)
    plus_c = _write_edf_plus(tmp_path / "c.edf", data, 200.0, list(range(12)), events,
                             continuous=True)  # fmt: skip
    assert edf_record_onsets(plus_c) is None
    assert edf_record_onsets(plus_d)[1].tolist() == list(range(12))
    for path in (plus_d, plus_c):
        raw = read_recording(path)
        assert list(raw.annotations.description) == ["T1"]
        assert raw.annotations.onset.tolist() == [2.0]


def test_edf_plus_d_annotations_come_from_the_annotation_signal_only(tmp_path):
    """Samples whose bytes happen to read as a TAL ("+5\\x14x\\x14\\x00") are EEG, not an
    event: the annotations were read by scanning the whole file (mne.read_annotations(path),
    which also held all of it in memory), so such samples became an event "x" at 5 s."""
    data = np.random.default_rng(2).normal(0, 20, (6, 20 * 200))
    # int16 little-endian samples of 0.1 µV: b"+5", b"\x14x", b"\x14\x00"
    data[0, 12 * 200 + 7 : 12 * 200 + 10] = [1361.1, 3074.0, 2.0]
    onsets = [*range(10), *(15 + r for r in range(10))]
    path = _write_edf_plus(tmp_path / "chance.edf", data, 200.0, onsets,
                           [(2, 4, "T2"), (16, 4, "T1"), (17, 0, "mark\u00e9")])  # fmt: skip
    assert b"+5\x14x\x14\x00" in path.read_bytes()
    raw = read_recording(path)
    found = [(a["onset"], a["duration"], a["description"]) for a in raw.annotations]
    assert found == [
        (2.0, 4.0, "T2"), (10.0, 0.0, EDF_GAP_DESCRIPTION), (11.0, 4.0, "T1"),
        (12.0, 0.0, "mark\u00e9"),
    ]  # fmt: skip


def test_edf_plus_d_annotations_wholly_inside_a_gap_are_left_out(tmp_path):
    """An annotation recorded while the recording was paused has no data: moved onto the data's
    time axis it became a marker at the first sample after the gap (and, with --event-duration,
    labelled data recorded after it). One that starts in the gap and ends after it, or starts
    at a record's end, keeps its data part."""
    data = np.random.default_rng(3).normal(0, 20, (6, 20 * 200))
    onsets = [*range(10), *(15 + r for r in range(10))]  # a 5-s gap from 10 s to 15 s
    events = [(2, 4, "T2"), (11, 2, "paused"), (12, 0, "mark"), (10, 0, "at end"),
              (14, 3, "across"), (16, 4, "T1")]  # fmt: skip
    raw = read_recording(_write_edf_plus(tmp_path / "pause.edf", data, 200.0, onsets, events))
    found = [(a["onset"], a["duration"], a["description"]) for a in raw.annotations]
    assert sorted(found) == [
        (2.0, 4.0, "T2"), (10.0, 0.0, EDF_GAP_DESCRIPTION), (10.0, 0.0, "at end"),
        (10.0, 2.0, "across"), (11.0, 4.0, "T1"),
    ]  # fmt: skip


def test_edf_plus_d_gap_is_marked_for_mne(tmp_path):
    raw = read_recording(_edf_with_gap(tmp_path / "gap.edf", 90.0))
    marks = raw.annotations[raw.annotations.description == EDF_GAP_DESCRIPTION]
    assert marks.onset.tolist() == [10.0] and marks.duration.tolist() == [0.0]


def test_parts_either_side_of_a_jump_are_filtered_on_their_own(tmp_path):
    """Two recordings joined with a 200 µV step (``concatenate_raws`` marks the join EDGE):
    every window equals MNE's recipe, whose filters stop at the mark. Filtered across the step,
    the 0.1 Hz high-pass spread it over the windows on both sides."""
    info = mne.create_info(["FP1", "CZ", "O1"], 200.0, "eeg")
    rng = np.random.default_rng(0)
    parts = [
        mne.io.RawArray(rng.normal(size=(3, 6000)) * 1e-5 + offset, info, verbose="error")
        for offset in (0.0, 2e-4)
    ]
    raw = mne.concatenate_raws(parts, verbose="error")
    path = tmp_path / "joined_raw.fif"
    raw.save(path, verbose="error")
    record = _record(path, tmp_path)
    assert record["status"] == "ok", record.get("reason")
    shard = np.load(tmp_path / record["shard"])
    expected = preprocess_reference(raw.load_data(), PreprocessConfig())
    assert all(s + 800 <= 6000 or s >= 6000 for s in record["starts"])
    for window, start in zip(shard, record["starts"], strict=True):
        got = window.reshape(3, -1)
        np.testing.assert_allclose(got, expected[:, start : start + 800], atol=1e-4)


def _fif_with(path, annotations):
    """A 60-s, 250-Hz, 3-electrode FIF; annotations (onset s, duration s, description)."""
    x = np.random.default_rng(2).normal(size=(3, 60 * 250)) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(["FP1", "CZ", "O1"], 250.0, "eeg"), verbose="error")
    if annotations:
        onset, duration, description = zip(*annotations, strict=True)
        raw.set_annotations(mne.Annotations(onset, duration, description))
    raw.save(path, verbose="error")
    return path


def test_eeglab_boundary_is_a_discontinuity_not_an_event(tmp_path):
    """EEGLAB's ``boundary`` marks where removed data were cut out: no window spans it, and
    with --event-duration it does not become a class."""
    path = _fif_with(tmp_path / "cut_raw.fif", [(30.0, 0.0, "boundary")])
    record = _record(path, tmp_path / "a")
    assert [s / 200 for s in record["starts"]] == [*range(0, 27, 4), *range(30, 57, 4)]
    record = _record(path, tmp_path / "b", labels=LabelRules(event_duration=4.0))
    assert record["label_source"] == "none" and set(record["label_names"]) == {""}


def test_split_fif_parts_are_prepared_once(sample_files, tmp_path):
    """MNE reads every part of a split FIF with its first part; the later parts were also
    prepared as recordings of their own, so each sample was in the folder twice."""
    raw = mne.io.read_raw_edf(sample_files["S001R04.edf"], preload=True, verbose="error")
    folder = tmp_path / "split"
    folder.mkdir()
    raw.save(folder / "rec_raw.fif", split_size="3MB", verbose="error")
    raw.save(folder / "sub-01_task-x_eeg.fif", split_size="3MB", split_naming="bids",
             verbose="error")  # fmt: skip
    assert len(list(folder.iterdir())) == 6  # both recordings in three parts
    jobs = discover([str(folder)])
    assert sorted(j.path.rsplit("/", 1)[1] for j in jobs) == [
        "rec_raw.fif",
        "sub-01_task-x_split-01_eeg.fif",
    ]
    report = prepare([str(folder / "rec_raw.fif"), str(folder)], tmp_path / "out", progress=False)
    assert report["usable"] == 2
    assert report["hours"] == pytest.approx(2 * raw.times[-1] / 3600, rel=1e-3)
    # a part named on its own is still prepared (the user asked for that file)
    assert len(discover([str(folder / "rec_raw-1.fif")])) == 1


def test_a_mains_frequency_other_than_the_notch_is_warned_about(tmp_path):
    """A FIF (or BIDS) recording says it was made at 60 Hz mains; notching 50 Hz (the default)
    leaves the 60 Hz interference inside the 0.1-75 Hz band without a word."""
    path = _fif_with(tmp_path / "us_raw.fif", [])
    raw = mne.io.read_raw_fif(path, preload=True, verbose="error")
    raw.info["line_freq"] = 60.0
    raw.save(path, overwrite=True, verbose="error")
    report = prepare([str(path)], tmp_path / "a", progress=False)
    warned = [w for w in report["warnings"] if "60 Hz mains" in w]
    assert len(warned) == 1 and "--notch 60" in warned[0] and str(path) in warned[0]
    settings = Settings(preprocess=PreprocessConfig(notch_freq=60.0))
    report = prepare([str(path)], tmp_path / "b", settings, progress=False)
    assert not [w for w in report["warnings"] if "mains" in w]


@pytest.mark.parametrize(
    ("unit", "volts"),
    [(b"uv", 1e-6), (b"UV", 1e-6), ("µV".encode(), 1e-6), (b"\xb5V", 1e-6), (b"nV", 1e-9)],
)
def test_edf_units_mne_misreads_are_scaled(tmp_path, unit, volts):
    """MNE reads any physical dimension but its exact ``uV``/``µV``/``mV`` as volts: 20 µV
    written as ``uv`` became 20 V, and 2e5 in the shards (inf in float16)."""
    data = np.random.default_rng(3).normal(0, 20, (3, 12 * 200))
    path = _write_edf_plus(tmp_path / "u.edf", data, 200.0, list(range(12)), continuous=True,
                           unit=unit)  # fmt: skip
    got = read_recording(path).get_data()
    quantised = np.round(data * 10) / 10  # what the file holds, in its unit
    np.testing.assert_allclose(got, quantised * volts, rtol=1e-6, atol=volts * 1e-3)


def test_microvolts_read_as_volts_are_refused(tmp_path):
    """An EDF unit MNE does not know ('' here) is read as volts: µV values became volts and
    were written, a million times too large, as a usable recording."""
    data = np.random.default_rng(4).normal(0, 20, (3, 12 * 200))
    path = _write_edf_plus(tmp_path / "u.edf", data, 200.0, list(range(12)), continuous=True,
                           unit=b"")  # fmt: skip
    record = _record(path, tmp_path)
    assert record["status"] == "bad" and "implausible amplitude" in record["reason"]
    ok = _write_edf_plus(tmp_path / "ok.edf", data, 200.0, list(range(12)), continuous=True)
    assert _record(ok, tmp_path)["status"] == "ok"


def test_reference_electrode_is_named_like_the_channels(sample_files, tmp_path, capsys):
    """--reference T3 on eegmat (``EEG T3``, kept as T7) failed every recording with a
    ValueError; a reference missing from a recording is a bad recording with its reason, and
    a name that is no electrode is refused before anything is read."""
    from eegfast.cli import main as cli_main

    edf = sample_files["Subject00_1.edf"]
    out = tmp_path / "t3"
    assert cli_main(["prepare", str(edf), "--reference", "T3", "--out", str(out),
                     "--no-progress", "--workers", "1"]) == 0  # fmt: skip
    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["preprocess"]["reference"] == "T7"
    shard = np.load(out / index["recordings"][0]["shard"])
    t7 = index["recordings"][0]["electrodes"].index("T7")
    assert np.abs(shard[:, t7]).max() == 0  # re-referenced to itself
    capsys.readouterr()
    assert cli_main(["prepare", str(edf), "--reference", "XYZ", "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 2  # fmt: skip
    assert "--reference: 'XYZ'" in capsys.readouterr().err
    record = _record(edf, tmp_path / "iz", preprocess=PreprocessConfig(reference="IZ"))
    assert record["status"] == "bad"
    assert record["reason"].startswith("reference electrode IZ is not among the kept")
