"""`eegfast prepare` on long recordings: peak memory, and a worker process that dies.

The recordings here are short; the block sizes are made small instead, so that the paths taken
by hours-long recordings (channels read in groups, windows written in blocks) run in a second.
"""

import json
import multiprocessing
import os
import signal
import sys
import tracemalloc

import mne
import numpy as np
import pytest

import eegfast.data.prepare as prepare_module
from eegfast.data.prepare import Settings, discover, prepare, process_file
from eegfast.data.preprocess import PreprocessConfig, cut_windows, preprocess_signal

NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "P4", "O1", "O2", "F7", "F8", "T7"]


def _fif(path, seconds: float = 120.0, sfreq: float = 250.0, flat: int | None = None):
    """A recording of noise and a 10 Hz rhythm (tens of µV) with a DC offset per channel."""
    rng = np.random.default_rng(len(path.name))
    t = np.arange(int(seconds * sfreq)) / sfreq
    data = 2e-5 * rng.standard_normal((len(NAMES), len(t))) + 3e-5 * np.sin(2 * np.pi * 10 * t)
    data += 1e-3 * rng.standard_normal((len(NAMES), 1))
    if flat is not None:
        data[flat] = 0.0
    info = mne.create_info(NAMES, sfreq, "eeg")
    mne.io.RawArray(data, info, verbose="error").save(path, overwrite=True, verbose="error")
    return path


def _shard(out, record) -> np.ndarray:
    return np.load(out / record["shard"])


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(preprocess=PreprocessConfig(reference="average", dtype="float16")),
        Settings(preprocess=PreprocessConfig(reference="CZ", window_seconds=8, stride_seconds=3)),
    ],
    ids=["default", "average-float16", "cz-overlap"],
)
def test_long_recording_is_read_a_few_channels_at_a_time(tmp_path, monkeypatch, settings):
    """The channels are read (float64) and preprocessed a group at a time, and the windows are
    written a block at a time: the peak stays below the float64 array of every channel that
    was read whole before, and the shard is the one the whole array gives, bit for bit."""
    path = _fif(tmp_path / "long_raw.fif", seconds=240.0, sfreq=500.0)
    raw = mne.io.read_raw(path, verbose="error")
    cfg = settings.preprocess
    whole = raw.get_data()  # (C, T) float64: what was read at once before
    expected_signal = preprocess_signal(whole, raw.info["sfreq"], cfg, ch_names=NAMES)
    whole_bytes = whole.nbytes
    del whole
    # one channel at a time (as a long one is read: 256 MiB of float64 is about one hour of 8
    # channels at 1 kHz); windows written 50 at a time
    monkeypatch.setattr(prepare_module, "READ_BLOCK_BYTES", 8 * raw.n_times, raising=False)
    monkeypatch.setattr(prepare_module, "WRITE_BLOCK_BYTES", 50 * 14 * 800 * 4, raising=False)
    job = discover([str(path)])[0]
    (tmp_path / "out").mkdir()
    tracemalloc.start()
    try:
        record = process_file(job, settings, str(tmp_path / "out"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert record["status"] == "ok", record
    assert peak < 0.6 * whole_bytes, (peak, whole_bytes)
    starts = np.asarray(record["starts"])
    shard = _shard(tmp_path / "out", record)
    expected = cut_windows(expected_signal, starts, cfg)
    assert shard.dtype == expected.dtype and np.array_equal(shard, expected)


def test_bad_channel_dropped_when_read_in_groups(tmp_path, monkeypatch):
    """--bad-channels drop with the flat channel in the second group: the others' windows are
    those of the recording without it (average reference over the kept ones)."""
    path = _fif(tmp_path / "flat_raw.fif", seconds=60.0, flat=4)
    raw = mne.io.read_raw(path, verbose="error")
    cfg = PreprocessConfig(reference="average")
    kept = [n for i, n in enumerate(NAMES) if i != 4]
    expected_signal = preprocess_signal(
        raw.get_data(picks=kept), raw.info["sfreq"], cfg, ch_names=kept
    )
    monkeypatch.setattr(prepare_module, "READ_BLOCK_BYTES", 3 * 8 * raw.n_times, raising=False)
    settings = Settings(preprocess=cfg, bad_channels="drop")
    record = process_file(discover([str(path)])[0], settings, str(tmp_path))
    assert record["status"] == "ok", record
    assert record["excluded"] == {"C3": "flat or non-finite"}
    expected = cut_windows(expected_signal, np.asarray(record["starts"]), cfg)
    assert np.array_equal(_shard(tmp_path, record), expected)
    # and without --bad-channels drop the recording is refused, naming the channel
    record = process_file(discover([str(path)])[0], Settings(preprocess=cfg), str(tmp_path))
    assert record["status"] == "bad" and "flat channels" in record["reason"]
    assert "C3" in record["reason"]


_real_process_file = process_file


def _killed_on_doomed(job, settings, out):
    """process_file, except that the process preparing a file named doomed* is SIGKILLed (what
    the kernel's out-of-memory killer does to one holding a recording too large)."""
    if os.path.basename(job.path).startswith("doomed"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process_file(job, settings, out)


@pytest.mark.skipif(sys.platform != "linux", reason="the test patches forked workers")
def test_a_killed_worker_is_reported_by_name_and_the_run_goes_on(tmp_path, monkeypatch):
    """A worker killed while preparing one recording broke the pool: the run ended with
    BrokenProcessPool, naming no file, with no index or report. Now that recording is bad,
    named with the reason, and every other one is prepared."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a_raw.fif", "doomed_raw.fif", "b_raw.fif", "c_raw.fif"):
        _fif(src / name, seconds=20.0)
    monkeypatch.setattr(prepare_module, "process_file", _killed_on_doomed)
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(prepare_module, "_pool_context", lambda: fork)
    report = prepare([str(src)], tmp_path / "out", workers=2, progress=False)
    assert report["usable"] == 3
    [bad] = report["bad"]
    assert bad["file"].endswith("doomed_raw.fif")
    assert "killed (SIGKILL)" in bad["reason"] and "memory" in bad["reason"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["recordings"]) == 3
    # no record kept for it: a later run (fewer workers, more memory) tries it again
    monkeypatch.setattr(prepare_module, "process_file", _real_process_file)
    again = prepare([str(src)], tmp_path / "out", workers=2, progress=False)
    assert again["usable"] == 4 and again["reused"] == 3


def _write_fails(job, settings, out):
    raise prepare_module.OutputWriteError(28, "No space left on device", f"{out}/shards/x.npy")


@pytest.mark.skipif(sys.platform != "linux", reason="the test patches forked workers")
def test_a_failed_write_while_preparing_alone_stops_the_run(tmp_path, monkeypatch):
    """A recording prepared again in a process of its own (after a worker died) whose shard
    could not be written (a full disk) was reported bad, "died (exit code 1)", and the run
    went on: the run stops naming the shard, as in the pool."""
    src = tmp_path / "src"
    src.mkdir()
    _fif(src / "a_raw.fif", seconds=20.0)
    [job] = prepare_module.discover([str(src)])
    monkeypatch.setattr(prepare_module, "process_file", _write_fails)
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(prepare_module, "_pool_context", lambda: fork)
    with pytest.raises(prepare_module.OutputWriteError, match="No space left") as raised:
        prepare_module._process_alone(job, prepare_module.Settings(), str(tmp_path / "out"))
    assert raised.value.filename.endswith("x.npy")
