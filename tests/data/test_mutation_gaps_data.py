"""Checks of preprocessing, labels, the index and the data set that a mutation audit found
missing: each test fails on a one-line change of the code it names (a boundary of a
validation, a cache key, the padding's grid, a case-sensitive match, a skipped check)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from eegfast.data import ShardDataset, collate_padded, load_index, make_loader, read_index
from eegfast.data.dataset import ElectrodeSetBatchSampler, _BatchMemory
from eegfast.data.labels import LabelRules, infer_subject, is_mark, read_label_table
from eegfast.data.preprocess import (
    PreprocessConfig,
    SampleRateError,
    _rereference,
    check_sample_rate,
    cut_windows,
    preprocess_signal,
    window_starts,
)
from tests.data.test_hostile_inputs_audit import _edit, _folder

# ---------------------------------------------------------------------------------------------
# preprocess.py


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # 0.001 s is 0.2 samples: a stride of round(0.2) = 0 samples, np.arange's
        # ZeroDivisionError later instead of an error naming the setting
        ({"stride_seconds": 0.001}, "stride_seconds"),
        ({"l_freq": 0.0}, "l_freq"),  # a 0 Hz high-pass is no filter MNE can design
        ({"h_freq": float("nan")}, "h_freq"),
        ({"notch_freq": 0.0}, "notch_freq"),
        ({"l_freq": 40.0, "h_freq": 40.0}, "l_freq"),  # an empty band
        ({"h_freq": 100.0}, "h_freq"),  # the Nyquist frequency of the 200 Hz output itself
    ],
)
def test_config_refuses_values_on_the_boundary(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stride_seconds": float("inf")}, "stride_seconds: must be a finite number"),
        ({"l_freq": float("inf"), "h_freq": None}, "l_freq: must be a finite frequency"),
        ({"l_freq": 150.0, "h_freq": None}, "l_freq: must be below 100 Hz"),
        ({"l_freq": 100.0, "h_freq": None}, "l_freq: must be below 100 Hz"),
    ],
)
def test_config_refuses_what_failed_every_recording_later(kwargs, match):
    """`eegfast prepare --stride inf` (or ``--l-freq 150 --h-freq none``) was accepted, and then
    every recording came out bad with "OverflowError: cannot convert float infinity to
    integer" (MNE's "Invalid cutoff frequency"): one error naming the setting instead."""
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)
    PreprocessConfig(stride_seconds=1e6)  # a stride longer than any recording: one window
    PreprocessConfig(l_freq=99.0, h_freq=None)


def test_a_high_pass_above_the_inputs_nyquist_frequency_is_a_sample_rate_error():
    """Without a low-pass, the high-pass edge must be below the input's Nyquist frequency
    too: MNE's "Invalid cutoff frequency" for a 90 Hz high-pass of a 160 Hz recording."""
    cfg = PreprocessConfig(l_freq=90.0, h_freq=None, notch_freq=None)
    with pytest.raises(SampleRateError, match="160 Hz is too low for a high-pass at 90 Hz"):
        preprocess_signal(np.zeros((1, 1600)), 160.0, cfg)
    assert preprocess_signal(np.zeros((1, 2000)), 200.0, cfg).shape == (1, 2000)


def test_sample_rate_exactly_at_the_limit_is_refused():
    """A band edge at the input's Nyquist frequency (150 Hz for a 75 Hz low-pass), a notch
    closer than its 1 Hz transition band to it, and a NaN or zero rate are refused."""
    with pytest.raises(SampleRateError, match="150 Hz is too low for the band-pass"):
        check_sample_rate(150.0, PreprocessConfig())
    check_sample_rate(150.5, PreprocessConfig())
    notch = PreprocessConfig(h_freq=40.0, notch_freq=50.0)
    with pytest.raises(SampleRateError, match="102 Hz is too low for a 50 Hz notch"):
        check_sample_rate(102.0, notch)
    check_sample_rate(102.5, notch)
    no_filters = PreprocessConfig(l_freq=None, h_freq=None, notch_freq=None)
    for bad in (float("nan"), 0.0, -250.0):
        with pytest.raises(SampleRateError, match="invalid sample rate"):
            check_sample_rate(bad, no_filters)


def test_the_gain_of_one_notch_is_not_reused_for_another():
    """The filters' gain is cached per (rate, lengths, band, notch): a recording at 50 Hz mains
    and the next one at 60 Hz, of the same rate and length, each get their own notch."""
    sfreq = 500.0
    t = np.arange(int(60 * sfreq)) / sfreq
    mains50 = (5e-5 * np.sin(2 * np.pi * 50.0 * t))[None]  # 0.5 units
    middle = slice(4000, -4000)
    removed = preprocess_signal(mains50, sfreq, PreprocessConfig(notch_freq=50.0))
    assert np.abs(removed[0, middle]).max() < 0.01
    kept = preprocess_signal(mains50, sfreq, PreprocessConfig(notch_freq=60.0))
    assert np.abs(kept[0, middle]).max() == pytest.approx(0.5, rel=0.02)


def _sines(t: np.ndarray) -> np.ndarray:
    """(T,) volts: 10 µV sines at 7.7, 23.9 and 37.1 Hz (inside the band, away from mains)."""
    return 1e-5 * sum(np.sin(2 * np.pi * f * t + k) for k, f in enumerate((7.7, 23.9, 37.1)))


def test_band_pass_output_is_on_the_200_hz_grid_at_256_hz():
    """At 256 Hz (200/256 = 25/32) the band-pass and notch kernels reach 5914 samples, not a
    multiple of 32: the left padding must be rounded up to one, else the output starts 0.4
    input samples (1.6 ms) off the grid of the first sample (0.2 SD off at 37 Hz)."""
    sfreq = 256.0
    x = _sines(np.arange(int(round(120 * sfreq)) + 1) / sfreq)[None]
    got = preprocess_signal(x, sfreq, PreprocessConfig(), precision="float64")[0]
    exact = _sines(np.arange(len(got)) / 200.0) * 1e4
    inside = slice(40 * 200, -40 * 200)  # away from the 0.1 Hz high-pass's edges
    assert np.abs(got[inside] - exact[inside]).max() < 1e-2 * exact.std()


def test_blocks_of_channels_give_the_same_output():
    """Channels go through the FFT in blocks of ``max_block_bytes``; the last block of 7
    channels is a short one for every block size between 2 and 6."""
    rng = np.random.default_rng(0)
    data = 1e-5 * rng.standard_normal((7, 2500))
    cfg = PreprocessConfig()
    whole = preprocess_signal(data, 250.0, cfg)
    for max_bytes in np.geomspace(1, 1 << 28, 40).astype(int):
        got = preprocess_signal(data, 250.0, cfg, max_block_bytes=int(max_bytes))
        np.testing.assert_array_equal(got, whole, err_msg=f"max_block_bytes={max_bytes}")


@pytest.mark.parametrize(("precision", "dtype"), [("float64", np.float64), ("float32", np.float32)])
def test_precision_sets_the_dtype_of_the_ffts(monkeypatch, precision, dtype):
    """``precision="float64"`` (for recordings whose float32 FFT rounding matters) must run the
    FFTs in float64; the float32 output alone cannot tell."""
    seen = []
    rfft = scipy.fft.rfft

    def spy(x, *args, **kwargs):
        seen.append(np.asarray(x).dtype)
        return rfft(x, *args, **kwargs)

    monkeypatch.setattr(scipy.fft, "rfft", spy)
    preprocess_signal(np.zeros((2, 2500)), 250.0, PreprocessConfig(), precision=precision)
    assert seen and all(d == dtype for d in seen)


def test_window_starts_stop_at_the_end_of_the_signal():
    """An ``end`` past the signal (an event running past the recording's end) gives only the
    windows inside the signal: a start past it made cut_windows fail or cut a short window."""
    cfg = PreprocessConfig(window_seconds=2)
    assert window_starts(1000, cfg, begin=100, end=5000).tolist() == [100, 500]
    assert window_starts(1000, cfg, end=10_000).tolist() == [0, 400]


def test_cut_windows_refuses_an_out_of_another_shape():
    cfg = PreprocessConfig(window_seconds=2)
    signal = np.zeros((3, 1000), np.float32)
    starts = window_starts(1000, cfg)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 2, 200\)"):
        cut_windows(signal, starts, cfg, out=np.zeros((3, 3, 2, 200), np.float32))


def test_rereference_inplace_writes_into_the_signal():
    """prepare re-references a recording in place: a second array of the recording's size
    (hours of float32 at 200 Hz) is what ``inplace`` exists to avoid."""
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    expected = data - data[1]
    got = _rereference(data, ["FP1", "CZ", "O1"], "CZ", inplace=True)
    assert got is data
    np.testing.assert_array_equal(data, expected)


# ---------------------------------------------------------------------------------------------
# labels.py


def test_bad_and_edge_marks_are_matched_whatever_their_case():
    """MNE treats descriptions starting with "bad" or "edge" as marks in any case
    (``bad_blink``, as people type them): they label nothing."""
    for mark in ("bad_blink", "Bad muscle", "edge boundary", "Edge"):
        assert is_mark(mark), mark
        assert LabelRules().events_from([(0.0, 4.0, mark)]) == ()
    assert not is_mark("T1")


@pytest.mark.parametrize(
    ("path", "subject"),
    [
        # a BIDS-like name in a flat folder: the entity follows an underscore
        ("/d/study_sub-07_task-rest_eeg.edf", "sub-07"),
        # the fallback is the name before its first dot (compound extensions such as .fif.gz)
        ("/d/rec01.fif.gz", "rec01"),
    ],
)
def test_infer_subject_more_names(path, subject):
    assert infer_subject(path)[0] == subject


def test_a_table_of_a_header_only_or_without_labels_is_refused(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,subject,session\n")
    with pytest.raises(ValueError, match=r"labels\.csv: no rows"):
        read_label_table(csv)
    csv.write_text("file,subject\na.edf,p1\n")
    with pytest.raises(ValueError, match=r"labels\.csv: missing columns \['label'\]"):
        read_label_table(csv)


def test_table_cells_are_stripped_and_an_empty_task_is_none(tmp_path):
    """A space after the comma (``a.edf, rest``) gave the class ``' rest'``, another class than
    ``'rest'`` of the next row."""
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,subject,session,task\na.edf, rest , p1 ,s1,\nb.edf,rest,p2,s1,mi\n")
    table = read_label_table(csv)
    assert (table["a.edf"].label, table["a.edf"].subject, table["a.edf"].task) == (
        "rest",
        "p1",
        None,
    )
    assert table["b.edf"].task == "mi"


def test_table_problems_list_exactly_ten_missing_recordings_in_full(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nx.edf,rest\n")
    rules = LabelRules(table=read_label_table(csv))
    paths = [tmp_path / "x.edf", *(tmp_path / f"r{i}.edf" for i in range(10))]
    (message,) = rules.table_problems(paths)
    assert "10 recording(s) not in the table" in message
    assert message.endswith("r9.edf") and "more" not in message
    (message,) = rules.table_problems([*paths, tmp_path / "r10.edf"])
    assert message.endswith("and 1 more")


# ---------------------------------------------------------------------------------------------
# index.py


# (edit of the index and its recording, what the error names)
MORE_BAD_INDEXES = {
    # written by a newer eegfast: its layout may mean other things
    "another format version": (lambda i, r: i.update(format_version=2), "format version 2"),
    "zero window length": (lambda i, r: i.update(window_seconds=0), "window_seconds"),
    "label names not text": (lambda i, r: i["tasks"]["mi"].update(labels=[1, 2]), "tasks"),
    # read_index gave them, and a shard of that dtype was refused only when first read
    "a dtype prepare never writes": (lambda i, r: r.update(dtype="float64"), "dtype"),
    # torch's embedding takes a negative row from the end of the table: another electrode
    "negative electrode rows": (lambda i, r: r.update(input_chans=[0, 1, -2, 3, 4]), "input_chans"),
    # names[2] of a task with 2 classes: an IndexError; in training, a cross-entropy error
    "label id equal to the class count": (lambda i, r: r.update(labels=[0, 2, 1]), "labels"),
    # 0.5 samples: read_index's start_s and prepare's resume trusted a float
    "starts not integers": (lambda i, r: r.update(starts=[0.5, 400, 800]), "starts"),
    "labels not integers": (lambda i, r: r.update(labels=[0.0, 1.0, 0.0]), "labels"),
    "session as a number": (lambda i, r: r.update(session=1), "session"),
    "electrodes not names": (
        lambda i, r: r.update(electrodes=["FP1", 2, "C3", "C4"]),
        "electrodes",
    ),
}


@pytest.mark.parametrize("case", MORE_BAD_INDEXES)
def test_more_index_jsons_that_prepare_never_writes_are_refused_naming_them(tmp_path, case):
    root = _folder(tmp_path / "p")
    edit, named = MORE_BAD_INDEXES[case]
    _edit(root, edit)
    for read in (load_index, read_index):
        with pytest.raises(ValueError, match=rf"{root / 'index.json'}.*({named})"):
            read(root)


def test_an_index_json_that_is_not_utf8_names_the_file(tmp_path):
    root = _folder(tmp_path / "p")
    (root / "index.json").write_bytes(b'{"format_version": 1, "x": "\xff"}')  # Latin-1 ÿ
    with pytest.raises(ValueError, match=rf"{root / 'index.json'} is not valid JSON"):
        load_index(root)


def test_read_index_gives_start_seconds_and_shard_rows(tmp_path):
    """One record per window: its start in seconds (at 200 Hz) and its row in the shard."""
    root = _folder(tmp_path / "p", n_windows=3)
    _edit(root, lambda i, r: r.update(starts=[0, 500, 1100]))
    records = read_index(root)
    assert [(r["start_s"], r["row"], r["window"]) for r in records] == [
        (0.0, 0, 0),
        (2.5, 1, 1),
        (5.5, 2, 2),
    ]


# ---------------------------------------------------------------------------------------------
# dataset.py


def test_items_give_their_start_in_seconds(tmp_path):
    root = _folder(tmp_path / "p", n_windows=3)
    _edit(root, lambda i, r: r.update(starts=[0, 500, 1100]))
    ds = ShardDataset(root)
    assert [ds[i]["start_s"] for i in range(3)] == [0.0, 2.5, 5.5]


def test_a_fortran_ordered_shard_is_refused(tmp_path):
    """A shard of the right shape and dtype saved in Fortran order (by another tool): its rows
    are not windows, and were read as such without a word."""
    root = _folder(tmp_path / "p")
    shard = root / "shards" / "a.npy"
    np.save(shard, np.asfortranarray(np.load(shard)))
    with pytest.raises(ValueError, match=r"a\.npy: shard holds"):
        ShardDataset(root)[0]


def _item(c: int, a: int = 2, **fields) -> dict:
    """An item as a data set of windows gives it: (c, a, 200) windows, c electrodes."""
    return {"x": torch.ones(c, a, 200), "input_chans": torch.arange(c + 1), **fields}


def test_collate_padded_leaves_items_without_a_label_unlabelled():
    """An item of a dataset that has no labels (pretraining data) is -1, not class 0."""
    batch = collate_padded([_item(3), _item(2, label=1)])
    assert batch["label"].tolist() == [-1, 1]


def test_collate_padded_refuses_windows_of_another_length():
    """A 1-s window after a 2-s one was broadcast into 2 s (its patch repeated) silently."""
    with pytest.raises(ValueError, match="items: window shapes differ"):
        collate_padded([_item(3, a=2), _item(3, a=1)])


def test_batch_sampler_without_groups_counts_the_samplers_items():
    """``len()`` of the batches is that of the sampler's items (a subset, or a weighted sampler
    that draws another number of them), not of the data set's: an epoch's progress and the
    learning-rate schedule come from it."""
    batches = ElectrodeSetBatchSampler(None, 4, num_items=100, sampler=list(range(10)))
    assert len(batches) == len(list(batches)) == 3
    dropped = ElectrodeSetBatchSampler(
        None, 4, num_items=100, sampler=list(range(10)), drop_last=True
    )
    assert len(dropped) == len(list(dropped)) == 2


def test_batch_memory_keeps_at_most_max_buffers():
    """Batches of changing sizes (electrode sets of other counts) each need a buffer of their
    own size: the pool replaces free ones instead of growing by one per size for good."""
    memory = _BatchMemory(max_buffers=2)
    for nbytes in (1000, 2000, 3000, 4000, 1000):
        assert memory.take(nbytes).nbytes == nbytes
    assert len(memory._buffers) <= 2


def test_make_loader_reads_shard_batches_in_this_process_by_default(tmp_path):
    """A ShardDataset batch is a read from the page cache into recycled memory; worker
    processes would add a copy into fresh shared memory per batch (slower than the read), so
    the default is no workers for it, and up to 2 for other data sets."""
    ds = ShardDataset(_folder(tmp_path / "p"))
    assert make_loader(ds, 2, shuffle=False, pin_memory=False).num_workers == 0
    items = [_item(3, label=0) for _ in range(4)]
    assert make_loader(items, 2, shuffle=False, pin_memory=False).num_workers >= 1
