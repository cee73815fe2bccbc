"""LaBraM preprocessing: band-pass, mains notch, resampling to 200 Hz, units of 100 µV, windows.

Two implementations of the same recipe:

* ``preprocess_reference(raw, config)``: the plain MNE calls the LaBraM code makes
  (``raw.filter`` -> ``raw.notch_filter`` -> ``raw.resample``), kept as the definition of what
  the output should be (tests and the benchmark compare against it).
* ``preprocess_signal(data, sfreq, config)``: the fast path used by ``eegfast prepare``. MNE's
  zero-phase FIR filters act on a signal as a real gain per frequency, and MNE's FFT resampling
  keeps the spectrum below the new Nyquist frequency. Both are therefore one multiplication in the
  frequency domain: we take ONE real FFT per channel of the (reflection-padded) recording,
  multiply it by the gain of the very filters MNE designs (band-pass x notch, computed once per
  sample rate from ``mne.filter.create_filter``), drop the bins above 100 Hz and take ONE inverse
  FFT at the new length. No time-domain convolution, no second pass for the notch, no separate
  resampling pass. Away from the first and last second the result equals the MNE recipe to
  float precision (tests check it on the bundled recordings) when the recording's length is a
  multiple of q (below; else MNE's rounding of its padded length stretches MNE's time axis by up
  to half a sample, 0.2-0.4 SD at the end) and it is longer than the 0.1 Hz high-pass (33 s):
  a shorter one with a DC offset differs throughout, as each channel's mean is removed first,
  where MNE filters the step from the offset to its zero padding.

The output is exactly on the 200 Hz grid of the input's first sample: the padding is a whole
number of input periods of the resampling ratio p/q (MNE's default padding can shift the output by
up to half a sample). Rates with a small q (128, 160, 250, 256, 500, 512, 1000, 1024, 2048 Hz ...)
are fast. Other rates take the fraction with a denominator up to 10^4, or 10^5 where that one is
more than 1 ppm off (``_ratio``; amplifiers' clocks are accurate to 10-50 ppm): 173.61 Hz is
3759/3263 (an hour drifts 0.011 samples), 199.99 Hz is 20000/19999. Such q need FFT lengths with
large prime factors: 199.99 Hz runs ~6x slower and its first channel peaks at ~20x its float64
samples (4 h: 4.3 s, 450 MiB; 200 Hz: 0.1 s an hour). A rate next to a simple one (200.0001 Hz)
keeps the simple fraction, 0.5 ppm off (24 hours end 43 ms late), as with MNE.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

__all__ = [
    "PATCH_SAMPLES",
    "TARGET_SFREQ",
    "PreprocessConfig",
    "SampleRateError",
    "check_sample_rate",
    "preprocess_reference",
    "preprocess_signal",
    "window_starts",
    "cut_windows",
]

TARGET_SFREQ = 200.0  # LaBraM: one patch = 1 s = 200 samples
PATCH_SAMPLES = 200
VOLTS_TO_UNITS = 1e4  # MNE gives volts; LaBraM wants units of 100 µV: V * 1e6 / 100
MAX_PATCHES = 16  # rows of LaBraM's temporal embedding


class SampleRateError(ValueError):
    """The recording's sample rate cannot carry the requested band."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Every step of the recipe; the defaults are LaBraM's.

    l_freq, h_freq : band-pass edges in Hz (None skips that side).
    notch_freq : mains frequency to remove (50 or 60 Hz; None for no notch).
    reference : None keeps the recorded reference; ``"average"`` subtracts the mean of the kept
        electrodes; an electrode name (e.g. ``"CZ"``) subtracts that electrode.
    window_seconds : A, patches per window (1..16); a window is (C, A, 200).
    stride_seconds : step between window starts (default A: no overlap).
    dtype : storage dtype of the windows, ``"float32"`` or ``"float16"``.
    scale : multiplier from volts to the stored unit (1e4: units of 100 µV).
    """

    l_freq: float | None = 0.1
    h_freq: float | None = 75.0
    notch_freq: float | None = 50.0
    reference: str | None = None
    window_seconds: int = 4
    stride_seconds: float | None = None
    dtype: str = "float32"
    scale: float = VOLTS_TO_UNITS

    def __post_init__(self) -> None:
        a = self.window_seconds
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_PATCHES:
            raise ValueError(f"window_seconds: must be an integer 1..{MAX_PATCHES}, got {a!r}")
        # finite: an infinite stride passed here and failed every recording in prepare with
        # "OverflowError: cannot convert float infinity to integer", naming no setting
        if self.stride_seconds is not None and not (
            1 <= self.stride_seconds * TARGET_SFREQ < math.inf
        ):
            raise ValueError(
                f"stride_seconds: must be a finite number >= 1/200 s, got {self.stride_seconds!r}"
            )
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype: 'float32' or 'float16', got {self.dtype!r}")
        for name in ("l_freq", "h_freq", "notch_freq"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(
                    f"{name}: must be a finite frequency > 0 Hz or None, got {value!r}"
                )
        if self.l_freq is not None and self.h_freq is not None and self.l_freq >= self.h_freq:
            raise ValueError(f"l_freq ({self.l_freq}) must be below h_freq ({self.h_freq})")
        # without a low-pass, a high-pass at or above the output's Nyquist frequency leaves
        # nothing, and MNE refused it for each recording ("Invalid cutoff frequency")
        if self.l_freq is not None and self.l_freq >= TARGET_SFREQ / 2:
            raise ValueError(f"l_freq: must be below 100 Hz (Nyquist at 200 Hz), got {self.l_freq}")
        if self.h_freq is not None and self.h_freq >= TARGET_SFREQ / 2:
            raise ValueError(f"h_freq: must be below 100 Hz (Nyquist at 200 Hz), got {self.h_freq}")

    @property
    def window_samples(self) -> int:
        return self.window_seconds * PATCH_SAMPLES

    @property
    def stride_samples(self) -> int:
        stride = self.window_seconds if self.stride_seconds is None else self.stride_seconds
        return int(round(stride * TARGET_SFREQ))


def check_sample_rate(sfreq: float, config: PreprocessConfig, *, what: str = "recording") -> None:
    """Raise ``SampleRateError`` when ``sfreq`` cannot carry the band-pass or the notch."""
    if not sfreq > 0:
        raise SampleRateError(f"{what}: invalid sample rate {sfreq!r} Hz")
    nyquist = sfreq / 2
    if config.h_freq is not None and nyquist <= config.h_freq:
        raise SampleRateError(
            f"{what}: sample rate {sfreq:g} Hz is too low for the band-pass up to "
            f"{config.h_freq:g} Hz (needs more than {2 * config.h_freq:g} Hz); "
            "lower h_freq or leave this recording out"
        )
    if config.l_freq is not None and nyquist <= config.l_freq:  # only without h_freq
        raise SampleRateError(
            f"{what}: sample rate {sfreq:g} Hz is too low for a high-pass at "
            f"{config.l_freq:g} Hz (needs more than {2 * config.l_freq:g} Hz)"
        )
    if config.notch_freq is not None and nyquist <= config.notch_freq + 1.0:
        raise SampleRateError(
            f"{what}: sample rate {sfreq:g} Hz is too low for a {config.notch_freq:g} Hz notch"
        )


# ---------------------------------------------------------------------------------------------
# Reference: the MNE calls of the LaBraM recipe.


def preprocess_reference(raw, config: PreprocessConfig) -> np.ndarray:
    """(C, T') float64 in stored units: MNE filter, notch, resample on a copy of ``raw``.

    ``raw`` must be preloaded and hold only the channels to keep. One deviation from MNE's
    defaults: ``npad`` is a multiple of the resampling ratio's denominator. MNE's ``'auto'`` pads
    to a power of two, and ``round(ratio * npad)`` then shifts the output by up to half a sample
    (0.4 samples = 2 ms for 500 -> 200 Hz), which is an artefact, not part of the recipe.
    """
    check_sample_rate(raw.info["sfreq"], config)
    q = _ratio(raw.info["sfreq"]).denominator
    npad = _resample_pad(raw.info["sfreq"], q)
    raw = raw.copy()
    if config.l_freq is not None or config.h_freq is not None:
        raw.filter(config.l_freq, config.h_freq, picks="all", verbose="error")
    if config.notch_freq is not None:
        raw.notch_filter(config.notch_freq, picks="all", verbose="error")
    raw.resample(TARGET_SFREQ, npad=npad, verbose="error")
    data = raw.get_data() * config.scale
    return _rereference(data, raw.ch_names, config.reference)


# ---------------------------------------------------------------------------------------------
# Fast path: one FFT per channel.


@lru_cache(maxsize=32)
def _kernels(sfreq: float, l_freq, h_freq, notch_freq) -> tuple[np.ndarray, ...]:
    """The zero-phase FIR kernels MNE would use at ``sfreq`` (odd length, centred)."""
    import mne

    kernels = []
    if l_freq is not None or h_freq is not None:
        kernels.append(mne.filter.create_filter(None, sfreq, l_freq, h_freq, verbose="error"))
    if notch_freq is not None:
        # raw.notch_filter defaults: notch width freq/200, transition bandwidth 1 Hz.
        half = notch_freq / 400.0 + 0.5
        kernels.append(
            mne.filter.create_filter(
                None,
                sfreq,
                notch_freq + half,
                notch_freq - half,
                l_trans_bandwidth=0.5,
                h_trans_bandwidth=0.5,
                verbose="error",
            )
        )
    return tuple(kernels)


def _zero_phase_gain(kernel: np.ndarray, n_fft: int, n_keep: int) -> np.ndarray:
    """Real gain of a centred odd-length FIR at the first ``n_keep`` ``rfft`` bins of length
    ``n_fft`` (a copy: the full spectrum is freed on return)."""
    centre = (len(kernel) - 1) // 2
    wrapped = np.zeros(n_fft)
    wrapped[: len(kernel) - centre] = kernel[centre:]
    wrapped[n_fft - centre :] = kernel[:centre]
    return np.fft.rfft(wrapped)[:n_keep].real.copy()


# Bytes of gains kept for later calls (the most recent is always kept: prepare calls
# preprocess_signal once per group of channels with the same length). An lru_cache of 32 held
# each gain's full float64 spectrum, 4 bytes per input sample: 2.3 GB per worker after 32
# recordings of 10 h at 500 Hz, never given back.
_GAIN_CACHE_BYTES = 1 << 26
_gain_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
_gain_lock = threading.Lock()


def _gain(sfreq: float, n_fft: int, n_keep: int, l_freq, h_freq, notch_freq) -> np.ndarray:
    """(n_keep,) float64 (read-only) gain of MNE's filters at the first ``n_keep`` rfft bins."""
    key = (sfreq, n_fft, n_keep, l_freq, h_freq, notch_freq)
    with _gain_lock:
        if key in _gain_cache:
            _gain_cache.move_to_end(key)
            return _gain_cache[key]
    gain = None
    for kernel in _kernels(sfreq, l_freq, h_freq, notch_freq):
        if gain is None:
            gain = _zero_phase_gain(kernel, n_fft, n_keep)
        else:
            gain *= _zero_phase_gain(kernel, n_fft, n_keep)
    gain = np.ones(n_keep) if gain is None else gain
    gain.flags.writeable = False
    with _gain_lock:
        _gain_cache[key] = gain
        held = sum(g.nbytes for g in _gain_cache.values())
        while len(_gain_cache) > 1 and held > _GAIN_CACHE_BYTES:
            held -= _gain_cache.popitem(last=False)[1].nbytes
    return gain


# How far 200/sfreq may be from the fraction p/q taken for it, relative: 1 ppm, well below the
# accuracy of amplifiers' own clocks (10-50 ppm). Denominators up to 10^4 only took 199.99 Hz as
# 10001/10000 instead of 20000/19999 (50 ppm: 6 samples too many in 10 minutes, the windows ever
# later than their events). Denominators stay at most 10^5: the padding is q samples a side, and
# such q already need FFT lengths with large prime factors (a closer fraction for a rate next to
# a simple one, 200.0001 Hz = 2000000/2000001, took a minute and gigabytes a channel for 24 h).
_RATIO_TOLERANCE = 1e-6


def _ratio(sfreq: float) -> Fraction:
    """200/sfreq as p/q: the best fraction with a denominator up to 10^4, or up to 10^5 where
    that one is more than ``_RATIO_TOLERANCE`` off (199.99 Hz: 20000/19999)."""
    exact = Fraction(TARGET_SFREQ / sfreq)
    ratio = exact.limit_denominator(10_000)
    if abs(ratio - exact) > _RATIO_TOLERANCE * exact:
        ratio = exact.limit_denominator(100_000)
    return ratio


def _resample_pad(sfreq: float, q: int) -> int:
    """Samples of padding for resampling: about 1 s, a multiple of the ratio's denominator."""
    return -(-max(int(sfreq), 1) // q) * q


def _fast_length(minimum: int, multiple: int) -> int:
    from scipy.fft import next_fast_len

    return next_fast_len(-(-minimum // multiple), real=True) * multiple


def preprocess_signal(
    data: np.ndarray,
    sfreq: float,
    config: PreprocessConfig,
    *,
    ch_names: list[str] | None = None,
    precision: str = "float32",
    max_block_bytes: int = 1 << 28,
) -> np.ndarray:
    """Band-pass + notch + resample to 200 Hz + scale (+ re-reference) in one FFT per channel.

    data : (C, T) in volts (float32 or float64). Returns (C, T') float32 in stored units,
    ``T' = round(T * 200 / sfreq)``, the same length MNE's resampling gives.
    precision : ``"float32"`` (default) or ``"float64"`` FFTs.
    """
    from scipy import fft as sfft

    if data.ndim != 2:
        raise ValueError(f"data: expected (C, T), got shape {data.shape}")
    check_sample_rate(sfreq, config)
    n_ch, n_in = data.shape
    ratio = _ratio(sfreq)
    n_out = int(round(n_in * (TARGET_SFREQ / sfreq)))  # MNE's length (p/q may be 1 ppm off)
    if n_in == 0 or n_out == 0:
        return np.zeros((n_ch, n_out), np.float32)
    kernels = _kernels(float(sfreq), config.l_freq, config.h_freq, config.notch_freq)
    q = ratio.denominator
    # Padding on each side: the support of the combined kernel, and at least the ~1 s that the
    # reference's resampling pads with (without filters, or with short ones, the FFT would
    # otherwise wrap the recording's end onto its start and ring at both edges).
    half = max(sum((len(k) - 1) // 2 for k in kernels), _resample_pad(sfreq, q))
    pad_left = -(-half // q) * q  # a multiple of q: the output starts on a sample
    n_fft = _fast_length(n_in + pad_left + half, q)
    n_fft_out = n_fft * ratio.numerator // q
    n_keep = min(n_fft, n_fft_out) // 2 + 1
    gain = _gain(float(sfreq), n_fft, n_keep, config.l_freq, config.h_freq, config.notch_freq)
    dc_gain = float(gain[0]) * config.scale  # what the filters and scaling do to a constant
    gain = gain * (config.scale * n_fft_out / n_fft)  # irfft at the new length: rescale
    start = pad_left * ratio.numerator // q

    out = np.empty((n_ch, n_out), np.float32)
    # Single precision FFTs: twice as fast, and their rounding error (~1e-7 of a channel's
    # largest value) is far below the tolerance against the MNE recipe. The mean is removed
    # first (added back below, times the gain at 0 Hz) so a large DC offset cannot eat the
    # float32 mantissa.
    fdtype = np.float64 if precision == "float64" else np.float32
    gain = gain.astype(fdtype)
    block = max(1, max_block_bytes // (8 * np.dtype(fdtype).itemsize * n_fft))
    # One padded buffer per block, filled in place (no float64 copy of the block, no separate
    # padding array): the FFT then runs on exactly n_fft samples, with no reshaping inside scipy.
    buffer = np.empty((min(block, n_ch), n_fft), fdtype)
    for c0 in range(0, n_ch, block):
        chunk = data[c0 : c0 + block]
        rows = chunk.shape[0]
        offset = chunk.mean(axis=1, keepdims=True, dtype=np.float64)
        padded = buffer[:rows]
        np.subtract(chunk, offset, out=padded[:, pad_left : pad_left + n_in], casting="unsafe")
        _reflect_limited_inplace(padded, pad_left, n_in)
        # The filtered spectrum goes straight into a buffer of the inverse FFT's exact size
        # (zeros above the kept bins when upsampling): scipy then needs no resizing copy.
        spectrum = np.empty((rows, n_fft_out // 2 + 1), np.result_type(fdtype, np.complex64))
        np.multiply(sfft.rfft(padded, axis=1)[:, :n_keep], gain, out=spectrum[:, :n_keep])
        spectrum[:, n_keep:] = 0
        signal = sfft.irfft(spectrum, n=n_fft_out, axis=1, overwrite_x=True)
        np.add(
            signal[:, start : start + n_out],
            (offset * dc_gain).astype(np.float32),
            out=out[c0 : c0 + rows],
            casting="unsafe",
        )
    return _rereference(out, ch_names, config.reference)


def _reflect_limited_inplace(buf: np.ndarray, left: int, n: int) -> None:
    """``_reflect_limited`` into ``buf`` (rows, left + n + right) whose ``[:, left:left+n]``
    already holds the signal: fills the padding in place."""
    right = buf.shape[1] - left - n
    x = buf[:, left : left + n]
    lr, rr = min(left, n - 1), min(right, n - 1)
    buf[:, : left - lr] = 0
    buf[:, left + n + rr :] = 0
    if lr:
        np.subtract(2 * x[:, :1], x[:, lr:0:-1], out=buf[:, left - lr : left])
    if rr:
        mirrored = x[:, n - 2 :: -1][:, :rr]  # x[n-2], x[n-3], ...
        np.subtract(2 * x[:, -1:], mirrored, out=buf[:, left + n : left + n + rr])


def _reflect_limited(x: np.ndarray, left: int, right: int) -> np.ndarray:
    """Pad like MNE's ``'reflect_limited'``: point reflection about the end samples
    (``2 * x[0] - x[k]``, which keeps the signal and its slope continuous) for up to T-1
    samples on each side, zeros beyond."""
    n = x.shape[1]
    out = np.empty((x.shape[0], left + n + right), x.dtype)
    out[:, left : left + n] = x
    _reflect_limited_inplace(out, left, n)
    return out


def _rereference(
    data: np.ndarray, ch_names: list[str] | None, reference: str | None, *, inplace: bool = False
):
    """``data`` (C, T) minus the reference; ``inplace`` subtracts it from ``data`` itself (the
    same values, without a second array of the recording's size)."""
    if reference is None:
        return data
    if reference == "average":
        ref = data.mean(axis=0, keepdims=True)
    elif ch_names is None or reference not in ch_names:
        raise ValueError(
            f"reference: electrode {reference!r} is not among the kept channels {ch_names}"
        )
    else:
        ref = data[ch_names.index(reference)].copy()  # a copy: its own row is zeroed in place
    if inplace:
        data -= ref
        return data
    return data - ref


# ---------------------------------------------------------------------------------------------
# Windows.


def window_starts(
    n_samples: int, config: PreprocessConfig, *, begin: int = 0, end: int | None = None
) -> np.ndarray:
    """Start samples (at 200 Hz) of the complete windows inside ``[begin, end)``."""
    end = n_samples if end is None else min(end, n_samples)
    last = end - config.window_samples
    if last < begin:
        return np.zeros(0, np.int64)
    return np.arange(begin, last + 1, config.stride_samples, dtype=np.int64)


def cut_windows(signal: np.ndarray, starts: np.ndarray, config: PreprocessConfig, out=None):
    """(W, C, A, 200) windows of ``signal`` (C, T') at ``starts``, in ``config.dtype``."""
    n_ch = signal.shape[0]
    a = config.window_seconds
    shape = (len(starts), n_ch, a, PATCH_SAMPLES)
    if out is None:
        out = np.empty(shape, config.dtype)
    elif out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")
    for i, s in enumerate(starts):
        out[i] = signal[:, s : s + config.window_samples].reshape(n_ch, a, PATCH_SAMPLES)
    return out


def hours(n_samples: int, sfreq: float) -> float:
    return n_samples / sfreq / 3600.0 if sfreq > 0 else math.nan
