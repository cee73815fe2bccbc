import json
import shutil

import mne
import numpy as np
import pytest

from eegfast.cli import main as cli_main
from eegfast.data import read_index
from eegfast.data.index import load_index
from eegfast.data.labels import LabelRules
from eegfast.data.prepare import (
    PROCESSING_REVISION,
    Settings,
    discover,
    prepare,
    process_file,
)
from eegfast.data.preprocess import PreprocessConfig, cut_windows, preprocess_signal
from eegfast.electrodes import labram_input_chans

EEGMAT_RULES = LabelRules(filename_rules=(("_1$", "rest"), ("_2$", "task")))


def _export(raw, path):
    if path.suffix == ".fif":
        raw.save(path, overwrite=True, verbose="error")
    else:
        mne.export.export_raw(path, raw, fmt="edf", overwrite=True, verbose="error")
    return path


@pytest.fixture(scope="module")
def broken(sample_files, tmp_path_factory):
    """Broken recordings made from the real ones: {reason pattern: path}."""
    folder = tmp_path_factory.mktemp("broken")
    source = mne.io.read_raw(sample_files["Subject00_2.edf"], preload=True, verbose="error")
    base = source.copy().crop(0, 12, include_tmax=False).pick(source.ch_names[:6])

    def variant(data=None, names=None, sfreq=None):
        info = base.info.copy()
        raw = mne.io.RawArray(base.get_data() if data is None else data, info, verbose="error")
        if names is not None:
            raw.rename_channels(dict(zip(raw.ch_names, names, strict=True)))
        if sfreq is not None:
            raw.resample(sfreq, verbose="error")
        return raw

    files = {}
    blob = sample_files["S001R04.edf"].read_bytes()
    (folder / "truncated.edf").write_bytes(blob[: len(blob) - 50_000])
    files["truncated EDF"] = folder / "truncated.edf"
    (folder / "empty.edf").write_bytes(b"")
    files["empty file"] = folder / "empty.edf"
    (folder / "corrupt.edf").write_bytes(b"\x00garbage" * 100)
    files["corrupt EDF header"] = folder / "corrupt.edf"
    files["no EEG channels"] = _export(
        variant(names=[f"ECG{i}" for i in range(6)]), folder / "ecg_only.edf"
    )
    files["only unknown electrodes"] = _export(
        variant(names=[f"X{i}" for i in range(6)]), folder / "unknown.edf"
    )
    flat = base.get_data()
    flat[2] = 0.0
    files["flat channels .*EEG F3"] = _export(variant(flat), folder / "flat.edf")
    nan = base.get_data()
    nan[1, 100:200] = np.nan
    files["non-finite .*EEG Fp2"] = _export(variant(nan), folder / "nan_raw.fif")
    files["sample rate 128 Hz is too low"] = _export(variant(sfreq=128.0), folder / "slow.edf")
    short = mne.io.RawArray(base.get_data()[:, :1000], base.info, verbose="error")  # 2 s
    files["no complete 4-s window"] = _export(short, folder / "short.edf")
    return files


def test_prepare_sample_and_broken(sample_files, broken, tmp_path):
    out = tmp_path / "out"
    good = [f"mi={sample_files['S001R04.edf']}", f"arith={sample_files['Subject00_2.edf']}"]
    settings = Settings(labels=EEGMAT_RULES)
    report = prepare(good + [str(p) for p in broken.values()], out, settings, progress=False)
    assert report["usable"] == 2 and report["files"] == 2 + len(broken)
    reasons = {b["file"]: b["reason"] for b in report["bad"]}
    assert len(reasons) == len(broken)
    for pattern, path in broken.items():
        assert any(
            __import__("re").search(pattern, r) for f, r in reasons.items() if f == str(path)
        ), (pattern, reasons.get(str(path)))
    md = (out / "report.md").read_text()
    assert "Bad recordings" in md and "truncated.edf" in md and "ODC-By" in md
    assert json.loads((out / "report.json").read_text())["usable"] == 2

    index = load_index(out)
    assert index["tasks"] == {"arith": {"labels": ["task"]}, "mi": {"labels": ["T0", "T1", "T2"]}}
    records = read_index(out)
    mi = [r for r in records if r["task"] == "mi"]
    assert len(mi) == 30  # 30 events of 4.1-4.2 s -> one 4-s window each
    assert {r["label_name"] for r in mi} == {"T0", "T1", "T2"}
    assert all(r["subject"] == "S001" for r in mi)
    arith = [r for r in records if r["task"] == "arith"]
    assert len(arith) == 15 and {r["label"] for r in arith} == {0}  # 62 s -> 15 windows
    assert arith[0]["subject"] == "Subject00" and len(arith[0]["electrodes"]) == 19


def test_shard_content_is_the_preprocessed_signal(sample_files, tmp_path):
    path = sample_files["Subject00_2.edf"]
    cfg = PreprocessConfig(window_seconds=2, stride_seconds=1.5, dtype="float16")
    prepare([str(path)], tmp_path, Settings(preprocess=cfg), progress=False)
    rec = load_index(tmp_path)["recordings"][0]
    shard = np.load(tmp_path / rec["shard"], mmap_mode="r")
    raw = mne.io.read_raw(path, preload=True, verbose="error")
    raw.pick([c for c in raw.ch_names if c not in ("ECG ECG", "EEG A2-A1")])
    signal = preprocess_signal(raw.get_data(), raw.info["sfreq"], cfg)
    starts = np.asarray(rec["starts"])
    assert starts[:3].tolist() == [0, 300, 600]
    assert shard.shape == (len(starts), 19, 2, 200) and shard.dtype == np.float16
    np.testing.assert_array_equal(shard, cut_windows(signal, starts, cfg))


def test_resume_and_idempotence(sample_files, tmp_path):
    srcs = [str(sample_files[n]) for n in ("Subject00_2.edf", "Subject01_2.edf", "S001R08.edf")]
    first = prepare(srcs, tmp_path, progress=False)
    assert first["processed"] == 3 and first["reused"] == 0
    index_before = (tmp_path / "index.json").read_text()
    shard_times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.npy")}

    again = prepare(srcs, tmp_path, progress=False)
    assert again["processed"] == 0 and again["reused"] == 3
    assert (tmp_path / "index.json").read_text() == index_before
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.npy")
    } == shard_times

    # a killed run: one record lost (its shard was written), plus a half-written temporary
    victim = sorted((tmp_path / "shards").glob("*.json"))[0]
    victim.unlink()
    (tmp_path / "shards" / ".x.npy.tmp-123").write_bytes(b"partial")
    resumed = prepare(srcs, tmp_path, progress=False)
    assert resumed["processed"] == 1 and resumed["reused"] == 2
    assert resumed["stale_temporaries_removed"] == 1
    assert not list((tmp_path / "shards").glob(".*tmp*"))
    assert (tmp_path / "index.json").read_text() == index_before

    # outputs of an older processing revision (records without one) are prepared again
    aged = sorted((tmp_path / "shards").glob("*.json"))[1]
    record = json.loads(aged.read_text())
    del record["revision"]
    aged.write_text(json.dumps(record))
    redone = prepare(srcs, tmp_path, progress=False)
    assert redone["processed"] == 1 and redone["reused"] == 2 and redone["outdated"] == 1
    assert "prepared by an older eegfast" in (tmp_path / "report.md").read_text()
    assert json.loads(aged.read_text())["revision"] == PROCESSING_REVISION
    assert (tmp_path / "index.json").read_text() == index_before

    # other settings -> reprocessed, not mixed with the old shards
    changed = prepare(srcs, tmp_path, Settings(PreprocessConfig(window_seconds=2)), progress=False)
    assert changed["processed"] == 3
    assert load_index(tmp_path)["window_seconds"] == 2


def test_process_file_never_raises(tmp_path):
    job = discover([str(_missing_ok(tmp_path))])[0]
    record = process_file(job, Settings(), str(tmp_path / "out"))
    assert record["status"] == "bad" and "empty file" in record["reason"]


def _missing_ok(tmp_path):
    p = tmp_path / "zero.edf"
    p.write_bytes(b"")
    return p


def test_workers_give_the_same_result(sample_files, tmp_path):
    srcs = [str(sample_files[n]) for n in ("Subject00_2.edf", "Subject01_2.edf", "S001R04.edf")]
    serial = prepare(srcs, tmp_path / "serial", progress=False, workers=1)
    pooled = prepare(srcs, tmp_path / "pooled", progress=False, workers=2)
    assert serial["windows"] == pooled["windows"]
    a, b = load_index(tmp_path / "serial"), load_index(tmp_path / "pooled")
    assert a["recordings"] == b["recordings"]
    for rec in a["recordings"]:
        np.testing.assert_array_equal(
            np.load(tmp_path / "serial" / rec["shard"]), np.load(tmp_path / "pooled" / rec["shard"])
        )


def test_cli_exit_codes(sample_files, broken, tmp_path, capsys):
    good = str(sample_files["Subject01_2.edf"])
    bad = str(broken["truncated EDF"])
    common = ["--no-progress", "--workers", "1"]
    assert cli_main(["prepare", good, bad, "--out", str(tmp_path / "a"), *common]) == 0
    assert "truncated EDF" in capsys.readouterr().err
    strict = ["prepare", good, bad, "--out", str(tmp_path / "a"), "--strict", *common]
    assert cli_main(strict) == 1
    assert cli_main(["prepare", bad, "--out", str(tmp_path / "b"), *common]) == 1
    assert "no usable recording" in capsys.readouterr().err
    missing = ["prepare", str(tmp_path / "nope.edf"), "--out", str(tmp_path / "c"), *common]
    assert cli_main(missing) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["prepare", good, "--out", str(tmp_path / "d"), "--window", "17", *common]) == 2
    assert "--window: must be an integer 1..16, got 17" in capsys.readouterr().err
    inverted = ["--l-freq", "50", "--h-freq", "10"]
    assert cli_main(["prepare", good, "--out", str(tmp_path / "e"), *inverted, *common]) == 2
    assert "--l-freq (50.0) must be below --h-freq (10.0)" in capsys.readouterr().err


def test_cli_warns_about_a_labels_table_that_does_not_fit(sample_files, tmp_path, capsys):
    """Rows matching no recording, empty labels and recordings not in the table: warnings on
    stderr and in report.md; errors (exit 2, nothing processed) under --strict."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for n in ("Subject00_1.edf", "Subject00_2.edf", "Subject01_2.edf"):
        shutil.copy(sample_files[n], folder / n)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "file,label,subject,session\n"
        "Subjct00_1.edf,rest,s0,a\n"  # misspelled
        "Subject00_2.edf,,s0,a\n"  # empty label
        "Subject01_2.edf,task,s1,a\n"
        "not_there.edf,task,s9,a\n"
    )
    common = ["--labels", str(csv), "--no-progress", "--workers", "1"]
    assert cli_main(["prepare", str(folder), "--out", str(tmp_path / "o"), *common]) == 0
    expected = [
        "line 2: file 'Subjct00_1.edf' matches no recording",
        "line 3: file 'Subject00_2.edf' has an empty label",
        "line 5: file 'not_there.edf' matches no recording",
        "1 recording(s) not in the table",
    ]
    err = capsys.readouterr().err
    assert all(f"warning: labels table {csv}" in err and e in err for e in expected), err
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Warnings" in report and all(e in report for e in expected)
    assert len(json.loads((tmp_path / "o" / "report.json").read_text())["warnings"]) == 4
    strict = ["prepare", str(folder), "--out", str(tmp_path / "s"), "--strict", *common]
    assert cli_main(strict) == 2
    err = capsys.readouterr().err
    assert "4 labels table problem(s) (--strict)" in err and all(e in err for e in expected)
    assert not (tmp_path / "s" / "index.json").exists()
    csv.write_text(
        "file,label,subject,session\n"
        + "".join(f"{n},rest,s0,a\n" for n in ("Subject00_1.edf", "Subject00_2.edf"))
        + "Subject01_2.edf,task,s1,a\n"
    )
    assert cli_main(strict) == 0  # a table that fits: no warning
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--workers", "-3", "argument --workers: must be an integer >= 1, got '-3'"),
        ("--workers", "0", "argument --workers: must be an integer >= 1, got '0'"),
        ("--notch", "55", "argument --notch: must be the mains frequency 50 or 60 (Hz)"),
        ("--notch", "x", "argument --notch: must be the mains frequency 50 or 60 (Hz)"),
    ],
)
def test_cli_rejects_bad_workers_and_notch(tmp_path, capsys, flag, value, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        cli_main(["prepare", str(tmp_path), "--out", str(out), flag, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_notch_accepts_50_60_and_none():
    import argparse

    from eegfast.data.prepare import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    for value, expected in [("50", 50.0), ("60", 60.0), ("none", None), ("0", None)]:
        assert parser.parse_args(["x", "--out", "o", "--notch", value]).notch == expected


def test_prepare_rejects_bad_workers(sample_files, tmp_path):
    source = str(sample_files["Subject01_2.edf"])
    with pytest.raises(ValueError, match="workers: must be an integer >= 1, got -3"):
        prepare([source], tmp_path / "o", workers=-3, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_options(sample_files, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for n in ("Subject00_2.edf", "Subject01_2.edf"):
        shutil.copy(sample_files[n], folder / n)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "file,label,subject,session\nSubject00_2.edf,bad,P0,1\nSubject01_2.edf,good,P1,1\n"
    )
    args = ["prepare", str(folder), "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"]
    args += ["--labels", str(csv), "--classes", "bad,good", "--channels", "Cz,Fz,Pz"]
    args += ["--window", "8", "--stride", "4", "--dtype", "float16", "--reference", "average"]
    assert cli_main(args) == 0
    records = read_index(tmp_path / "o")
    assert {(r["subject"], r["label"]) for r in records} == {("P0", 0), ("P1", 1)}
    assert records[0]["electrodes"] == ("CZ", "FZ", "PZ") and records[0]["task"] == "src"
    assert len(records) == 2 * 14  # 62 s, 8-s windows every 4 s


def test_bad_channels_drop(broken, tmp_path):
    flat = broken["flat channels .*EEG F3"]
    report = prepare([str(flat)], tmp_path, Settings(bad_channels="drop"), progress=False)
    assert report["usable"] == 1
    record = json.loads(next((tmp_path / "shards").glob("*.json")).read_text())
    assert record["electrodes"] == ["FP1", "FP2", "F4", "F7", "F8"]
    assert record["excluded"]["EEG F3"] == "flat or non-finite"


def test_task_change_reprocesses(sample_files, tmp_path):
    path = str(sample_files["Subject00_2.edf"])
    prepare([f"one={path}"], tmp_path, progress=False)
    again = prepare([f"two={path}"], tmp_path, progress=False)
    assert again["processed"] == 1
    assert [r["task"] for r in load_index(tmp_path)["recordings"]] == ["two"]


def test_old_names_option(sample_files, tmp_path):
    settings = Settings(modern_names=False)
    prepare([str(sample_files["Subject01_2.edf"])], tmp_path, settings, progress=False)
    record = load_index(tmp_path)["recordings"][0]
    electrodes = record["electrodes"]
    assert electrodes[6:8] == ["T3", "T4"] and "T7" not in electrodes
    # the embedding rows of the old names (T7's row had been given to T3)
    assert record["input_chans"] == labram_input_chans(electrodes, modern_names=False)
    assert record["input_chans"][7] != labram_input_chans(["T7"])[1]


def test_bids_folder_needs_mne_bids(tmp_path, monkeypatch):
    (tmp_path / "dataset_description.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "mne_bids", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install mne-bids"):
        discover([str(tmp_path)])


def test_discover(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.edf").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("")
    (tmp_path / "a" / "r.vhdr").write_text("")
    (tmp_path / "a" / "r.eeg").write_bytes(b"")
    jobs = discover([str(tmp_path / "a"), f"a={tmp_path / 'a' / 'x.edf'}", str(tmp_path / "a")])
    assert [(j.path.split("/")[-1], j.task) for j in jobs] == [("r.vhdr", "a"), ("x.edf", "a")]
    # under two tasks: one record, and the second task had been dropped without a word
    with pytest.raises(ValueError, match=r"x.edf is also under task 'a' \(from SRC"):
        discover([str(tmp_path / "a"), f"t={tmp_path / 'a' / 'x.edf'}"])
    with pytest.raises(ValueError, match=r"x.edf is also under task 'mi'"):
        discover([f"mi={tmp_path / 'a' / 'x.edf'}", f"arith={tmp_path / 'a' / 'x.edf'}"])
    with pytest.raises(FileNotFoundError, match="no recordings MNE can read"):
        (tmp_path / "empty").mkdir()
        discover([str(tmp_path / "empty")])


def test_discover_takes_path_objects_and_one_path(tmp_path):
    """prepare(sources=...) with Path objects stopped on a TypeError naming nothing (`in` on a
    Path), and one str was read letter by letter."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.edf").write_bytes(b"")
    (tmp_path / "a" / "y.edf").write_bytes(b"")
    as_text = discover([str(tmp_path / "a")])
    assert [j.path for j in discover([tmp_path / "a"])] == [j.path for j in as_text]
    assert [j.path for j in discover(tmp_path / "a")] == [j.path for j in as_text]
    assert [j.path for j in discover(str(tmp_path / "a"))] == [j.path for j in as_text]
    with pytest.raises(TypeError, match=r"^sources: expected files or folders .* got int 3"):
        discover([str(tmp_path / "a"), 3])


def test_read_index_needs_no_torch(sample_files, tmp_path):
    import subprocess
    import sys

    prepare([str(sample_files["Subject00_2.edf"])], tmp_path, progress=False)
    code = (
        "import sys; from eegfast.data import read_index; "
        f"n = len(read_index({str(tmp_path)!r})); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(n)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "15"


def test_bids_folder(sample_files, tmp_path):
    mne_bids = pytest.importorskip("mne_bids")  # optional dependency (pip install eegfast[bids])
    raw = mne.io.read_raw(sample_files["Subject01_2.edf"], verbose="error")
    raw.set_channel_types({"ECG ECG": "ecg"})
    raw.info["line_freq"] = 50
    root = tmp_path / "bids"
    path = mne_bids.BIDSPath(subject="07", task="arith", root=root, datatype="eeg")
    mne_bids.write_raw_bids(raw, path, overwrite=True, verbose="error")
    report = prepare([f"arith={root}"], tmp_path / "out", progress=False)
    assert report["usable"] == 1 and report["subjects"] == ["sub-07"]
    record = load_index(tmp_path / "out")["recordings"][0]
    assert record["task"] == "arith" and len(record["electrodes"]) == 19


def _fif_recording(path, *, first_s=0.0, bads=(), annotations=(), dated=True):
    """A 60-s, 250-Hz, 3-electrode FIF recording whose first sample is ``first_s`` after the
    measurement start; ``annotations``: (seconds after the first sample, duration, description);
    ``dated=False``: no measurement date (annotations then have no ``orig_time``)."""
    sfreq = 250.0
    x = np.random.default_rng(0).normal(size=(3, int(60 * sfreq))) * 1e-5
    raw = mne.io.RawArray(x, mne.create_info(["FP1", "CZ", "O1"], sfreq, "eeg"),
                          first_samp=int(first_s * sfreq), verbose="error")  # fmt: skip
    raw.set_meas_date(1_000_000_000 if dated else None)
    raw.info["bads"] = list(bads)
    if annotations:
        onset, duration, description = zip(*annotations, strict=True)
        # MNE counts onsets from the measurement start in both cases: with orig_time set it
        # takes them as given, without it it adds first_time itself
        raw.set_annotations(mne.Annotations(
            [raw.first_time + o if dated else o for o in onset], duration, description,
            orig_time=raw.info["meas_date"],
        ))  # fmt: skip
    raw.save(path, verbose="error")
    return path


def _processed(path, tmp_path, preprocess=None):
    """The record process_file writes for one recording (every field, unlike index.json)."""
    job = discover([str(path)])[0]
    return process_file(job, Settings(preprocess=preprocess or PreprocessConfig()), str(tmp_path))


def test_annotations_count_from_the_first_sample(tmp_path):
    """A FIF whose data start 100 s into the measurement: its events' windows are where the
    events are in the data (they had been shifted by 100 s, past the recording's end)."""
    path = _fif_recording(tmp_path / "late_raw.fif", first_s=100.0,
                          annotations=[(10, 8, "left"), (30, 8, "right")])  # fmt: skip
    record = _processed(path, tmp_path, PreprocessConfig(window_seconds=4))
    assert [s / 200 for s in record["starts"]] == [10, 14, 30, 34]
    assert record["label_names"] == ["left", "left", "right", "right"]


def test_annotations_count_from_the_first_sample_without_a_measurement_date(tmp_path):
    """The same without a measurement date (an anonymised or cropped FIF): MNE still counts the
    onsets from the measurement start (it adds first_time when the annotations have no
    orig_time), so they were 100 s late and every event fell past the recording's end."""
    path = _fif_recording(tmp_path / "late_undated_raw.fif", first_s=100.0, dated=False,
                          annotations=[(10, 8, "left"), (30, 8, "right")])  # fmt: skip
    raw = mne.io.read_raw_fif(path, verbose="error")
    assert raw.annotations.orig_time is None and raw.annotations.onset[0] == 110.0
    record = _processed(path, tmp_path, PreprocessConfig(window_seconds=4))
    assert [s / 200 for s in record["starts"]] == [10, 14, 30, 34]
    assert record["label_names"] == ["left", "left", "right", "right"]


def test_channels_marked_bad_are_left_out(tmp_path):
    path = _fif_recording(tmp_path / "bads_raw.fif", bads=["CZ"])
    record = _processed(path, tmp_path)
    assert record["electrodes"] == ["FP1", "O1"]
    assert record["excluded"]["CZ"] == "marked bad in the recording"
    every = _fif_recording(tmp_path / "all_raw.fif", bads=["FP1", "CZ", "O1"])
    record = _processed(every, tmp_path)
    assert record["status"] == "bad" and "every EEG channel is marked bad" in record["reason"]


def test_windows_in_bad_segments_are_left_out(tmp_path):
    """Continuous 4-s windows (0, 4, ..., 56 s) overlapping MNE's BAD_ marks are not written."""
    path = _fif_recording(tmp_path / "art_raw.fif",
                          annotations=[(5, 2, "BAD_muscle"), (20, 0, "bad blink")])  # fmt: skip
    record = _processed(path, tmp_path, PreprocessConfig(window_seconds=4))
    starts = [s / 200 for s in record["starts"]]
    assert 4 not in starts and 20 not in starts and 16 in starts and 24 in starts
    assert len(starts) == 15 - 2 and record["windows_in_bad_segments"] == 2


def test_channels_naming_one_electrode_twice_or_an_unknown_one_is_refused(sample_files, tmp_path,
                                                                          capsys):  # fmt: skip
    """--channels is checked once, naming the problem, before any recording is read."""
    with pytest.raises(ValueError, match=r"channels: the same electrode appears twice: 'T3'"):
        Settings(channels=("T3", "T7"))
    with pytest.raises(ValueError, match=r"channels: unknown electrode names \['XYZ'\]"):
        Settings(channels=("C3", "XYZ"))
    with pytest.raises(ValueError, match="empty electrode name"):
        Settings(channels=("C3", ""))
    assert Settings(channels=("T3", "T7"), modern_names=False).channels == ("T3", "T7")
    out = tmp_path / "o"
    good = str(next(iter(sample_files.values())))
    argv = ["prepare", good, "--out", str(out), "--channels", "C3,T3,T7"]
    assert cli_main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--channels: the same electrode appears twice: 'T3' and 'T7' -> T7" in err
    assert not out.exists()


def test_killed_rerun_with_other_settings_leaves_no_mixed_index(tmp_path, monkeypatch):
    """A re-run with another filter rewrites the shards under the same names; killed after the
    first, the old index (saying 0.1 Hz) must not stay over a mix of 0.1-Hz and 8-Hz shards of
    one shape, which loaded without a word. Without an index the folder is refused until a
    run finishes; that run redoes what the killed one had not."""
    import eegfast.data.prepare as prepare_module

    files = [str(_fif_recording(tmp_path / f"r{i}_raw.fif")) for i in (1, 2)]
    out = tmp_path / "out"
    prepare(files, out, progress=False)
    real = prepare_module.process_file
    calls = []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "process_file", killed_after_one)
    other = Settings(preprocess=PreprocessConfig(l_freq=8.0))
    with pytest.raises(KeyboardInterrupt):
        prepare(files, out, other, progress=False, workers=1)
    with pytest.raises(ValueError, match="not a prepared folder"):
        load_index(out)
    monkeypatch.setattr(prepare_module, "process_file", real)
    report = prepare(files, out, other, progress=False, workers=1)
    assert report["reused"] == 1 and report["processed"] == 1
    assert load_index(out)["settings"]["preprocess"]["l_freq"] == 8.0


def test_new_recordings_keep_the_index_of_the_finished_ones(tmp_path):
    """Only shards the index lists make it untrustworthy: adding a recording keeps it."""
    first = str(_fif_recording(tmp_path / "a_raw.fif"))
    out = tmp_path / "out"
    prepare([first], out, progress=False)
    index = (out / "index.json").read_text()
    second = str(_fif_recording(tmp_path / "b_raw.fif"))
    from eegfast.data.prepare import _drop_index_of_replaced_shards

    _drop_index_of_replaced_shards(out, discover([second]))
    assert (out / "index.json").read_text() == index
    _drop_index_of_replaced_shards(out, discover([first]))
    assert not (out / "index.json").exists()


def test_a_record_is_gone_while_its_shard_is_rewritten(tmp_path, monkeypatch):
    """Killed between writing a new shard and its record, the old record (old settings) must
    not remain beside the new shard: a run with the old settings would reuse it."""
    import eegfast.data.prepare as prepare_module

    path = _fif_recording(tmp_path / "a_raw.fif")
    job = discover([str(path)])[0]
    assert process_file(job, Settings(), str(tmp_path))["status"] == "ok"
    record = tmp_path / "shards" / f"{job.key}.json"
    assert record.exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_process", killed)
    with pytest.raises(KeyboardInterrupt):
        process_file(job, Settings(preprocess=PreprocessConfig(l_freq=8.0)), str(tmp_path))
    assert not record.exists()


def test_event_map_that_matches_no_annotation_warns(tmp_path, capsys):
    """--event-map names events: a description no recording has (a typo) and recordings cut
    into unlabelled windows because they have none of them are said, not silent."""
    events = _fif_recording(tmp_path / "ev_raw.fif", annotations=[(4, 8, "T1"), (20, 8, "T2")])
    plain = _fif_recording(tmp_path / "plain_raw.fif")
    out = tmp_path / "out"
    argv = ["prepare", str(events), str(plain), "--out", str(out), "--no-progress"]
    argv += ["--event-map", "T1=left", "--event-map", "T3=right"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "--event-map T3=right: no recording has an annotation 'T3'" in err
    assert "(annotations found: T1, T2)" in err
    assert "1 recording(s) have no annotation named in --event-map" in err
    assert str(plain) in err and "T1=left" not in err
    report = json.loads((out / "report.json").read_text())
    assert len(report["warnings"]) == 2
    assert "no annotation named in --event-map" in (out / "report.md").read_text()


def test_zero_duration_events_are_warned_about_and_labelled_with_event_duration(tmp_path, capsys):
    """Onset markers (zero-duration annotations, as event channels and BIDS events give them)
    were skipped without a word, even when --event-map named them: every window unlabelled.
    Now prepare warns and names --event-duration, which labels that long after each onset."""
    markers = [(4, 0, "T1"), (20, 0, "T2"), (36, 0, "T1")]
    path = _fif_recording(tmp_path / "markers_raw.fif", annotations=markers)
    argv = ["prepare", str(path), "--no-progress", "--event-map", "T1=left"]
    argv += ["--event-map", "T2=right"]
    assert cli_main([*argv, "--out", str(tmp_path / "skipped")]) == 0
    err = capsys.readouterr().err
    assert "3 annotation(s) of zero duration (onset markers) in 1 recording(s)" in err
    assert "label no window: T1 (2), T2 (1)." in err
    assert "--event-duration" in err and "no annotation named in --event-map" not in err
    index = json.loads((tmp_path / "skipped" / "index.json").read_text())
    assert set(index["recordings"][0]["labels"]) == {-1}

    assert cli_main([*argv, "--event-duration", "8", "--out", str(tmp_path / "labelled")]) == 0
    assert "zero duration" not in capsys.readouterr().err
    index = json.loads((tmp_path / "labelled" / "index.json").read_text())
    names = index["tasks"][index["recordings"][0]["task"]]["labels"]
    labels = [names[i] for i in index["recordings"][0]["labels"]]
    assert labels == ["left", "left", "right", "right", "left", "left"]  # 8 s = two 4-s windows

    for bad in ("0", "-1", "nan", "x"):
        with pytest.raises(SystemExit):
            cli_main([*argv, "--event-duration", bad, "--out", str(tmp_path / "bad")])
    assert "--event-duration: must be a positive number of seconds" in capsys.readouterr().err


def test_event_map_warnings_are_not_made_up_for_records_of_older_runs(tmp_path, capsys):
    """Records written before prepare kept the annotation descriptions have none: a re-run
    reusing them must not warn that no recording has the --event-map annotations (every
    entry was said to match nothing, with 'annotations found: none')."""
    events = _fif_recording(tmp_path / "ev_raw.fif", annotations=[(4, 8, "T1"), (20, 8, "T2")])
    out = tmp_path / "out"
    argv = ["--out", str(out), "--no-progress", "--event-map", "T1=left"]
    assert cli_main(["prepare", str(events), *argv]) == 0
    assert "--event-map" not in capsys.readouterr().err
    for record in (out / "shards").glob("*.json"):  # as an older eegfast wrote it
        fields = json.loads(record.read_text())
        del fields["annotation_descriptions"]
        record.write_text(json.dumps(fields))
    newer = _fif_recording(tmp_path / "new_raw.fif", annotations=[(4, 8, "T2")])
    assert cli_main(["prepare", str(events), str(newer), *argv]) == 0
    err = capsys.readouterr().err
    assert "no recording has an annotation" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["reused"] == 1 and report["processed"] == 1
    # the new recording is still said to have none of the named annotations
    assert "1 recording(s) have no annotation named in --event-map" in err and str(newer) in err


def test_settings_digest_of_folders_made_before_event_duration_is_unchanged():
    """The digest decides whether a prepared recording is reused: settings that existed before
    --event-duration must keep their digests (values computed by the code before it), and a
    given event duration must change it."""
    rules = LabelRules(event_map={"T1": "left"}, filename_rules=(("_1$", "rest"),))
    assert Settings().digest() == "56e1ad4a5c956d95"
    assert Settings(labels=rules).digest() == "3082b40eebd65bfa"
    assert Settings(preprocess=PreprocessConfig(l_freq=8.0)).digest() == "3945693ace09137e"
    timed = LabelRules(event_map={"T1": "left"}, event_duration=4.0)
    assert (
        Settings(labels=timed).digest()
        != Settings(labels=LabelRules(event_map={"T1": "left"})).digest()
    )
