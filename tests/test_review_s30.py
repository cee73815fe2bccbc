"""Review of session 30's commits: what a second reading of them found.

An EDF+D recording of a BIDS dataset reads its events.tsv with
``mne_bids.events_file_to_annotation_kwargs``, which mne-bids 0.17 (allowed by the package's
``mne-bids`` requirement) has without the ``verbose`` argument that came in 0.18: every such
recording with a gap was a bad record ("TypeError: ... unexpected keyword argument
'verbose'")."""

from __future__ import annotations

import pytest

from eegfast.data.reading import EDF_GAP_DESCRIPTION, read_recording
from tests.data.test_prepare_audit import _edf_with_gap

mne_bids = pytest.importorskip("mne_bids")


def test_edf_plus_d_events_tsv_read_with_mne_bids_0_17s_reader(tmp_path, monkeypatch):
    """The events.tsv reader as mne-bids 0.17 has it (no ``verbose``): events.tsv's events
    still label the recording, on the data's time axis."""
    real = mne_bids.events_file_to_annotation_kwargs

    def reader_of_0_17(events_fname):  # (its signature: the file name only)
        return real(events_fname)

    monkeypatch.setattr(mne_bids, "events_file_to_annotation_kwargs", reader_of_0_17)
    root = tmp_path / "ds"
    folder = root / "sub-01" / "eeg"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    # 10 s of data, a 5-s gap, 10 s more (the EDF's own events: T2 at 2 s, T1 at 11 s of data)
    path = _edf_with_gap(folder / "sub-01_task-mi_eeg.edf", 5.0)
    (folder / "sub-01_task-mi_events.tsv").write_text(
        "onset\tduration\ttrial_type\n3\t4\tleft\n17\t4\tright\n"
    )
    raw = read_recording(path, bids_root=root)
    found = [(a["onset"], a["duration"], a["description"]) for a in raw.annotations]
    assert found == [(3.0, 4.0, "left"), (10.0, 0.0, EDF_GAP_DESCRIPTION), (12.0, 4.0, "right")]
