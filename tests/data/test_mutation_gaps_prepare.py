"""Preprocessing and windowing checks that a mutation audit found missing: each test fails on a
one-line change of the code it names (stride rounding, average reference, event and BAD
boundaries, the placement of the parts between discontinuities)."""

import numpy as np

from eegfast.data.prepare import _preprocess_segments
from eegfast.data.preprocess import PreprocessConfig, preprocess_signal, window_starts
from tests.data.test_prepare import _fif_recording, _processed


def test_stride_seconds_round_to_the_nearest_sample():
    """0.29 s is 57.99999999999999 samples in binary arithmetic: 58, not truncated to 57."""
    cfg = PreprocessConfig(window_seconds=1, stride_seconds=0.29)
    assert cfg.stride_samples == 58
    assert window_starts(400, cfg).tolist() == [0, 58, 116, 174]


def test_average_and_electrode_references_subtract_across_electrodes():
    """``reference="average"`` subtracts, at every sample, the mean over the electrodes (not
    each electrode's mean over time); an electrode name subtracts that electrode's samples."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 2500)) * 1e-5  # (C, T) volts at 250 Hz
    data += np.array([[1e-5], [-2e-5], [3e-5]])  # offsets: a per-electrode mean is not 0
    names = ["FP1", "CZ", "O1"]
    plain = preprocess_signal(data, 250.0, PreprocessConfig(), ch_names=names)
    average = preprocess_signal(data, 250.0, PreprocessConfig(reference="average"), ch_names=names)
    np.testing.assert_allclose(average, plain - plain.mean(0, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(average.sum(0), 0.0, atol=1e-5)
    cz = preprocess_signal(data, 250.0, PreprocessConfig(reference="CZ"), ch_names=names)
    np.testing.assert_allclose(cz, plain - plain[1:2], atol=1e-6)


def test_event_windows_end_inside_their_event(tmp_path):
    """An event one sample (5 ms) shorter than a window gives no window: a window may not
    reach past the end of the event whose label it takes."""
    path = _fif_recording(tmp_path / "ev_raw.fif",
                          annotations=[(10, 3.995, "left"), (30, 8, "right")])  # fmt: skip
    record = _processed(path, tmp_path, PreprocessConfig(window_seconds=4))
    assert [s / 200 for s in record["starts"]] == [30, 34]
    assert record["label_names"] == ["right", "right"]
    assert record["events_shorter_than_window"] == 1


def test_a_bad_segment_ending_between_samples_drops_the_window_it_reaches(tmp_path):
    """BAD from 2 s to 4.0025 s: the window starting at 4 s overlaps its last 2.5 ms (half a
    sample at 200 Hz) and is dropped too (the end is rounded up, not down)."""
    path = _fif_recording(tmp_path / "bad_raw.fif", annotations=[(2.0, 2.0025, "BAD_muscle")])
    record = _processed(path, tmp_path, PreprocessConfig(window_seconds=4))
    starts = [s / 200 for s in record["starts"]]
    assert 0 not in starts and 4 not in starts and 8 in starts
    assert record["windows_in_bad_segments"] == 2


def test_parts_between_discontinuities_stay_on_the_200_hz_grid():
    """A cut at input sample 1303 of a 256-Hz recording is 1017.97 output samples in: the part
    after it starts at output sample 1018 (rounded), not 1017 (truncated, 4.9 ms early). A
    20-Hz sine that is continuous across the cut must come out in phase on both sides."""
    sfreq, cut = 256.0, 1303
    t = np.arange(int(20 * sfreq)) / sfreq
    data = np.sin(2 * np.pi * 20.0 * t)[None] * 1e-5
    cfg = PreprocessConfig(l_freq=None, notch_freq=None)  # short filters: small edge effects
    whole = preprocess_signal(data, sfreq, cfg)
    parts, segments = _preprocess_segments(data, sfreq, cfg, ["CZ"], [cut])
    assert segments[1][0] == 1018
    inside = slice(1018 + 400, whole.shape[1] - 400)  # 2 s from the cut and from the end
    # amplitude 0.1 units; one sample of shift at 20 Hz is a difference of about 0.06
    np.testing.assert_allclose(parts[0, inside], whole[0, inside], atol=5e-3)
