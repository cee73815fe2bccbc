"""``eegfast prepare SRC... --out DIR``: recordings -> preprocessed, sharded, memory-mapped windows.

Each recording is read with MNE, its channels are mapped to the LaBraM electrode table, it is
band-passed, notch-filtered and resampled in one FFT per channel (``preprocess_signal``), cut into
(C, A, 200) windows, and written as one shard (``shards/<key>.npy``) plus its record
(``shards/<key>.json``) by a pool of worker processes. The continuous parts of a recording with
gaps (EDF+D, MNE's ``EDGE``, EEGLAB's ``boundary`` and BrainVision's ``New Segment`` marks)
are filtered and windowed on their own. The later parts of a split FIF file are read with its
first part, not as recordings.
``index.json`` and a report (``report.json``, ``report.md``) are written at the end.

Resuming: a recording whose record exists, with the same settings and the same size and
modification time of its files (with a BrainVision header its .eeg/.vmrk, with EEGLAB's .set its
.fdt, for an EGI .mff folder every file in it, in a BIDS folder its _channels.tsv/_events.tsv/.json
sidecars) is not processed again,
so re-running the same command is cheap and a killed run loses only the recordings in flight;
outputs made by an older eegfast whose processing has changed since are
prepared again (``--force`` redoes everything). Bad recordings (truncated or corrupt files, no EEG,
only unknown electrodes, flat or non-finite channels, µV read as volts, too-low sample rate, too
short, or one whose worker process was killed: out of memory) are listed with their reason and
skipped. The exit status is 1 only when nothing usable was produced, or with ``--strict`` when
any recording was bad. A ``--labels`` table that does not fit the recordings (rows that match
no recording, empty labels, recordings it does not name) gives warnings, on stderr and in the
report; with ``--strict`` an error (exit 2) before anything is processed. A mains frequency in the
file (FIF, BIDS) other than ``--notch`` is warned about.

Events: windows are labelled from a recording's annotations; one whose annotations give no event
(none, only BAD/EDGE marks, none named in ``--event-map``) is labelled from the events of its stim
channel instead, read with ``mne.find_events`` (every change to a non-zero code is an event, even
one sample long), named by their trigger codes ("1", "2", ...: ``--event-map 1=left``). They are
onset markers: they label windows only with ``--event-duration``. ``--stim-channel auto`` (the
default) reads STI101 or ``STI 014``, else the first channel of type stim (BDF's Status, an
EDF's Status/Trigger), else one named like a trigger (TRIG, STI...); ``--stim-channel NAME`` reads
that one (a recording that needs it and lacks it is bad); ``--stim-channel none`` reads none.
The stim channel is never an EEG channel of the windows; ``--no-annotations`` ignores both.

SRC is a recording, a folder (searched recursively for files MNE reads; an EGI ``.mff`` folder is
one recording; a BIDS folder is read through mne-bids), and may be written ``TASK=SRC`` to name the
task of its recordings. In a BIDS dataset (a folder with a dataset_description.json: given
itself, a folder in it such as a subject's, one of its recordings, or a folder holding datasets)
the raw recordings, ``sub-X/[ses-Y/]eeg/sub-X_...``, are read through mne-bids with their
sidecars, not those of derivatives/ or sourcedata/; a folder or recording in a dataset is of
the dataset's task (its folder's name), as the dataset is, and a dataset of several BIDS tasks
gives one task each (``ds-mi``, ``ds-rest``) unless TASK= or ``--task`` names one. Searching
a dataset (or a part of it) leaves out, with a warning counting them, the files its
``.bidsignore`` names (gitignore patterns), those out of ``sub-X/[ses-Y/]eeg/`` (``meg/``,
``ieeg/``, ``beh/``, ``stimuli/``...) and those whose names mne-bids refuses (``..._eeg_old.edf``,
``.EDF``; given by its own path such a file is read plainly). A BIDS recording's session is
its ``ses-`` label. In an EDF+D file (with gaps) of a dataset, events.tsv's onsets (seconds from
the first sample, the file's time) are moved onto the data's time axis. A folder
search follows links to folders, skips hidden files and folders (``.DS_Store``, ``._x.edf``,
``.snapshot``) and ``~$`` lock files, and warns of a subfolder it cannot list (an error with
``--strict``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import numbers
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pathspec

from eegfast.cpus import usable_cpu_count
from eegfast.data.index import FORMAT_VERSION, INDEX_NAME, SHARD_DIR
from eegfast.data.labels import LabelRules, is_discontinuity_mark, read_label_table
from eegfast.data.preprocess import (
    PATCH_SAMPLES,
    TARGET_SFREQ,
    PreprocessConfig,
    SampleRateError,
    _rereference,
    check_sample_rate,
    cut_windows,
    preprocess_signal,
    window_starts,
)
from eegfast.data.reading import (
    MNE_EXTENSIONS,
    BadRecording,
    annotation_durations,
    import_mne_bids,
    map_channels,
    read_recording,
)
from eegfast.electrodes import is_labram_channel, labram_input_chans, normalize_channel_name
from eegfast.fileio import (
    remove_stale_temporaries,
    write_atomic,
    write_text_atomic,
)


def _json_text(value: object, depth: int = 0) -> str:
    """JSON of the folder's files (records, index, report): an object or a list holding objects
    or lists is indented one space a level, for reading; a list of plain values (a recording's
    ``starts``, ``labels``, ``electrodes``) is one line. (``indent=1`` put each of a corpus's
    millions of window starts and labels on a line of its own: 2M windows were a 40 MB,
    4M-line index.json, 3 s to write with json's pure-Python indenting encoder.) A value JSON
    cannot hold (a numpy scalar) is a TypeError, never silently stringified."""
    pad, inner = "\n" + " " * depth, "\n" + " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{_json_key(k)}: {_json_text(v, depth + 1)}" for k, v in value.items()]
        return "{" + inner + ("," + inner).join(items) + pad + "}"
    # (the types of the items, not each item, tested: a list of a million starts is one pass)
    if isinstance(value, list | tuple) and any(
        issubclass(t, dict | list | tuple) for t in set(map(type, value))
    ):
        items = [_json_text(v, depth + 1) for v in value]
        return "[" + inner + ("," + inner).join(items) + pad + "]"
    return json.dumps(value, default=None)  # a plain value, or a list of them (C encoder)


def _json_key(key: object) -> str:
    if isinstance(key, str):
        return json.dumps(key)
    return json.dumps({key: 0}, default=None)[1:-4]  # json's own text of an int/float/bool key


def _write_json(path: Path, payload: dict) -> None:
    """``payload`` as ``_json_text`` into ``path``, atomically (temporary, fsync, rename)."""
    write_text_atomic(path, _json_text(payload) + "\n")


def _write_index(path: Path, index: dict) -> None:
    """``index`` into ``path`` as ``_write_json``, unless the file there holds the same content
    already: an index of an older eegfast (``indent=1`` layout) is left as it is. Checkpoints
    record its SHA-256 (``eegfast.train.checkpoint.data_identity``): rewritten in this layout
    by a run that reused every recording, a resume warned that the folder was prepared again."""
    text = _json_text(index) + "\n"
    try:
        kept = path.read_text(encoding="utf-8") if path.is_file() else None  # (not a FIFO)
        if kept is not None and (kept == text or json.loads(kept) == json.loads(text)):
            return
    except (OSError, ValueError, RecursionError):  # unreadable (or `[[[[...`): written anew
        pass
    write_text_atomic(path, text)


__all__ = ["Job", "Settings", "configure_parser", "discover", "main", "prepare", "process_file"]

FLAT_PEAK_TO_PEAK_V = 1e-7  # 0.1 µV over the whole recording: a disconnected or flat channel
# 1 V: past any EEG amplifier's range (DC-coupled ones such as BioSemi's span ±0.26 V). A median
# channel beyond it is µV read as volts (an EDF unit MNE does not know, such as '' or 'uVolt').
IMPLAUSIBLE_PEAK_TO_PEAK_V = 1.0


@dataclass(frozen=True)
class Settings:
    """Everything that decides a recording's output (hashed to decide what can be reused)."""

    preprocess: PreprocessConfig = PreprocessConfig()
    labels: LabelRules = LabelRules()
    channels: tuple[str, ...] | None = None
    allow_extended: bool = False
    modern_names: bool = True
    bad_channels: str = "reject"  # or "drop"

    def __post_init__(self) -> None:
        if self.channels is not None:
            # Checked once here, not per recording: an unknown name or two names of one
            # electrode (T3 and T7) would otherwise fail every recording with a vaguer reason.
            if not self.channels or any(not str(c).strip() for c in self.channels):
                raise ValueError(f"channels: empty electrode name in {list(self.channels)}")
            try:
                labram_input_chans(
                    self.channels,
                    allow_extended=self.allow_extended,
                    modern_names=self.modern_names,
                )
            except ValueError as err:
                raise ValueError(f"channels: {str(err).removeprefix('names: ')}") from None

    def digest(self) -> str:
        fields = asdict(self)
        if fields["labels"]["event_duration"] is None:
            # the field is newer than outputs made without it: those stay reusable
            del fields["labels"]["event_duration"]
        if fields["labels"]["stim_channel"] == "auto":
            del fields["labels"]["stim_channel"]  # newer too (PROCESSING_REVISION 6 redoes them)
        payload = json.dumps(fields, sort_keys=True, default=str)
        if not self.modern_names:
            # --old-names outputs before 2026-12-06 gave T3..T6 the rows of T7..P8: not reused
            payload += "|old-name-rows"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    path: str
    task: str
    bids_root: str | None  # the BIDS dataset the recording belongs to (read with mne-bids)
    key: str


def _key(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)[:80]
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def _is_recording(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".mff"):
        return path.is_dir()  # EGI's MFF recording is a folder of files
    return path.is_file() and name.endswith(MNE_EXTENSIONS)


def _inside_recording(path: Path, root: Path) -> bool:
    """Whether ``path`` is one of the files of a folder recording (``.mff``) under ``root``."""
    return any(part.lower().endswith(".mff") for part in path.relative_to(root).parts[:-1])


def _is_junk(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS's AppleDouble ``._x.edf``, ``.git``,
    ``.Trash-1000``, ``.snapshot``) and Office/editor lock files (``~$x``): in a folder search
    they were taken as recordings, reported bad (failing a --strict run) or prepared twice."""
    return name.startswith((".", "~$"))


def _search(folder: Path, problems: list[str]) -> list[Path]:
    """The files and folders under ``folder``, sorted, without the ``_is_junk`` ones. Links to
    folders are followed (``rglob`` skipped them: recordings kept on another disk and linked
    in were left out without a word), each real folder once, so a link loop ends. A folder that
    cannot be listed (no permission) is named in ``problems`` (``rglob`` skipped it too)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def unlisted(err: OSError) -> None:
        problems.append(
            f"cannot list {err.filename} ({err.strerror or err}): its recordings, if any, "
            "are not prepared"
        )

    for top, dirs, files in os.walk(folder, followlinks=True, onerror=unlisted):
        try:
            st = os.stat(top)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # real folders first: a recording is named by its own path, not by a link to it
        dirs[:] = sorted(
            (d for d in dirs if not _is_junk(d)), key=lambda d: (os.path.islink(Path(top, d)), d)
        )
        found += [Path(top, name) for name in dirs]
        found += [Path(top, name) for name in files if not _is_junk(name)]
    return sorted(found)


def _bids_root(folder: Path, cache: dict[Path, Path | None]) -> Path | None:
    """The BIDS dataset ``folder`` is in: the nearest folder at or above it holding a
    ``dataset_description.json``, else None. Walked up without resolving links (datalad
    datasets are links into ``.git/annex``); ``cache`` keeps the answers of one search."""
    folder = Path(os.path.abspath(folder))
    if folder not in cache:
        if (folder / "dataset_description.json").is_file():
            cache[folder] = folder
        else:
            cache[folder] = None if folder.parent == folder else _bids_root(folder.parent, cache)
    return cache[folder]


def _bids_place(path: Path, cache: dict[Path, Path | None]) -> Path | None:
    """The BIDS dataset whose raw EEG recording ``path`` is, at its place there
    (``<root>/sub-X/[ses-Y/]eeg/sub-X_...``), else None. Only there is it read with mne-bids:
    ``read_raw_bids`` reads the file the dataset's layout names, which for a file elsewhere
    (a derivatives/ folder without a dataset_description.json of its own) is another one."""
    root = _bids_root(path.parent, cache)
    if root is None:
        return None
    rel = Path(os.path.abspath(path.parent)).relative_to(root).parts
    in_place = (
        len(rel) in (2, 3)
        and rel[-1] == "eeg"
        and rel[0].startswith("sub-")
        and path.name.startswith(f"{rel[0]}_")
        and (len(rel) == 2 or (rel[1].startswith("ses-") and f"_{rel[1]}_" in path.name))
    )
    return root if in_place else None


def _bidsignore(
    root: Path, cache: dict[Path, Callable[[Path], bool] | None], notes: list[str]
) -> Callable[[Path], bool] | None:
    """Whether a path in the BIDS dataset ``root`` is one its ``.bidsignore`` names (None
    without one): the files the dataset says are not BIDS, by gitignore's patterns relative to
    its root (the BIDS specification's syntax), the last matching pattern deciding (``!`` takes
    a path back), a file in a named folder named too. An unreadable one is said in ``notes``
    and not applied; ``cache``: one search's matchers.

    Each folder is matched with pathspec, which takes a pattern naming a folder to name all
    below it: a ``!`` pattern taking back a parent folder (``**/eeg/`` then ``!sub-01/``) also
    takes back a subfolder an earlier pattern named, which git would leave ignored. No pattern
    without ``!`` differs from git (checked against ``git check-ignore`` on 400 combinations)."""
    if root in cache:
        return cache[root]
    try:
        text = (root / ".bidsignore").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    except OSError as err:
        notes.append(
            f"cannot read {root / '.bidsignore'} ({err.strerror or err}): the files it names "
            "are prepared"
        )
        text = ""
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except (ValueError, re.error) as err:
            # `!` alone, a trailing `\`, `[z-a]`: no git pattern, which git passes over (they
            # match nothing); pathspec raised, and the whole search stopped on a traceback
            # naming neither the file nor the line
            notes.append(
                f"{root / '.bidsignore'}, line {number}: {line!r} is not a git pattern ({err}); "
                "left out"
            )
        else:
            lines.append(line)
    spec = pathspec.GitIgnoreSpec.from_lines(lines)

    def ignored(path: Path) -> bool:
        parts = Path(os.path.abspath(path)).relative_to(root).parts
        # its folders first: a file in an ignored folder is ignored, whatever names it again
        # (git's rule, which a path's own match does not apply)
        folders = ("/".join(parts[:n]) + "/" for n in range(1, len(parts)))
        # (bool: pathspec 0.12.0 answers None for a path no pattern names)
        return any(spec.match_file(folder) for folder in folders) or bool(
            spec.match_file("/".join(parts))
        )

    # (comments and blank lines are patterns that name nothing: include is None)
    cache[root] = ignored if any(p.include is not None for p in spec.patterns) else None
    return cache[root]


def _in_bids_extras(path: Path, top: Path, cache: dict[Path, Path | None]) -> bool:
    """Whether ``path``, found searching ``top``, is in the ``derivatives/`` or ``sourcedata/``
    folder of a BIDS dataset below ``top``: processed or original copies of the raw data,
    which would be prepared twice (a derivative dataset has a dataset_description.json of its
    own, so it is BIDS too). Given as SRC itself, such a folder is searched."""
    top = Path(os.path.abspath(top))
    folder = Path(os.path.abspath(path.parent))
    while folder != top and folder.parent != folder:
        if folder.name in ("derivatives", "sourcedata") and _bids_root(folder.parent, cache) == (
            folder.parent
        ):
            return True
        folder = folder.parent
    return False


def _need_mne_bids(source: str, dataset: Path) -> None:
    """mne-bids, or an ImportError naming the SRC and its dataset now rather than once a file."""
    try:
        import_mne_bids()
    except ImportError as err:
        raise ImportError(f"SRC {source!r}: {dataset} is a BIDS dataset: {err}") from None


_BIDS_TASK = re.compile(r"_task-([A-Za-z0-9]+)(?=_)")


def _bids_tasks(root: Path, cache: dict[Path, set[str]]) -> set[str]:
    """The BIDS task labels of the EEG recordings of the dataset ``root`` (its
    ``sub-X/[ses-Y/]eeg/`` files but those its .bidsignore names: a pilot task it leaves out
    named the one task's recordings ``ds-mi``), whatever part of it was given; ``cache``: one
    search's."""
    if root not in cache:
        ignored = _bidsignore(root, {}, [])  # (an unreadable one: said by the search)
        cache[root] = {
            m.group(1)
            for pattern in ("sub-*/eeg/*", "sub-*/ses-*/eeg/*")
            for p in root.glob(pattern)
            if (m := _BIDS_TASK.search(p.name)) is not None and not (ignored and ignored(p))
        }
    return cache[root]


def _bids_task(name: str, path: Path, root: Path, cache: dict[Path, set[str]]) -> str:
    """The default task ``name`` of the recording ``path`` of the BIDS dataset ``root``, with
    ``-<label>`` of its BIDS task where the dataset has several: P300 and motor-imagery
    recordings of one dataset were one task, a classifier over the union of their classes."""
    m = _BIDS_TASK.search(path.name)
    if m is None or len(_bids_tasks(root, cache)) < 2:
        return name
    return f"{name}-{m.group(1)}"


_BIDS_SESSION = re.compile(r"(?:^|_)(ses-[A-Za-z0-9]+)(?=_)")


def _bids_session(path: str | os.PathLike) -> str:
    """The BIDS session of a recording, ``ses-<label>`` in its file name (``ses-a`` of
    ``sub-01_ses-a_task-mi_eeg.edf``), as its subject is ``sub-01``; '' without one. The
    record's ``session`` when a labels table gives none: information only, splits group
    recordings by subject alone."""
    m = _BIDS_SESSION.search(Path(path).name)
    return "" if m is None else m.group(1)


def _mne_bids_refusal(path: Path, root: Path) -> str | None:
    """None when mne-bids reads ``path`` by its name in the dataset ``root``, as
    ``read_recording`` asks it to; else why not: the BIDS naming rule the name breaks, as
    mne-bids says it (a backup ``..._eeg_old.edf``: "Suffix old is not allowed", an upper-case
    ``.EDF``, an entity it does not know), or the other place its name gives."""
    try:
        bids_path = import_mne_bids().get_bids_path_from_fname(path).update(root=root)
    except Exception as err:  # mne-bids raises KeyError, ValueError ... for names it refuses
        # its first sentence: the list of every allowed suffix or extension that follows is long
        why = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        return why.split(". Use one of")[0].rstrip(".") or type(err).__name__
    if os.path.abspath(bids_path.fpath) != os.path.abspath(path):
        return f"its name places it at {bids_path.fpath}"
    return None


def _source_strings(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """``sources`` as SRC strings: one path is a list of it (a str was read letter by letter,
    ``SRC 'a': no such file``), Path objects are their text (``in`` on a Path: a TypeError
    naming nothing)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    strings = []
    for source in sources:
        if not isinstance(source, str | os.PathLike):
            raise TypeError(
                f"sources: expected files or folders (str or os.PathLike), got "
                f"{type(source).__name__} {source!r}"
            )
        strings.append(os.fspath(source))
    return strings


def discover(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    default_task: str | None = None,
    *,
    problems: list[str] | None = None,
    skipped: list[str] | None = None,
) -> list[Job]:
    """Jobs for SRC arguments (files, folders, BIDS folders, ``TASK=SRC``); sorted, unique.

    A recording reached under two tasks (``mi=a.edf arith=a.edf``, or a file and a folder
    holding it) is a ValueError naming it: it has one record, and one of the tasks was dropped
    without a word. A folder is searched as ``_search`` says; the subfolders it could not list
    are appended to ``problems`` (a warning when None).

    In a BIDS dataset a folder search takes the raw EEG recordings only,
    ``sub-X/[ses-Y/]eeg/sub-X_...`` (not ``meg/``, ``ieeg/``, ``beh/``..., whose recordings
    are no scalp EEG, nor ``derivatives/`` or ``sourcedata/``), and of those not the files its
    ``.bidsignore`` names (gitignore patterns relative to the dataset's root) nor those whose
    names mne-bids refuses (a backup ``..._eeg_old.edf``, an upper-case ``.EDF``), which it
    would fail to read. Those it leaves out, other than derivatives/ and sourcedata/, are
    counted in ``skipped``, a line for each SRC, dataset and reason, with an example (a warning
    each when None). A folder given inside a dataset out of its subjects' part (``code/``,
    ``derivatives/`` without a description of its own) is read as a plain folder, and a
    recording given by its own path as a plain file where mne-bids cannot read it or the
    ``.bidsignore`` names it."""
    jobs: dict[str, Job] = {}
    given_as: dict[str, str] = {}  # resolved path -> the SRC argument that first gave it
    bids_roots: dict[Path, Path | None] = {}  # folder -> the BIDS dataset it is in
    bids_tasks: dict[Path, set[str]] = {}  # BIDS dataset -> its task labels
    ignores: dict[Path, Callable[[Path], bool] | None] = {}  # dataset -> its .bidsignore
    notes: list[str] = []  # what was left out on purpose, for ``skipped``
    sources = _source_strings(sources)

    def add(path: Path, task: str, bids: str | None, source: str) -> None:
        resolved = str(path.resolve())
        earlier = jobs.get(resolved)
        if earlier is not None and earlier.task != task:
            raise ValueError(
                f"SRC {source!r}: {path} is also under task {earlier.task!r} (from SRC "
                f"{given_as[resolved]!r}); a recording has one task here: prepare it into "
                "another --out for the other task"
            )
        if earlier is None:
            jobs[resolved] = Job(str(path), task, bids, _key(path))
            given_as[resolved] = source

    for source in sources:
        task, _, spec = source.rpartition("=") if "=" in source else ("", "", source)
        if task and Path(source).exists():  # a path that really contains '='
            task, spec = "", source
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"SRC {source!r}: no such file or folder")
        if path.is_dir() and not _is_recording(path):
            # a folder in a BIDS dataset (a subject's) is of the dataset's task, as the dataset
            dataset = _bids_root(path, bids_roots)
            inside = (
                () if dataset is None else Path(os.path.abspath(path)).relative_to(dataset).parts
            )
            if inside and not inside[0].startswith("sub-"):
                dataset = None  # its derivatives/, sourcedata/, code/: no part of its raw data
            folder_task = task or default_task or (dataset or path).resolve().name
            # BrainVision: read the header (.vhdr), not its data file (.eeg); an .mff folder is
            # one recording, not a folder of them
            unlisted: list[str] = []
            files = [
                p
                for p in _search(path, unlisted)
                if _is_recording(p) and not _is_sidecar(p) and not _inside_recording(p, path)
            ]
            named = [f"SRC {source!r}: {problem}" for problem in unlisted]
            if problems is not None:
                problems += named
            else:
                for problem in named:
                    warnings.warn(problem, stacklevel=2)
            # In a BIDS dataset (the folder, one above it, or ones in it) raw data only, read
            # with mne-bids: <sub>/[<ses>/]eeg/, not derivatives/ or sourcedata/. (A subject's
            # folder was read as plain files: channels.tsv's bad channels and types and
            # events.tsv's events were ignored, and the task was the subject's id.)
            bids: dict[Path, Path] = {}
            kept = []
            # (dataset, why) -> [count, an example]: the files of datasets left out, said once
            left_out: dict[tuple[Path, str], list] = {}
            if dataset is not None:
                _need_mne_bids(source, dataset)
            for p in files:
                root = _bids_root(p.parent, bids_roots)
                if root is None:
                    kept.append(p)
                    continue
                if _in_bids_extras(p, path, bids_roots):
                    continue
                placed = _bids_place(p, bids_roots)
                if placed is None and dataset is None:
                    if not root.is_relative_to(os.path.abspath(path)):
                        kept.append(p)  # a folder given inside a dataset, out of its layout
                        continue
                ignored = _bidsignore(root, ignores, notes)
                refusal = None
                if ignored is not None and ignored(p):
                    why = ".bidsignore"
                elif placed is None:
                    why = "layout"  # meg/, beh/, ieeg/, stimuli/, eeg/old/ ...
                else:
                    _need_mne_bids(source, placed)
                    refusal = _mne_bids_refusal(p, placed)
                    if refusal is None:
                        kept.append(p)
                        bids[p] = placed
                        continue
                    why = "name"  # read through mne-bids, it would be an unreadable recording
                entry = left_out.setdefault((root, why), [0, p, refusal])
                entry[0] += 1
            files = kept
            for (root, why), (count, example, refusal) in left_out.items():
                reason = {
                    ".bidsignore": "its .bidsignore names them",
                    "layout": "out of its layout, where only sub-X/[ses-Y/]eeg/ holds raw EEG "
                    "recordings",
                    "name": "names mne-bids does not read as BIDS",
                }[why]
                example_text = f"{example}: {refusal}" if refusal else str(example)
                notes.append(
                    f"SRC {source!r}: {count} file(s) of the BIDS dataset {root} not prepared: "
                    f"{reason} (e.g. {example_text})"
                    + (
                        "; give one as SRC by its own path to read it without its sidecars"
                        if why == "name"
                        else ""
                    )
                )
            if not files:
                why = "".join(f"; {problem}" for problem in unlisted)
                why += "".join(f"; {note}" for note in notes if note.startswith(f"SRC {source!r}"))
                raise FileNotFoundError(
                    f"SRC {source!r}: no recordings MNE can read in {path}{why}"
                )
            for p in files:
                named = folder_task
                if p in bids and not (task or default_task):
                    named = _bids_task(folder_task, p, bids[p], bids_tasks)
                add(p, named, str(bids[p]) if p in bids else None, source)
        else:
            # a recording of a BIDS dataset: read with its sidecars, of the dataset's task
            # (not of its folder's name, "eeg")
            root = _bids_place(path, bids_roots)
            if root is not None:
                ignored = _bidsignore(root, ignores, notes)
                if ignored is not None and ignored(path):
                    root = None  # the dataset says it is not BIDS: read it plainly
            if root is not None:
                _need_mne_bids(source, root)
                if _mne_bids_refusal(path, root) is not None:
                    root = None  # a name mne-bids refuses (``_eeg_old.edf``): read it plainly
            named_by = root.resolve() if root is not None else path.resolve().parent
            bids_root = None if root is None else str(root)
            named = task or default_task or named_by.name
            if root is not None and not (task or default_task):
                named = _bids_task(named, path, root, bids_tasks)
            add(path, named, bids_root, source)
    for continuation in _fif_continuations([job.path for job in jobs.values()]):
        del jobs[continuation]
    if skipped is not None:
        skipped += notes
    else:
        for note in notes:
            warnings.warn(note, stacklevel=2)
    return sorted(jobs.values(), key=lambda j: j.path)


# The parts of a FIF recording split at 2 GB (``raw.save(split_size=...)``): MNE names them
# ``<name>-1.fif``, ``<name>-2.fif`` ... after ``<name>.fif``, or ``..._split-02_...`` after
# ``..._split-01_...`` (BIDS), and reads them all when it opens the first part.
_FIF_PART = re.compile(r"^(?P<stem>.+)-[1-9]\d*(?P<ext>\.fif(?:\.gz)?)$", re.IGNORECASE)
_BIDS_PART = re.compile(r"_split-(?!0*1_)\d+_", re.IGNORECASE)


def _fif_continuations(paths: list[str]) -> set[str]:
    """The paths among ``paths`` that MNE reads as later parts of another of them (resolved):
    prepared on their own too, their samples would be in the folder twice. Told by the names
    given, not the resolved ones: a datalad dataset's files are links to ``.git/annex``
    objects named by their hashes (both parts were prepared). Only FIF paths are resolved:
    resolving every path of a 20k-file search doubled the time discovery took."""
    found: set[str] = set()
    listed = {
        str(Path(path).resolve()) for path in paths if path.lower().endswith((".fif", ".fif.gz"))
    }
    first_parts: dict[str, set[str]] = {}
    for path in paths:
        p = Path(path)
        part = _FIF_PART.match(p.name)
        if part:
            first = p.with_name(part["stem"] + part["ext"])
        elif _BIDS_PART.search(p.name) and p.name.lower().endswith((".fif", ".fif.gz")):
            first = p.with_name(_BIDS_PART.sub("_split-01_", p.name, count=1))
        else:
            continue
        first_key, key = str(first.resolve()), str(p.resolve())
        if first_key not in listed:
            continue
        if first_key not in first_parts:
            import mne

            try:  # the header only: the names of the parts MNE reads with the first one
                raw = mne.io.read_raw_fif(first, preload=False, verbose="error")
                first_parts[first_key] = {str(Path(f).resolve()) for f in raw.filenames[1:]}
            except Exception:  # unreadable: it is reported when processed; keep both
                first_parts[first_key] = set()
        if key in first_parts[first_key]:
            found.add(key)
    return found


def _is_sidecar(path: Path) -> bool:
    if path.suffix.lower() != ".eeg":
        return False
    return any(path.with_suffix(ext).exists() for ext in (".vhdr", ".VHDR", ".ahdr", ".AHDR"))


def _brainvision_header(path: Path) -> str:
    """The text of the BrainVision header ``path``, decoded as MNE reads it: in the
    ``Codepage=`` it names (``ANSI``: cp1252), UTF-8 without one, Latin-1 where that fails.
    (Read as Latin-1 always, the UTF-8 header of ``Müller.vhdr`` named ``MÃ¼ller.eeg``, a file
    that is not there: edits of its marker file went unseen by later runs.)"""
    data = path.read_bytes()
    named = re.search(
        r"^Codepage=(.+)$", data.decode("ascii", "ignore"), re.MULTILINE | re.IGNORECASE
    )
    codepage = named[1].strip() if named else "utf-8"
    try:
        return data.decode("cp1252" if codepage.upper() == "ANSI" else codepage)
    except (UnicodeDecodeError, LookupError):  # (LookupError: a codepage Python does not know)
        return data.decode("latin-1")


def _companions(path: Path, bids: bool) -> list[Path]:
    """The other files a recording's output is made from: BrainVision's data and marker files
    (as its header names them), EEGLAB's ``.fdt``, the files of an ``.mff`` folder, and in a
    BIDS dataset the recording's own sidecars (``_events.tsv``, ``_channels.tsv``, ``.json``)."""
    name = path.name.lower()
    found: list[Path] = []
    if name.endswith((".vhdr", ".ahdr")):
        try:
            header = _brainvision_header(path)
        except OSError:
            header = ""
        for key in ("DataFile", "MarkerFile"):
            named = re.search(rf"^{key}=(.*?)\s*$", header, re.MULTILINE | re.IGNORECASE)
            if named and named[1]:
                found.append(path.parent / named[1])
    elif name.endswith(".set"):
        found += [
            path.with_suffix(ext) for ext in (".fdt", ".FDT") if path.with_suffix(ext).exists()
        ]
    elif path.is_dir():
        found += sorted(p for p in path.rglob("*") if p.is_file())
    if bids and "_" in path.name:
        prefix = path.name.rsplit("_", 1)[0] + "_"
        found += sorted(
            p
            for p in path.parent.iterdir()
            if p.name.startswith(prefix) and p.suffix.lower() in (".tsv", ".json")
        )
    return found


def _fingerprint(path: Path, bids: bool = False) -> dict:
    """Size and modification time of the recording, and of its companion files when it has
    any (``_companions``): a re-run reuses the output only while none of them has changed (an
    edited marker file or BIDS channels.tsv was otherwise not seen)."""
    st = path.stat()
    found = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    companions = {}
    for companion in _companions(path, bids):
        try:
            cs = companion.stat()
            companions[companion.name] = [cs.st_size, cs.st_mtime_ns]
        except OSError:  # missing: the recording is bad now, and redone once it is there
            companions[companion.name] = None
    if companions:
        found["companions"] = companions
    return found


class OutputWriteError(OSError):
    """A shard could not be written (disk full, no permission): the run's problem, not the
    recording's. ``process_file`` lets it through, so the run stops naming the file; recorded
    as a bad recording it was reused as one by every later run, after space was freed too."""


class WorkerStartError(RuntimeError):
    """The worker processes could not start, so no recording was prepared by them: the run's
    problem, not the recordings'. Mostly a script that calls ``prepare`` with ``workers`` > 1
    outside ``if __name__ == "__main__":`` (see ``prepare``); every recording was reported bad
    ("the process preparing it died (exit code 1)") instead."""


def _worker_start_message(exitcode: int | None = None) -> str:
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    script = f"the script {script}" if script else "the calling script"
    how = "" if exitcode is None else f" (exit code {exitcode}; its error is above)"
    return (
        f"the worker processes could not start{how}: each new one (start method "
        f"{_pool_context().get_start_method()}) runs {script} again, which must therefore call "
        'prepare (or eegfast\'s main) only under `if __name__ == "__main__":`; put the call '
        "under that guard, or use one worker (workers=1, --workers 1)"
    )


def _record_path(out: Path, job: Job) -> Path:
    return out / SHARD_DIR / f"{job.key}.json"


def _shard_name(job: Job) -> str:
    """The shard of ``job``'s windows, relative to the output folder, as index.json names it."""
    return f"{SHARD_DIR}/{job.key}.npy"


def _bad_record(job: Job, settings: Settings) -> dict:
    """The fields every record has, as a bad one: processing fills in the rest and marks it ok."""
    return {
        "status": "bad",
        "file": str(Path(job.path)),
        "key": job.key,
        "task": job.task,
        "job_task": job.task,
        "settings": settings.digest(),
        "revision": PROCESSING_REVISION,
    }


def process_file(job: Job, settings: Settings, out: str) -> dict:
    """Read, check, preprocess, window and write one recording; returns its record.

    Never raises for a bad recording: the record then has ``status='bad'`` and ``reason``.
    """
    out_dir = Path(out)
    path = Path(job.path)
    started = time.perf_counter()
    record = _bad_record(job, settings)
    # The old record goes before the shard is replaced: killed in between, an old record
    # beside a new shard would let a later run with the old settings reuse the new shard.
    _record_path(out_dir, job).unlink(missing_ok=True)
    try:
        record.update(_fingerprint(path, job.bids_root is not None))
        record.update(_process(job, settings, out_dir))
        record["status"] = "ok"
    except OutputWriteError:
        raise  # (no record: a later run prepares the recording again)
    except (BadRecording, SampleRateError) as err:
        record["reason"] = str(err)
    except Exception as err:  # a reader or numeric failure on one file must not stop the run
        record["reason"] = f"error: {type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=5)
    record["seconds"] = round(time.perf_counter() - started, 4)
    _write_json(_record_path(out_dir, job), record)
    return record


def _process(job: Job, settings: Settings, out_dir: Path) -> dict:
    cfg = settings.preprocess
    raw = read_recording(job.path, bids_root=job.bids_root)
    sfreq = float(raw.info["sfreq"])
    ch_types = raw.get_channel_types()
    stim_name = _pick_stim_channel(raw.ch_names, ch_types, settings.labels.stim_channel)
    if stim_name is not None:  # never an EEG channel, whatever its name or the reader's type
        ch_types[raw.ch_names.index(stim_name)] = "stim"
    chmap = map_channels(
        raw.ch_names,
        ch_types,
        channels=list(settings.channels) if settings.channels else None,
        allow_extended=settings.allow_extended,
        modern_names=settings.modern_names,
    )
    info = {
        "sfreq_in": sfreq,
        "duration_s": raw.n_times / sfreq,
        "excluded": chmap.excluded,
        "unknown": list(chmap.unknown),
    }
    line_freq = raw.info.get("line_freq")  # FIF, BIDS PowerLineFrequency; EDF has none
    if line_freq:
        info["line_freq"] = float(line_freq)
    if not chmap.picks:
        if chmap.n_eeg == 0:
            raise BadRecording(f"no EEG channels (channels: {', '.join(raw.ch_names[:12])})")
        raise BadRecording(f"only unknown electrodes: {', '.join(chmap.unknown[:20])}")
    check_sample_rate(sfreq, cfg)
    names, picks = list(chmap.names), list(chmap.picks)
    marked_bad = set(raw.info["bads"])  # FIF, BIDS channels.tsv status=bad, set by the user
    if marked_bad & {raw.ch_names[p] for p in picks}:
        for pick in picks:
            if raw.ch_names[pick] in marked_bad:
                info["excluded"][raw.ch_names[pick]] = "marked bad in the recording"
        kept = [i for i, pick in enumerate(picks) if raw.ch_names[pick] not in marked_bad]
        if not kept:
            raise BadRecording(f"every EEG channel is marked bad: {', '.join(sorted(marked_bad))}")
        names, picks = [names[i] for i in kept], [picks[i] for i in kept]
    # Onsets from the first sample: MNE counts them from the measurement start, first_time
    # before the data's first sample, with or without a measurement date (without one,
    # orig_time is None and MNE added first_time when the annotations were set).
    onsets = np.asarray(raw.annotations.onset, dtype=float) - raw.first_time
    # An annotation one sample long or less is an onset marker, like one of zero duration:
    # MNE gives BrainVision's stimulus markers (one sample) 1/sfreq s, which no window fits,
    # so they were events too short to label anything, the recording was refused, and
    # --event-duration did not apply. (A FIF file's float32 times may make one a little
    # longer than a sample: annotation_durations allows for that.)
    durations = annotation_durations(raw)
    annotations = list(zip(onsets, durations, raw.annotations.description, strict=True))
    rules = settings.labels
    resolved = rules.resolve(job.path, annotations)
    stim_events: list[tuple[float, float, str]] = []
    # no event from the annotations: the stim channel's events (FIF's STI 014, BDF's Status);
    # not read for a recording a file-name rule labels when, lacking --event-duration, those
    # onset markers could label nothing anyway
    wants_stim = resolved.source == "none" or (
        resolved.source == "filename" and rules.event_duration is not None
    )
    if rules.use_annotations and rules.stim_channel and wants_stim:
        if stim_name is None and rules.stim_channel != "auto":
            raise BadRecording(
                f"--stim-channel {rules.stim_channel!r}: no such channel, and no annotation "
                f"labels the recording (channels: {', '.join(raw.ch_names[:20])})"
            )
        if stim_name is not None:
            stim_events = _stim_channel_events(raw, stim_name)
            info["stim_channel"] = stim_name
            info["stim_channel_events"] = len(stim_events)
            if stim_events:
                resolved = rules.resolve(job.path, annotations, stim_events)
    if rules.use_annotations and resolved.source in ("annotations", "stim channel", "none"):
        # (an annotation's onset markers first: they are often the stim events once more)
        skipped = rules.skipped_onset_markers(annotations)
        if not skipped and rules.skipped_onset_markers(stim_events):
            skipped = rules.skipped_onset_markers(stim_events)
            info["skipped_onset_markers_channel"] = stim_name
        info["skipped_onset_markers"] = skipped
    if rules.event_map is not None:
        # for the report: which annotations (and trigger codes read) there were when none of
        # --event-map's matched
        info["annotation_descriptions"] = sorted(
            {str(d).strip() for _, _, d in [*annotations, *stim_events]}
        )
    cuts = _discontinuities(annotations, sfreq, raw.n_times)
    # Read, checked and preprocessed a few channels at a time; the checks below then decide.
    # (A reference electrode that is not kept refuses the recording: nothing to preprocess.)
    signal, segments, low, high = _read_preprocessed(
        raw,
        picks,
        names,
        sfreq,
        cfg,
        cuts,
        drop_bad=settings.bad_channels == "drop",
        preprocess=cfg.reference in (None, "average") or cfg.reference in names,
    )
    finite, flat = _channel_problems(low, high)
    bad = ~finite | flat
    if bad.any():
        nonfinite_names = [raw.ch_names[picks[i]] for i in np.flatnonzero(~finite)]
        flat_names = [raw.ch_names[picks[i]] for i in np.flatnonzero(flat)]
        problems = []
        if nonfinite_names:
            problems.append(f"non-finite samples (NaN/inf) in {', '.join(nonfinite_names)}")
        if flat_names:
            problems.append(f"flat channels (peak-to-peak < 0.1 µV): {', '.join(flat_names)}")
        if settings.bad_channels == "reject" or bad.all():
            raise BadRecording("; ".join(problems))
        for i in np.flatnonzero(bad):
            info["excluded"][raw.ch_names[picks[i]]] = "flat or non-finite"
        keep = np.flatnonzero(~bad)
        signal = None if signal is None else signal[keep]
        names = [names[i] for i in keep]
        low, high = low[keep], high[keep]
    typical = float(np.median(high - low))
    if typical > IMPLAUSIBLE_PEAK_TO_PEAK_V:
        raise BadRecording(
            f"implausible amplitude: median channel peak-to-peak {typical:.3g} V (EEG is µV to "
            "mV); the file's units are probably not what it says (MNE reads an EDF unit it does "
            "not know as volts)"
        )
    if cuts:
        info["discontinuities"] = len(cuts)
    if cfg.reference not in (None, "average") and cfg.reference not in names:
        raise BadRecording(
            f"reference electrode {cfg.reference} is not among the kept electrodes "
            f"({', '.join(names)})"
        )
    assert signal is not None  # _read_preprocessed skips only recordings refused above
    signal = _rereference(signal, names, cfg.reference, inplace=True)
    n_out = signal.shape[1]
    label_names: list[str] = []
    if resolved.events is not None:
        starts_list = []
        short = 0
        for event in resolved.events:
            begin = int(round(event.onset * TARGET_SFREQ))
            end = int(round((event.onset + event.duration) * TARGET_SFREQ))
            s = _segment_window_starts(n_out, cfg, segments, begin, end)
            short += len(s) == 0
            starts_list.append(s)
            label_names += [event.label] * len(s)
        starts = np.concatenate(starts_list) if starts_list else np.zeros(0, np.int64)
        info["events"] = len(resolved.events)
        info["events_shorter_than_window"] = int(short)
    else:
        starts = _segment_window_starts(n_out, cfg, segments, 0, n_out)
        label_names = [resolved.label] * len(starts)
    starts, label_names, n_bad = _outside_bad_segments(starts, label_names, annotations, cfg)
    if n_bad:
        info["windows_in_bad_segments"] = n_bad
    if len(starts) == 0:
        what = "annotated event" if resolved.events is not None else "recording"
        raise BadRecording(
            f"no complete {cfg.window_seconds}-s window (longest {what} is shorter; "
            f"recording {n_out / TARGET_SFREQ:g} s)"
        )
    shard = out_dir / _shard_name(job)
    _write_windows(shard, signal, starts, cfg)
    info.update(
        {
            "task": resolved.task or job.task,
            "subject": resolved.subject,
            "subject_source": resolved.subject_source,
            "session": resolved.session or _bids_session(job.path),
            "label_source": resolved.source,
            "electrodes": names,
            "input_chans": labram_input_chans(
                names, allow_extended=settings.allow_extended, modern_names=settings.modern_names
            ),
            "shard": _shard_name(job),
            "dtype": cfg.dtype,
            "window_seconds": cfg.window_seconds,
            "starts": starts.tolist(),
            "label_names": label_names,
            "n_windows": len(starts),
        }
    )
    return info


def _discontinuities(annotations, sfreq: float, n_times: int) -> list[int]:
    """Input samples (sorted, inside the recording) where the data jump: the first sample after
    a gap. Marked by MNE's ``EDGE...`` annotations (``concatenate_raws``, the gaps of an EDF+D
    file as ``read_recording`` marks them), EEGLAB's ``boundary`` events and BrainVision's
    ``New Segment`` markers (a paused and resumed recording)."""
    cuts = {
        int(round(onset * sfreq))
        for onset, _, description in annotations
        if is_discontinuity_mark(description)
    }
    return sorted(c for c in cuts if 0 < c < n_times)


# Float64 bytes of a recording read at once: its channels are read and preprocessed in groups
# of at most this size. Read whole, 4 h of 32 channels at 500 Hz were a 1.8 GB float64 array,
# five times the float32 200 Hz signal kept, and the peak of a run.
READ_BLOCK_BYTES = 1 << 28
# Bytes of windows cut and written at once (the shard's windows are never held whole: with
# overlapping windows they are several times the signal).
WRITE_BLOCK_BYTES = 1 << 26


def _channel_problems(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite, flat) (C,) bool from each channel's lowest and highest sample (volts).

    NaN propagates into both extremes, +inf into the max, -inf into the min, so a channel is
    finite exactly when both are (no separate isfinite pass over the samples)."""
    finite = np.isfinite(low) & np.isfinite(high)
    flat = np.zeros(len(low), bool)
    flat[finite] = (high - low)[finite] < FLAT_PEAK_TO_PEAK_V
    return finite, flat


def _read_preprocessed(
    raw,
    picks: list[int],
    names: list[str],
    sfreq: float,
    cfg: PreprocessConfig,
    cuts: list[int],
    *,
    drop_bad: bool,
    preprocess: bool = True,
) -> tuple[np.ndarray | None, list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Read the channels ``picks`` of ``raw`` a group at a time (``READ_BLOCK_BYTES`` of float64
    at most) and preprocess each group (``_preprocess_segments``, not re-referenced: that needs
    every channel). Each channel's preprocessing does not depend on the others, so the signal
    is the one the whole (C, T) array gave, without holding that array.

    Channels found flat or non-finite are not preprocessed, and nothing more is once the
    recording will be refused: a bad channel without ``drop_bad``, a bad reference electrode,
    or ``preprocess`` False.
    Returns (the (C, T') float32 signal, with the rows of bad channels unset, or None when
    nothing was preprocessed; the parts' ``[begin, end)``; each channel's lowest and highest
    sample (C,) in volts).
    """
    n_ch = len(picks)
    rows = max(1, READ_BLOCK_BYTES // (8 * max(raw.n_times, 1)))
    plain = replace(cfg, reference=None)
    reference = None
    if cfg.reference not in (None, "average") and cfg.reference in names:
        reference = names.index(cfg.reference)
    low, high = np.empty(n_ch), np.empty(n_ch)
    signal, segments = None, []
    for r0 in range(0, n_ch, rows):
        r1 = min(r0 + rows, n_ch)
        data = raw.get_data(picks=picks[r0:r1])  # (rows, T) volts, float64
        low[r0:r1], high[r0:r1] = data.min(axis=1), data.max(axis=1)
        finite, flat = _channel_problems(low[:r1], high[:r1])
        bad = ~finite | flat
        bad_reference = reference is not None and bad[reference : reference + 1].any()
        if (bad.any() and not drop_bad) or bad_reference:
            preprocess = False  # the recording is refused
        good = np.flatnonzero(~bad[r0:r1])
        if preprocess and len(good):
            part, segments = _preprocess_segments(
                data if len(good) == len(data) else data[good], sfreq, plain, [], cuts
            )
            if signal is None:
                signal = np.empty((n_ch, part.shape[1]), np.float32)
            signal[r0 + good] = part
        del data
    return signal, segments, low, high


def _write_windows(
    path: Path, signal: np.ndarray, starts: np.ndarray, cfg: PreprocessConfig
) -> None:
    """The (W, C, A, 200) windows of ``signal`` (C, T') at ``starts`` as a .npy file (the bytes
    ``write_npy_atomic(path, cut_windows(signal, starts, cfg))`` writes), cut and written
    ``WRITE_BLOCK_BYTES`` at a time."""
    shape = (len(starts), signal.shape[0], cfg.window_seconds, PATCH_SAMPLES)
    dtype = np.dtype(cfg.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    per = max(1, WRITE_BLOCK_BYTES // (dtype.itemsize * math.prod(shape[1:])))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for i in range(0, len(starts), per):
                cut_windows(signal, starts[i : i + per], cfg).tofile(f)

    try:
        write_atomic(path, write)
    except OSError as err:  # (write_atomic's errors name the shard)
        args = (err.errno, err.strerror, err.filename) if err.errno is not None else (str(err),)
        raise OutputWriteError(*args) from err


def _preprocess_segments(
    data: np.ndarray, sfreq: float, cfg: PreprocessConfig, names: list[str], cuts: list[int]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``preprocess_signal`` of each continuous part between ``cuts`` (input samples) on its
    own, as MNE's ``raw.filter`` does at ``EDGE`` marks: filtering across a jump would smear it
    over the filter's length (tens of seconds for the 0.1 Hz high-pass) on both sides.

    data : (C, T) volts. Returns the (C, T') signal at 200 Hz and the parts' ``[begin, end)`` in
    its samples (one part, the whole signal, without cuts).
    """
    if not cuts:
        signal = preprocess_signal(data, sfreq, cfg, ch_names=names)
        return signal, [(0, signal.shape[1])]
    ratio = TARGET_SFREQ / sfreq
    n_out = int(round(data.shape[1] * ratio))
    signal = np.zeros((data.shape[0], n_out), np.float32)
    segments = []
    bounds = [0, *cuts, data.shape[1]]
    for begin_in, end_in in zip(bounds[:-1], bounds[1:], strict=True):
        begin, end = int(round(begin_in * ratio)), int(round(end_in * ratio))
        part = preprocess_signal(data[:, begin_in:end_in], sfreq, cfg, ch_names=names)
        n = min(part.shape[1], end - begin)
        signal[:, begin : begin + n] = part[:, :n]
        segments.append((begin, begin + n))
    return signal, segments


def _segment_window_starts(
    n_out: int, cfg: PreprocessConfig, segments: list[tuple[int, int]], begin: int, end: int
) -> np.ndarray:
    """Starts of the complete windows inside ``[begin, end)`` that lie within one part."""
    found = [
        window_starts(n_out, cfg, begin=max(begin, b), end=min(end, e))
        for b, e in segments
        if min(end, e) > max(begin, b)
    ]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _outside_bad_segments(
    starts: np.ndarray, label_names: list[str], annotations, cfg: PreprocessConfig
) -> tuple[np.ndarray, list[str], int]:
    """The windows (and their labels) that overlap no ``BAD...`` annotation (MNE's mark of an
    artefact segment; onsets from the first sample, seconds), and how many were dropped."""
    bad = [
        (int(np.floor(onset * TARGET_SFREQ)), int(np.ceil((onset + duration) * TARGET_SFREQ)))
        for onset, duration, description in annotations
        if str(description).upper().startswith("BAD")
    ]
    if not bad or len(starts) == 0:
        return starts, label_names, 0
    ends = starts + cfg.window_samples
    keep = np.ones(len(starts), bool)
    for begin, end in bad:
        keep &= ~((starts < max(end, begin + 1)) & (ends > begin))  # a 0-s mark: one sample
    kept_labels = [name for name, k in zip(label_names, keep, strict=True) if k]
    return starts[keep], kept_labels, int((~keep).sum())


# What a recording's output is made by, besides its settings: bumped whenever the processing
# changes what the same settings produce, so that outputs of an older eegfast are redone instead
# of reused. 2 (2026-12-06): windows overlapping BAD_ annotations dropped, channels marked bad in
# the file (info["bads"]) left out, FIF event onsets relative to the first sample, resampling
# without filters padded (no wrap-around of the recording's end onto its start). 3: BioSemi
# letter-number cap positions (A1..H32) are no longer read as the 10-20 sites of those names.
# 4: the gaps of EDF+D files and EDGE/boundary marks: annotations on the data's time axis, no
# window across a gap, each continuous part filtered on its own; EDF units MNE misreads rescaled.
# 5: annotations one sample long (BrainVision markers) are onset markers, as zero-length ones.
# 6: a recording whose annotations give no event is labelled from its stim channel's events.
# 7: BrainVision's New Segment markers (a paused recording) are discontinuities, not events.
# 8: E1/E2 (a sleep montage's EOG) are no evidence of a BioSemi cap; MNE's renamed repeats of
#    a name (CHB-MIT's T8-P8-0/-1) map to it; EDF labels padded with NULs map.
# 9: rates whose 200/sfreq needs a denominator above 10^4 to be within 1 ppm (199.99 Hz) take
#    one up to 10^5 (199.99 Hz was stretched by 5e-5: 6 samples too many in 10 minutes).
# 10: one-sample markers a FIF file's float32 times make a little longer than a sample are
#    onset markers (they were events no window fits: the recording was refused).
# 11: a subject id is the last match of its pattern in the path (a folder above a BIDS
#    dataset named like ``eeg_sub-set`` was every recording's subject).
# 12: old-name bipolar pairs (T3-T5) take their 10-10 row with --old-names; Nihon Kohden's
#    'POL' channel prefix is removed like 'EEG' (those recordings' electrodes were unknown).
# 13: an EDF+D recording of a BIDS dataset is labelled by its events.tsv (the EDF's own
#    annotations replaced them); a BIDS ``ses-`` fills the session a labels table leaves empty.
# 14: EDF+D annotations and BDF trigger codes of records past the header's count are read (as
#    MNE reads the samples); a NUL-padded 'uV' unit is microvolts; a BDF trigger range written
#    with a decimal comma is scaled.
# 15: a BioSemi cap's labels with a prefix or reference suffix ('POL C17', 'EEG C1-Ref') show
#    the cap (its C1..C6, A1/A2 were 10-20 sites); names numbered other than MNE's renamed
#    repeats (Cz-1, Cz-2 without Cz-0) keep their names; PSG signals (HEO, Snore, ...) typed.
# 16: an EDF+D annotation wholly inside a gap (recorded while paused) is left out (it was a
#    marker at the first sample after the gap, and with --event-duration labelled those data).
PROCESSING_REVISION = 16


def _reusable(record_path: Path, job: Job, digest: str) -> tuple[dict | None, bool]:
    """(the record, if its output can be reused, else None; whether it was only outdated: the
    same settings and source file, made by an older processing revision)."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        same = (
            # (a record that is no object, or nested past json's recursion, is damaged: the
            # run stopped on it with AttributeError / RecursionError, naming no file)
            isinstance(record, dict)
            and record.get("settings") == digest
            and record.get("job_task") == job.task
            and all(
                record.get(k) == v
                for k, v in _fingerprint(Path(job.path), job.bids_root is not None).items()
            )
        )
    except (OSError, ValueError, RecursionError):
        return None, False
    if not same:
        return None, False
    if record.get("revision", 1) != PROCESSING_REVISION:
        return None, True
    # Only the shard prepare writes for this job: another name (edited, or `../x`) went into
    # index.json as it was, and a missing one stopped the run with a KeyError.
    shard = _shard_name(job)
    if record.get("status") == "ok" and (
        record.get("shard") != shard or not (record_path.parent.parent / shard).exists()
    ):
        return None, False
    return record, False


def _drop_index_of_replaced_shards(out: Path, todo: list[Job]) -> None:
    """Remove ``index.json`` before any shard it lists is written again.

    A run with other settings (another filter, reference, dtype) rewrites shards under the
    same names; killed half way, it would leave the old index describing a mix of old and new
    shards of the same shape, which loads without a word. Without an index the folder is
    refused until a run finishes and writes the new one."""
    index_path = out / INDEX_NAME
    try:
        listed = {
            r["shard"] for r in json.loads(index_path.read_text(encoding="utf-8"))["recordings"]
        }
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        # unreadable (or nested past json's recursion: `[[[[...`): it cannot be trusted either
        listed = None
    if listed is None or any(_shard_name(job) in listed for job in todo):
        index_path.unlink(missing_ok=True)


def _warm_imports() -> None:
    """Import the readers and scipy once here, so forked workers inherit them (importing mne and
    scipy.signal costs seconds per process, more than preprocessing a recording)."""
    import mne.filter  # noqa: F401
    import mne.io  # noqa: F401
    import scipy.fft  # noqa: F401
    import scipy.signal  # noqa: F401


def _pool_context():
    # fork is fastest (workers inherit the imports above), but unsafe once torch, with its thread
    # pools, lives in this process; the fork server then imports the readers once for all workers.
    if sys.platform == "linux" and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    if sys.platform == "win32":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["eegfast.data.prepare", "mne.io", "mne.filter", "scipy.signal"])
    return ctx


def _process_in_pool(
    todo: list[Job],
    settings: Settings,
    out: str,
    workers: int,
    records: dict[str, dict],
    done: Callable[[], object],
) -> None:
    """``process_file`` of every job in ``workers`` processes, one recording each at a time
    (the next is sent when one finishes); the records go into ``records`` by key.

    A worker that dies (the kernel's out-of-memory killer ends one holding a recording too
    large for the memory left) breaks the pool. The recordings then in flight, one of them the
    cause, are prepared again one at a time in a process of their own, and the one whose
    process dies again is reported bad by name (``_process_alone``); the rest go on in a new
    pool. Before, the run ended with ``BrokenProcessPool`` naming no file, and no report.
    """
    pending = todo[::-1]  # next job last
    while pending:
        in_flight: dict = {}  # future -> job
        size = min(workers, len(pending))
        try:
            with ProcessPoolExecutor(size, mp_context=_pool_context()) as pool:
                while pending or in_flight:
                    while pending and len(in_flight) < workers:
                        future = pool.submit(process_file, pending[-1], settings, out)
                        in_flight[future] = pending.pop()
                    finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in finished:
                        records[in_flight[future].key] = future.result()
                        del in_flight[future]
                        done()
        except BrokenProcessPool:
            for job in sorted(in_flight.values(), key=lambda j: j.path):
                records[job.key] = _process_alone(job, settings, out)
                done()


def _process_file_alone(job: Job, settings: Settings, out: str, messages: Connection) -> None:
    """``process_file`` in the process :func:`_process_alone` starts. Through ``messages``: that
    the process started (one that dies before, while it starts up, says nothing about the
    recording), and a failed shard write (``OutputWriteError``, the run's problem): the
    process's exit status alone made either a recording that "died (exit code 1)"."""
    messages.send(("started",))
    try:
        process_file(job, settings, out)
    except OutputWriteError as err:  # (its args hold no file name: sent with it)
        args = (err.errno, err.strerror, err.filename) if err.errno else (str(err),)
        messages.send(("write failed", args))
        sys.exit(1)


def _process_alone(job: Job, settings: Settings, out: str) -> dict:
    """``process_file`` in a process of its own; a bad record naming how it ended if it dies.

    That record is not written: a later run tries the recording again (with fewer workers, or
    more memory)."""
    started = time.perf_counter()
    context = _pool_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_process_file_alone, args=(job, settings, out, send))
    process.start()
    send.close()  # (the child's copy stays open until it ends)
    process.join()
    started_job = False
    failed_write = None  # the shard could not be written: the run stops, as in the pool
    with contextlib.suppress(EOFError):  # (all read: the process ended or died)
        while receive.poll():
            message = receive.recv()
            started_job |= message[0] == "started"
            failed_write = message[1] if message[0] == "write failed" else failed_write
    receive.close()
    if failed_write is not None:
        raise OutputWriteError(*failed_write)
    if not started_job and process.exitcode != 0:
        # died starting up, before it got the recording: so would every other worker
        raise WorkerStartError(_worker_start_message(process.exitcode))
    if process.exitcode == 0:
        return json.loads(_record_path(Path(out), job).read_text(encoding="utf-8"))
    if process.exitcode == -9:
        reason = (
            "the process preparing it was killed (SIGKILL), most likely by the out-of-memory "
            "killer: see the memory a recording needs in the README (Data); use fewer --workers"
        )
    else:
        reason = f"the process preparing it died (exit code {process.exitcode})"
    record = _bad_record(job, settings)
    record["reason"] = reason
    record["seconds"] = round(time.perf_counter() - started, 4)
    return record


def prepare(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    settings: Settings = Settings(),
    *,
    workers: int = 1,
    task: str | None = None,
    classes: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> dict:
    """Run the whole preparation; returns the report (also written to ``out``).

    Mismatches between a labels table and the recordings (see ``LabelRules.table_problems``)
    are the report's ``warnings``; with ``strict`` they raise ``ValueError`` before any
    recording is processed.

    ``workers`` > 1: single-threaded worker processes (scipy's FFTs on one thread, no BLAS).
    On Linux they are forked while torch is not imported; once it is (its thread pools make a
    fork unsafe), and on macOS and Windows, they are started afresh and import the calling
    script again, like any ``multiprocessing`` start method but fork: a script calling this
    must then do so under ``if __name__ == "__main__":``, or the run stops with a
    :class:`WorkerStartError` saying so (a worker that dies once it has a recording still
    makes only that recording bad).
    """
    from eegfast.progress import progress_bar

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # This process is a worker starting up, running the calling script again (spawn,
        # forkserver): called outside the main guard. Nothing is done: a run of its own
        # would start workers of its own, and clear the folder's temporaries and index. (Not
        # a WorkerStartError, which main() reports and returns from: the worker must end.)
        raise RuntimeError(_worker_start_message())
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    started = time.perf_counter()
    out = Path(out)
    unlisted: list[str] = []  # folders a search could not list
    # files of BIDS datasets a search left out (.bidsignore, out of the layout, a name mne-bids
    # refuses): warnings, not --strict errors, since the dataset itself leaves them out
    skipped: list[str] = []
    jobs = discover(sources, task, problems=unlisted, skipped=skipped)
    if strict and unlisted:
        raise ValueError(
            f"{len(unlisted)} folder(s) not searched (--strict):\n  " + "\n  ".join(unlisted)
        )
    warnings = settings.labels.table_problems([j.path for j in jobs])
    if strict and warnings:
        raise ValueError(
            f"{len(warnings)} labels table problem(s) (--strict):\n  " + "\n  ".join(warnings)
        )
    warnings = unlisted + skipped + warnings
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(out / SHARD_DIR)
    digest = settings.digest()
    records: dict[str, dict] = {}
    todo = []
    outdated = 0
    for job in jobs:
        record, old = (None, False) if force else _reusable(_record_path(out, job), job, digest)
        outdated += old
        if record is None:
            todo.append(job)
        else:
            record["reused"] = True
            records[job.key] = record
    if todo:
        _drop_index_of_replaced_shards(out, todo)
        _warm_imports()
    bar = progress_bar(
        total=len(todo), desc="prepare", unit="file", disable=not progress or not todo
    )
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            records[job.key] = process_file(job, settings, str(out))
            bar.update()
    else:
        _process_in_pool(todo, settings, str(out), workers, records, bar.update)
    bar.close()
    ordered = [records[j.key] for j in jobs]
    index = build_index(ordered, settings, classes)
    _write_index(out / INDEX_NAME, index)
    report = build_report(ordered, index, settings, time.perf_counter() - started, removed)
    report["warnings"] = (
        warnings
        + _event_map_problems(ordered, settings.labels.event_map)
        + _onset_marker_problems(ordered)
        + _mains_problems(ordered, settings.preprocess.notch_freq)
    )
    report["outdated"] = outdated  # redone: made by an older processing revision
    _write_json(out / "report.json", report)
    md = out / "report.md"
    write_text_atomic(md, report_markdown(report))
    return report


def _event_map_problems(records: list[dict], event_map: dict[str, str] | None) -> list[str]:
    """Warnings for ``--event-map`` entries that no usable recording has an annotation of (a
    misspelled description), and for recordings cut as unlabelled continuous windows because
    they have none of its annotations (not what a user asking for events expects)."""
    if not event_map:
        return []
    ok = [r for r in records if r["status"] == "ok" and "annotation_descriptions" in r]
    found = {d for r in ok for d in r["annotation_descriptions"]}
    # records reused from an older eegfast do not list their annotations: an entry might
    # match one of those, so none is said to match nothing
    older = any(r["status"] == "ok" and "annotation_descriptions" not in r for r in records)
    problems = []
    for desc in [] if older else sorted(set(event_map) - found):
        seen = ", ".join(sorted(found)[:20]) or "none"
        problems.append(
            f"--event-map {desc}={event_map[desc]}: no recording has an annotation {desc!r} "
            f"(annotations found: {seen})"
        )
    # (a recording labelled by the table or a file-name rule instead is labelled as asked)
    # (recordings with only zero-duration ones have their own warning: _onset_marker_problems)
    unmatched = [
        r["file"]
        for r in ok
        if r.get("label_source") == "none" and not r.get("skipped_onset_markers")
    ]
    if unmatched:
        shown = ", ".join(unmatched[:10])
        if len(unmatched) > 10:
            shown += f" and {len(unmatched) - 10} more"
        problems.append(
            f"{len(unmatched)} recording(s) have no annotation named in --event-map, so all "
            f"their windows are unlabelled: {shown}"
        )
    return problems


def _mains_problems(records: list[dict], notch_freq: float | None) -> list[str]:
    """A warning for recordings whose file gives a mains frequency (``line_freq``: FIF, BIDS)
    other than the one ``--notch`` removed: their mains interference is inside the 75 Hz band
    and stays in the windows."""
    if notch_freq is None:  # no notch asked for
        return []
    hit: dict[float, list[str]] = {}
    for r in records:
        line = r.get("line_freq") if r["status"] == "ok" else None
        if line and abs(line - notch_freq) > 1.0:
            hit.setdefault(line, []).append(r["file"])
    problems = []
    for line, files in sorted(hit.items()):
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        problems.append(
            f"{len(files)} recording(s) were made at {line:g} Hz mains (line_freq in the file) "
            f"but --notch removed {notch_freq:g} Hz; prepare them with --notch {line:g} "
            f"({shown})"
        )
    return problems


# Trigger channels by name (upper case), for readers that type them EEG (an EDF's ``TRIG`` or
# ``STI101``): MNE's own choice looks only at STI101, ``STI 014`` and channels of type stim.
_TRIGGER_NAME = re.compile(r"^(STIM?\s?\d*|STATUS|TRIG(GER)?S?\s?\d*|EVENTS?|MARKERS?)$")


def _pick_stim_channel(ch_names: list[str], ch_types: list[str], wanted: str | None) -> str | None:
    """The channel whose events label a recording (``--stim-channel``), or None.

    wanted : None (none); a channel name (exact, else the one equal to it ignoring case; None
        when the recording has no such channel); ``"auto"``: MNE's choice (STI101, ``STI 014``,
        else the first channel of type stim; not ``MNE_STIM_CHANNEL`` of the user's MNE config,
        which would make outputs depend on it), else the first named like a trigger channel.
    """
    if wanted is None:
        return None
    if wanted != "auto":
        if wanted in ch_names:
            return wanted
        same = [n for n in ch_names if n.strip().casefold() == wanted.strip().casefold()]
        return same[0] if len(same) == 1 else None
    for name in ("STI101", "STI 014"):
        if name in ch_names:
            return name
    for name, kind in zip(ch_names, ch_types, strict=True):
        if kind == "stim":
            return name
    for name in ch_names:
        if _TRIGGER_NAME.match(name.strip().upper()):
            return name
    return None


def _stim_channel_events(raw, name: str) -> list[tuple[float, float, str]]:
    """``(onset_s from the first sample, 0.0, trigger code)`` of each event of the stim channel
    ``name`` (``mne.find_events``: every change to a non-zero code is an event, even one sample
    long; a negative code counts as its absolute value). Of a channel named ``Status``
    (BioSemi's) only the trigger bits 0-15 count, as MNE's BDF reader advises."""
    import mne

    from eegfast.data.reading import bdf_trigger_values

    sfreq = float(raw.info["sfreq"])
    # rounded: a trigger channel an EDF reader types EEG reads back scaled (1.0000153 for 1),
    # and find_events truncates to integers, which made 0.99998 no event at all
    codes = np.round(raw.get_data(picks=[name]))
    filename = raw.filenames[0] if raw.filenames else None
    if filename is not None and raw.get_channel_types(picks=[name]) == ["stim"]:
        # a BDF that scales its Status/Trigger channel: MNE's codes are wrong there
        scaled = bdf_trigger_values(filename, name)
        if scaled is not None and len(scaled) == codes.shape[1]:
            codes = np.round(scaled)[np.newaxis]
    if name.strip().casefold() == "status":
        # BioSemi keeps system bits above the codes (bit 16, a new epoch, survives MNE's
        # reader): with it set, code 1 read as 65537, and its return to 65536 as an event too
        codes = np.bitwise_and(codes.astype(np.int64), 0xFFFF).astype(np.float64)
    trigger = mne.io.RawArray(codes, mne.create_info([name], sfreq, "stim"), verbose="error")
    events = mne.find_events(
        trigger, stim_channel=name, shortest_event=1, consecutive=True, verbose="error"
    )
    return [(int(sample) / sfreq, 0.0, str(int(code))) for sample, _, code in events]


def _onset_marker_problems(records: list[dict]) -> list[str]:
    """A warning for recordings whose labelling annotations of zero duration (onset markers:
    event channels, BIDS events) were skipped: without ``--event-duration`` they label no
    window, and where they were the only ones the whole recording is unlabelled."""
    hit = [r for r in records if r["status"] == "ok" and r.get("skipped_onset_markers")]
    if not hit:
        return []
    per_description: dict[str, int] = {}
    for r in hit:
        for desc, n in r["skipped_onset_markers"].items():
            per_description[desc] = per_description.get(desc, 0) + n
    count = sum(per_description.values())
    listed = ", ".join(f"{d} ({n})" for d, n in sorted(per_description.items())[:20])
    shown = ", ".join(r["file"] for r in hit[:10])
    if len(hit) > 10:
        shown += f" and {len(hit) - 10} more"
    stim = sorted({r.get("skipped_onset_markers_channel") for r in hit} - {None})
    return [
        f"{count} annotation(s) of zero duration (onset markers) in {len(hit)} recording(s) "
        f"label no window: {listed}"
        + (f" (among them the events of stim channel {', '.join(stim)})" if stim else "")
        + ". Where they mark events, pass --event-duration SECONDS to "
        f"label that long after each onset (with --event-map DESC=LABEL for only those "
        f"descriptions) ({shown})"
    ]


def build_index(records: list[dict], settings: Settings, classes: list[str] | None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    tasks: dict[str, set[str]] = {}
    for r in ok:
        tasks.setdefault(r["task"], set()).update(n for n in r["label_names"] if n)
    task_labels = {}
    for name, found in sorted(tasks.items()):
        order = list(classes) if classes else sorted(found)
        task_labels[name] = {"labels": order}
    recordings = []
    for r in ok:
        order = task_labels[r["task"]]["labels"]
        ids = [order.index(n) if n in order else -1 for n in r["label_names"]]
        recordings.append(
            {
                k: r[k]
                for k in (
                    "file",
                    "subject",
                    "session",
                    "task",
                    "electrodes",
                    "input_chans",
                    "shard",
                    "dtype",
                    "window_seconds",
                    "starts",
                    "n_windows",
                    "sfreq_in",
                )
            }  # fmt: skip
            | {"labels": ids}
        )
    return {
        "format_version": FORMAT_VERSION,
        "settings": json.loads(json.dumps(asdict(settings), default=str)),
        "settings_digest": settings.digest(),
        "window_seconds": settings.preprocess.window_seconds,
        "tasks": task_labels,
        "recordings": recordings,
    }


def build_report(
    records: list[dict], index: dict, settings: Settings, seconds: float, removed: int
) -> dict:
    from eegfast.datasets import ATTRIBUTION, SAMPLE_FILES

    ok = [r for r in records if r["status"] == "ok"]
    # (by status: `r not in ok` compared every record with the usable ones, 20k records: 5 s)
    bad = [
        {"file": r["file"], "reason": r.get("reason", "")} for r in records if r["status"] != "ok"
    ]
    unknown: dict[str, int] = {}
    # channels of an electrode another channel already gave (T3 beside T7, a name the file holds
    # twice): one of two different signals is lost, which each record alone did not show
    duplicates: dict[str, int] = {}
    for r in records:
        for name in r.get("unknown", []):
            unknown[name] = unknown.get(name, 0) + 1
        for name, reason in (r.get("excluded") or {}).items():
            if str(reason).startswith("duplicate of"):
                key = f"{name}: {reason}"
                duplicates[key] = duplicates.get(key, 0) + 1
    fresh = [r for r in records if not r.get("reused")]
    fresh_hours = sum(r.get("duration_s", 0.0) for r in fresh if r["status"] == "ok") / 3600
    label_counts: dict[str, dict[str, int]] = {}
    for rec in index["recordings"]:
        names = index["tasks"][rec["task"]]["labels"]
        counts = label_counts.setdefault(rec["task"], {})
        for i in rec["labels"]:
            key = names[i] if i >= 0 else "(none)"
            counts[key] = counts.get(key, 0) + 1
    sample_names = {f.name for f in SAMPLE_FILES}
    uses_sample = any(Path(r["file"]).name in sample_names for r in records)
    return {
        "files": len(records),
        "usable": len(ok),
        "bad": bad,
        "reused": sum(1 for r in records if r.get("reused")),
        "processed": len(fresh),
        "windows": sum(r["n_windows"] for r in ok),
        "hours": round(sum(r["duration_s"] for r in ok) / 3600, 6),
        "subjects": sorted({r["subject"] for r in ok}),
        "subjects_from_file_name": sorted(
            {r["file"] for r in ok if r.get("subject_source", "").startswith("file name")}
        ),
        "labels": label_counts,
        "excluded_unknown_channels": dict(sorted(unknown.items())),
        "excluded_duplicate_channels": dict(sorted(duplicates.items())),
        "seconds": round(seconds, 3),
        "hours_per_minute": round(fresh_hours / (seconds / 60), 4) if seconds > 0 else None,
        "stale_temporaries_removed": removed,
        "settings_digest": settings.digest(),
        "attribution": ATTRIBUTION if uses_sample else None,
    }


def report_markdown(report: dict) -> str:
    lines = [
        "# eegfast prepare report",
        "",
        f"- recordings: {report['files']} ({report['usable']} usable, {len(report['bad'])} bad, "
        f"{report['reused']} reused from an earlier run)",
        f"- windows: {report['windows']}, EEG: {report['hours']:.4f} h, "
        f"subjects: {len(report['subjects'])}",
        f"- time: {report['seconds']:.2f} s"
        + (
            f" ({report['hours_per_minute']:.3f} h of EEG per minute)"
            if report["processed"]
            else ""
        ),
    ]
    if report.get("outdated"):
        lines.append(
            f"- {report['outdated']} recording(s) prepared by an older eegfast, whose processing "
            "differed, were prepared again"
        )
    if report["labels"]:
        lines += ["", "## Labels (windows)", ""]
        for task, counts in report["labels"].items():
            parts = ", ".join(f"{k}: {v}" for k, v in counts.items())
            lines.append(f"- {task}: {parts}")
    if report["bad"]:
        lines += ["", "## Bad recordings (skipped)", "", "| file | reason |", "|---|---|"]
        for b in report["bad"]:
            lines.append(f"| {b['file']} | {b['reason'].replace('|', '/')} |")
    if report["excluded_unknown_channels"]:
        lines += ["", "## Channels left out as unknown electrodes (recordings)", ""]
        lines += [f"- `{k}`: {v}" for k, v in report["excluded_unknown_channels"].items()]
    if report.get("excluded_duplicate_channels"):
        lines += ["", "## Channels left out as a second channel of one electrode (recordings)", ""]
        lines += [f"- `{k}`: {v}" for k, v in report["excluded_duplicate_channels"].items()]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""]
        lines += [f"- {w}" for w in report["warnings"]]
    if report["subjects_from_file_name"]:
        n = len(report["subjects_from_file_name"])
        lines += ["", f"Note: {n} recording(s) got their file name as subject id."]
    if report["attribution"]:
        lines += ["", "## Data licence", "", report["attribution"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def _pairs(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    pairs = []
    for v in values or []:
        key, sep, value = v.rpartition("=")
        if not sep or not key:
            raise SystemExit(f"eegfast prepare: {what} {v!r}: expected KEY=VALUE")
        pairs.append((key, value))
    return pairs


def _freq(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


MAINS_HZ = (50.0, 60.0)


def _mains(text: str) -> float | None:
    """--notch: 50 or 60 (Hz), or none/off/0 for no notch."""
    try:
        value = _freq(text)
    except ValueError:
        value = math.nan
    if value is not None and value not in MAINS_HZ:
        raise argparse.ArgumentTypeError(
            f"must be the mains frequency 50 or 60 (Hz), or none for no notch, got {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    """--event-duration: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _stim_channel_arg(text: str) -> str | None:
    """--stim-channel: a channel name, auto, or none/off."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a channel name, auto or none, got ''")
    if text.strip().lower() in ("none", "off"):
        return None
    return "auto" if text.strip().lower() == "auto" else text


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("sources", nargs="+", metavar="SRC", help="recording or folder [TASK=SRC]")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--workers",
        type=_workers,
        # one per CPU this process may use: more (on the machine's other CPUs) would only
        # share those, each holding a recording in memory
        default=min(usable_cpu_count(), 8),
        help="worker processes (>= 1; default: the CPUs this process may use, at most 8)",
    )
    g = parser.add_argument_group("preprocessing (defaults: LaBraM)")
    g.add_argument("--window", type=int, default=4, help="window length A in s (1..16; default 4)")
    g.add_argument(
        "--stride", type=float, default=None, help="step between windows in s (default: --window)"
    )
    g.add_argument(
        "--l-freq", type=_freq, default=0.1, help="high-pass edge (Hz, or none; default 0.1)"
    )
    g.add_argument(
        "--h-freq", type=_freq, default=75.0, help="low-pass edge (Hz, or none; default 75)"
    )
    g.add_argument(
        "--notch", type=_mains, default=50.0, help="mains frequency 50/60 (or none; default 50)"
    )
    g.add_argument(
        "--reference", default=None, help="'average' or an electrode (default: as recorded)"
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the shards (default float32)",
    )
    g = parser.add_argument_group("channels")
    g.add_argument("--channels", default=None, help="comma-separated electrodes to keep, in order")
    g.add_argument("--allow-extended", action="store_true", help="allow table rows >= 129")
    g.add_argument("--old-names", action="store_true", help="keep T3/T4/T5/T6 (not T7/T8/P7/P8)")
    g.add_argument(
        "--bad-channels",
        choices=("reject", "drop"),
        default="reject",
        help="flat/NaN channels: reject the recording (default) or drop those channels",
    )
    g = parser.add_argument_group("labels and subjects")
    g.add_argument("--labels", type=Path, default=None, help="CSV: file,label,subject,session")
    g.add_argument("--event-map", action="append", metavar="DESC=LABEL", help="annotation -> label")
    g.add_argument(
        "--no-annotations",
        action="store_true",
        help="ignore annotations and stim-channel events",
    )
    g.add_argument(
        "--stim-channel",
        type=_stim_channel_arg,
        default="auto",
        metavar="NAME|auto|none",
        help="the channel whose events label recordings whose annotations give none "
        "(default: auto, see above)",
    )
    g.add_argument(
        "--event-duration",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="label SECONDS after each onset marker (an annotation of zero duration, or of one "
        "sample as BrainVision markers; default: skip)",
    )
    g.add_argument(
        "--filename-rule", action="append", metavar="REGEX=LABEL", help="label by file name"
    )
    g.add_argument("--subject-regex", default=None, help="regex; group 1 is the subject id")
    g.add_argument("--classes", default=None, help="label names in class-id order (a,b,c)")
    g.add_argument(
        "--task",
        default=None,
        help="task name (default: the SRC folder's name; in a BIDS dataset, the dataset's, "
        "with -<task> where it has several BIDS tasks)",
    )
    g = parser.add_argument_group("run")
    g.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if any recording is bad; a labels table that does not fit the recordings "
        "(rows matching none, empty labels, recordings not in it) is an error",
    )
    g.add_argument("--force", action="store_true", help="reprocess finished recordings too")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _reference(text: str | None, *, modern_names: bool) -> str | None:
    """--reference: None, 'average', or an electrode in the spelling of the kept channels'
    names (``Cz`` -> ``CZ``, ``T3`` -> ``T7``, as the recordings' ``EEG T3`` become)."""
    if text is None or text.strip().lower() == "none":
        return None
    if text.strip().lower() == "average":
        return "average"
    name = normalize_channel_name(text, modern_names=modern_names)
    if not is_labram_channel(name, allow_extended=True):
        raise ValueError(
            f"--reference: {text!r} is not an electrode of the LaBraM table, nor 'average'"
        )
    return name


# PreprocessConfig's fields as the command's flags, for its errors
_FLAG_OF_FIELD = {
    "window_seconds": "--window",
    "stride_seconds": "--stride",
    "l_freq": "--l-freq",
    "h_freq": "--h-freq",
    "notch_freq": "--notch",
    "dtype": "--dtype",
    "channels": "--channels",
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        preprocess = PreprocessConfig(
            l_freq=args.l_freq,
            h_freq=args.h_freq,
            notch_freq=args.notch,
            reference=_reference(args.reference, modern_names=not args.old_names),
            window_seconds=args.window,
            stride_seconds=args.stride,
            dtype=args.dtype,
        )
    except ValueError as err:  # name the flag the user typed, not the field behind it
        text = str(err)
        for name, flag in _FLAG_OF_FIELD.items():
            text = re.sub(rf"\b{name}\b", flag, text)
        raise ValueError(text) from None
    event_map = dict(_pairs(args.event_map, "--event-map")) if args.event_map else None
    labels = LabelRules(
        event_map=event_map,
        filename_rules=tuple(_pairs(args.filename_rule, "--filename-rule")),
        table=read_label_table(args.labels) if args.labels else {},
        subject_regex=args.subject_regex,
        use_annotations=not args.no_annotations,
        event_duration=args.event_duration,
        stim_channel=args.stim_channel,
    )
    channels = tuple(c.strip() for c in args.channels.split(",")) if args.channels else None
    try:
        return Settings(
            preprocess=preprocess,
            labels=labels,
            channels=channels,
            allow_extended=args.allow_extended,
            modern_names=not args.old_names,
            bad_channels=args.bad_channels,
        )
    except ValueError as err:
        raise ValueError(re.sub(r"^channels:", "--channels:", str(err))) from None


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        report = prepare(
            args.sources,
            args.out,
            settings,
            workers=args.workers,
            task=args.task,
            classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
            force=args.force,
            progress=not args.no_progress,
            strict=args.strict,
        )
    except (ValueError, FileNotFoundError, ImportError, WorkerStartError) as err:
        print(f"eegfast prepare: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing into --out (disk full): one line, not a traceback
        print(
            f"eegfast prepare: {err}; the recordings finished before it are kept (the same "
            "command goes on from them)",
            file=sys.stderr,
        )
        return 1
    print(
        f"{report['usable']}/{report['files']} recordings usable, {report['windows']} windows, "
        f"{report['hours']:.3f} h of EEG, {len(report['bad'])} bad "
        f"({report['reused']} reused); report: {args.out / 'report.md'}"
    )
    for b in report["bad"]:
        print(f"  bad: {b['file']}: {b['reason']}", file=sys.stderr)
    if report.get("outdated"):
        print(
            f"  {report['outdated']} recording(s) prepared by an older eegfast were prepared "
            "again (its processing has changed since)"
        )
    for warning in report["warnings"]:
        print(f"  warning: {warning}", file=sys.stderr)
    if report["usable"] == 0 or report["windows"] == 0:
        print("eegfast prepare: no usable recording", file=sys.stderr)
        return 1
    if args.strict and report["bad"]:
        return 1
    return 0
