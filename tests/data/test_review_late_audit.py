"""Review of the late BIDS discovery changes: a recording given by its path whose name mne-bids
cannot read as a BIDS name (a backup ``..._eeg_old.edf``, an upper-case ``.EDF``) in a
dataset's ``sub-X/eeg/`` folder."""

import mne
import numpy as np
import pytest

from eegfast.data.prepare import discover
from eegfast.data.reading import read_recording

pytest.importorskip("mne_bids")


@pytest.mark.parametrize("name", ["sub-01_task-mi_eeg_old.edf", "sub-01_task-mi_eeg.EDF"])
def test_a_named_file_mne_bids_cannot_parse_is_read_plainly(tmp_path, name):
    """Given as SRC, such a file was taken as the dataset's recording and read through
    mne-bids, which refuses its name (``Suffix old is not allowed``): a file that was read
    before was reported as an unreadable recording."""
    root = tmp_path / "ds"
    folder = root / "sub-01" / "eeg"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    x = np.random.default_rng(0).normal(size=(3, 250 * 10)) * 2e-5
    raw = mne.io.RawArray(x, mne.create_info(["C3", "C4", "Cz"], 250.0, "eeg"), verbose="error")
    mne.export.export_raw(folder / name, raw, fmt="edf", verbose="error")
    (job,) = discover([str(folder / name)])
    assert job.bids_root is None
    assert read_recording(job.path, bids_root=job.bids_root).n_times == 250 * 10
