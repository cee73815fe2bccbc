"""The LaBraM electrode table and electrode-name normalisation (dependency-free leaf module).

LaBraM adds a learned spatial embedding ``pos_embed[input_chans]`` to every token. The rows of
that table follow a fixed list of 136 electrode names (``LABRAM_CHANNEL_NAMES``); row 0 is the
cls token, so electrode ``n`` uses row ``LABRAM_CHANNEL_NAMES.index(n) + 1``.

The reference checkpoints hold only 129 rows (cls + 128 electrodes): the last 8 names of the list
(bipolar pairs ``FP1-F3`` ... ``P4-O2``, list index 128..135) point past the table, and the
reference code would index out of bounds or, on some devices, read garbage. ``labram_input_chans``
therefore rejects them unless the caller asks for an extended table (137 rows) explicitly.

Names in recordings are written in many ways. ``normalize_channel_name`` maps them to the table's
spelling:

* surrounding blanks and padding dots are removed, case is folded (``'Fc5.'`` -> ``'FC5'``,
  ``'Cz..'`` -> ``'CZ'``); a name ends at its first NUL (EDF labels padded with NULs), and
  Unicode compatibility forms are folded (NFKC: full-width ``'Ｆｐ１'`` -> ``'FP1'``);
* an ``EEG`` type prefix is removed (``'EEG Fp1'``, ``'EEG:Fp1'``, ``'EEG-Fp1'`` -> ``'FP1'``),
  and so is Nihon Kohden's ``POL`` (polygraph input) prefix (``'POL Fp1-Ref'`` -> ``'FP1'``);
* a reference suffix naming a *common* reference is removed: ``-REF``, ``-LE`` (linked ears),
  ``-AR``/``-AVG``/``-CAR`` (average), ``-REF1``... (``'EEG FP1-REF'`` -> ``'FP1'``). Suffixes
  naming a single electrode are NOT removed: ``'EEG A2-A1'`` stays the bipolar derivation
  ``'A2-A1'`` (the difference of the two ear electrodes is not electrode A2);
* old 10-20 names are replaced by their 10-10 names: T3 -> T7, T4 -> T8, T5 -> P7, T6 -> P8
  (the table holds both spellings at different rows; eegfast always uses the 10-10 rows so the
  same scalp site gets the same embedding in every dataset). Pass ``modern_names=False`` to keep
  the old spelling (and the old rows), e.g. to match a checkpoint fine-tuned on TUH names;
* a bipolar pair ``X-Y`` of two electrode names is normalised on each side (``'Fp1-F7'`` ->
  ``'FP1-F7'``, ``'T3-T5'`` -> ``'T7-P7'``). Only the 16 pairs of the table are known electrodes,
  and all of them sit at list index >= 120 (8 of them past the 129-row table). The table spells
  them with 10-10 names only, so an old-name pair takes that row with ``modern_names=False``
  too (``'T3-T5'`` -> ``'T7-P7'``; a pair of the table has no old-name row to keep).

Anything else is returned normalised but unmapped: callers report unknown names, they never guess.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = [
    "LABRAM_CHANNEL_NAMES",
    "LABRAM_TABLE_ROWS",
    "LABRAM_EXTENDED_TABLE_ROWS",
    "OLD_TO_MODERN_NAMES",
    "normalize_channel_name",
    "split_bipolar",
    "labram_channel_index",
    "labram_input_chans",
    "is_labram_channel",
]

# The reference list (labram_state_dicts.json, "pos_embed_channel_names"), upper-cased: the six
# names with a lower-case 'h' (half-way positions such as FTT9h) are matched case-insensitively.
LABRAM_CHANNEL_NAMES: tuple[str, ...] = (
    "FP1", "FPZ", "FP2", "AF9", "AF7", "AF5", "AF3", "AF1", "AFZ", "AF2", "AF4", "AF6", "AF8",
    "AF10", "F9", "F7", "F5", "F3", "F1", "FZ", "F2", "F4", "F6", "F8", "F10", "FT9", "FT7",
    "FC5", "FC3", "FC1", "FCZ", "FC2", "FC4", "FC6", "FT8", "FT10", "T9", "T7", "C5", "C3", "C1",
    "CZ", "C2", "C4", "C6", "T8", "T10", "TP9", "TP7", "CP5", "CP3", "CP1", "CPZ", "CP2", "CP4",
    "CP6", "TP8", "TP10", "P9", "P7", "P5", "P3", "P1", "PZ", "P2", "P4", "P6", "P8", "P10",
    "PO9", "PO7", "PO5", "PO3", "PO1", "POZ", "PO2", "PO4", "PO6", "PO8", "PO10", "O1", "OZ",
    "O2", "O9", "CB1", "CB2", "IZ", "O10", "T3", "T5", "T4", "T6", "M1", "M2", "A1", "A2",
    "CFC1", "CFC2", "CFC3", "CFC4", "CFC5", "CFC6", "CFC7", "CFC8", "CCP1", "CCP2", "CCP3",
    "CCP4", "CCP5", "CCP6", "CCP7", "CCP8", "T1", "T2", "FTT9H", "TTP7H", "TPP9H", "FTT10H",
    "TPP8H", "TPP10H", "FP1-F7", "F7-T7", "T7-P7", "P7-O1", "FP2-F8", "F8-T8", "T8-P8", "P8-O2",
    "FP1-F3", "F3-C3", "C3-P3", "P3-O1", "FP2-F4", "F4-C4", "C4-P4", "P4-O2",
)  # fmt: skip

LABRAM_TABLE_ROWS = 129  # rows of pos_embed in the reference checkpoints: cls + 128 electrodes
LABRAM_EXTENDED_TABLE_ROWS = len(LABRAM_CHANNEL_NAMES) + 1  # 137: every name gets a row

OLD_TO_MODERN_NAMES: dict[str, str] = {"T3": "T7", "T4": "T8", "T5": "P7", "T6": "P8"}

_INDEX = {name: i for i, name in enumerate(LABRAM_CHANNEL_NAMES)}
_ELECTRODE_NAMES = frozenset(n for n in LABRAM_CHANNEL_NAMES if "-" not in n)
# Suffixes that name a common reference, not a second electrode. Blanks around the dash are
# allowed ('EEG Fp1 - REF'), as they are between the two sides of a bipolar pair.
_REFERENCE_SUFFIX = re.compile(r"\s*-\s*(REF\d*|LE|AR|AVG|CAR|AV|COM|CMS|REFERENCE)$")
# 'EEG' is the EDF+ signal type; EDF files exported from Nihon Kohden systems prefix the
# channels of their polygraph inputs with 'POL' instead ('POL Fp1-Ref', 'POL EKG1', 'POL DC01').
_TYPE_PREFIX = re.compile(r"^(EEG|POL)(\s+|:\s*|-(?=[A-Z]))")


def _fold(raw: str) -> str:
    # An EDF label padded with NULs instead of blanks reaches us as 'Fp1\x00\x00...' (MNE
    # strips only blanks): the name ends at the first NUL, as MNE reads the header's other
    # text fields. NFKC folds compatibility forms (full-width 'Ｆｐ１') to their ASCII letters.
    name = unicodedata.normalize("NFKC", raw.split("\x00", 1)[0]).strip().upper()
    name = re.sub(r"\s+", " ", name)
    return name.strip(". ")  # eegmmidb pads names with dots ('FC5.', 'CZ..')


def _modern(name: str, modern_names: bool) -> str:
    return OLD_TO_MODERN_NAMES.get(name, name) if modern_names else name


def normalize_channel_name(raw: str, *, modern_names: bool = True) -> str:
    """The table spelling of a recorded channel name.

    >>> normalize_channel_name("EEG Fp1-REF"), normalize_channel_name("Fc5.")
    ('FP1', 'FC5')
    >>> normalize_channel_name("EEG T3"), normalize_channel_name("Fp1-F7")
    ('T7', 'FP1-F7')
    >>> normalize_channel_name("EEG A2-A1")  # an ear difference, not electrode A2
    'A2-A1'

    The result is NOT guaranteed to be in the table (``'ECG ECG'`` -> ``'ECG ECG'``); check
    with ``is_labram_channel`` or let ``labram_input_chans`` report unknown names.
    """
    if not isinstance(raw, str):
        raise TypeError(f"raw: channel name must be a str, got {type(raw).__name__}")
    name = _fold(raw)
    name = _TYPE_PREFIX.sub("", name, count=1).strip(". ")
    name = _REFERENCE_SUFFIX.sub("", name).strip(". ")
    pair = split_bipolar(name, modern_names=modern_names)
    if pair is not None:
        bipolar = f"{pair[0]}-{pair[1]}"
        if not modern_names and bipolar not in _INDEX:
            # The table spells its pairs with 10-10 names only ('T7-P7'): an old-name pair
            # ('T3-T5', TUH / CHB-MIT montages) is the same derivation, and that is its only row.
            modern = split_bipolar(name, modern_names=True)
            if modern is not None and f"{modern[0]}-{modern[1]}" in _INDEX:
                return f"{modern[0]}-{modern[1]}"
        return bipolar
    return _modern(name, modern_names)


def split_bipolar(name: str, *, modern_names: bool = True) -> tuple[str, str] | None:
    """``('FP1', 'F7')`` for a bipolar derivation of two known electrodes, else None.

    Both sides must be electrode names of the table (after case folding and old->new renaming):
    ``'A2-A1'`` -> ``('A2', 'A1')``, while ``'FP1-REF'`` or ``'ECG-1'`` -> None.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: channel name must be a str, got {type(name).__name__}")
    parts = _fold(name).split("-")
    if len(parts) != 2:
        return None
    left, right = (_modern(p.strip(". "), modern_names) for p in parts)
    known = _ELECTRODE_NAMES
    if left in known and right in known:
        return left, right
    return None


def is_labram_channel(name: str, *, allow_extended: bool = False) -> bool:
    """Whether ``name`` (already normalised) has a usable row in the spatial table."""
    index = _INDEX.get(name)
    if index is None:
        return False
    return allow_extended or index + 1 < LABRAM_TABLE_ROWS


def labram_channel_index(name: str) -> int:
    """Index of a normalised name in ``LABRAM_CHANNEL_NAMES`` (ValueError naming it if absent)."""
    try:
        return _INDEX[name]
    except KeyError:
        raise ValueError(f"electrode {name!r} is not in the LaBraM electrode table") from None


def labram_input_chans(
    names: Iterable[str], *, allow_extended: bool = False, modern_names: bool = True
) -> list[int]:
    """Rows of the spatial embedding for electrodes ``names``: ``[0] + [index(n) + 1, ...]``.

    Names are normalised first (``normalize_channel_name``), so raw recording names work;
    ``modern_names=False`` keeps T3/T4/T5/T6 on their own (old) rows, as for the names
    ``normalize_channel_name(..., modern_names=False)`` gives.
    Raises ``ValueError`` naming every unknown name, every name whose row is past the 129-row
    reference table (list index >= 128; pass ``allow_extended=True`` for a model built with
    ``LABRAM_EXTENDED_TABLE_ROWS`` rows), and names that map to the same electrode twice
    (e.g. ``'T3'`` and ``'T7'``).
    """
    if isinstance(names, str):
        raise TypeError("names: expected a sequence of channel names, got a single str")
    raw_names = list(names)
    for i, raw in enumerate(raw_names):
        if not isinstance(raw, str):
            raise TypeError(f"names[{i}]: channel name must be a str, got {type(raw).__name__}")
    normalised = [normalize_channel_name(n, modern_names=modern_names) for n in raw_names]
    unknown = [r for r, n in zip(raw_names, normalised, strict=True) if n not in _INDEX]
    past_table = [
        r
        for r, n in zip(raw_names, normalised, strict=True)
        if n in _INDEX and not allow_extended and _INDEX[n] + 1 >= LABRAM_TABLE_ROWS
    ]
    seen: dict[str, str] = {}
    duplicates = []
    for r, n in zip(raw_names, normalised, strict=True):
        if n in seen:
            duplicates.append(f"{seen[n]!r} and {r!r} -> {n}")
        seen.setdefault(n, r)
    problems = []
    if unknown:
        problems.append(f"unknown electrode names {unknown}")
    if past_table:
        problems.append(
            f"electrodes {past_table} have rows past the {LABRAM_TABLE_ROWS}-row reference "
            "table (pass allow_extended=True for a model with an extended table)"
        )
    if duplicates:
        problems.append(f"the same electrode appears twice: {', '.join(duplicates)}")
    if problems:
        raise ValueError("names: " + "; ".join(problems))
    return [0] + [_INDEX[n] + 1 for n in normalised]
