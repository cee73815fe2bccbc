"""Tests that kill mutations which survived the earlier suites in the top-level modules:
eegfast/electrodes.py, fileio.py, cli.py, datasets.py, progress.py and demo.py. Each test
names the behaviour a one-line slip there (a dropped term, an inverted condition, a wrong
default) would break unnoticed."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast import datasets, demo, fileio, progress
from eegfast.electrodes import normalize_channel_name

# --- electrodes -------------------------------------------------------------------------------


def test_tabs_around_the_dash_of_a_pair_are_blanks():
    """Runs of blanks (tabs included) fold to one space before a pair is split: each side is
    stripped of spaces and dots only, so a tab left in 'FP1\\t' made the pair unknown."""
    assert normalize_channel_name("Fp1\t-\tF7") == "FP1-F7"
    assert normalize_channel_name("T3 \t-  T5", modern_names=False) == "T7-P7"


@pytest.mark.parametrize("raw", ["EEG Fp1-REF1", "Fp1-Ref2", "EEG FP1-REF12"])
def test_numbered_reference_suffixes_are_removed(raw):
    """The docs name -REF1...: a numbered common reference is a reference, not a pair."""
    assert normalize_channel_name(raw) == "FP1"


# --- fileio -----------------------------------------------------------------------------------


def test_a_write_makes_its_rename_durable_with_an_fsync_of_the_folder(tmp_path, monkeypatch):
    """Without the folder's fsync a power cut after os.replace can lose the new name."""
    synced = []

    def spy(folder):
        synced.append((Path(folder), sorted(p.name for p in Path(folder).iterdir())))

    monkeypatch.setattr(fileio, "fsync_dir", spy)
    path = fileio.write_text_atomic(tmp_path / "sub" / "a.txt", "x")
    assert synced == [(tmp_path / "sub", ["a.txt"])]  # after the rename, of its folder
    assert path.read_text() == "x"


def test_an_oserror_subclass_of_another_kind_keeps_its_type(tmp_path):
    """Only a plain errno OSError is re-raised naming the target: a library's own subclass
    (here one carrying ENOSPC) is the caller's to catch by its type."""

    class LibraryError(OSError):
        pass

    def failing(tmp):
        tmp.write_text("half")
        raise LibraryError(errno.ENOSPC, "library says no")

    with pytest.raises(LibraryError, match="library says no"):
        fileio.write_atomic(tmp_path / "a.bin", failing)
    assert list(tmp_path.iterdir()) == []


def test_json_files_end_with_a_newline(tmp_path):
    path = fileio.write_json_atomic(tmp_path / "r.json", {"a": 1})
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": 1}


def test_a_folder_named_like_a_temporary_is_not_removed(tmp_path):
    """Only files are a killed writer's temporaries; a folder of that name (the user's) made
    the clean-up fail with IsADirectoryError."""
    folder = tmp_path / ".x.npy.tmp-abcd"
    folder.mkdir()
    (tmp_path / ".y.npy.tmp-efgh").write_text("partial")
    assert fileio.remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


# --- cli --------------------------------------------------------------------------------------


def test_a_missing_dependency_is_not_reported_as_a_missing_command(monkeypatch):
    """Only the command's own module missing means "not in this build"; a dependency it
    imports that is missing (mne, safetensors...) must surface as itself."""
    import importlib

    from eegfast import cli

    def missing(name):
        def import_module(module_name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        return import_module

    monkeypatch.setattr(importlib, "import_module", missing("some_dependency"))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        cli._load("prepare")
    monkeypatch.setattr(importlib, "import_module", missing("eegfast.data.prepare"))
    with pytest.raises(SystemExit, match="eegfast prepare: this command is not available"):
        cli._load("prepare")


# --- datasets ---------------------------------------------------------------------------------


def test_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_dir() == tmp_path / "xdg" / "eegfast" / "sample"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.cache_dir() == tmp_path / "home" / ".cache" / "eegfast" / "sample"


def test_verify_sample_says_which_check_failed(tmp_path):
    """A file of the wrong size is reported by its size; one of the right size with other
    bytes (damaged in place) by its SHA-256."""
    first, second = datasets.SAMPLE_FILES[:2]
    (tmp_path / first.name).write_bytes(b"short")
    (tmp_path / second.name).write_bytes(bytes(second.size))
    problems = datasets.verify_sample(tmp_path)
    assert problems[0] == f"{tmp_path / first.name}: 5 bytes, expected {first.size}"
    assert problems[1] == f"{tmp_path / second.name}: SHA-256 differs from the published checksum"
    assert problems[2:] == [f"{tmp_path / f.name}: missing" for f in datasets.SAMPLE_FILES[2:]]


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    try:
        return datasets.sample(download=False)[0].parent
    except datasets.SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")


def _linked_sample(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in datasets.SAMPLE_FILES:
        (folder / f.name).symlink_to(source / f.name)
    return folder


def test_eegfast_data_is_searched_before_the_cache(sample_dir, tmp_path, monkeypatch):
    mine = _linked_sample(sample_dir, tmp_path / "mine")
    cache = _linked_sample(sample_dir, tmp_path / "cache")
    monkeypatch.setenv("EEGFAST_DATA", str(mine))
    assert datasets.sample(download=False, cache=cache)[0].parent == mine


def test_an_incomplete_eegfast_data_folder_is_named(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("EEGFAST_DATA", str(mine))
    monkeypatch.setattr(datasets, "SHARED_DATA", tmp_path / "no-shared")
    with pytest.raises(datasets.SampleDataError) as raised:
        datasets.sample(download=False, cache=tmp_path / "cache")
    first = datasets.SAMPLE_FILES[0].name
    assert f"(EEGFAST_DATA={mine}: {mine / first}: missing;" in str(raised.value)


# --- progress ---------------------------------------------------------------------------------


class _ClosedStderr(io.StringIO):
    def isatty(self):
        raise ValueError("I/O operation on closed file")


def test_a_stderr_that_cannot_be_asked_counts_as_unattended(monkeypatch):
    monkeypatch.setattr("sys.stderr", _ClosedStderr())
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with progress.progress_bar(total=2, file=io.StringIO()) as bar:
        assert bar.mininterval == progress.UNATTENDED_REFRESH_S


# --- demo -------------------------------------------------------------------------------------


def test_mains_frequency_by_dataset():
    assert demo.mains_hz(Path("S001R04.edf")) == 60.0  # eegmmidb, USA
    assert demo.mains_hz(Path("Subject00_1.edf")) == 50.0  # eegmat, Ukraine


def _fake_edf(monkeypatch, sfreq: float, volts: np.ndarray) -> None:
    import mne

    def read_raw_edf(path, preload=True, verbose=None):
        info = mne.create_info(["CZ"], sfreq, "eeg")
        return mne.io.RawArray(volts[None], info, verbose="error")

    monkeypatch.setattr(mne.io, "read_raw_edf", read_raw_edf)


def test_load_recording_units_and_a_notch_above_nyquist(monkeypatch):
    """Patches are in units of 100 µV; a mains frequency at or above the Nyquist frequency
    less 1 Hz is not notch-filtered (MNE refuses it)."""
    seconds = 20
    t = np.arange(seconds * 200) / 200.0
    _fake_edf(monkeypatch, 200.0, 1e-4 * np.sin(2 * np.pi * 10.0 * t))  # 100 µV at 10 Hz
    rec = demo.load_recording(Path("Subject00_1.edf"))
    assert rec.patches.shape == (1, seconds, 200) and rec.notch_hz == 50.0
    middle = rec.patches[0, 5:15]  # away from the filter's edges
    amplitude = middle.pow(2).mean().sqrt().item() * 2**0.5  # of the sine, from its RMS
    assert amplitude == pytest.approx(1.0, rel=0.1)
    t = np.arange(seconds * 100) / 100.0  # Nyquist 50 Hz: no 60 Hz notch
    _fake_edf(monkeypatch, 100.0, 1e-4 * np.sin(2 * np.pi * 10.0 * t))
    rec = demo.load_recording(Path("S001R04.edf"))
    assert rec.notch_hz is None and rec.sfreq_in == 100.0
    assert rec.patches.shape == (1, seconds, 200)


def test_band_features_are_log_amplitudes_of_all_101_bins():
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = demo.band_features(x)
    assert features.shape == (4, demo.NUM_BANDS)
    # log amplitudes: scaling the signal shifts every band by log(scale)
    shifted = demo.band_features(10.0 * x) - features
    torch.testing.assert_close(shifted, torch.full_like(shifted, np.log(10.0)))
    # the 0 Hz bin is in the first band (and only there)
    changed = (demo.band_features(x + 5.0) - features).abs() > 1e-9
    assert changed[:, 0].all() and not changed[:, 1:].any()


def test_code_usage_is_a_fraction_of_the_whole_codebook():
    usage = demo.code_usage(torch.tensor([0, 1, 1, 3]))
    assert usage["codes_used"] == 3
    assert usage["usage"] == pytest.approx(3 / demo.NUM_CODES)


def test_find_edf_files_takes_upper_case_suffixes(tmp_path):
    for name in ("B.EDF", "a.edf", "notes.txt", "c.Edf"):
        (tmp_path / name).write_text("")
    assert [p.name for p in demo.find_edf_files(tmp_path)] == ["B.EDF", "a.edf", "c.Edf"]


def test_demo_exits_1_when_the_lookup_differs_from_the_reference(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.edf").write_text("")
    patches = torch.randn(1, 600, 200, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(
        demo, "load_recording", lambda path: demo.Recording(path.name, 200.0, 50.0, patches)
    )
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    assert demo.main(argv) == 0
    monkeypatch.setattr(demo, "reference_mismatches", lambda features, codebook: 1)
    assert demo.main(argv) == 1
    assert "DIFFER from the reference" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    assert summary["lookup_matches_reference"] is False
    assert os.listdir(tmp_path / "out") == ["demo_summary.json"]
