"""Audit of the file-system side of `eegfast prepare` and of prepared folders: which files a
folder search takes, what a failed output write leaves, and the shard paths of index.json."""

import errno
import json
import os
import shutil

import mne
import numpy as np
import pytest

from eegfast.cli import main as cli
from eegfast.data import ShardDataset, load_index
from eegfast.data import prepare as prep
from eegfast.data.prepare import discover, prepare

CHANNELS = ["Fp1", "Fp2", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2"]


def _recording(path, seconds: float = 8.0):
    """A small FIF recording at ``path``: 10 EEG channels of 20 µV noise at 200 Hz."""
    rng = np.random.default_rng(0)
    info = mne.create_info(CHANNELS, 200.0, "eeg")
    data = rng.standard_normal((len(CHANNELS), int(seconds * 200))) * 20e-6
    path.parent.mkdir(parents=True, exist_ok=True)
    mne.io.RawArray(data, info, verbose="error").save(path, verbose="error")
    return path


def _found(folder, **kwargs) -> list[str]:
    return [os.path.relpath(job.path, folder) for job in discover([str(folder)], **kwargs)]


def test_a_folder_search_skips_hidden_files_and_os_junk(tmp_path):
    """A folder copied from a Mac, or open in an editor, holds ``._a.fif`` (AppleDouble),
    ``.DS_Store``, ``~$`` lock files and hidden folders (``.snapshot``): they were taken as
    recordings, reported bad (failing a --strict run), or prepared a second time."""
    rec = _recording(tmp_path / "data" / "a.fif")
    for junk in ("._a.fif", ".DS_Store", "~$a.fif", ".hidden.fif"):
        (rec.parent / junk).write_bytes(b"\0" * 4096)
    (rec.parent / ".snapshot").mkdir()
    shutil.copy(rec, rec.parent / ".snapshot" / "a.fif")
    assert _found(rec.parent) == ["a.fif"]
    # a file named on the command line is read, whatever its name
    assert len(discover([str(rec.parent / "._a.fif")])) == 1


def test_a_folder_search_follows_links_to_folders_and_ends_link_loops(tmp_path):
    """``data/sub-02 -> /elsewhere/sub-02``: the recordings of a linked folder were left out
    without a word (``rglob`` does not follow links); a link loop must still end."""
    _recording(tmp_path / "elsewhere" / "sub-02" / "b.fif")
    own = _recording(tmp_path / "data" / "sub-01" / "a.fif")
    (tmp_path / "data" / "sub-02").symlink_to(tmp_path / "elsewhere" / "sub-02")
    (tmp_path / "data" / "sub-01" / "loop").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "again").symlink_to(own.parent)  # the same folder twice: one job
    assert _found(tmp_path / "data") == ["sub-01/a.fif", "sub-02/b.fif"]


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """A subfolder without read permission (chmod 000; simulated: this may run as root) was
    skipped without a word: the report now warns, --strict refuses, and a SRC folder that
    cannot be listed at all says why it holds no recordings."""
    _recording(tmp_path / "data" / "a.fif")
    locked = tmp_path / "data" / "locked"
    locked.mkdir()
    scandir = os.scandir

    def refuse(path="."):
        if os.fspath(path) in (str(locked), str(tmp_path / "data2")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    problems: list[str] = []
    assert _found(tmp_path / "data", problems=problems) == ["a.fif"]
    assert len(problems) == 1 and str(locked) in problems[0] and "Permission denied" in problems[0]
    with pytest.warns(UserWarning, match="cannot list .*locked"):
        discover([str(tmp_path / "data")])
    with pytest.raises(ValueError, match=r"1 folder\(s\) not searched \(--strict\)"):
        prepare([str(tmp_path / "data")], tmp_path / "out", progress=False, strict=True)
    report = prepare([str(tmp_path / "data")], tmp_path / "out", progress=False)
    assert report["usable"] == 1
    assert any(str(locked) in w for w in report["warnings"])
    (tmp_path / "data2").mkdir()
    with pytest.raises(FileNotFoundError, match="no recordings .*Permission denied"):
        discover([str(tmp_path / "data2")], problems=[])


def test_a_full_disk_stops_prepare_naming_the_shard_and_is_not_a_bad_recording(
    tmp_path, monkeypatch, capsys
):
    """ENOSPC while a shard was written made the recording 'bad' (error: OSError), and that
    verdict was reused by every later run with the same settings, after space was freed too;
    the run went on failing each recording. Now the run stops with one line naming the shard
    (exit status 1), leaves no record and no temporary, and a later run prepares it."""
    rec = _recording(tmp_path / "a.fif")
    out = tmp_path / "out"
    real = prep.write_atomic

    def full_disk(path, write):
        def fail(tmp):
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, fail)

    monkeypatch.setattr(prep, "write_atomic", full_disk)
    argv = ["prepare", str(rec), "--out", str(out), "--window", "4", "--no-progress"]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"{out / 'shards'}{os.sep}a.fif-" in err[0] and ".npy" in err[0]
    assert os.listdir(out / "shards") == []  # no record, no temporary
    monkeypatch.setattr(prep, "write_atomic", real)  # space freed
    assert cli(argv) == 0
    assert "1/1 recordings usable" in capsys.readouterr().out


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "prepared"
    prepare([str(_recording(tmp_path / "a.fif"))], out, progress=False)
    return out


@pytest.mark.parametrize("where", ["absolute", "dotdot", "windows"])
def test_index_shard_paths_outside_the_folder_are_refused(prepared, tmp_path, where):
    """A prepared folder received from someone else (or an index.json edited) may list shards
    by absolute paths or through ``..``: ``root / shard`` read a file outside the folder,
    without a word, when it held windows of the right shape."""
    index = json.loads((prepared / "index.json").read_text())
    shard = prepared / index["recordings"][0]["shard"]
    outside = tmp_path / "outside.npy"
    shutil.copy(shard, outside)
    index["recordings"][0]["shard"] = {
        "absolute": str(outside),
        "dotdot": "shards/../../outside.npy",
        "windows": "C:\\data\\outside.npy",
    }[where]
    (prepared / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json lists the shard .* not a path inside"):
        load_index(prepared)
    with pytest.raises(ValueError, match="not a path inside"):
        ShardDataset(prepared)


def test_a_prepared_folder_moved_elsewhere_still_reads(prepared, tmp_path):
    before = ShardDataset(prepared)[0]["x"]
    moved = shutil.move(prepared, tmp_path / "elsewhere" / "moved")
    after = ShardDataset(moved)[0]["x"]
    assert np.array_equal(before.numpy(), after.numpy())
