"""Sample rates real recordings have, against the exact answer: the 200 Hz output of a
band-limited signal is that signal sampled every 5 ms from the input's first sample.

``preprocess_reference`` (MNE) is not the yardstick here: MNE's FFT resampling rounds the padded
length times the ratio, which stretches its time axis by up to half a sample whenever the
recording's length is not a multiple of the ratio's denominator (0.2-0.4 SD off at 250 Hz with
10001 samples); the fast path has no such rounding.
"""

import tracemalloc
from fractions import Fraction

import numpy as np
import pytest

import eegfast.data.preprocess as preprocess_module
from eegfast.data.preprocess import PreprocessConfig, preprocess_signal

FREQS = np.array([3.1, 7.7, 11.3, 23.9, 37.1])  # Hz: inside the band, away from the mains
RESAMPLE_ONLY = PreprocessConfig(l_freq=None, h_freq=None, notch_freq=None)


def _signal(t: np.ndarray) -> np.ndarray:
    """(T,) volts: sines of 5-10 µV at ``FREQS``, each with its own phase, at times ``t`` (s)."""
    amps = np.array([1.0, 1.0, 1.0, 0.5, 0.5])[:, None] * 1e-5
    phases = np.arange(len(FREQS))[:, None]
    return (amps * np.sin(2 * np.pi * FREQS[:, None] * t[None] + phases)).sum(axis=0)


def _error_vs_exact(sfreq: float, n_in: int, config: PreprocessConfig, edge_s: float = 2.0):
    """(largest error away from the edges / SD of the exact output, output length)."""
    x = _signal(np.arange(n_in) / sfreq)[None]
    got = preprocess_signal(x, sfreq, config, precision="float64")[0].astype(np.float64)
    exact = _signal(np.arange(len(got)) / 200.0) * config.scale
    m = int(edge_s * 200)
    return float(np.abs(got - exact)[m:-m].max() / exact.std()), len(got)


@pytest.mark.parametrize(
    "sfreq", [160.0, 250.0, 256.0, 500.0, 512.0, 1000.0, 1024.0, 2048.0, 200.0, 173.61, 199.99]
)
@pytest.mark.parametrize("extra", [0, 1, 3])
def test_output_is_on_the_200_hz_grid_of_the_first_sample(sfreq, extra):
    """Short recordings with odd lengths, at the rates of real data sets: every output sample
    is the signal at k/200 s (an output shifted or stretched by a tenth of a sample is 0.1 SD
    off at 37 Hz), and the length is MNE's, round(T * 200 / sfreq)."""
    n_in = int(round(30 * sfreq)) + extra
    error, n_out = _error_vs_exact(sfreq, n_in, RESAMPLE_ONLY)
    assert n_out == int(round(n_in * 200.0 / sfreq))
    assert error < 1e-3


@pytest.mark.parametrize("seconds", [60, 600])
def test_199_99_hz_is_not_resampled_as_10001_over_10000(seconds):
    """200/199.99 = 20000/19999 was approximated with denominators up to 10^4 only, as
    10001/10000 (5e-5 too high): 0.45 SD off after a minute, and 10 minutes came out 6 samples
    too long (120006), every window later than its event by up to 30 ms."""
    n_in = int(round(seconds * 199.99))
    error, n_out = _error_vs_exact(199.99, n_in, RESAMPLE_ONLY)
    assert n_out == int(round(n_in * 200.0 / 199.99)) == seconds * 200
    assert error < 1e-3


def test_long_bonn_rate_keeps_its_fast_fraction():
    """173.61 Hz (Bonn) is 3759/3263, 15 ppb from 200/173.61: an hour drifts by 0.011 samples
    (1.3% of the SD at 37 Hz), well inside amplifiers' clock accuracy, and the FFTs stay fast
    (20000/17361 would make them several times slower)."""
    assert preprocess_module._ratio(173.61) == Fraction(3759, 3263)
    error, n_out = _error_vs_exact(173.61, int(round(3600 * 173.61)), RESAMPLE_ONLY)
    assert n_out == 720000
    assert error < 2e-2


@pytest.mark.parametrize(
    ("sfreq", "ratio"),
    [(199.99, Fraction(20000, 19999)), (200.0001, Fraction(1)), (250.0, Fraction(4, 5))],
)
def test_the_fraction_is_within_one_ppm_with_denominators_up_to_1e5(sfreq, ratio):
    """A closer fraction than 1 ppm for a rate next to a simple one (200.0001 Hz is exactly
    2000000/2000001) needs a huge q, whose padding and FFTs took a minute and gigabytes a
    channel for 24 h: 0.5 ppm is left, as MNE leaves it."""
    got = preprocess_module._ratio(sfreq)
    assert got == ratio and got.denominator <= 100_000
    assert abs(got - Fraction(200 / sfreq)) <= 1e-6 * Fraction(200 / sfreq)


def test_band_pass_and_notch_keep_the_grid_too():
    """With LaBraM's filters, the sines inside the band come through at their times (the FIR's
    pass-band ripple is well below 1%); 199.99 Hz was 0.45 SD off."""
    for sfreq in (250.0, 199.99):
        error, _ = _error_vs_exact(sfreq, int(round(120 * sfreq)) + 1, PreprocessConfig(), 40.0)
        assert error < 1e-2, sfreq


def test_mains_harmonics_are_removed_by_the_low_pass():
    """The recipe's notch is at 50 Hz only (raw.notch_filter(50)); 100 and 150 Hz harmonics of a
    1 kHz recording are left to the 75 Hz low-pass, whose stop band starts at 93.75 Hz. (The
    first and last ~17 s are the 0.1 Hz high-pass's half length: left out, as in MNE.)"""
    sfreq = 1000.0
    t = np.arange(int(120 * sfreq)) / sfreq
    for f in (50.0, 100.0, 150.0):
        out = preprocess_signal((5e-5 * np.sin(2 * np.pi * f * t))[None], sfreq, PreprocessConfig())
        assert np.abs(out[0, 4000:-4000]).max() < 0.002 * 0.5, f  # < 0.2% of the 0.5 units in


def test_gain_cache_does_not_hold_every_recordings_spectrum(monkeypatch):
    """The filters' gain was cached (lru_cache of 32) as a view of its full float64 spectrum,
    4 bytes per input sample: a worker preparing recordings of distinct lengths held 32 of
    them for good (2.3 GB after 32 recordings of 10 h at 500 Hz). The cache now holds what
    ``_GAIN_CACHE_BYTES`` allows, and only the bins kept after resampling."""
    monkeypatch.setattr(preprocess_module, "_GAIN_CACHE_BYTES", 1 << 20, raising=False)
    sfreq, cfg = 500.0, PreprocessConfig()
    rng = np.random.default_rng(0)
    recordings = [1e-5 * rng.standard_normal((1, 300_000 + 7919 * i)) for i in range(6)]
    first = preprocess_signal(recordings[0], sfreq, cfg)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for x in recordings:  # distinct lengths: a gain each
            preprocess_signal(x, sfreq, cfg)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 << 20, held  # six full spectra were ~7.5 MB
    # what the cache gives back is what it computed
    np.testing.assert_array_equal(preprocess_signal(recordings[0], sfreq, cfg), first)
