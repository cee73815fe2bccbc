"""Reading recordings with MNE and mapping their channels to the LaBraM electrode table.

* ``read_recording(path)``: any format ``mne.io.read_raw`` reads (EDF/EDF+/BDF, FIF, BrainVision,
  EEGLAB, GDF, CNT, ...); a file inside a BIDS dataset through ``mne_bids`` when it is installed.
  EDF/BDF headers are checked against the file size first, because MNE silently reads a
  truncated EDF as a shorter recording. MNE reads the records of a discontinuous EDF+D/BDF+D
  file back to back; its annotations are moved onto that time axis here and each gap is marked
  ``EDGE boundary`` (``prepare`` filters and windows the parts between such marks separately).
* ``map_channels(names, types)``: which channels are EEG electrodes of the table. Non-EEG signals
  are recognised by name (``ECG``/``EKG``, ``EOG``, ``EMG``, respiration, triggers ...) as well
  as by the type MNE reports, because many EDF files type every signal as EEG (the eegmat
  recordings carry ``ECG ECG`` typed as EEG). EEG names that do not normalise to a usable table
  row (e.g. ``EEG A2-A1``, the difference of the two ear electrodes) are returned as ``unknown``
  with the reason; they are never mapped to a nearby name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eegfast.electrodes import (
    LABRAM_TABLE_ROWS,
    is_labram_channel,
    labram_channel_index,
    normalize_channel_name,
)

__all__ = [
    "BadRecording",
    "ChannelMap",
    "MNE_EXTENSIONS",
    "EDF_GAP_DESCRIPTION",
    "annotation_durations",
    "bdf_trigger_values",
    "check_edf_size",
    "edf_record_onsets",
    "guess_channel_type",
    "map_channels",
    "read_recording",
]

# Extensions mne.io.read_raw understands (lower case; compound ones first).
MNE_EXTENSIONS = (
    ".fif.gz", ".edf", ".bdf", ".gdf", ".fif", ".vhdr", ".ahdr", ".set", ".cnt", ".mff",
    ".nxe", ".eeg", ".lay", ".cdt",
)  # fmt: skip


class BadRecording(Exception):
    """A recording that cannot be used; the message is the reason shown in the report."""


# Name patterns of non-EEG signals -> MNE channel type (checked on the upper-cased raw name and
# on its normalised form). The sleep (PSG) spellings are here because such files type every
# signal EEG: HEO/VEO, LEOG/REOG; E1/E2 referenced to a mastoid or ear (AASM EOG: 'E1-M2');
# leg EMG (LLEG, LAT1-LAT2); effort belts, snoring, airflow sensors, OSAT; pulse, HR; body
# position, light, temperature, microphone. E1/E2 alone stay EEG (EGI nets' E1..E257), and no
# pattern may match a name of the LaBraM table (tests/data/test_channel_types_s30.py).
_NON_EEG = (
    (re.compile(r"\b(ECG|EKG)\b|^(ECG|EKG)|^PULSE|^HR\b"), "ecg"),
    (re.compile(r"EOG|^(HEO|VEO)\b|^LOC\b|^ROC\b|^E[12]\s*[-:]\s*[MA][12]$"), "eog"),
    (re.compile(r"\bEMG\b|^EMG|CHIN|LEG|^[LR]AT\d"), "emg"),
    (
        re.compile(
            r"RESP|PLETH|SPO2|SAO2|OSAT|THORAX|^THOR|ABDO|^EFFORT|AIRFLOW|^FLOW|NASAL|SNOR"
            r"|THERM|CANNULA|PTAF|CPAP"
        ),
        "resp",
    ),
    (
        re.compile(r"^(STI|STATUS|TRIGGER|TRIG|EVENT|MARKER|DC\d*|PHOTIC|IBI|BURSTS|SUPPR)\b"),
        "stim",
    ),
    (
        re.compile(
            r"EDF ANNOTATIONS|BDF ANNOTATIONS|^(LIGHT|POSITION|POS|BODY|TEMP(ERATURE)?|MIC)\b"
        ),
        "misc",
    ),
)


def guess_channel_type(raw_name: str, mne_type: str = "eeg") -> str:
    """MNE type for a channel: the reported type unless its name says it is not EEG.

    The patterns are tried on the raw name and on its normalised form, so montage-style
    names (TUH's ``EEG EKG1-REF``, ``EEG ROC-REF``, ``EEG PHOTIC-REF``) are recognised too.
    """
    name = raw_name.strip().upper()
    stripped = normalize_channel_name(raw_name).upper()
    for pattern, kind in _NON_EEG:
        if pattern.search(name) or pattern.search(stripped):
            return kind
    return mne_type


@dataclass(frozen=True)
class ChannelMap:
    """Result of ``map_channels``: kept EEG electrodes and why every other channel was left out.

    picks : indices of the kept channels in the recording, in recording order (or in the order
        of ``channels`` when given).
    names : their normalised table names (same order as ``picks``).
    excluded : raw name -> reason, for every channel not kept.
    unknown : raw names of EEG channels with no usable table row (a subset of ``excluded``).
    """

    picks: tuple[int, ...]
    names: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()
    n_eeg: int = 0


# BioSemi's 128/256-channel caps name positions A1..A32, B1..B32, ... H32; some of those names
# (A1, A2, C1..C6, F1..F10) are also 10-20 sites, elsewhere on the head. A name alone cannot
# tell them apart, the recording can: letter-number names that are no 10-20 site (A3, B1, D7,
# C17, ...) mean the cap's layout, and then none of its letter-number names is a 10-20 site.
# E-names are no such evidence: E1/E2 are the AASM names of a sleep recording's two EOG
# electrodes, beside F3, C3, C4, A1, A2 (which were all left out as cap positions), and EGI's
# E1..E257 nets have no 10-20 letter-number names to mistake. Every BioSemi layout begins with
# block A (A1..A32), so a cap still shows by its other letters.
_LETTER_NUMBER = re.compile(r"^[A-H]([1-9]|[1-2][0-9]|3[0-2])$", re.IGNORECASE)


def _label(raw: str) -> str:
    """A channel name without its padding: blanks, and NULs and what follows the first (an EDF
    label padded with NULs reaches MNE's reader as 'A1\\x00\\x00...')."""
    return raw.split("\x00", 1)[0].strip()


def _cap_position(raw: str) -> str | None:
    """The letter-number name (``'C17'``) a channel has, without the type prefix and reference
    suffix of its spelling (``'POL C17'``, ``'EEG C17-Ref'``), or None."""
    # normalize_channel_name: only T3..T6 change with modern_names, none of them A..H + number
    name = normalize_channel_name(raw)
    return name if _LETTER_NUMBER.match(name) else None


def _letter_number_cap(ch_names: list[str]) -> bool:
    """Whether the recording names its electrodes by a letter-number cap layout (BioSemi)."""
    layout_only = [
        raw
        for raw in ch_names
        if (name := _cap_position(raw)) is not None
        and name[0] != "E"
        and not is_labram_channel(name, allow_extended=True)
    ]
    return len(layout_only) >= 2


# MNE renames the channels of a file that holds one name several times to NAME-0, NAME-1, ...
# (CHB-MIT's EDF files hold the derivation T8-P8 twice: 'T8-P8-0' and 'T8-P8-1'), counting
# from 0 and renaming every copy (mne's _unique_channel_names; a letter, NAME-a, only where
# NAME-<number> is taken already: not recognised here, those channels stay unknown).
_RUNNING_NUMBER = re.compile(r"^(.+)-(\d+)$")


def _renamed_duplicates(ch_names: list[str]) -> dict[str, str]:
    """{channel name: the name it had in the file} for the channels MNE gave a running number:
    the k >= 2 names STEM-0 .. STEM-<k-1> of one STEM, where no channel is named STEM itself.

    Any other group cannot be MNE's renaming ('Cz-1', 'Cz-2' lack 'Cz-0'; beside 'Cz' the
    file held that name once) and keeps its names. Channels a file really names 'Cz-0' and
    'Cz-1' cannot be told apart from renamed copies of 'Cz'; they are taken as those.
    """
    labels = {_label(raw) for raw in ch_names}
    stems: dict[str, list[tuple[int, str]]] = {}
    for raw in ch_names:
        match = _RUNNING_NUMBER.match(_label(raw))
        if match is not None:
            number = match.group(2)
            # 'Cz-00' is no running number: MNE writes str(index)
            if number == str(int(number)):
                stems.setdefault(match.group(1), []).append((int(number), raw))
    return {
        raw: stem
        for stem, group in stems.items()
        if len(group) >= 2
        and stem not in labels
        and sorted(n for n, _ in group) == list(range(len(group)))
        for _, raw in group
    }


def map_channels(
    ch_names: list[str],
    ch_types: list[str] | None = None,
    *,
    channels: list[str] | None = None,
    allow_extended: bool = False,
    modern_names: bool = True,
) -> ChannelMap:
    """Split a recording's channels into table electrodes and excluded signals.

    Two channels of one electrode (``T3`` and ``T7``; a name the file holds twice, which MNE
    renames ``T8-P8-0``, ``T8-P8-1``) keep the first; the others are excluded as duplicates.

    channels : keep exactly these electrodes (normalised names), in this order; raises
        ``BadRecording`` naming those the recording lacks (and why a channel of that name was
        left out, when it has one), ``ValueError`` when one electrode is asked for twice.
    """
    ch_types = list(ch_types) if ch_types is not None else ["eeg"] * len(ch_names)
    cap_layout = _letter_number_cap(ch_names)
    renamed = _renamed_duplicates(ch_names)
    picks, names, unknown = [], [], []
    excluded: dict[str, str] = {}
    seen: dict[str, str] = {}
    n_eeg = 0
    for i, (raw, mne_type) in enumerate(zip(ch_names, ch_types, strict=True)):
        kind = guess_channel_type(raw, mne_type)
        if kind != "eeg":
            excluded[raw] = f"{kind} channel"
            continue
        n_eeg += 1
        if cap_layout and _cap_position(raw) is not None:
            excluded[raw] = (
                "BioSemi-style cap position (letter + number, A1..H32): not the 10-20 site of "
                "that name"
            )
            unknown.append(raw)
            continue
        name = normalize_channel_name(raw, modern_names=modern_names)
        if raw in renamed and not is_labram_channel(name, allow_extended=True):
            # 'T8-P8-1' is the file's T8-P8 (the first of them is kept, the others are duplicates)
            stem = normalize_channel_name(renamed[raw], modern_names=modern_names)
            name = stem if is_labram_channel(stem, allow_extended=True) else name
        if not is_labram_channel(name, allow_extended=True):
            excluded[raw] = f"unknown electrode ({name!r} is not in the LaBraM table)"
            unknown.append(raw)
        elif not is_labram_channel(name, allow_extended=allow_extended):
            index = labram_channel_index(name)
            excluded[raw] = (
                f"{name!r} has row {index + 1}, past the {LABRAM_TABLE_ROWS}-row reference table"
            )
            unknown.append(raw)
        elif name in seen:
            excluded[raw] = f"duplicate of {seen[name]!r} (both are {name})"
        else:
            seen[name] = raw
            picks.append(i)
            names.append(name)
    if channels is not None:
        wanted = [normalize_channel_name(c, modern_names=modern_names) for c in channels]
        twice = sorted({c for c in wanted if wanted.count(c) > 1})
        if twice:  # (else the channel was picked twice, two rows of one electrode)
            raise ValueError(f"channels: electrodes asked for twice: {twice} (in {channels})")
        missing = [c for c in wanted if c not in names]
        if missing:
            # a channel the recording has but left out (typed EOG by its reader, a BioSemi cap
            # position, ...): "missing" alone read as if the file lacked it
            why = [
                f"{raw!r}: {reason}"
                for raw, reason in excluded.items()
                if normalize_channel_name(raw, modern_names=modern_names) in missing
            ]
            raise BadRecording(
                f"missing requested electrodes {missing}"
                + (f" (left out: {'; '.join(why)})" if why else "")
            )
        for name, i in zip(names, picks, strict=True):
            if name not in wanted:
                excluded[ch_names[i]] = "not in --channels"
        order = [names.index(c) for c in wanted]
        picks = [picks[j] for j in order]
        names = wanted
    return ChannelMap(tuple(picks), tuple(names), excluded, tuple(unknown), n_eeg)


def _edf_header(path: Path) -> bytes:
    """The header of an EDF/BDF file: 256 bytes, then 256 per signal (fewer when the file is
    shorter, or its signal count is not a number). ``read_recording`` reads it once for the
    checks below, which otherwise each opened the file and read it again."""
    with open(path, "rb") as f:
        head = f.read(256)
        try:
            ns = _edf_int(head[252:256], "number of signals")
        except ValueError:
            return head
        return head + f.read(256 * max(ns, 0))


class _EdfHeaderError(ValueError):
    """An EDF/BDF header field that is no number, or that contradicts another; the message
    names the field."""


class _EdfHeaderTruncated(_EdfHeaderError):
    """The header bytes end before the header size the header announces (``header_bytes``)."""

    def __init__(self, header_bytes: int) -> None:
        super().__init__(f"header of {header_bytes} bytes")
        self.header_bytes = header_bytes


def _edf_text(field: bytes) -> str:
    """A header field as MNE's EDF reader reads it: up to its first NUL (some writers pad with
    NULs, not blanks), without the blanks around it."""
    return field.decode("latin-1").split("\x00", 1)[0].strip()


def _edf_int(field: bytes, name: str) -> int:
    """An integer header field (``_edf_text``); ``_EdfHeaderError`` naming ``name`` else."""
    try:
        return int(_edf_text(field))
    except ValueError:
        raise _EdfHeaderError(f"{name} is not a number: {_edf_text(field)!r}") from None


def _edf_layout(head: bytes) -> tuple[int, int, list[str], list[int]]:
    """(header size in bytes, data records as the header says (-1: not known), each signal's
    label, each signal's samples per data record) of an EDF/BDF header.

    The one parse of these fields for ``check_edf_size``, ``bdf_trigger_values`` and the EDF+D
    reader. ``_EdfHeaderError`` (a ValueError) naming the field that is no number (or a
    signal count and header size that disagree, a negative sample count);
    ``_EdfHeaderTruncated`` when ``head`` ends before the header size it announces.
    """
    header_bytes = _edf_int(head[184:192], "header size (bytes 184-191)")
    n_records = _edf_int(head[236:244], "number of data records (bytes 236-243)")
    ns = _edf_int(head[252:256], "number of signals (bytes 252-255)")
    if ns <= 0 or header_bytes != 256 * (ns + 1):
        raise _EdfHeaderError(f"{ns} signals, header of {header_bytes} bytes")
    if len(head) < header_bytes:
        raise _EdfHeaderTruncated(header_bytes)
    # (labels stripped as MNE strips them, so its channel names find them)
    labels = [label.strip().decode("latin-1") for label in _edf_fields(head, 256, 16, ns)]
    samples = [
        _edf_int(field, f"samples per record of signal {i + 1} ({labels[i]!r})")
        for i, field in enumerate(_edf_fields(head, 256 + 216 * ns, 8, ns))
    ]
    negative = [i for i, n in enumerate(samples) if n < 0]
    if negative:
        i = negative[0]
        raise _EdfHeaderError(
            f"samples per record of signal {i + 1} ({labels[i]!r}) is negative: {samples[i]}"
        )
    return header_bytes, n_records, labels, samples


def _edf_records_in_file(size: int, header_bytes: int, record_bytes: int) -> int:
    """The complete data records of an EDF/BDF file of ``size`` bytes: those MNE reads, whatever
    the header's count says (-1 while the file was being written; fewer when the recorder
    stopped without updating it; ``check_edf_size`` refuses a file shorter than the count)."""
    return max(size - header_bytes, 0) // record_bytes if record_bytes > 0 else 0


def _edf_fields(head: bytes, offset: int, width: int, n: int) -> list[bytes]:
    """``n`` fields of ``width`` bytes from ``offset`` of an EDF header (one per signal)."""
    return [head[offset + width * i : offset + width * (i + 1)] for i in range(n)]


def check_edf_size(path: str | os.PathLike, *, header: bytes | None = None) -> None:
    """Raise ``BadRecording`` when an EDF/BDF file is shorter than its header says, holds no
    complete data record, or has a header field that is no number (the reason names it).

    Header layout (EDF spec): bytes 184-191 header size, 236-243 number of data records,
    252-255 number of signals ``ns``; then ``ns`` 8-byte "samples per record" fields at offset
    256 + 216 * ns. BDF stores 3 bytes per sample instead of 2. Numbers are read as MNE reads
    them (up to a NUL). A file longer than its count of records (or one counting -1) passes:
    MNE reads every complete record in it.
    header : the file's header bytes when already read (``_edf_header``).
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 256:
        raise BadRecording(f"corrupt EDF: {size} bytes, shorter than the 256-byte header")
    head = _edf_header(path) if header is None else header
    try:
        header_bytes, n_records, _, samples = _edf_layout(head)
    except _EdfHeaderTruncated as err:
        raise BadRecording(
            f"truncated EDF: {size} bytes, header alone needs {err.header_bytes}"
        ) from None
    except ValueError as err:
        raise BadRecording(f"corrupt EDF header ({err})") from None
    if size < header_bytes:  # (a header given by the caller, longer than this file)
        raise BadRecording(f"truncated EDF: {size} bytes, header alone needs {header_bytes}")
    width = 3 if path.suffix.lower() == ".bdf" else 2
    record_bytes = width * sum(samples)
    complete = _edf_records_in_file(size, header_bytes, record_bytes)
    expected = header_bytes + n_records * record_bytes
    if n_records != -1 and size < expected:  # (-1: still recording when written: size decides)
        raise BadRecording(
            f"truncated EDF: {size} bytes, header announces {n_records} records "
            f"({expected} bytes); {complete} complete"
        )
    if complete == 0:  # (MNE's reader failed on an EDF+ file of none: "IndexError")
        raise BadRecording("empty recording (no complete data record)")


def read_recording(path: str | os.PathLike, *, bids_root: str | os.PathLike | None = None):
    """``mne.io.BaseRaw`` (not preloaded) for one recording; ``BadRecording`` with the reason.

    bids_root : the BIDS dataset holding ``path``; the recording is then read with
        ``mne_bids.read_raw_bids`` (channel types, events and line frequency from the sidecars).
    """
    import mne

    path = Path(path)
    if not path.exists():
        raise BadRecording("file not found")
    if not path.is_file() and not path.is_dir():  # (a folder: an EGI .mff recording)
        # a FIFO blocks a reader until something writes to it; MNE called it "a directory"
        raise BadRecording("not a regular file (a FIFO, socket or device)")
    if path.is_file() and path.stat().st_size == 0:
        raise BadRecording("empty file (0 bytes)")
    header = None
    events_tsv = None  # a BIDS recording's events.tsv
    if path.suffix.lower() in (".edf", ".bdf"):
        header = _edf_header(path) if path.stat().st_size >= 256 else b""
        check_edf_size(path, header=header)
    try:
        if bids_root is not None:
            mne_bids = import_mne_bids()
            bids_path = mne_bids.get_bids_path_from_fname(path).update(root=bids_root)
            if os.path.abspath(bids_path.fpath) != os.path.abspath(path):
                # read_raw_bids reads the file at the place the name gives in bids_root: for a
                # file elsewhere (a derivatives/ copy) that is another one, read without a word
                raise BadRecording(
                    f"not at its place in the BIDS dataset {bids_root} ({bids_path.fpath}): "
                    "read it without bids_root"
                )
            raw = mne_bids.read_raw_bids(bids_path, verbose="error")
            if header is not None:  # (the events' source for _mark_edf_gaps)
                events_tsv = bids_path.find_matching_sidecar(
                    suffix="events", extension=".tsv", on_error="ignore"
                )
        else:
            raw = mne.io.read_raw(path, preload=False, verbose="error")
    except BadRecording:
        raise
    except Exception as err:  # MNE raises many types for unreadable files
        reason = f"unreadable: {type(err).__name__}: {err}".strip().rstrip(":")
        if not path.name.lower().endswith(MNE_EXTENSIONS):  # MNE's own message may be empty
            reason += (
                f" ({path.suffix or 'no extension'}: not a recording format MNE reads; those are "
                + ", ".join(MNE_EXTENSIONS)
                + ")"
            )
        raise BadRecording(reason) from None
    if raw.n_times == 0:
        raise BadRecording("empty recording (no samples)")
    if header is not None:
        _mark_edf_gaps(raw, path, header, events_tsv)
        _fix_edf_units(raw, path, header)
    return raw


# Physical dimensions (case-folded: 'µ', the micro sign, folds to 'μ') -> volts per unit.
_EDF_UNITS = {"uv": 1e-6, "μv": 1e-6, "mv": 1e-3, "nv": 1e-9, "v": 1.0}


def _mne_edf_unit(unit: str) -> float:
    """The scale MNE gives a physical dimension (its exact spellings; volts otherwise)."""
    if unit in ("\u03bcV", "\u00b5V", "\x83\xcaV", "uV"):
        return 1e-6
    return 1e-3 if unit == "mV" else 1.0


def edf_unit_corrections(
    path: str | os.PathLike, *, header: bytes | None = None
) -> dict[int, float]:
    """{channel index (as MNE lists them): factor} for the signals of an EDF/BDF file whose
    unit MNE misreads: it knows only ``uV``, ``µV`` and ``mV`` spelt exactly so, and reads any
    other unit as volts, so ``uv``, ``UV``, a UTF-8 ``µV`` or ``nV`` came out 1e3 to 1e9 times
    too large. header : the file's header bytes when already read (``_edf_header``)."""
    head = _edf_header(Path(path)) if header is None else header
    try:
        ns = _edf_int(head[252:256], "number of signals")
    except ValueError:
        return {}
    labels = _edf_fields(head, 256, 16, ns)
    units = [unit.strip() for unit in _edf_fields(head, 256 + 96 * ns, 8, ns)]
    corrections = {}
    index = 0
    for label, raw_unit in zip(labels, units, strict=True):
        if label.strip() in (b"EDF Annotations", b"BDF Annotations"):
            continue  # not a channel of MNE's raw
        try:
            unit = raw_unit.decode("utf-8")
        except UnicodeDecodeError:
            unit = raw_unit.decode("latin-1")
        # (up to a NUL: MNE read a NUL-padded 'uV' as volts, 1e6 times too large)
        meant = _EDF_UNITS.get(_label(unit).casefold())
        given = _mne_edf_unit(raw_unit.decode("latin-1"))
        if meant is not None and meant != given:
            corrections[index] = meant / given
        index += 1
    return corrections


def _fix_edf_units(raw, path: Path, header: bytes | None = None) -> None:
    """Rescale the channels whose unit MNE misreads (``edf_unit_corrections``).

    Not the stim channels (an EDF's Status/Trigger, BDF's Status): MNE reads their stored
    integers whatever the unit, so the trigger codes of one with a unit written ``UV`` were
    scaled by 1e-6 and lost."""
    types = raw.get_channel_types()
    corrections = {
        index: factor
        for index, factor in edf_unit_corrections(path, header=header).items()
        if types[index] != "stim"
    }
    if not corrections:
        return
    raw.load_data(verbose="error")
    for index, factor in corrections.items():
        raw.apply_function(lambda x, f=factor: x * f, picks=[index], verbose="error")


def bdf_trigger_values(
    path: str | os.PathLike, name: str, *, header: bytes | None = None
) -> np.ndarray | None:
    """(T,) the physical values of the trigger channel ``name`` of a BDF file whose header
    scales it, or None when MNE's reading of it is right (any other file or channel).

    MNE reads a BDF's ``Status``/``Trigger`` channel as BioSemi stores it, raw 24-bit codes
    (physical range = digital range), ignoring the header's scale, and keeps its low 17 bits.
    A BDF that scales the channel (``mne.export.export_raw`` writes physical range [0, 4] onto
    the full digital range for codes up to 4) then read as unrelated codes (codes 3 and 4 as
    the events "1", "65535", "1"). None too when the channel has fewer samples per record than
    the recording (MNE holds each of its values over several samples then).
    """
    path = Path(path)
    if path.suffix.lower() != ".bdf":
        return None
    head = _edf_header(path) if header is None else header
    try:
        header_bytes, n_records, labels, samples = _edf_layout(head)
        ns, index = len(labels), labels.index(name)
        pmin, pmax, dmin, dmax = (  # (read as MNE reads them: a decimal comma is a point)
            float(_edf_text(_edf_fields(head, 256 + offset * ns, 8, ns)[index]).replace(",", "."))
            for offset in (104, 112, 120, 128)
        )
    except ValueError:
        return None  # (a header MNE read: these fields were numbers to it)
    if labels.count(name) != 1 or (pmin, pmax) == (dmin, dmax) or dmax == dmin:
        return None
    if samples[index] != max(samples):
        return None
    record_bytes = 3 * sum(samples)
    # (the records MNE reads: a header's count of -1, or one short of the file's, gave values
    # of another length than MNE's channel, and prepare kept MNE's wrong codes)
    n_records = _edf_records_in_file(path.stat().st_size, header_bytes, record_bytes)
    if n_records == 0:
        return np.empty(0)
    records = np.memmap(path, np.uint8, "r", header_bytes, (n_records, record_bytes))
    begin, n = 3 * sum(samples[:index]), samples[index]
    # Each 24-bit little-endian sample into the top 3 bytes of an int32, shifted back down:
    # the arithmetic shift extends the sign (two's complement). With the scaling in place, 4
    # bytes a sample besides the float64 result; the int32 triplets, masks and temporaries of
    # before took 6 times that (GBs, in each prepare worker, for a day's Status at 2 kHz).
    padded = np.zeros((n_records, n, 4), np.uint8)
    padded[:, :, 1:] = records[:, begin : begin + 3 * n].reshape(n_records, n, 3)
    del records
    digital = padded.view("<i4").reshape(-1)
    np.right_shift(digital, 8, out=digital)
    values = digital.astype(np.float64)
    del padded, digital
    values -= dmin
    values *= (pmax - pmin) / (dmax - dmin)
    values += pmin
    return values


def annotation_durations(raw) -> np.ndarray:
    """(n,) float64 durations in seconds of ``raw.annotations``, 0 for an onset marker: an
    annotation one sample long or less (MNE gives BrainVision's stimulus markers 1/sfreq s),
    as ``eegfast prepare`` counts them.

    A FIF file keeps each onset and end as float32, so a one-sample marker reads back up to a
    float32 step of its end longer or shorter (1/160 s at 10 s: 1.00006 samples): that slack
    is allowed, else such a marker was an event no window fits and the recording was refused.
    """
    sfreq = float(raw.info["sfreq"])
    durations = np.asarray(raw.annotations.duration, dtype=np.float64)
    ends = np.asarray(raw.annotations.onset, dtype=np.float64) + durations
    slack = np.spacing(np.abs(ends).astype(np.float32)).astype(np.float64)
    return np.where(durations * sfreq > 1.0 + 1e-6 + slack * sfreq, durations, 0.0)


# The zero-duration annotation at the first sample after a gap of an EDF+D/BDF+D file: MNE's own
# mark of a discontinuity (``concatenate_raws`` writes it; ``raw.filter`` filters the parts on
# either side of it separately), which ``eegfast prepare`` also windows and filters around.
EDF_GAP_DESCRIPTION = "EDGE boundary"

_TAL = re.compile(rb"([+-]\d+(?:\.\d*)?)(?:\x15(\d+(?:\.\d*)?))?\x14")


def edf_record_onsets(
    path: str | os.PathLike, *, header: bytes | None = None
) -> tuple[float, np.ndarray] | None:
    """(record duration in s, onset of every data record in s from the first one) of a
    discontinuous EDF+D/BDF+D file; None for any other file (EDF, EDF+C, BDF+C).

    The onsets are the time-keeping TALs (the first ``+onset\\x14\\x14`` of each record's
    annotation signal). ``BadRecording`` when an EDF+D file has no annotation signal or a record
    without its time stamp. header : the file's header bytes when already read (``_edf_header``).
    """
    found = _edf_plus_d_records(path, header)
    return None if found is None else found[:2]


def _edf_plus_d_records(
    path: str | os.PathLike, header: bytes | None
) -> tuple[float, np.ndarray, bytes] | None:
    """:func:`edf_record_onsets`, and the bytes of the file's annotation signals (every
    record's, in order), which hold its TALs."""
    path = Path(path)
    head = _edf_header(path) if header is None else header
    if not head[192:236].strip().upper().startswith((b"EDF+D", b"BDF+D")):
        return None
    try:
        header_bytes, _, labels, samples = _edf_layout(head)
        record_s = float(_edf_text(head[244:252]))
    except ValueError as err:
        if not isinstance(err, _EdfHeaderError):
            err = _EdfHeaderError(f"record duration (bytes 244-251) is not a number: {err}")
        raise BadRecording(f"corrupt EDF+D header ({err})") from None
    width = 3 if path.suffix.lower() == ".bdf" else 2
    tal = [i for i, name in enumerate(labels) if name in ("EDF Annotations", "BDF Annotations")]
    if not tal:
        raise BadRecording("EDF+D file without an annotation signal (no record time stamps)")
    record_bytes = width * sum(samples)
    n_records = _edf_records_in_file(path.stat().st_size, header_bytes, record_bytes)
    if n_records == 0:
        return record_s, np.empty(0), b""
    # Each annotation signal's place in a record; the first holds the time stamp. Only their
    # bytes are copied out of the mapped file (n_records x their bytes; 10 MB of a day's 850 MB
    # 19-channel file): a seek and read per record and signal took 3x as long (0.2 s there).
    spans = [(width * sum(samples[:i]), width * samples[i]) for i in tal]
    records = np.memmap(path, np.uint8, "r", header_bytes, (n_records, record_bytes))
    tals = np.concatenate([records[:, at : at + length] for at, length in spans], axis=1)
    del records
    row, first = tals.shape[1], spans[0][1]
    tals = tals.tobytes()  # (record r's annotation bytes at r * row, its first signal's first)
    onsets = np.empty(n_records)
    for r in range(n_records):
        match = _TAL.match(tals, r * row, r * row + first)
        if match is None:
            raise BadRecording(f"EDF+D data record {r} has no time stamp")
        onsets[r] = float(match.group(1))
    back = np.flatnonzero(np.diff(onsets) < 0)
    if len(back):  # (the EDF+ spec orders them; the gap mapping needs them sorted)
        r = int(back[0]) + 1
        raise BadRecording(
            f"EDF+D data record {r} starts at {onsets[r]:g} s, before record {r - 1} "
            f"({onsets[r - 1]:g} s): records out of time order"
        )
    return record_s, onsets - onsets[0], tals


# One TAL: onset, optional duration, then its annotations, each ended by \x14, and \x00 (as
# MNE's EDF reader parses them)
_TAL_ANNOTATIONS = re.compile(rb"([+-]\d+\.?\d*)(\x15(\d+\.?\d*))?(\x14.*?)\x14\x00")


def _tal_annotations(tals: bytes, first_stamp: float) -> list[tuple[float, float, str]]:
    """(onset in s from the first record, duration, description) of each annotation in the TAL
    bytes ``tals`` of an EDF+ file's annotation signals (time-keeping TALs, which have none,
    give nothing); ``first_stamp``: the first record's time stamp, from which onsets count."""
    found = []
    for onset, _, duration, texts in _TAL_ANNOTATIONS.findall(tals):
        for text in texts.split(b"\x14")[1:]:
            if text:
                description = text.decode("utf-8", errors="replace")
                found.append((float(onset) - first_stamp, float(duration or 0), description))
    return found


def _mark_edf_gaps(
    raw, path: Path, header: bytes | None = None, events_tsv: str | os.PathLike | None = None
) -> None:
    """Put an EDF+D file's annotations on the time axis of its data, and mark its gaps.

    MNE reads the data records of an EDF+D file back to back, as if there were no gaps between
    them, but keeps its annotations at their times in the file: after a gap every event would
    be that much too late (or dropped past the end), and windows would join data from both
    sides of the gap. Here each annotation's onset and end are moved onto the data's time axis
    (a time inside a gap goes to the first sample after it), and the first sample after each
    gap gets an ``EDGE boundary`` mark.

    events_tsv : a BIDS recording's events.tsv, the source of its events (as ``read_raw_bids``
        has it) instead of the file's own annotations: its onsets, seconds from the first
        sample in the file's time (as BIDS defines them, and mne-bids writes an EDF+D file's
        annotations), are moved as theirs are. (The file's own replaced them.)
    """
    import mne

    found = _edf_plus_d_records(path, header)
    if found is None:
        return
    record_s, onsets, tals = found
    data_onsets = np.arange(len(onsets)) * record_s
    # a gap: the next record does not start where this one ends (half a sample's tolerance)
    jumps = np.flatnonzero(np.abs(np.diff(onsets) - record_s) > 0.5 / raw.info["sfreq"]) + 1
    if len(jumps) == 0:
        return

    def to_data_time(t: np.ndarray) -> np.ndarray:
        r = np.clip(np.searchsorted(onsets, t, side="right") - 1, 0, None)
        within = np.minimum(t - onsets[r], record_s)  # past its record's end: in the gap
        return data_onsets[r] + np.where(t < onsets[0], t - onsets[0], within)

    # From the file itself: raw.annotations has already lost those MNE put past the data's end.
    # Its annotation signals only: mne.read_annotations(path) reads the whole file into memory
    # (gigabytes for a long recording, in each worker) and scans the signal bytes too, where a
    # chance "+5\x14...\x14\x00" in the EEG samples became an event.
    stamp = float(_TAL.match(tals).group(1))  # the first record's (edf_record_onsets checked it)
    found_annotations = _tal_annotations(tals, stamp)
    if events_tsv is not None:  # from the file too: raw.annotations lost those past the end
        # (quiet through MNE's log level: mne-bids 0.17's reader has no verbose argument, and
        # every such recording failed on it with a TypeError)
        with mne.utils.use_log_level("error"):
            events = import_mne_bids().events_file_to_annotation_kwargs(events_tsv)
        found_annotations = [
            (float(onset), float(duration), str(description))
            for onset, duration, description in zip(
                events["onset"], events["duration"], events["description"], strict=True
            )
        ]
    begin = np.array([onset for onset, _, _ in found_annotations], dtype=float)
    end = begin + np.array([duration for _, duration, _ in found_annotations], dtype=float)
    # An annotation wholly inside a gap (onset after a record's end, end by the next record's
    # start) has no data: moved, it became a marker at the first sample after the gap, and
    # with --event-duration labelled data recorded after it. Left out.
    r = np.searchsorted(onsets, begin, side="right") - 1
    following = np.append(onsets[1:], np.inf)
    in_gap = (r >= 0) & (begin - onsets[np.maximum(r, 0)] > record_s)
    in_gap &= (r < len(onsets) - 1) & (end <= following[np.maximum(r, 0)])
    if in_gap.any():
        found_annotations = [
            a for a, gone in zip(found_annotations, in_gap, strict=True) if not gone
        ]
        begin, end = begin[~in_gap], end[~in_gap]
    new_onset = to_data_time(begin)
    gap_times = data_onsets[jumps]
    annotations = mne.Annotations(
        np.concatenate([new_onset, gap_times]) + raw.first_time,
        np.concatenate([to_data_time(end) - new_onset, np.zeros(len(jumps))]),
        [description for _, _, description in found_annotations]
        + [EDF_GAP_DESCRIPTION] * len(jumps),
        orig_time=raw.annotations.orig_time,
    )
    raw.set_annotations(annotations, emit_warning=False, verbose="error")


def import_mne_bids():
    try:
        import mne_bids
    except ImportError:
        raise ImportError(
            "reading a BIDS dataset needs mne-bids (pip install mne-bids): its channels.tsv "
            "and events.tsv say which channels are bad and what the events are"
        ) from None
    return mne_bids
