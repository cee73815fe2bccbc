"""Audit of prepared folders and labels tables that were damaged, edited by hand or made by
another tool: each is refused at once with one line naming the file, never read on trust."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eegfast.cli import main as cli
from eegfast.data import ShardDataset, read_index
from eegfast.data.labels import read_label_table
from eegfast.train.data import load_data

ELECTRODES = ["FP1", "FP2", "C3", "C4"]


def _folder(root: Path, n_windows: int = 3) -> Path:
    """A prepared folder as ``eegfast prepare`` writes it, built by hand (no MNE run): one
    recording of ``n_windows`` 2-s windows of 4 electrodes, task ``mi`` with two classes."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    windows = np.random.default_rng(0).standard_normal((n_windows, 4, 2, 200), np.float32)
    np.save(shards / "a.npy", windows)
    recording = {
        "file": "a.edf",
        "subject": "S1",
        "session": "",
        "task": "mi",
        "electrodes": ELECTRODES,
        "input_chans": [0, 1, 2, 3, 4],
        "shard": "shards/a.npy",
        "dtype": "float32",
        "window_seconds": 2,
        "starts": [400 * w for w in range(n_windows)],
        "n_windows": n_windows,
        "sfreq_in": 200.0,
        "labels": [w % 2 for w in range(n_windows)],
    }
    index = {
        "format_version": 1,
        "window_seconds": 2,
        "tasks": {"mi": {"labels": ["left", "right"]}},
        "recordings": [recording],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def _edit(root: Path, edit) -> None:
    index = json.loads((root / "index.json").read_text())
    edit(index, index["recordings"][0])
    (root / "index.json").write_text(json.dumps(index))


def test_a_hand_built_folder_as_prepare_writes_it_reads(tmp_path):
    ds = ShardDataset(_folder(tmp_path / "p"))
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 0]
    assert [r["label_name"] for r in read_index(tmp_path / "p")] == ["left", "right", "left"]


# (edit of the index and its recording, what the error names)
ABSURD_INDEXES = {
    # np.repeat asked for 7.3 TiB (MemoryError) before the shard was ever looked at
    "huge window count": (lambda i, r: r.update(n_windows=10**12), "n_windows|starts"),
    # numpy's "negative dimensions are not allowed", naming no file
    "negative window count": (lambda i, r: r.update(n_windows=-3), "n_windows"),
    # the dataset gave every window a label without a word: windows 0..2 took ids of others
    "labels shorter than the windows": (lambda i, r: r.update(labels=[1, 0]), "labels"),
    "labels longer than the windows": (lambda i, r: r.update(labels=[0, 1, 0, 1]), "labels"),
    # a class id past the task's label names: IndexError from read_index / load_data
    "label id past the class names": (lambda i, r: r.update(labels=[0, 5, 1]), "labels"),
    "label id below -1": (lambda i, r: r.update(labels=[0, -4, 1]), "labels"),
    "starts of another length": (lambda i, r: r.update(starts=[0]), "starts"),
    "task not in tasks": (lambda i, r: r.update(task="sleep"), "task 'sleep'"),
    "a key missing": (lambda i, r: r.pop("input_chans"), "missing \\['input_chans'\\]"),
    "input_chans of text": (lambda i, r: r.update(input_chans=["a"] * 5), "input_chans"),
    "subject as a number": (lambda i, r: r.update(subject=7), "subject"),
    "recordings not a list": (lambda i, r: i.update(recordings={"a": r}), "recordings"),
    "recording not an object": (lambda i, r: i.update(recordings=["a.npy"]), "recordings"),
    "negative window length": (lambda i, r: i.update(window_seconds=-2), "window_seconds"),
    "tasks as a list": (lambda i, r: i.update(tasks=["mi"]), "tasks"),
}


@pytest.mark.parametrize("case", ABSURD_INDEXES)
def test_an_index_json_with_absurd_or_inconsistent_entries_is_refused_naming_it(tmp_path, case):
    """Before, each of these gave numpy's or Python's error naming nothing (MemoryError,
    KeyError, AttributeError, IndexError), or, worse, a data set with other windows' labels."""
    root = _folder(tmp_path / "p")
    edit, named = ABSURD_INDEXES[case]
    _edit(root, edit)
    for read in (ShardDataset, read_index, lambda folder: load_data([folder])):
        with pytest.raises(ValueError, match=rf"{root / 'index.json'}.*({named})"):
            read(root)


def test_a_shard_of_another_dtype_is_refused_when_the_index_names_none(tmp_path):
    """An index.json without ``dtype`` (written before it was recorded): an int64 shard of the
    right shape was read as float32 bits, windows of garbage without a word."""
    root = _folder(tmp_path / "p")
    _edit(root, lambda i, r: r.pop("dtype"))
    windows = np.load(root / "shards" / "a.npy")
    ShardDataset(root)[0]  # a float32 shard reads
    np.save(root / "shards" / "a.npy", (windows * 100).astype(np.int64))
    with pytest.raises(ValueError, match=r"a\.npy: shard holds int64 .* float32 or float16"):
        ShardDataset(root)[0]


def _table(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_labels_table_with_a_field_past_the_csv_limit_is_a_named_error(tmp_path):
    """csv's own ``_csv.Error: field larger than field limit (131072)`` (binary data read as a
    table, or a table of one huge cell) is no ValueError: `eegfast prepare` showed a
    traceback and exit status 1."""
    table = _table(tmp_path / "labels.csv", b"file,label\na.edf," + b"x" * 200_000 + b"\n")
    with pytest.raises(ValueError, match=r"labels table .*labels\.csv: not a CSV table"):
        read_label_table(table)


@pytest.mark.parametrize(
    ("encoding", "said"),
    [("utf-16", r"line 1: not UTF-8 text \(UTF-16"), ("latin-1", r"line 2: not UTF-8 text")],
)
def test_a_labels_table_in_another_encoding_says_so_and_what_to_do(tmp_path, encoding, said):
    """Excel's "Unicode text" (UTF-16) and Latin-1 tables: the message was the codec's own
    "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"."""
    text = "file,label\na.edf,r\u00e9pos\n"
    table = _table(tmp_path / "labels.csv", text.encode(encoding))
    with pytest.raises(ValueError, match=rf"labels\.csv, {said}.*save it as CSV UTF-8"):
        read_label_table(table)
    # the same text saved as "CSV UTF-8" (with its byte-order mark) reads
    table.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_label_table(table)["a.edf"].label == "r\u00e9pos"


def test_prepare_with_a_garbage_labels_table_is_one_line_and_status_2(tmp_path, capsys):
    table = _table(tmp_path / "labels.csv", b"file,label\n" + b'"' + b"\x01" * 200_000)
    argv = ["prepare", str(tmp_path / "a.edf"), "--labels", str(table), "--out"]
    assert cli([*argv, str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eegfast prepare: labels table") and "\n" not in err
