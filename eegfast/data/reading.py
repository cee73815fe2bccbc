"""Reading recordings with MNE and mapping their channels to the LaBraM electrode table.

* ``read_recording(path)``: any format ``mne.io.read_raw`` reads (EDF/EDF+/BDF, FIF, BrainVision,
  EEGLAB, GDF, CNT, ...); a file inside a BIDS dataset through ``mne_bids`` when it is installed.
  EDF/BDF headers are checked against the file size first, because MNE silently reads a
  truncated EDF as a shorter recording.
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
    "check_edf_size",
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


# Name patterns of non-EEG signals -> MNE channel type (checked on the upper-cased raw name).
_NON_EEG = (
    (re.compile(r"\b(ECG|EKG)\b|^(ECG|EKG)"), "ecg"),
    (re.compile(r"\b(V|H)?EOG\b|^(V|H)?EOG|^LOC\b|^ROC\b"), "eog"),
    (re.compile(r"\bEMG\b|^EMG|CHIN"), "emg"),
    (re.compile(r"RESP|PLETH|SPO2|SAO2|THORAX|ABDO|AIRFLOW|NASAL"), "resp"),
    (
        re.compile(r"^(STI|STATUS|TRIGGER|TRIG|EVENT|MARKER|DC\d*|PHOTIC|IBI|BURSTS|SUPPR)\b"),
        "stim",
    ),
    (re.compile(r"EDF ANNOTATIONS|BDF ANNOTATIONS"), "misc"),
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
_LETTER_NUMBER = re.compile(r"^[A-H]([1-9]|[1-2][0-9]|3[0-2])$", re.IGNORECASE)


def _letter_number_cap(ch_names: list[str]) -> bool:
    """Whether the recording names its electrodes by a letter-number cap layout (BioSemi)."""
    layout_only = [
        raw
        for raw in ch_names
        if _LETTER_NUMBER.match(raw.strip())
        and not is_labram_channel(normalize_channel_name(raw), allow_extended=True)
    ]
    return len(layout_only) >= 2


def map_channels(
    ch_names: list[str],
    ch_types: list[str] | None = None,
    *,
    channels: list[str] | None = None,
    allow_extended: bool = False,
    modern_names: bool = True,
) -> ChannelMap:
    """Split a recording's channels into table electrodes and excluded signals.

    channels : keep exactly these electrodes (normalised names), in this order; raises
        ``BadRecording`` naming those the recording lacks.
    """
    ch_types = list(ch_types) if ch_types is not None else ["eeg"] * len(ch_names)
    cap_layout = _letter_number_cap(ch_names)
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
        if cap_layout and _LETTER_NUMBER.match(raw.strip()):
            excluded[raw] = (
                "BioSemi-style cap position (letter + number, A1..H32): not the 10-20 site of "
                "that name"
            )
            unknown.append(raw)
            continue
        name = normalize_channel_name(raw, modern_names=modern_names)
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
        missing = [c for c in wanted if c not in names]
        if missing:
            raise BadRecording(f"missing requested electrodes {missing}")
        for name, i in zip(names, picks, strict=True):
            if name not in wanted:
                excluded[ch_names[i]] = "not in --channels"
        order = [names.index(c) for c in wanted]
        picks = [picks[j] for j in order]
        names = wanted
    return ChannelMap(tuple(picks), tuple(names), excluded, tuple(unknown), n_eeg)


def check_edf_size(path: str | os.PathLike) -> None:
    """Raise ``BadRecording`` when an EDF/BDF file is shorter than its header says.

    Header layout (EDF spec): bytes 184-191 header size, 236-243 number of data records,
    252-255 number of signals ``ns``; then ``ns`` 8-byte "samples per record" fields at offset
    256 + 216 * ns. BDF stores 3 bytes per sample instead of 2.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 256:
        raise BadRecording(f"corrupt EDF: {size} bytes, shorter than the 256-byte header")
    with open(path, "rb") as f:
        head = f.read(256)
        try:
            header_bytes = int(head[184:192].decode("ascii").strip())
            n_records = int(head[236:244].decode("ascii").strip())
            ns = int(head[252:256].decode("ascii").strip())
        except ValueError:
            raise BadRecording("corrupt EDF header (non-numeric size fields)") from None
        if ns <= 0 or header_bytes != 256 * (ns + 1):
            raise BadRecording(f"corrupt EDF header ({ns} signals, header of {header_bytes} bytes)")
        if size < header_bytes:
            raise BadRecording(f"truncated EDF: {size} bytes, header alone needs {header_bytes}")
        f.seek(256 + 216 * ns)
        try:
            samples = [int(f.read(8).decode("ascii").strip()) for _ in range(ns)]
        except ValueError:
            raise BadRecording("corrupt EDF header (non-numeric samples per record)") from None
    width = 3 if path.suffix.lower() == ".bdf" else 2
    record_bytes = width * sum(samples)
    if n_records == -1:  # still recording when written: size decides
        return
    expected = header_bytes + n_records * record_bytes
    if size < expected:
        raise BadRecording(
            f"truncated EDF: {size} bytes, header announces {n_records} records "
            f"({expected} bytes); {(size - header_bytes) // max(record_bytes, 1)} complete"
        )


def read_recording(path: str | os.PathLike, *, bids_root: str | os.PathLike | None = None):
    """``mne.io.BaseRaw`` (not preloaded) for one recording; ``BadRecording`` with the reason.

    bids_root : the BIDS dataset holding ``path``; the recording is then read with
        ``mne_bids.read_raw_bids`` (channel types, events and line frequency from the sidecars).
    """
    import mne

    path = Path(path)
    if not path.exists():
        raise BadRecording("file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise BadRecording("empty file (0 bytes)")
    if path.suffix.lower() in (".edf", ".bdf"):
        check_edf_size(path)
    try:
        if bids_root is not None:
            mne_bids = import_mne_bids()
            bids_path = mne_bids.get_bids_path_from_fname(path).update(root=bids_root)
            raw = mne_bids.read_raw_bids(bids_path, verbose="error")
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
    return raw


def import_mne_bids():
    try:
        import mne_bids
    except ImportError:
        raise ImportError(
            "reading a BIDS dataset needs mne-bids (pip install mne-bids); or pass the "
            "recording files themselves"
        ) from None
    return mne_bids
