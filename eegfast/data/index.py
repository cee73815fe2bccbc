"""Layout of a prepared folder and its index (readable without torch).

A folder written by ``eegfast prepare`` holds::

    index.json            what the dataset reads: settings, tasks and their label names, and one
                          entry per usable recording (its shard, electrodes, windows, labels)
    report.json/.md       summary of the run, with every bad file and its reason
    shards/<key>.npy      one shard per recording: (W, C, A, 200) windows, float32 or float16,
                          a plain .npy file (np.load(path, mmap_mode="r") opens it)
    shards/<key>.json     the recording's record; written after its shard, so a recording is
                          finished exactly when its .json exists (what resuming relies on)

Every file is written with :mod:`eegfast.fileio` (temporary name in the same folder, fsync,
rename), so a killed run never leaves a half-written shard under a final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "SHARD_DIR",
    "load_index",
    "read_index",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_DIR = "shards"


def load_index(root: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a prepared folder (ValueError naming the folder if absent)."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise ValueError(
            f"root: {root} is not a prepared folder (no {INDEX_NAME}); run `eegfast prepare`"
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"root: {path} is not valid JSON ({err}); run `eegfast prepare` on {root} again"
        ) from err
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        found = index.get("format_version") if isinstance(index, dict) else None
        raise ValueError(
            f"root: {path} has format version {found}, "
            f"this eegfast reads {FORMAT_VERSION}; prepare the data again"
        )
    for entry in index.get("recordings", []):
        shard = entry.get("shard") if isinstance(entry, dict) else None
        if not _inside_folder(shard):
            # `root / shard` would read a file outside the folder (an absolute path, or one
            # through `..`: an index.json written elsewhere, or edited), without a word
            raise ValueError(
                f"root: {path} lists the shard {shard!r} (of {entry.get('file')!r}), not a "
                f"path inside {root}; prepare writes {SHARD_DIR}/<key>.npy: run "
                f"`eegfast prepare` on the recordings again"
            )
    return index


def _inside_folder(shard: object) -> bool:
    """Whether ``shard`` is a relative path without ``..`` (judged by its text, so that a
    ``shards`` folder that is a link to another disk is still fine), on any OS."""
    if not isinstance(shard, str) or not shard:
        return False
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.anchor or ".." in pure.parts:
            return False
    return True


def read_index(root: str | os.PathLike) -> list[dict]:
    """One record per window: file, subject, session, task, label (int, -1 = none),
    label_name, electrodes (tuple of names), input_chans, window (index in its file),
    start_s, shard (path relative to root), row (in the shard)."""
    index = load_index(root)
    records = []
    for entry in index["recordings"]:
        electrodes = tuple(entry["electrodes"])
        names = index["tasks"][entry["task"]]["labels"]
        for w, (start, label) in enumerate(zip(entry["starts"], entry["labels"], strict=True)):
            records.append(
                {
                    "file": entry["file"],
                    "subject": entry["subject"],
                    "session": entry["session"],
                    "task": entry["task"],
                    "label": label,
                    "label_name": names[label] if label >= 0 else "",
                    "electrodes": electrodes,
                    "input_chans": tuple(entry["input_chans"]),
                    "window": w,
                    "start_s": start / 200.0,
                    "shard": entry["shard"],
                    "row": w,
                }
            )
    return records
