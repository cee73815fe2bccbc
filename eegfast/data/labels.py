"""Labels and subject ids for recordings: annotations/events, file-name rules, or a CSV table.

``LabelRules.resolve(path, annotations)`` decides, per recording, in this order:

1. a row of the CSV table (columns ``file,label,subject,session``; optional ``task``) whose
   ``file`` equals the recording's path, its path relative to the table, or its file name ->
   one label for the whole recording;
2. annotations (``(onset_s, duration_s, description)``, e.g. eegmmidb's T0/T1/T2 with 4.1-4.2 s
   durations) -> windows are cut inside each event and get its label. ``event_map`` renames
   descriptions (``T1=left``) and, when given, keeps only the mapped ones; without it every
   description (not a blank one) with a positive duration counts except MNE's ``BAD``/``EDGE``
   marks, EEGLAB's ``boundary`` and BrainVision's ``New Segment``. An annotation of zero
   duration (an onset marker, as event channels and BIDS events give them; ``prepare`` counts
   BrainVision's one-sample markers as such) is skipped unless ``event_duration`` (seconds)
   says how long after its onset it labels;
3. when the annotations give no event: the events of the recording's stim channel (``prepare``
   reads them with ``mne.find_events`` as ``(onset_s, 0.0, trigger code)``, e.g. ``"1"``;
   ``stim_channel`` says which channel: ``"auto"``, a name, or None for none), labelled as
   annotations are: ``event_map`` renames and selects the codes, and these onset markers need
   ``event_duration``;
4. the first file-name rule ``(regex, label)`` whose regex is found in the file stem (e.g.
   ``('_1$', 'rest'), ('_2$', 'task')`` for eegmat) -> one label for the whole recording;
5. otherwise unlabelled (label ``''``, stored as -1).

Subjects: the table's ``subject``; else the first capture group of ``subject_regex`` in the path;
else the built-in patterns (BIDS ``sub-XX``, eegmmidb ``S001`` of ``S001R04``, eegmat
``Subject00``, TUH ``aaaaaaab`` of ``aaaaaaab_s001_t000``); else the file stem, which makes every
file its own subject (said in the report).

``LabelRules.table_problems`` lists what does not fit between the table and the recordings
(rows that match no recording, empty labels, recordings the table does not name): ``prepare``
warns about them, and fails on them under ``--strict``. A table saved with a UTF-8 byte-order
mark (Excel's "CSV UTF-8") reads like one without.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Event",
    "LabelRules",
    "Resolved",
    "infer_subject",
    "is_discontinuity_mark",
    "is_mark",
    "read_label_table",
]


def is_discontinuity_mark(description: object) -> bool:
    """Whether an annotation marks a jump in the data: MNE's ``EDGE...`` (``concatenate_raws``,
    the gaps of an EDF+D file as ``read_recording`` marks them), EEGLAB's ``boundary``, or
    BrainVision's ``New Segment`` (MNE's ``New Segment/``: the recorder starts one wherever a
    recording was paused and resumed; MNE drops the one at the first sample)."""
    desc = str(description).strip()
    lower = desc.lower()
    return (
        desc.upper().startswith("EDGE")
        or lower == "boundary"
        or lower == "new segment"
        or lower.startswith("new segment/")
    )


def is_mark(description: object) -> bool:
    """Whether an annotation marks the recording rather than an event, and so labels nothing:
    MNE's ``BAD...`` (artefacts) and the discontinuity marks (:func:`is_discontinuity_mark`)."""
    return str(description).strip().upper().startswith("BAD") or is_discontinuity_mark(description)


@dataclass(frozen=True)
class Event:
    onset: float  # seconds from the start of the recording
    duration: float
    label: str


@dataclass(frozen=True)
class Resolved:
    """How one recording is labelled: a whole-file ``label`` or a list of ``events``."""

    subject: str
    session: str
    label: str  # '' = unlabelled (ignored when events is not None)
    events: tuple[Event, ...] | None
    source: str  # 'table', 'annotations', 'stim channel', 'filename', 'none'
    task: str | None = None  # from the table's optional task column
    subject_source: str = "pattern"


@dataclass(frozen=True)
class TableRow:
    label: str
    subject: str
    session: str
    task: str | None
    # for messages: the row's ``file`` as written, its line, and the table it is in
    file: str = ""
    line: int = 0
    table: str = ""


_SUBJECT_PATTERNS = (
    re.compile(r"(?:^|[/_\\])(sub-[A-Za-z0-9]+)"),
    re.compile(r"(?:^|[/\\])(S\d{3})R\d{2}(?:\.|$)"),
    re.compile(r"(?:^|[/\\])(Subject\d+)_\d"),
    re.compile(r"(?:^|[/\\])([a-z]{8})_s\d{3}_t\d{3}"),
)


def infer_subject(path: str | os.PathLike, regex: str | None = None) -> tuple[str, str]:
    """(subject id, how it was found) for a recording path."""
    text = Path(path).as_posix()
    if regex:
        m = re.search(regex, text)
        if m:
            return (m.group(1) if m.groups() else m.group(0)), "subject_regex"
    for pattern in _SUBJECT_PATTERNS:
        # the last match, nearest the file: a folder above a dataset named like one
        # (``/data/eeg_sub-set/ds/sub-01/...``) made every recording of it one subject
        found = [m.group(1) for m in pattern.finditer(text)]
        if found:
            return found[-1], "pattern"
    return Path(path).name.split(".")[0], "file name (each file its own subject)"


def read_label_table(path: str | os.PathLike) -> dict[str, TableRow]:
    """CSV ``file,label,subject,session[,task]`` -> {key: row}; keys are the ``file`` values
    and the absolute paths they resolve to (relative to the table's folder)."""
    path = Path(path)
    try:
        # A table saved by Excel as "CSV UTF-8" starts with a byte-order mark, which would
        # otherwise stick to the first column's name ('\ufefffile'). (Not the utf-8-sig codec:
        # its error offsets leave the mark out.)
        data = path.read_bytes()
        text = data.decode("utf-8").removeprefix("\ufeff")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except OSError as err:
        raise ValueError(f"labels table {path}: {err}") from None
    except UnicodeDecodeError as err:
        # Excel's "Unicode text" is UTF-16, older tools write Latin-1: the codec's words alone
        # ("can't decode byte 0xff in position 0") did not say what to do
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"labels table {path}, line {line}: not UTF-8 text ({_encoding_guess(data)}byte "
            f"{data[err.start]:#04x}); save it as CSV UTF-8"
        ) from None
    except csv.Error as err:
        # binary data, or a field past csv's limit (131072 characters): csv.Error is no
        # ValueError, and `eegfast prepare` showed a traceback
        raise ValueError(f"labels table {path}: not a CSV table ({err})") from None
    if not rows:
        raise ValueError(f"labels table {path}: no rows")
    missing = {"file", "label"} - set(rows[0])
    if missing:
        raise ValueError(
            f"labels table {path}: missing columns {sorted(missing)} "
            "(expected file,label,subject,session)"
        )
    table = {}
    for i, row in enumerate(rows, start=2):
        file = (row.get("file") or "").strip()
        if not file:
            raise ValueError(f"labels table {path}, line {i}: empty 'file'")
        entry = TableRow(
            label=(row.get("label") or "").strip(),
            subject=(row.get("subject") or "").strip(),
            session=(row.get("session") or "").strip(),
            task=(row.get("task") or "").strip() or None,
            file=file,
            line=i,
            table=str(path),
        )
        written = file
        if os.sep == "/" and "\\" in file and not (path.parent / file).exists():
            # a table made on Windows (`sub-01\eeg\x.edf`), used on Linux or macOS, where a
            # backslash is part of a file name: its rows matched no recording, which were
            # then prepared unlabelled (a warning, amid others)
            written = file.replace("\\", "/")
        try:
            resolved = str((path.parent / written).resolve())
        except ValueError:  # a NUL in it: "embedded null byte", naming neither table nor line
            raise ValueError(
                f"labels table {path}, line {i}: 'file' {file!r} holds a NUL character, so it "
                "is no file name"
            ) from None
        earlier = table.get(file) or table.get(resolved)
        if earlier is not None:
            raise ValueError(
                f"labels table {path}, line {i}: file {file!r} repeats line {earlier.line} "
                "(one row per recording)"
            )
        table[file] = entry
        table[resolved] = entry
    return table


def _encoding_guess(data: bytes) -> str:
    """``"UTF-16 (byte-order mark); "`` for a file that starts with one, else ``""``."""
    return "UTF-16 (byte-order mark); " if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""


@dataclass(frozen=True)
class LabelRules:
    event_map: dict[str, str] | None = None
    filename_rules: tuple[tuple[str, str], ...] = ()
    table: dict[str, TableRow] = field(default_factory=dict)
    subject_regex: str | None = None
    use_annotations: bool = True
    # seconds labelled after the onset of a zero-duration annotation (None: skip those)
    event_duration: float | None = None
    # the channel whose events label a recording without labelling annotations: "auto" (the
    # one MNE picks, else one named like a trigger channel), a channel name, or None for none
    stim_channel: str | None = "auto"

    def __post_init__(self) -> None:
        if self.event_duration is not None and not (
            isinstance(self.event_duration, int | float)
            and not isinstance(self.event_duration, bool)
            and 0 < self.event_duration < float("inf")
        ):
            raise ValueError(
                f"event_duration must be a positive number of seconds, got {self.event_duration!r}"
            )
        if self.stim_channel is not None and (
            not isinstance(self.stim_channel, str) or not self.stim_channel.strip()
        ):
            raise ValueError(
                f"stim_channel must be 'auto', a channel name or None, got {self.stim_channel!r}"
            )
        for regex, _label in self.filename_rules:
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"filename rule {regex!r}: {err}") from None
        if self.subject_regex is not None:
            try:
                re.compile(self.subject_regex)
            except re.error as err:
                raise ValueError(f"subject_regex {self.subject_regex!r}: {err}") from None

    def _row(self, path: Path) -> TableRow | None:
        for key in (str(path.resolve()), path.as_posix(), path.name):
            if key in self.table:
                return self.table[key]
        return None

    def table_problems(self, paths: list[str | os.PathLike]) -> list[str]:
        """What is wrong between the table and the recordings ``paths`` (one message each):
        rows that match none of them (a misspelled file name), rows with an empty label, and
        recordings the table does not name (they fall back to annotations or file-name rules,
        and take their subject from the file name). Nothing without a table."""
        if not self.table:
            return []
        rows = sorted({row.line: row for row in self.table.values()}.items())
        matched: set[int] = set()
        missing = []
        for path in paths:
            row = self._row(Path(path))
            if row is None:
                missing.append(Path(path).as_posix())
            else:
                matched.add(row.line)
        problems = []
        for line, row in rows:
            where = f"labels table {row.table}, line {line}: file {row.file!r}"
            if line not in matched:
                problems.append(f"{where} matches no recording")
            elif not row.label:
                problems.append(f"{where} has an empty label (the recording is left unlabelled)")
        if missing:
            shown = ", ".join(missing[:10])
            if len(missing) > 10:
                shown += f" and {len(missing) - 10} more"
            tables = ", ".join(sorted({row.table for _, row in rows}))
            problems.append(
                f"labels table {tables}: {len(missing)} recording(s) not in the table "
                f"(labelled by annotations or file-name rules if any, subject from the path): "
                f"{shown}"
            )
        return problems

    def _label_of(self, description: object) -> str | None:
        """The label an annotation's description gives, or None if it labels nothing."""
        desc = str(description).strip()
        if self.event_map is not None:
            return self.event_map.get(desc)
        # A blank description names no class: as the label '' (unlabelled) its windows were
        # events, and the recording's file-name rule no longer applied.
        return None if not desc or is_mark(desc) else desc

    def events_from(self, annotations) -> tuple[Event, ...]:
        """Events from ``(onset, duration, description)`` triples (e.g. ``raw.annotations``);
        a zero-duration one lasts ``event_duration`` seconds, or is skipped without it."""
        events = []
        for onset, duration, description in annotations:
            label = self._label_of(description)
            if label is None:
                continue
            if duration <= 0 and self.event_duration is not None:
                duration = self.event_duration
            if duration > 0:
                events.append(Event(float(onset), float(duration), label))
        return tuple(events)

    def skipped_onset_markers(self, annotations) -> dict[str, int]:
        """Descriptions (with counts) of the annotations that would label windows but were
        skipped for a zero duration (none with ``event_duration``): for ``prepare``'s warning,
        which lists them (some, such as EEGLAB's ``boundary``, mark no event)."""
        if self.event_duration is not None:
            return {}
        skipped: dict[str, int] = {}
        for _, duration, description in annotations:
            if duration <= 0 and self._label_of(description) is not None:
                desc = str(description).strip()
                skipped[desc] = skipped.get(desc, 0) + 1
        return skipped

    def resolve(self, path: str | os.PathLike, annotations=(), stim_events=()) -> Resolved:
        """How the recording ``path`` is labelled (the order of the module's docstring).

        annotations, stim_events : ``(onset_s, duration_s, description)`` triples; the stim
            channel's events count only when the annotations give no event.
        """
        path = Path(path)
        subject, subject_source = infer_subject(path, self.subject_regex)
        row = self._row(path)
        if row is not None:
            return Resolved(
                row.subject or subject,
                row.session,
                row.label,
                None,
                "table",
                row.task,
                "table" if row.subject else subject_source,
            )
        if self.use_annotations:
            events = self.events_from(annotations)
            if events:
                return Resolved(subject, "", "", events, "annotations", None, subject_source)
            events = self.events_from(stim_events)
            if events:
                return Resolved(subject, "", "", events, "stim channel", None, subject_source)
        for regex, label in self.filename_rules:
            if re.search(regex, path.name.split(".")[0]):
                return Resolved(subject, "", label, None, "filename", None, subject_source)
        return Resolved(subject, "", "", None, "none", None, subject_source)
