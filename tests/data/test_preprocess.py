import mne
import numpy as np
import pytest

from eegfast.data.preprocess import (
    PreprocessConfig,
    SampleRateError,
    check_sample_rate,
    cut_windows,
    preprocess_reference,
    preprocess_signal,
    window_starts,
)


def _eeg(path, seconds=None):
    raw = mne.io.read_raw(path, preload=True, verbose="error")
    raw.drop_channels([c for c in raw.ch_names if c in ("ECG ECG", "EEG A2-A1")])
    if seconds is not None:
        raw.crop(0, seconds, include_tmax=False)
    return raw


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("Subject00_2.edf", PreprocessConfig(notch_freq=50.0)),  # 500 -> 200 Hz
        ("S001R04.edf", PreprocessConfig(notch_freq=60.0)),  # 160 -> 200 Hz
        ("S001R08.edf", PreprocessConfig(l_freq=1.0, h_freq=40.0, notch_freq=None)),
        ("Subject01_2.edf", PreprocessConfig(reference="average")),
    ],
)
def test_fast_path_matches_mne_recipe(sample_files, name, config):
    raw = _eeg(sample_files[name], seconds=40)
    expected = preprocess_reference(raw, config)
    got = preprocess_signal(raw.get_data(), raw.info["sfreq"], config, ch_names=raw.ch_names)
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (len(raw.ch_names), 40 * 200)
    scale = expected.std()
    # Everywhere, edges included. What is left comes from padding once (fast path) instead of
    # once per MNE pass (band-pass, notch, resample): < 1% of the signal's SD at the worst sample.
    assert np.abs(got - expected).max() < 1e-2 * scale
    assert np.abs(got - expected).mean() < 2.5e-4 * scale


@pytest.mark.parametrize("name", ["S001R08.edf", "Subject00_2.edf"])
def test_resampling_only_has_no_edge_artefact(sample_files, name):
    # No filter: the FFT still needs the resampling's padding, else the recording's end wraps
    # onto its start (the first and last samples were off by 17% of the SD at 160 Hz).
    raw = _eeg(sample_files[name], seconds=40)
    config = PreprocessConfig(l_freq=None, h_freq=None, notch_freq=None)
    expected = preprocess_reference(raw, config)
    got = preprocess_signal(raw.get_data(), raw.info["sfreq"], config)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-2 * expected.std()


def test_units_are_100_microvolts():
    sfreq = 500.0
    t = np.arange(int(60 * sfreq)) / sfreq
    volts = 50e-6 * np.sin(2 * np.pi * 10 * t)  # 50 µV at 10 Hz, well inside the band
    out = preprocess_signal(volts[None], sfreq, PreprocessConfig())
    middle = out[0, 4000:-4000]
    assert np.isclose(np.abs(middle).max(), 0.5, rtol=0.01)  # 50 µV = 0.5 units of 100 µV
    # 50 Hz mains is removed
    mains = preprocess_signal(
        (50e-6 * np.sin(2 * np.pi * 50 * t))[None], sfreq, PreprocessConfig(notch_freq=50.0)
    )
    assert np.abs(mains[0, 4000:-4000]).max() < 0.01


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_dc_offset_without_high_pass(precision):
    rng = np.random.default_rng(0)
    volts = 0.05 + 1e-5 * rng.normal(size=(2, 5000))  # 50 mV offset, 10 µV noise, 500 Hz
    cfg = PreprocessConfig(l_freq=None, notch_freq=None)
    out = preprocess_signal(volts, 500.0, cfg, precision=precision)
    np.testing.assert_allclose(out.mean(axis=1), 500.0, rtol=1e-4)  # 50 mV = 500 units
    with_hp = preprocess_signal(volts, 500.0, PreprocessConfig(), precision=precision)
    assert np.abs(with_hp.mean(axis=1)).max() < 5.0  # the 0.1 Hz high-pass removes it


def test_reference_electrode():
    data = np.random.default_rng(0).normal(size=(3, 2000)) * 1e-5
    cfg = PreprocessConfig(reference="CZ")
    out = preprocess_signal(data, 200.0, cfg, ch_names=["FP1", "CZ", "O1"])
    assert np.abs(out[1]).max() == 0
    with pytest.raises(ValueError, match="reference: electrode 'PZ'"):
        preprocess_signal(data, 200.0, PreprocessConfig(reference="PZ"), ch_names=["FP1"] * 3)


def test_sample_rate_too_low():
    with pytest.raises(SampleRateError, match="128 Hz is too low for the band-pass up to 75 Hz"):
        check_sample_rate(128.0, PreprocessConfig())
    with pytest.raises(SampleRateError, match="notch"):
        check_sample_rate(100.0, PreprocessConfig(h_freq=40.0, notch_freq=50.0))
    check_sample_rate(100.0, PreprocessConfig(h_freq=40.0, notch_freq=None))
    with pytest.raises(SampleRateError):
        preprocess_signal(np.zeros((1, 100)), 128.0, PreprocessConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_seconds": 0}, "window_seconds"),
        ({"window_seconds": 17}, "window_seconds"),
        ({"window_seconds": 2.5}, "window_seconds"),
        ({"dtype": "int16"}, "dtype"),
        ({"l_freq": 80.0, "h_freq": 75.0}, "l_freq"),
        ({"h_freq": 120.0}, "h_freq"),
        ({"notch_freq": -50.0}, "notch_freq"),
        ({"stride_seconds": 0.0}, "stride_seconds"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_windows():
    cfg = PreprocessConfig(window_seconds=2, stride_seconds=1.0)
    starts = window_starts(200 * 5 + 50, cfg)
    assert starts.tolist() == [0, 200, 400, 600]
    assert window_starts(399, cfg).tolist() == []
    assert window_starts(2000, cfg, begin=100, end=700).tolist() == [100, 300]
    signal = np.arange(3 * 1100, dtype=np.float32).reshape(3, 1100)
    win = cut_windows(signal, starts, cfg)
    assert win.shape == (4, 3, 2, 200)
    np.testing.assert_array_equal(win[1].reshape(3, 400), signal[:, 200:600])
    half = cut_windows(signal, starts, PreprocessConfig(window_seconds=2, dtype="float16"))
    assert half.dtype == np.float16
