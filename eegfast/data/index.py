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

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "SHARD_DIR",
    "load_index",
    "preprocess_settings",
    "read_index",
]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_DIR = "shards"


def load_index(root: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a prepared folder; ValueError naming the folder if absent,
    and naming the file (and recording) when it is not the layout prepare writes (counts,
    labels and starts that disagree, keys missing, values of another type)."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise ValueError(
            f"root: {root} is not a prepared folder (no {INDEX_NAME}); run `eegfast prepare`"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        # (RecursionError: `[[[[...` nested past json's recursion, a traceback naming nothing)
        raise ValueError(
            f"root: {path} is not valid JSON ({err}); run `eegfast prepare` on {root} again"
        ) from err
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        found = index.get("format_version") if isinstance(index, dict) else None
        raise ValueError(
            f"root: {path} has format version {found}, "
            f"this eegfast reads {FORMAT_VERSION}; prepare the data again"
        )
    _check_layout(index, path, root)
    for entry in index["recordings"]:
        shard = entry.get("shard")
        if not _inside_folder(shard):
            # `root / shard` would read a file outside the folder (an absolute path, or one
            # through `..`: an index.json written elsewhere, or edited), without a word
            raise ValueError(
                f"root: {path} lists the shard {shard!r} (of {entry.get('file')!r}), not a "
                f"path inside {root}; prepare writes {SHARD_DIR}/<key>.npy: run "
                f"`eegfast prepare` on the recordings again"
            )
    return index


def preprocess_settings(index: dict) -> dict:
    """The preprocessing settings of a parsed ``index.json`` (``settings.preprocess``, as
    prepare records them: filters, notch, scale, ...); {} for an index without them (written
    by another tool or by hand: :func:`load_index` takes one, and its windows train as any
    other; only what the settings are compared with cannot say more)."""
    settings = index.get("settings")
    preprocess = settings.get("preprocess") if isinstance(settings, dict) else None
    return dict(preprocess) if isinstance(preprocess, dict) else {}


_STORED_DTYPES = ("float32", "float16")


def _check_layout(index: dict, path: Path, root: Path) -> None:
    """ValueError naming ``path`` (and the recording) unless ``index`` has the layout prepare
    writes. An index.json edited by hand, damaged or written by another tool is otherwise read
    on trust: a ``n_windows`` of 10**12 asked for terabytes, a negative one or a missing key
    gave numpy's or Python's error naming nothing, and ``labels`` shorter or longer than the
    windows (or ids past the task's label names) gave windows other windows' labels silently."""

    def bad(what: str, where: str = "") -> ValueError:
        return ValueError(
            f"root: {path}{where}: {what}; not an index.json `eegfast prepare` writes: run it "
            f"on the recordings again to rebuild {root}"
        )

    window = index.get("window_seconds")
    if not _is_int(window) or window < 1:
        raise bad(f"window_seconds must be a positive int, got {window!r}")
    tasks = index.get("tasks")
    if not isinstance(tasks, dict) or not all(
        isinstance(t, dict)
        and isinstance(t.get("labels"), list)
        and all(isinstance(n, str) for n in t["labels"])
        for t in tasks.values()
    ):
        raise bad("tasks must map each task to {'labels': [names]}")
    recordings = index.get("recordings")
    if not isinstance(recordings, list):
        raise bad(f"recordings must be a list, got {type(recordings).__name__}")
    for i, entry in enumerate(recordings):
        if not isinstance(entry, dict):
            raise bad(f"recordings[{i}] must be an object, got {type(entry).__name__}")
        where = f", recordings[{i}] ({entry.get('file')!r})"
        missing = [k for k in _RECORDING_KEYS if k not in entry]
        if missing:
            raise bad(f"missing {missing}", where)
        for key in ("file", "subject", "session", "task"):
            if not isinstance(entry[key], str):
                raise bad(f"{key} must be a str, got {entry[key]!r}", where)
        if entry["task"] not in tasks:
            raise bad(f"task {entry['task']!r} is not one of tasks {sorted(tasks)}", where)
        if entry.get("dtype", "float32") not in _STORED_DTYPES:
            raise bad(f"dtype must be one of {_STORED_DTYPES}, got {entry['dtype']!r}", where)
        electrodes = entry["electrodes"]
        if not isinstance(electrodes, list) or not all(isinstance(e, str) for e in electrodes):
            raise bad("electrodes must be a list of names", where)
        chans = _int_array(entry["input_chans"])
        if chans is None or len(chans) != len(electrodes) + 1 or (chans < 0).any():
            raise bad(
                f"input_chans must be {len(electrodes) + 1} table rows (cls, then one per "
                "electrode), non-negative ints",
                where,
            )
        n = entry["n_windows"]
        if not _is_int(n) or n < 0:
            raise bad(f"n_windows must be a non-negative int, got {n!r}", where)
        starts = _int_array(entry["starts"])
        if starts is None or len(starts) != n or (starts < 0).any():
            raise bad(f"starts must be {n} non-negative ints (one per window)", where)
        labels = _int_array(entry["labels"])
        classes = len(tasks[entry["task"]]["labels"])
        if labels is None or len(labels) != n or (labels < -1).any() or (labels >= classes).any():
            raise bad(
                f"labels must be {n} ints (one per window), -1 or a class id below {classes} "
                f"(task {entry['task']!r} has {classes} label names)",
                where,
            )


# what every recording of an index.json has (prepare's build_index; ``dtype`` is optional)
_RECORDING_KEYS = (
    "file", "subject", "session", "task", "electrodes", "input_chans", "shard", "starts",
    "n_windows", "labels",
)  # fmt: skip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_array(value: object) -> np.ndarray | None:
    """``value`` as a 1-D int64 array when it is a list of ints, else None (floats, strings,
    nested lists, numbers past int64)."""
    if not isinstance(value, list):
        return None
    if not value:
        return np.zeros(0, np.int64)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        return None
    return array if array.ndim == 1 and array.dtype.kind == "i" else None


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
