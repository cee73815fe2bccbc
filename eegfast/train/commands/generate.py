"""Run code of ``eegfast generate``: continue an EEG recording with a hybrid-pretrained model.

Its description (``eegfast generate --help``) and options are in
:mod:`eegfast.train.commands.options.generate`, read without importing torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eegfast.train.commands.options.generate import configure_parser  # noqa: F401

SFREQ = 200.0
PATCH = 200
UV_PER_UNIT = 100.0  # model units are 100 µV
OUTPUT_SUFFIXES = (".edf", ".npy")


class GenerateError(ValueError):
    """A bad argument or input file; the message names it."""


@dataclass(frozen=True)
class Prompt:
    """A prompt window: x (C, T) float32 in model units (100 µV) at 200 Hz, T >= 200."""

    x: np.ndarray
    names: tuple[str, ...]  # normalised LaBraM names, one per row of x
    source: str
    start_s: float  # where the window starts in the source recording
    # The recording's annotations within the window: (onset, duration, description, names),
    # onset in seconds from the window's first sample, spans clipped to the window; names:
    # the electrodes (of ``names``) a channel-specific one concerns, () for all. Empty for a
    # .npy/.npz prompt (arrays hold none).
    annotations: tuple[tuple[float, float, str, tuple[str, ...]], ...] = ()

    @property
    def seconds(self) -> float:
        return self.x.shape[1] / SFREQ


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _split_channels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise GenerateError("--channels: no electrode names given")
    return names


def check_label(label: str | None) -> str | None:
    """The ``--label`` stripped; GenerateError for one ``eegfast prepare`` would not read as
    a class (empty, or MNE's ``BAD``/``EDGE`` marks, EEGLAB's ``boundary`` and BrainVision's
    ``New Segment``, which it skips)."""
    if label is None:
        return None
    text = label.strip()
    if not text:
        raise GenerateError("--label: empty")
    from eegfast.data.labels import is_mark

    if is_mark(text):
        raise GenerateError(
            f"--label {text!r}: annotations starting with BAD or EDGE (and 'boundary', "
            "'New Segment') mark artefacts and discontinuities, not classes; choose another name"
        )
    return text


def _check_electrodes(
    names: list[str], what: str, *, allow_extended: bool = False
) -> tuple[str, ...]:
    """Normalised names; GenerateError naming every electrode the model cannot embed.

    allow_extended: the model has the extended spatial table (rows past the reference's 128
    electrodes, e.g. bipolar derivations).
    """
    from eegfast.electrodes import is_labram_channel, normalize_channel_name

    normalised = [normalize_channel_name(n) for n in names]
    unknown = [
        raw
        for raw, n in zip(names, normalised, strict=True)
        if not is_labram_channel(n, allow_extended=allow_extended)
    ]
    if unknown:
        where = "" if allow_extended else ", or past its 128 electrode rows"
        raise GenerateError(
            f"{what}: unknown electrodes {unknown} (not in the LaBraM electrode table{where})"
        )
    dupes = sorted({n for n in normalised if normalised.count(n) > 1})
    if dupes:
        raise GenerateError(f"{what}: electrodes given twice: {dupes}")
    return tuple(normalised)


def _window(
    x: np.ndarray, start: float | None, seconds: int, source: str
) -> tuple[np.ndarray, float]:
    """Whole patches of x (C, T) at 200 Hz: [start, start + seconds) or the last ``seconds``."""
    total = x.shape[1]
    if total < PATCH:
        raise GenerateError(
            f"--prompt {source}: {total} samples at 200 Hz ({total / SFREQ:.2f} s) is shorter "
            f"than one patch ({PATCH} samples = 1 s)"
        )
    if start is None:
        n = min(seconds, total // PATCH) * PATCH
        begin = total - n
    else:
        if not (math.isfinite(start) and start >= 0):
            raise GenerateError(f"--start must be a number >= 0, got {start}")
        begin = int(round(start * SFREQ))
        n = min(seconds, (total - begin) // PATCH) * PATCH if begin < total else 0
        if n < PATCH:
            raise GenerateError(
                f"--start {start:g}: less than one patch (1 s) of {source} remains after it "
                f"(the recording has {total / SFREQ:.2f} s at 200 Hz)"
            )
    return x[:, begin : begin + n], begin / SFREQ


def _window_annotations(
    raw, begin_s: float, end_s: float, rename: dict[str, str]
) -> tuple[tuple[float, float, str, tuple[str, ...]], ...]:
    """``raw``'s annotations within the window ``[begin_s, end_s)`` (seconds from its first
    sample), as :attr:`Prompt.annotations`: onsets from ``begin_s``, spans clipped to the
    window. ``rename``: recording channel name -> prompt electrode; a channel-specific
    annotation keeps the electrodes of the prompt, and is left out if it has none of them.
    One a sample of the recording long or less is an onset marker (duration 0), as
    ``eegfast prepare`` reads it there: at 200 Hz, 1/160 s (a 160-Hz recording's stimulus
    marker) is more than a sample, an event no window fits, and prepare refused the file."""
    from eegfast.data.reading import annotation_durations

    annotations = raw.annotations
    # MNE keeps onsets on the time axis of raw.first_time (from the measurement start with
    # orig_time set, and also when it is None: set_annotations adds first_time then), while
    # the prompt's samples count from the data's first sample.
    onsets = np.asarray(annotations.onset, dtype=float) - raw.first_time
    kept = []
    durations = annotation_durations(raw)
    for onset, duration, description, names in zip(
        onsets, durations, annotations.description, annotations.ch_names, strict=True
    ):
        stop = onset + max(float(duration), 0.0)
        # a span ending at the window's start covers none of it; a marker there is in it
        if onset >= end_s or stop < begin_s or (stop == begin_s and stop > onset):
            continue
        electrodes = tuple(rename[n] for n in names if n in rename)
        if names and not electrodes:  # only about channels the prompt does not have
            continue
        first = max(onset, begin_s)
        span = (float(first - begin_s), float(min(stop, end_s) - first))
        kept.append((*span, str(description), electrodes))
    return tuple(kept)


def _sidecar_channels(path: Path, *, required: bool) -> list[str] | None:
    """The electrode names of a .npy prompt from its ``.json`` sidecar (what ``eegfast generate``
    writes beside a .npy), checked to be at 200 Hz and in µV.

    Without a sidecar: GenerateError asking for --channels if ``required``, else None. A
    sidecar with no channel list is an error if ``required``, else None (a JSON file of
    something else, beside a .npy whose rows --channels names)."""
    import json

    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        if not required:
            return None
        raise GenerateError(
            f"--prompt {path.name}: a .npy prompt needs --channels (or a {sidecar.name} sidecar "
            "with its 'channels', as eegfast generate writes)"
        )
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        names = [str(name) for name in info["channels"]]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        # (RecursionError: a sidecar `[[[[...` nested past json's recursion)
        if not required:
            return None
        raise GenerateError(
            f"--prompt {path.name}: sidecar {sidecar} has no channel list ({err})"
        ) from None
    try:
        sfreq = float(info.get("sfreq", SFREQ))
    except (ValueError, TypeError):
        sfreq = math.nan  # not a rate: refused below with the value shown
    if sfreq != SFREQ:
        raise GenerateError(
            f"--prompt {path.name}: sidecar {sidecar} says {info['sfreq']} Hz; a .npy prompt "
            "must already be at 200 Hz"
        )
    units = info.get("units", "uV")
    if units not in ("uV", "µV", "μV"):  # micro sign or Greek mu
        raise GenerateError(
            f"--prompt {path.name}: sidecar {sidecar} says units {units!r}; a .npy prompt "
            "holds µV ('uV')"
        )
    return names


def _pick_rows(
    data: np.ndarray, names: list[str], channels: list[str], path: Path, extended: dict
) -> tuple[np.ndarray, list[str]]:
    """The rows of data (C, T), whose rows are the electrodes ``names``, that ``channels``
    picks (a subset, in its order)."""
    if data.ndim != 2 or data.shape[0] != len(names):
        what = "'x' (C, T)" if path.suffix.lower() == ".npz" else "(C, T)"
        raise GenerateError(
            f"--prompt {path.name}: expected {what} with C = {len(names)} electrodes, got "
            f"shape {data.shape}"
        )
    picked = _check_electrodes(channels, "--channels", **extended)
    known = _check_electrodes(names, f"--prompt {path.name}", **extended)
    missing = [c for c in picked if c not in known]
    if missing:
        raise GenerateError(f"--prompt {path.name}: has no electrodes {missing}")
    return data[[known.index(c) for c in picked]], list(picked)


# The longest .npz prompt read: its members are decompressed whole into the arrays their
# headers declare, so a small file could otherwise declare (and fill) any size (a zip bomb).
MAX_NPZ_PROMPT_SECONDS = 24 * 3600
MAX_NAME_BYTES = 1024  # per electrode name of a .npz's 'channels' (256 UTF-32 characters)


def _read_npz_prompt(path: Path, max_rows: int) -> dict[str, np.ndarray]:
    """Arrays ``x`` and ``channels`` (those present) of a .npz prompt, as ``np.load`` names
    them, each member's .npy header checked before its data are read: ``x`` (C, T) at most
    ``max_rows`` electrodes (what the model embeds) by ``MAX_NPZ_PROMPT_SECONDS`` at 200 Hz,
    ``channels`` at most ``max_rows`` names. GenerateError naming the file otherwise; a file
    that is no zip archive, or a member that is no .npy array, raises ValueError or
    ``zipfile.BadZipFile`` (np.load returned such a member as bytes: an AttributeError)."""
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        for key in ("x", "channels"):
            member = key if key in members else f"{key}.npy"  # (np.load's order)
            if member not in members:
                continue
            with archive.open(member) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f".npy format version {version}")
                    read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
                    shape, _, dtype = read_header(f)
                except ValueError as err:
                    raise ValueError(f"member {member} is not a .npy array ({err})") from None
                _check_npz_member(path, key, shape, dtype, max_rows)
                f.seek(0)
                arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    return arrays


def _check_npz_member(
    path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, max_rows: int
) -> None:
    """GenerateError naming ``path`` unless a .npz prompt's member ``key`` with this declared
    shape and dtype is within the bounds of :func:`_read_npz_prompt`."""
    what = f"--prompt {path.name}: not a readable .npz prompt: '{key}' declares {dtype} {shape}"
    if key == "x":
        max_samples = int(MAX_NPZ_PROMPT_SECONDS * SFREQ)
        if len(shape) != 2:  # (its size unchecked below)
            raise GenerateError(f"{what}; expected (C, T): electrodes by samples")
        if shape[0] > max_rows:
            raise GenerateError(f"{what}, more rows than the {max_rows} electrodes the model has")
        if shape[1] > max_samples:
            raise GenerateError(
                f"{what}, more than {MAX_NPZ_PROMPT_SECONDS / 3600:g} h at 200 Hz "
                f"({max_samples} samples); keep the part to continue"
            )
        if dtype.itemsize > 8:
            raise GenerateError(f"{what}; samples must be real numbers")
    elif math.prod(shape) > max_rows or dtype.itemsize > MAX_NAME_BYTES:
        raise GenerateError(
            f"{what}, more than the {max_rows} electrode names of the model (of at most "
            f"{MAX_NAME_BYTES // 4} characters)"
        )


def load_prompt(
    path: str | Path,
    *,
    channels: list[str] | None = None,
    start: float | None = None,
    prompt_seconds: int = 8,
    notch: float | None = 50.0,
    allow_extended: bool = False,
) -> Prompt:
    """Read and preprocess a prompt (see ``eegfast generate --help``) -> :class:`Prompt`.

    allow_extended: accept electrodes of the extended spatial table (a model with more than
    the reference's 129 ``pos_embed`` rows).
    """
    extended = {"allow_extended": allow_extended}
    path = Path(path)
    if prompt_seconds < 1:
        raise GenerateError(f"--prompt-seconds must be >= 1, got {prompt_seconds}")
    if notch is not None and notch != 0 and not (math.isfinite(notch) and notch > 0):
        raise GenerateError(f"--notch must be a frequency > 0 Hz (or 0 for none), got {notch}")
    if not path.is_file():
        # (a FIFO is no file to seek in, and waits for a writer: not read)
        what = "not a regular file" if path.exists() else "file not found"
        raise GenerateError(f"--prompt: {what}: {path}")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        sidecar = None
        if suffix == ".npy":
            # The sidecar names the rows; --channels then picks among them, as for a .npz or
            # a recording (taking it as the row names would relabel rows in another order).
            # Without a sidecar --channels names the rows.
            sidecar = _sidecar_channels(path, required=channels is None)
        try:
            if suffix == ".npy":
                data = np.load(path, allow_pickle=False)
                names = sidecar if sidecar is not None else channels
            else:
                from eegfast.electrodes import LABRAM_EXTENDED_TABLE_ROWS, LABRAM_TABLE_ROWS

                rows = LABRAM_EXTENDED_TABLE_ROWS if allow_extended else LABRAM_TABLE_ROWS
                arrays = _read_npz_prompt(path, max_rows=rows - 1)  # (row 0: cls)
        except GenerateError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as err:
            # a damaged file, another format under the suffix, or pickled objects (not loaded);
            # MemoryError: a header that claims terabytes (numpy allocates before it reads)
            raise GenerateError(
                f"--prompt {path.name}: not a readable {suffix} file ({err})"
            ) from None
        if suffix == ".npz":
            if len(arrays) < 2:
                raise GenerateError(
                    f"--prompt {path.name}: a .npz prompt holds arrays 'x' and 'channels'"
                )
            data, names = arrays["x"], [str(n) for n in np.ravel(arrays["channels"])]
        if channels is not None and (suffix == ".npz" or sidecar is not None):
            data, names = _pick_rows(data, names, channels, path, extended)
        if data.ndim != 2 or data.shape[0] != len(names):
            raise GenerateError(
                f"--prompt {path.name}: expected (C, T) with C = {len(names)} electrodes, got "
                f"shape {data.shape}"
            )
        if data.dtype.kind not in "fiu":
            # complex samples would lose their imaginary part; text or booleans are not EEG
            raise GenerateError(
                f"--prompt {path.name}: samples must be real numbers, got dtype {data.dtype}"
            )
        if not np.isfinite(data).all():
            raise GenerateError(f"--prompt {path.name}: holds NaN or infinite samples")
        normalised = _check_electrodes(list(names), f"--prompt {path.name}", **extended)
        x = np.asarray(data, dtype=np.float32) / UV_PER_UNIT
        window, begin = _window(x, start, prompt_seconds, path.name)
        return Prompt(np.ascontiguousarray(window), normalised, str(path), begin)

    from eegfast.data.preprocess import PreprocessConfig, SampleRateError, preprocess_signal
    from eegfast.data.reading import BadRecording, map_channels, read_recording

    if channels is not None:
        _check_electrodes(channels, "--channels", **extended)
    try:
        raw = read_recording(path)
        mapped = map_channels(raw.ch_names, raw.get_channel_types(), channels=channels, **extended)
    except BadRecording as err:
        raise GenerateError(f"--prompt {path}: {err}") from None
    if not mapped.picks:
        raise GenerateError(
            f"--prompt {path}: no EEG electrode of the LaBraM table (excluded: "
            f"{dict(list(mapped.excluded.items())[:8])})"
        )
    config = PreprocessConfig(notch_freq=notch or None, window_seconds=1)
    try:
        volts = raw.get_data(picks=list(mapped.picks))
        x = preprocess_signal(volts, raw.info["sfreq"], config, ch_names=list(mapped.names))
    except SampleRateError as err:
        raise GenerateError(f"--prompt {path}: {err}") from None
    window, begin = _window(x, start, prompt_seconds, path.name)
    rename = {raw.ch_names[p]: n for p, n in zip(mapped.picks, mapped.names, strict=True)}
    annotations = _window_annotations(raw, begin, begin + window.shape[1] / SFREQ, rename)
    return Prompt(
        np.ascontiguousarray(window, dtype=np.float32),
        mapped.names,
        str(path),
        begin,
        annotations,
    )


# --------------------------------------------------------------------------------------------
# Model and generation
# --------------------------------------------------------------------------------------------


def has_extended_table(model) -> bool:
    """Whether the model's spatial table has rows past the reference's (cls + 128 electrodes)."""
    from eegfast.electrodes import LABRAM_TABLE_ROWS

    return int(model.backbone.config.pos_rows) > LABRAM_TABLE_ROWS


def load_model(path: str | Path, *, device: torch.device | str = "cpu"):
    """The hybrid model of a checkpoint (file, checkpoint folder or run folder), in eval mode."""
    from eegfast.models.checkpoint import read_state_dict
    from eegfast.models.hybrid import load_hybrid_model
    from eegfast.train.checkpoint import resolve_weights_path

    path = Path(path)
    if not path.exists():
        raise GenerateError(f"--model: checkpoint not found: {path}")
    try:
        weights = resolve_weights_path(path)
        state = read_state_dict(weights)
        model = load_hybrid_model(state)
    except (FileNotFoundError, ValueError) as err:
        raise GenerateError(f"--model {path}: {err}") from None
    return model.to(device).eval()


def trained_window(path: str | Path) -> int | None:
    """Seconds of the longest window the hybrid checkpoint ``path`` was pretrained on (its
    meta's ``trained_on``), or None when it does not say (a file without an eegfast record, or
    a run from before it was recorded)."""
    from eegfast.train.checkpoint import read_meta

    try:
        meta = read_meta(path)
    except (FileNotFoundError, ValueError):
        return None
    seconds = (meta.get("trained_on") or {}).get("window_seconds")
    return int(seconds) if seconds else None


def check_mode(model, mode: str) -> None:
    """GenerateError unless ``model``'s forecasting head can generate in ``mode``: every mode
    needs its signal head, ``tokens`` also its code head (see
    :func:`eegfast.models.hybrid.generate`)."""
    if mode not in ("tokens", "regression"):
        raise GenerateError(f"--mode must be 'tokens' or 'regression', got {mode!r}")
    head = model.forecast_head
    if head.signal is None:
        raise GenerateError(
            "--model: this hybrid checkpoint has no signal head (trained without "
            "predict_signal), so it cannot generate EEG"
        )
    if mode == "tokens" and head.code_embed is None:
        raise GenerateError(
            "--mode tokens: this hybrid checkpoint has no code head (trained without "
            "predict_tokens); use --mode regression"
        )


def generate_signal(
    model,
    prompt: Prompt,
    seconds: float,
    *,
    mode: str = "tokens",
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = False,
    context: int | None = None,
) -> np.ndarray:
    """Generated continuation (C, round(seconds·200)) float32 in model units (100 µV).

    ``context``: patches the model sees at a time (default: its time embedding's rows). A
    model pretrained on shorter windows than its time embedding has rows it never trained:
    with ``context`` at its training length the window slides one patch at a time within the
    trained rows."""
    from eegfast.electrodes import labram_input_chans
    from eegfast.models.hybrid import generate
    from eegfast.progress import progress_bar

    if not seconds > 0:
        raise GenerateError(f"--seconds must be > 0, got {seconds}")
    if not temperature >= 0:  # also refuses NaN
        raise GenerateError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"--top-k must be >= 1, got {top_k}")
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise GenerateError(f"--seed must be in [-2**63, 2**64), got {seed}")
    check_mode(model, mode)
    samples = int(round(seconds * SFREQ))
    if samples < 1:
        raise GenerateError(f"--seconds {seconds} is less than one sample at 200 Hz")
    C, T = prompt.x.shape
    # The whole continuation is held (and written) at once, as float32 and as the model's
    # patches: refuse one that cannot fit before generating for hours towards it.
    needed, memory = 2 * 4 * C * samples, physical_memory_bytes()
    if memory is not None and needed > memory // 2:
        raise GenerateError(
            f"--seconds {seconds:g}: {C} channels x {samples} samples need ~{needed / 2**30:.1f} "
            f"GiB, more than half of this machine's {memory / 2**30:.1f} GiB; generate shorter "
            "pieces (--start and --include-prompt continue a recording)"
        )
    num_patches = math.ceil(samples / PATCH)
    limited = context is not None and context < model.max_patches
    context = min(context, model.max_patches) if context is not None else model.max_patches
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    window = prompt.x[:, T - min(T // PATCH, context) * PATCH :]
    x = torch.from_numpy(window).to(device=device, dtype=dtype).reshape(1, C, -1, PATCH)
    try:
        rows = labram_input_chans(prompt.names, allow_extended=has_extended_table(model))
    except ValueError as err:
        raise GenerateError(f"--prompt {prompt.source}: {err}") from None
    chans = torch.tensor(rows, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with progress_bar(
        total=num_patches, unit="patch", disable=not progress, desc="generate"
    ) as bar:
        out = generate(
            model,
            x,
            chans,
            num_patches,
            mode=mode,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            use_cache=use_cache,
            progress=bar.update,
            max_context=context,
            keep=context if limited else None,
        )
    return out[0].reshape(C, -1)[:, :samples].float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def display_names(names: tuple[str, ...] | list[str]) -> list[str]:
    """Standard capitalisation of 10-05 names ('FP1' -> 'Fp1', 'CZ' -> 'Cz'), else as given."""
    import mne

    builtin = mne.channels.get_builtin_montages()
    kind = next(k for k in ("colin27_1005", "standard_1005") if k in builtin)  # renamed in 1.13
    montage = mne.channels.make_standard_montage(kind)
    spelled = {n.upper(): n for n in montage.ch_names}
    return [spelled.get(n.upper(), n) for n in names]


def check_output_path(path: Path, overwrite: bool) -> None:
    """GenerateError unless ``path`` ends in .edf or .npy and, without ``overwrite``, neither it
    nor a .npy's ``.json`` sidecar exists."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise GenerateError(f"--out must end in .edf or .npy, got {path.name!r}")
    if path.is_dir():  # --overwrite replaces a file, never a folder (and os.replace cannot)
        raise GenerateError(f"--out {path}: is a folder, not a file")
    sidecar = path.with_suffix(".json")
    if suffix == ".npy" and sidecar.is_dir():  # (else refused only after generating)
        raise GenerateError(f"--out {path}: its sidecar {sidecar} is a folder, not a file")
    if overwrite:
        return
    if path.exists():
        raise GenerateError(f"--out {path} exists (pass --overwrite to replace it)")
    if suffix == ".npy" and sidecar.exists():
        raise GenerateError(
            f"--out {path}: its sidecar {sidecar} exists (pass --overwrite to replace it)"
        )


def write_output(
    path: str | Path,
    signal: np.ndarray,
    names: tuple[str, ...] | list[str],
    *,
    generated_from_s: float = 0.0,
    label: str | None = None,
    annotations: tuple | list = (),
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write signal (C, T) in model units (100 µV) at 200 Hz as ``.edf`` or ``.npy`` (+ .json).

    ``generated_from_s``: where the generated part starts (a prompt may come before it).
    ``label``: the class of the generated part (see ``eegfast generate --help``), or None.
    ``annotations``: those of a prompt written before the generated part, as
    :attr:`Prompt.annotations` (onsets from the signal's first sample, electrodes of ``names``):
    EDF annotations, or the sidecar's ``annotations`` beside a .npy.
    """
    from eegfast.fileio import fsync_dir, write_atomic, write_json_atomic

    path = Path(path)
    suffix = path.suffix.lower()
    check_output_path(path, overwrite)
    if signal.ndim != 2 or signal.shape[0] != len(names):
        raise ValueError(f"signal must be (C={len(names)}, T), got {signal.shape}")
    labels = display_names(names)
    duration = signal.shape[1] / SFREQ
    spelled = dict(zip(names, labels, strict=True))
    events = []  # (onset, duration, description, electrodes as written)
    for onset, length, description, electrodes in annotations:
        # (a microsecond's slack: a clipped span's onset + duration rounds either way)
        if not (0.0 <= onset and length >= 0.0 and onset + length <= generated_from_s + 1e-6):
            raise ValueError(
                f"annotations: {description!r} at {onset:g} s for {length:g} s is not within "
                f"the prompt written before the generated part (0 to {generated_from_s:g} s)"
            )
        events.append(
            (float(onset), float(length), str(description), [spelled[n] for n in electrodes])
        )
    if suffix == ".npy":
        micro = (signal * UV_PER_UNIT).astype(np.float32)

        def save_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, micro)

        # The pair is two files, replaced one after the other: the old sidecar goes first, so
        # that a run stopped in between (Ctrl-C, a kill) leaves a .npy without a sidecar (a
        # prompt then asks for --channels; a rerun needs --overwrite), never the new signal
        # beside the old one's channel names, which a prompt read would take as its own.
        sidecar_path = path.with_suffix(".json")
        if sidecar_path.is_file():
            sidecar_path.unlink()
            fsync_dir(path.parent)
        write_atomic(path, save_npy)
        sidecar = {
            "channels": labels,
            "sfreq": SFREQ,
            "units": "uV",
            "shape": list(micro.shape),
            "generated_from_s": generated_from_s,
            "label": label,
            "annotations": [
                {"onset": o, "duration": d, "description": text, "channels": chans}
                for o, d, text, chans in events
            ],
            **(metadata or {}),
        }
        write_json_atomic(sidecar_path, sidecar)
        return path

    import mne
    from mne.export import export_raw

    info = mne.create_info(labels, SFREQ, ch_types="eeg", verbose="error")
    raw = mne.io.RawArray(signal.astype(np.float64) / 1e4, info, verbose="error")  # -> volts
    # eegfast prepare reads every annotation with a duration as a class of the windows inside
    # it: "prompt"/"generated" spans would make classes of those words. Only a --label spans
    # the generated part; otherwise an onset marker (zero duration: labels nothing) says
    # where it starts.
    # The prompt's own annotations (events, BAD spans) stay on its part of the file.
    if label is None:
        events.append((generated_from_s, 0.0, "generated", []))
    else:
        events.append((generated_from_s, duration - generated_from_s, label, []))
    onsets, durations, descriptions, electrodes = zip(*events, strict=True)
    raw.set_annotations(mne.Annotations(onsets, durations, descriptions, ch_names=electrodes))

    def save_edf(tmp: Path) -> None:
        # Each channel's own physical range: with one range for all EEG channels (MNE's
        # default) a channel of 1 mV peaks set every channel's 16-bit step, and a 10 µV one
        # read back 0.05 µV off. "channelwise" is MNE >= 1.7's; older ones refuse it.
        try:
            export_raw(
                tmp, raw, fmt="edf", physical_range="channelwise", overwrite=True, verbose="error"
            )
        except ValueError as err:
            if "channelwise" not in str(err):
                raise
            export_raw(tmp, raw, fmt="edf", overwrite=True, verbose="error")

    write_atomic(path, save_edf)
    return path


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise GenerateError(f"--device: unknown device {text!r} (auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device here")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:  # else CUDA's "invalid device ordinal", a traceback
            raise GenerateError(
                f"--device {text}: this machine has {count} visible GPU(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    return device


def run(args: argparse.Namespace) -> Path:
    """Everything ``main`` does, raising :class:`GenerateError` on bad input."""
    out = Path(args.out)
    check_output_path(out, args.overwrite)  # before any work (the writer checks again)
    if not args.seconds > 0:
        raise GenerateError(f"--seconds must be > 0, got {args.seconds}")
    seconds = args.seconds
    if out.suffix.lower() == ".edf" and round(seconds * SFREQ) % PATCH:
        # EDF data records are 1 s: generate up to the next whole second instead of letting the
        # exporter pad the last record with repeated samples (marked BAD_ACQ_SKIP).
        seconds = math.ceil(seconds)
        print(f"note: EDF holds whole seconds; generating {seconds} s", file=sys.stderr)
    label = check_label(args.label)
    temperature = args.temperature
    if args.mode == "regression":
        # the regression head draws nothing: a sampling option there would be ignored silently
        given = [
            name
            for name, value in (("--temperature", temperature), ("--top-k", args.top_k))
            if value is not None
        ]
        if given:
            raise GenerateError(
                f"{' and '.join(given)}: sampling options of --mode tokens; --mode regression "
                "predicts each patch and draws nothing"
            )
    elif temperature is None:
        temperature = 1.0
    device = _device(args.device)
    model = load_model(args.model, device=device)
    check_mode(model, args.mode)  # before the prompt is read and preprocessed
    # Time rows past the windows the model was pretrained on were never trained: the context
    # (and the prompt) stay within them.
    trained = trained_window(args.model)
    context = model.max_patches if trained is None else min(trained, model.max_patches)
    why = f"its {context}-s pretraining windows" if trained else "its time embedding"
    prompt_seconds = args.prompt_seconds
    if prompt_seconds is None:
        prompt_seconds = min(8, context)
    elif prompt_seconds > context:
        raise GenerateError(
            f"--prompt-seconds {prompt_seconds} exceeds the model's context of {context} s ({why})"
        )
    prompt = load_prompt(
        args.prompt,
        channels=_split_channels(args.channels),
        start=args.start,
        prompt_seconds=prompt_seconds,
        notch=args.notch,
        allow_extended=has_extended_table(model),
    )
    if args.prompt_seconds is not None and prompt.seconds < args.prompt_seconds:
        # (whole patches of what the recording holds after --start: the sidecar alone said so)
        print(
            f"note: --prompt-seconds {args.prompt_seconds}: {prompt.source} has "
            f"{prompt.seconds:g} s (whole patches) from {prompt.start_s:g} s on; prompting "
            "with those",
            file=sys.stderr,
        )
    signal = generate_signal(
        model,
        prompt,
        seconds,
        mode=args.mode,
        temperature=1.0 if temperature is None else temperature,
        top_k=args.top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
        progress=not args.no_progress,
        context=context if trained else None,
    )
    start, annotations = 0.0, ()
    if args.include_prompt:
        start, annotations = prompt.seconds, prompt.annotations
        signal = np.concatenate((prompt.x, signal), axis=1)
    metadata = {
        "prompt": prompt.source,
        "prompt_start_s": prompt.start_s,
        "prompt_seconds": prompt.seconds,
        "generated_seconds": seconds,
        "model": str(args.model),
        "mode": args.mode,
        "temperature": temperature,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    return write_output(
        out,
        signal,
        prompt.names,
        generated_from_s=start,
        label=label,
        annotations=annotations,
        metadata=metadata,
        overwrite=True,
    )


def main(args: argparse.Namespace) -> int:
    try:
        out = run(args)
    except GenerateError as err:
        print(f"eegfast generate: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing --out failed (disk full): one line, not a traceback
        print(f"eegfast generate: error: {err}", file=sys.stderr)
        return 1
    extra = f" and {out.with_suffix('.json')}" if out.suffix.lower() == ".npy" else ""
    print(f"wrote {out}{extra}")
    return 0
