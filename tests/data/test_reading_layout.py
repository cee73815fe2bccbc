"""EDF/BDF header fields and data-record layout (eegfast.data.reading): the one parse of the
header (``_edf_layout``) that the size check, the BDF trigger reader and the EDF+D reader
share, the count of data records MNE reads, and the EDF+D annotation-signal reader."""

from pathlib import Path

import mne
import numpy as np
import pytest

from eegfast.data.reading import (
    BadRecording,
    _edf_plus_d_records,
    bdf_trigger_values,
    check_edf_size,
    edf_record_onsets,
    read_recording,
)
from tests.data.test_prepare_audit import _write_edf_plus
from tests.data.test_time_axes_audit import _status_raw


def _patch(path: Path, out: Path, at: int, field: bytes) -> Path:
    """A copy of ``path`` with ``field`` written at byte ``at``."""
    data = bytearray(path.read_bytes())
    data[at : at + len(field)] = field
    out.write_bytes(bytes(data))
    return out


def _edf_plus(tmp_path: Path, name: str = "rec.edf", **kwargs) -> Path:
    """12 one-second records (3 channels at 200 Hz + annotations), an event at 2 s."""
    data = np.random.default_rng(0).normal(0, 20, (3, 12 * 200))
    return _write_edf_plus(
        tmp_path / name, data, 200.0, list(range(12)), [(2, 1, "T1")], continuous=True, **kwargs
    )


# (3 EEG signals + 1 annotation signal: ns = 4)
_SAMPLES = 256 + 216 * 4  # the first signal's samples per record
_UNIT = 256 + 96 * 4  # the first signal's physical dimension


@pytest.mark.parametrize(
    ("at", "field"),
    [(184, b"1280\x00\x00\x00\x00"), (236, b"12\x00\x00\x00\x00\x00\x00"),
     (_SAMPLES, b"200\x00\x00\x00\x00\x00")],
)  # fmt: skip
def test_header_numbers_padded_with_nuls_are_read_as_mne_reads_them(tmp_path, at, field):
    """Some writers pad header fields with NULs; MNE reads such numbers up to the NUL, and the
    size check refused those files as "corrupt EDF header (non-numeric size fields)"."""
    path = _patch(_edf_plus(tmp_path), tmp_path / "nul.edf", at, field)
    check_edf_size(path)
    raw = read_recording(path)
    assert raw.n_times == 12 * 200


def test_corrupt_header_errors_name_the_field(tmp_path):
    path = _edf_plus(tmp_path)
    cases = [
        (184, b"x       ", r"header size \(bytes 184-191\) is not a number: 'x'"),
        (236, b"12a     ", r"number of data records \(bytes 236-243\) is not a number: '12a'"),
        (252, b"four", r"number of signals \(bytes 252-255\) is not a number: 'four'"),
        (_SAMPLES + 8, b"2OO     ", r"samples per record of signal 2 \('EEG Fp2'\) is not a nu"),
        (_SAMPLES, b"-200    ", r"samples per record of signal 1 \('EEG Fp1'\) is negative"),
    ]
    for at, field, message in cases:
        with pytest.raises(BadRecording, match=r"^corrupt EDF header \(" + message):
            check_edf_size(_patch(path, tmp_path / "bad.edf", at, field))
    with pytest.raises(BadRecording, match=r"corrupt EDF header \(5 signals, header of 1280"):
        check_edf_size(_patch(path, tmp_path / "bad.edf", 252, b"5   "))
    header_cut = tmp_path / "cut.edf"
    header_cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BadRecording, match="truncated EDF: 1000 bytes, header alone needs 1280"):
        check_edf_size(header_cut)


def test_a_nul_padded_microvolt_unit_is_read_as_microvolts(tmp_path):
    """MNE knows 'uV' spelt exactly so; 'uV' padded with NULs it read as volts, and the unit
    correction did not know it either: every sample 1e6 times too large."""
    path = _edf_plus(tmp_path)
    padded = path
    for i in range(3):  # (the three EEG signals' units)
        padded = _patch(padded, tmp_path / "nul_unit.edf", _UNIT + 8 * i, b"uV".ljust(8, b"\x00"))
    expected = read_recording(path).get_data()
    np.testing.assert_allclose(read_recording(padded).get_data(), expected, rtol=1e-12)


def test_edf_plus_d_records_past_the_header_count_are_read(tmp_path):
    """MNE reads every complete record of the file, whatever the header's count (-1 while still
    recording, or a count the recorder did not update): the EDF+D reader stopped at the count,
    and an event in a later record was dropped (its time stamps too)."""
    data = np.random.default_rng(1).normal(0, 20, (3, 12 * 200))
    onsets = [*range(6), *(20 + r for r in range(6))]
    path = _write_edf_plus(tmp_path / "gap.edf", data, 200.0, onsets)
    # an event in the last record's annotation signal (the writer puts events in the first)
    blob = bytearray(path.read_bytes())
    tal = b"+25\x14\x14\x00+25.5\x150\x14late\x14\x00"
    blob[len(blob) - 120 :] = tal.ljust(120, b"\x00")
    path.write_bytes(bytes(blob))
    for count in (b"-1      ", b"10      ", b"12      "):
        patched = _patch(path, tmp_path / "count.edf", 236, count)
        assert edf_record_onsets(patched)[1].tolist() == onsets, count
        raw = read_recording(patched)
        assert raw.n_times == 12 * 200
        found = {a["description"]: a["onset"] for a in raw.annotations}
        assert found == {"EDGE boundary": 6.0, "late": 11.5}, count


def test_bdf_trigger_values_cover_the_records_mne_reads(tmp_path):
    """A scaled BDF Status whose header counts -1 or fewer records than the file holds: its
    values must be as long as MNE's channel (else prepare kept MNE's wrong codes)."""
    path = tmp_path / "exported.bdf"
    mne.export.export_raw(path, _status_raw(), verbose="error")
    expected = bdf_trigger_values(path, "Status")
    assert expected is not None and sorted(set(np.round(expected))) == [0, 3, 4]
    n_records = int(path.read_bytes()[236:244])
    for count in (b"-1      ", str(n_records - 1).encode().ljust(8)):
        patched = _patch(path, tmp_path / "count.bdf", 236, count)
        assert mne.io.read_raw(patched, verbose="error").n_times == len(expected)
        np.testing.assert_array_equal(bdf_trigger_values(patched, "Status"), expected)


def test_bdf_trigger_scale_with_a_decimal_comma(tmp_path):
    """MNE reads '4,0' in a header's physical range as 4.0; the trigger reader gave up on it
    (None: MNE's unscaled codes kept)."""
    path = tmp_path / "exported.bdf"
    mne.export.export_raw(path, _status_raw(), verbose="error")
    expected = bdf_trigger_values(path, "Status")
    head = path.read_bytes()[:256]
    ns = int(head[252:256])
    at = 256 + 112 * ns + 8 * 3  # the Status signal's physical maximum
    assert path.read_bytes()[at : at + 8].strip() == b"4"
    comma = _patch(path, tmp_path / "comma.bdf", at, b"4,0     ")
    np.testing.assert_array_equal(bdf_trigger_values(comma, "Status"), expected)


def _edf_plus_d_file(path: Path, width: int, n_records: int, count: int | None = None) -> Path:
    """An EDF+D (width 2) or BDF+D (width 3) file of random signal bytes around two annotation
    signals (the first holds each record's time stamp, the second an event in some records);
    ``count``: the header's number of data records (default ``n_records``)."""
    signals = [("Fp1", 7), ("EDF Annotations", 20), ("Cz", 5), ("EDF Annotations", 9)]
    ns = len(signals)

    def field(value, size: int) -> bytes:
        return str(value).encode().ljust(size)

    head = b"".join([
        field(0, 8), field("X", 80), field("X", 80), field("01.01.20", 8), field("00.00.00", 8),
        field(256 * (ns + 1), 8), field("EDF+D", 44),
        field(n_records if count is None else count, 8), field(0.5, 8), field(ns, 4),
        *(field(label, 16) for label, _ in signals), field("", 80 * ns), field("", 8 * ns),
        *(field(v, 8) for v in [-1] * ns + [1] * ns + [-100] * ns + [100] * ns),
        field("", 80 * ns), *(field(n, 8) for _, n in signals), field("", 32 * ns),
    ])  # fmt: skip
    rng = np.random.default_rng(width)
    records = []
    for r in range(n_records):
        stamp = f"+{r * 0.5 + 3 * (r >= n_records // 2):g}\x14\x14\x00".encode()
        event = f"+{r * 0.5 + 0.1:g}\x150.2\x14e{r}\x14\x00".encode() if r % 3 == 0 else b""
        records.append(
            rng.integers(0, 256, width * 7, dtype=np.uint8).tobytes()
            + stamp.ljust(width * 20, b"\x00")
            + rng.integers(0, 256, width * 5, dtype=np.uint8).tobytes()
            + event.ljust(width * 9, b"\x00")
        )
    path.write_bytes(head + b"".join(records))
    return path


def _simple_loop(path: Path, width: int) -> tuple[np.ndarray, bytes]:
    """The EDF+D reader as it was: a seek and read per record and annotation signal."""
    head = path.read_bytes()
    ns = int(head[252:256])
    header_bytes = 256 * (ns + 1)
    samples = [int(head[256 + 216 * ns + 8 * i : 256 + 216 * ns + 8 * (i + 1)]) for i in range(ns)]
    labels = [head[256 + 16 * i : 256 + 16 * (i + 1)].strip() for i in range(ns)]
    spans = [(width * sum(samples[:i]), width * samples[i]) for i, label in enumerate(labels)
             if label == b"EDF Annotations"]  # fmt: skip
    record_bytes = width * sum(samples)
    onsets, tals = [], []
    with open(path, "rb") as f:
        for r in range((len(head) - header_bytes) // record_bytes):
            for k, (at, length) in enumerate(spans):
                f.seek(header_bytes + r * record_bytes + at)
                tals.append(f.read(length))
                if k == 0:
                    onsets.append(float(tals[-1].split(b"\x14", 1)[0]))
    return np.array(onsets) - onsets[0], b"".join(tals)


@pytest.mark.parametrize(("suffix", "width"), [(".edf", 2), (".bdf", 3)])
def test_edf_plus_d_reader_matches_a_record_by_record_read(tmp_path, suffix, width):
    """The annotation signals are copied out of a memory map of the records at once; the same
    onsets and TAL bytes as a seek and read per record (header counts -1 and 37 too)."""
    for count in (None, -1, 37):
        path = _edf_plus_d_file(tmp_path / f"rec{suffix}", width, 40, count)
        record_s, onsets, tals = _edf_plus_d_records(path, None)
        expected_onsets, expected_tals = _simple_loop(path, width)
        assert record_s == 0.5
        np.testing.assert_array_equal(onsets, expected_onsets)
        assert onsets[21] - onsets[19] == 4.0  # (the 3-s gap half-way)
        assert tals == expected_tals


def test_an_edf_plus_d_file_without_records(tmp_path):
    """No data record: edf_record_onsets raised IndexError, and read_recording gave MNE's
    "unreadable: IndexError: list index out of range"."""
    for count in (0, -1):
        path = _edf_plus_d_file(tmp_path / "empty.edf", 2, 0, count)
        record_s, onsets = edf_record_onsets(path)
        assert record_s == 0.5 and onsets.shape == (0,)
        with pytest.raises(BadRecording, match=r"^empty recording \(no complete data record\)"):
            read_recording(path)


def test_edf_plus_d_records_out_of_time_order_are_refused(tmp_path):
    """Record time stamps that go back: the annotations were put on the data's time axis by a
    binary search of unsorted onsets (wherever it landed), without a word."""
    data = np.random.default_rng(3).normal(0, 20, (3, 12 * 200))
    onsets = [0, 1, 2, 3, 4, 5, 20, 21, 22, 10, 11, 12]
    path = _write_edf_plus(tmp_path / "back.edf", data, 200.0, onsets, [(11.5, 0.2, "T1")])
    message = r"EDF\+D data record 9 starts at 10 s, before record 8 \(22 s\): records out of"
    with pytest.raises(BadRecording, match=message):
        edf_record_onsets(path)
    with pytest.raises(BadRecording, match=message):
        read_recording(path)


def test_bdf_trigger_values_sign_extend_24_bits_with_bounded_memory(tmp_path):
    """Digital values at both ends of the 24-bit range and around 0 come back exactly (the
    two's complement), and the read holds little besides its float64 result: the int32
    triplets, masks and temporaries peaked at 4 times the result (GBs for a day at 2 kHz)."""
    import tracemalloc

    import edfio

    full = (-8388608, 8388607)
    digital = np.tile([-8388608, -8388607, -65536, -1, 0, 1, 65535, 8388606, 8388607], 512 * 4)
    signals = [
        edfio.BdfSignal(np.zeros(len(digital)), 512.0, label="Cz", physical_range=(-1.0, 1.0)),
        edfio.BdfSignal(digital + 1000.0, 512.0, label="Status", digital_range=full,
                        physical_range=(full[0] + 1000.0, full[1] + 1000.0)),
    ]  # fmt: skip
    path = tmp_path / "signed.bdf"
    edfio.Bdf(signals, data_record_duration=1.0).write(path)
    bdf_trigger_values(path, "Status")  # (imports and caches out of the measure)
    tracemalloc.start()
    try:
        values = bdf_trigger_values(path, "Status")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(values, digital + 1000.0)
    assert peak < 2 * values.nbytes, peak / values.nbytes
