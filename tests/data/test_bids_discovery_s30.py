"""BIDS discovery, audit of session 30: ``.bidsignore``, ``ses-`` sessions, files a folder
search leaves out of a dataset (named in the report, not silently), a subject folder's non-EEG
datatypes, FIF continuations, and an EDF+D recording's events.tsv."""

import json
from pathlib import Path

import mne
import numpy as np
import pytest

from eegfast.data import prepare as prepare_module
from eegfast.data.labels import LabelRules, read_label_table
from eegfast.data.prepare import Settings, discover, prepare, process_file
from eegfast.data.reading import EDF_GAP_DESCRIPTION, read_recording
from tests.data.test_prepare_audit import _edf_with_gap

mne_bids = pytest.importorskip("mne_bids")

NAMES = ["Fp1", "Fp2", "F3", "C3", "C4", "O1", "O2"]


def _dataset(root, subjects=("01",), sessions=(None,), task="mi", seconds=10):
    """A BIDS dataset of ``seconds``-s, 250-Hz EDF recordings; returns their paths, in order."""
    written = []
    for i, (sub, ses) in enumerate((s, e) for s in subjects for e in sessions):
        x = np.random.default_rng(i).normal(size=(len(NAMES), seconds * 250)) * 2e-5
        raw = mne.io.RawArray(x, mne.create_info(NAMES, 250.0, "eeg"), verbose="error")
        path = mne_bids.BIDSPath(subject=sub, session=ses, task=task, root=root, datatype="eeg")
        mne_bids.write_raw_bids(raw, path, format="EDF", allow_preload=True, verbose="error")
        written.append(path.fpath)
    return written


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _names(jobs):
    return [Path(j.path).name for j in jobs]


# --- .bidsignore ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "rel", "ignored"),
    [
        ("*_old.edf", "sub-01/eeg/sub-01_task-mi_eeg_old.edf", True),
        ("*_old.edf", "sub-01/eeg/sub-01_task-mi_eeg.edf", False),
        ("extra/", "extra/a.edf", True),  # a folder: everything in it
        ("extra/", "sub-01/extra/a.edf", True),  # no slash but the last: at any depth
        ("extra/", "extra", False),  # a folder pattern names no file
        ("/sub-02/", "sub-02/eeg/sub-02_task-mi_eeg.edf", True),
        ("/sub-02/", "x/sub-02/eeg/a.edf", False),  # anchored at the root
        ("sub-*/eeg/*_bak.edf", "sub-01/eeg/sub-01_bak.edf", True),
        ("sub-*/eeg/*_bak.edf", "a/sub-01/eeg/sub-01_bak.edf", False),  # a slash: anchored
        ("sub-*/*_bak.edf", "sub-01/eeg/sub-01_bak.edf", False),  # * stays within a folder
        ("**/backup/**", "sub-01/eeg/backup/a.edf", True),
        ("**/backup/**", "backup/a.edf", True),
        ("*.edf\n!keep.edf", "sub-01/keep.edf", False),  # a later ! pattern takes it back
        ("old/\n!old/keep.edf", "old/keep.edf", True),  # not from an ignored folder (git's rule)
        ("# *.edf\n\n", "a.edf", False),  # comments and blank lines
        ("\\#x.edf", "#x.edf", True),
        ("sub-0[12]/", "sub-02/eeg/a.edf", True),
        ("sub-0[!12]/", "sub-02/eeg/a.edf", False),
        ("a?.edf", "ab.edf", True),
        ("a?.edf", "a/.edf", False),
    ],
)
def test_bidsignore_patterns_follow_gitignore(tmp_path, patterns, rel, ignored):
    (tmp_path / ".bidsignore").write_text(patterns + "\n")
    matcher = prepare_module._bidsignore(tmp_path, {}, [])  # None: no pattern in it
    assert (matcher is not None and matcher(tmp_path / rel)) is ignored


def test_files_a_dataset_bidsignores_are_skipped_and_reported(tmp_path):
    """A dataset's .bidsignore (gitignore patterns relative to its root) was not read: the
    backup copy it names was prepared through mne-bids (failing as "unreadable"), and the
    subject it leaves out of the dataset was prepared as raw data."""
    root = tmp_path / "ds"
    first, _ = _dataset(root, subjects=("01", "02"))
    _copy(first, first.with_name("sub-01_task-mi_eeg_old.edf"))
    (root / ".bidsignore").write_text("# not BIDS\n*_old.edf\n/sub-02/\n")
    skipped: list[str] = []
    jobs = discover([str(root)], skipped=skipped)
    assert _names(jobs) == [first.name] and jobs[0].bids_root == str(root)
    assert len(skipped) == 1
    assert "2 file(s)" in skipped[0] and ".bidsignore" in skipped[0] and str(root) in skipped[0]
    # without a list to take them: a warning
    with pytest.warns(UserWarning, match=r"\.bidsignore"):
        discover([str(root)])
    # the report names them (not an error under --strict: the dataset itself leaves them out)
    report = prepare([str(root)], tmp_path / "out", progress=False, strict=True)
    assert report["usable"] == 1
    assert any(".bidsignore" in w for w in report["warnings"])


def test_a_bidsignored_file_given_by_its_path_is_read_plainly(tmp_path):
    root = tmp_path / "ds"
    (first,) = _dataset(root)
    (root / ".bidsignore").write_text(f"{first.name}\n")
    (job,) = discover([str(first)])
    assert job.bids_root is None


def test_a_bidsignored_task_does_not_split_the_datasets_task(tmp_path):
    """A pilot task the .bidsignore leaves out made the dataset one of several BIDS tasks: its
    one task's recordings were named ``ds-mi`` instead of ``ds``."""
    root = tmp_path / "ds"
    _dataset(root)
    _dataset(root, task="pilot")
    (root / ".bidsignore").write_text("*_task-pilot_*\n")
    (job,) = discover([str(root)], skipped=[])
    assert job.task == "ds"


def test_no_recordings_left_says_why(tmp_path):
    """Every recording of the SRC left out: the error says why, not only "no recordings"."""
    root = tmp_path / "ds"
    _dataset(root)
    (root / ".bidsignore").write_text("sub-01/\n")
    with pytest.raises(FileNotFoundError, match=r"\.bidsignore"):
        discover([str(root)])


# --- sessions --------------------------------------------------------------------------------


def test_the_bids_session_fills_the_recordings_session(tmp_path):
    """``ses-a`` in a BIDS path left the record's and the index's session empty; the subject
    (which splits group by) is still the subject alone."""
    root = tmp_path / "ds"
    _dataset(root, subjects=("01",), sessions=("a", "b"))
    _dataset(root, subjects=("02",))
    prepare([str(root)], tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    found = sorted((r["subject"], r["session"]) for r in index["recordings"])
    assert found == [("sub-01", "ses-a"), ("sub-01", "ses-b"), ("sub-02", "")]


def test_a_labels_table_session_is_kept(tmp_path):
    root = tmp_path / "ds"
    (path,) = _dataset(root, sessions=("a",))
    table = tmp_path / "labels.csv"
    table.write_text(f"file,label,subject,session\n{path.name},rest,s1,visit1\n")
    settings = Settings(labels=LabelRules(table=read_label_table(table)))
    (job,) = discover([str(root)])
    record = process_file(job, settings, str(tmp_path))
    assert (record["subject"], record["session"]) == ("s1", "visit1")


# --- names mne-bids refuses, out-of-layout files, a subject's other datatypes -------------------


def test_a_search_skips_names_mne_bids_refuses_with_the_rule(tmp_path):
    """A file in sub-X/eeg/ whose name mne-bids refuses (a backup ``_eeg_old.edf``, an
    upper-case ``.EDF``) was read through mne-bids and reported as an unreadable recording."""
    root = tmp_path / "ds"
    first, second = _dataset(root, subjects=("01", "02"))
    _copy(first, first.with_name("sub-01_task-mi_eeg_old.edf"))
    second.rename(second.with_name("sub-02_task-mi_eeg.EDF"))
    skipped: list[str] = []
    jobs = discover([str(root)], skipped=skipped)
    assert _names(jobs) == [first.name]
    (note,) = skipped
    assert "2 file(s)" in note and "Suffix old is not allowed" in note
    assert "by its own path" in note
    # given by its path, such a file is read plainly (tests/data/test_review_late_audit.py)
    (job,) = discover([str(root / "sub-02" / "eeg" / "sub-02_task-mi_eeg.EDF")])
    assert job.bids_root is None


@pytest.mark.parametrize("given", ["subject", "dataset"])
def test_a_subjects_non_eeg_datatypes_are_not_prepared(tmp_path, given):
    """A subject folder given as SRC prepared its meg/, beh/, anat/ and ieeg/ files as plain
    recordings (the dataset given whole did not): only eeg/ is the subject's raw EEG."""
    root = tmp_path / "ds"
    (first,) = _dataset(root)
    for extra in ("meg/sub-01_task-mi_meg.fif", "beh/sub-01_task-mi_beh.edf",
                  "ieeg/sub-01_task-mi_ieeg.edf", "eeg/old/sub-01_task-mi_eeg.edf"):  # fmt: skip
        _copy(first, root / "sub-01" / extra)
    skipped: list[str] = []
    src = root / "sub-01" if given == "subject" else root
    jobs = discover([str(src)], skipped=skipped)
    assert _names(jobs) == [first.name] and jobs[0].task == "ds"
    (note,) = skipped
    assert "4 file(s)" in note and "out of its layout" in note and "sub-01" in note


def test_files_out_of_a_sub_datasets_layout_are_reported(tmp_path):
    """A folder holding datasets: their files out of the BIDS layout (stimuli/, a subject's
    beh/) were left out without a word."""
    root = tmp_path / "all" / "ds"
    (first,) = _dataset(root)
    _copy(first, root / "stimuli" / "x.edf")
    _copy(first, root / "sub-01" / "beh" / "sub-01_task-mi_beh.edf")
    plain = _copy(first, tmp_path / "all" / "loose.edf")  # no dataset: read plainly, no note
    skipped: list[str] = []
    jobs = discover([str(tmp_path / "all")], skipped=skipped)
    assert sorted(_names(jobs)) == sorted([first.name, plain.name])
    (note,) = skipped
    assert "2 file(s)" in note and str(root) in note and "out of its layout" in note
    report = prepare([str(tmp_path / "all")], tmp_path / "out", progress=False)
    assert any("out of its layout" in w for w in report["warnings"])


def test_a_folder_given_inside_a_dataset_out_of_its_layout_is_still_read(tmp_path):
    root = tmp_path / "ds"
    (first,) = _dataset(root)
    _copy(first, root / "code" / "sub-01" / "beh" / "x.edf")
    skipped: list[str] = []
    (job,) = discover([str(root / "code")], skipped=skipped)
    assert job.bids_root is None and job.task == "code" and not skipped


# --- FIF continuations ----------------------------------------------------------------------


def test_fif_continuations_resolve_only_fif_files(tmp_path, monkeypatch):
    """Every discovered path was resolved once more (20k files under a stray
    dataset_description.json: discovery took twice as long); only FIF names can be parts."""
    resolved: list[str] = []
    real = Path.resolve

    def counting(self, *args, **kwargs):
        resolved.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", counting)
    paths = [str(tmp_path / f"r{i}.edf") for i in range(50)] + [str(tmp_path / "a-1.fif")]
    assert prepare_module._fif_continuations(paths) == set()
    assert not [name for name in resolved if not name.endswith(".fif")]


# --- EDF+D in BIDS: events.tsv stays the source of events ------------------------------------


@pytest.mark.parametrize("gap_s", [5.0, 90.0])
def test_edf_plus_d_in_bids_keeps_events_tsv_on_the_data_axis(tmp_path, gap_s):
    """An EDF+D recording read through mne-bids had events.tsv's events replaced by the EDF's
    own annotations (T1/T2 instead of left/right). events.tsv's onsets are seconds from the
    first sample in the file's time, as the EDF's own: after a gap they move onto the data's
    time axis, and the gap still cuts windows (also for an event past the end of the data read
    back to back, which mne-bids' annotations had dropped)."""
    root = tmp_path / "ds"
    folder = root / "sub-01" / "eeg"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    # 10 s of data, a gap of gap_s, 10 s more; the EDF's own T2 at 2 s and T1 at 11 s of data
    path = _edf_with_gap(folder / "sub-01_task-mi_eeg.edf", gap_s)
    (folder / "sub-01_task-mi_events.tsv").write_text(
        f"onset\tduration\ttrial_type\n3\t4\tleft\n{12 + gap_s:g}\t4\tright\n"
    )
    raw = read_recording(path, bids_root=root)
    found = [(a["onset"], a["duration"], a["description"]) for a in raw.annotations]
    assert found == [(3.0, 4.0, "left"), (10.0, 0.0, EDF_GAP_DESCRIPTION), (12.0, 4.0, "right")]
    (job,) = discover([str(root)])
    record = process_file(job, Settings(), str(tmp_path / "out"))
    assert record["status"] == "ok", record.get("reason")
    assert record["label_names"] == ["left", "right"]
    assert record["starts"] == [3 * 200, 12 * 200] and record["discontinuities"] == 1


def test_edf_plus_d_in_bids_without_events_tsv_keeps_the_edfs_annotations(tmp_path):
    root = tmp_path / "ds"
    folder = root / "sub-01" / "eeg"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    path = _edf_with_gap(folder / "sub-01_task-mi_eeg.edf", 5.0)
    raw = read_recording(path, bids_root=root)
    found = [(a["onset"], a["description"]) for a in raw.annotations]
    assert found == [(2.0, "T2"), (10.0, EDF_GAP_DESCRIPTION), (11.0, "T1")]
