"""BIDS datasets through ``prepare``: a subject's folder or one file of a dataset, derivatives
and sourcedata, datalad's links, subject ids (an audit of discovery and reading)."""

import json
import os

import mne
import numpy as np
import pytest

from eegfast.data.labels import infer_subject
from eegfast.data.prepare import discover, prepare
from eegfast.data.reading import BadRecording, read_recording

mne_bids = pytest.importorskip("mne_bids")

NAMES = ["Fp1", "Fp2", "F3", "C3", "C4", "O1", "O2"]


def _dataset(root, subjects=("01",), sessions=(None,), task="mi"):
    """A BIDS dataset of 30-s, 250-Hz EDF recordings (task ``mi``: ``left`` at 2 s, ``right``
    at 10 s, 4 s each, in events.tsv); returns the BIDSPath of each, in order."""
    written = []
    for i, (sub, ses) in enumerate((s, e) for s in subjects for e in sessions):
        x = np.random.default_rng(i).normal(size=(len(NAMES), 30 * 250)) * 2e-5
        raw = mne.io.RawArray(x, mne.create_info(NAMES, 250.0, "eeg"), verbose="error")
        raw.info["line_freq"] = 50
        raw.set_annotations(mne.Annotations([2.0, 10.0], [4.0, 4.0], ["left", "right"]))
        path = mne_bids.BIDSPath(subject=sub, session=ses, task=task, root=root, datatype="eeg")
        mne_bids.write_raw_bids(raw, path, format="EDF", allow_preload=True, verbose="error")
        written.append(path)
    return written


def _edit_tsv(path, fn):
    """Rewrites each row (a dict of the header's columns) of a sidecar .tsv with ``fn``."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # (mne-bids 0.17-0.18: a BOM)
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    rows = [fn(row) for row in rows]
    path.write_text("\n".join(["\t".join(header), *("\t".join(r.values()) for r in rows)]) + "\n")


def _mark_sidecars(bids_path):
    """channels.tsv: Fp1 bad, F3 an EOG channel; events.tsv: only the ``right`` event left."""

    def channels(row):
        if row["name"] == "Fp1":
            row["status"] = "bad"
        if row["name"] == "F3":
            row["type"] = "EOG"
        return row

    _edit_tsv(bids_path.copy().update(suffix="channels", extension=".tsv").fpath, channels)
    events = bids_path.copy().update(suffix="events", extension=".tsv").fpath
    events.write_text("onset\tduration\ttrial_type\n10.0\t4.0\tright\n")


def _records(out):
    return sorted(
        (json.loads(p.read_text()) for p in (out / "shards").glob("*.json")),
        key=lambda r: r["file"],
    )


@pytest.mark.parametrize("given", ["subject folder", "session folder", "file"])
def test_a_part_of_a_bids_dataset_is_read_with_its_sidecars(tmp_path, given):
    """A subject's folder, or one recording, of a BIDS dataset was read as plain files:
    channels.tsv's bad channels and channel types, and events.tsv's events were ignored (the
    windows held a bad and an EOG channel, and were labelled by the EDF's own annotations),
    and the task was the folder's name (``sub-01``, ``ses-a``, ``eeg``), not the dataset's."""
    root = tmp_path / "ds"
    (path,) = _dataset(root, sessions=("a",))
    _mark_sidecars(path)
    source = {
        "subject folder": root / "sub-01",
        "session folder": root / "sub-01" / "ses-a",
        "file": path.fpath,
    }[given]
    prepare([str(source)], tmp_path / "part", progress=False)
    prepare([str(root)], tmp_path / "whole", progress=False)
    (part,) = _records(tmp_path / "part")
    (whole,) = _records(tmp_path / "whole")
    assert part["status"] == "ok", part.get("reason")
    assert part["excluded"]["Fp1"] == "marked bad in the recording"
    assert part["excluded"]["F3"] == "eog channel"
    assert part["label_names"] == ["right"] and part["starts"] == [10 * 200]
    assert (part["task"], part["subject"]) == ("ds", "sub-01")
    for key in ("electrodes", "excluded", "starts", "label_names", "task", "subject"):
        assert part[key] == whole[key], key


def test_a_dataset_and_its_subject_folder_together_are_one_job_each(tmp_path):
    """Given with one of its subject folders, the dataset's recordings were under two tasks
    (``ds`` and ``sub-01``): an error ("also under task") instead of one job a recording."""
    root = tmp_path / "ds"
    _dataset(root, subjects=("01", "02"))
    jobs = discover([str(root), str(root / "sub-01")])
    assert len(jobs) == 2
    assert {j.task for j in jobs} == {"ds"} and {j.bids_root for j in jobs} == {str(root)}


def test_a_folder_of_bids_datasets_reads_raw_data_once(tmp_path):
    """A folder holding BIDS datasets: their derivatives/ and sourcedata/ copies were prepared
    as recordings too (each sample twice), and their raw files read without sidecars."""
    root = tmp_path / "all" / "ds"
    (path,) = _dataset(root)
    for extra in ("derivatives/clean/sub-01/eeg", "sourcedata/sub-01/eeg"):
        (root / extra).mkdir(parents=True)
        (root / extra / path.fpath.name).write_bytes(path.fpath.read_bytes())
    # a derivative dataset describes itself, so it is BIDS too: not raw data of ds either
    (root / "derivatives" / "clean" / "dataset_description.json").write_text("{}")
    jobs = discover([str(tmp_path / "all")])
    assert [(j.path, j.bids_root) for j in jobs] == [(str(path.fpath), str(root))]
    assert jobs[0].task == "all"  # the SRC folder's name, as for any folder
    # the derivative dataset given itself is read, with its own root
    (job,) = discover([str(root / "derivatives" / "clean")])
    assert job.bids_root == str(root / "derivatives" / "clean") and job.task == "clean"


def test_a_file_out_of_its_bids_place_is_read_plainly(tmp_path):
    """read_raw_bids reads the file at the place its name gives in the dataset: a copy in a
    derivatives/ folder without a dataset_description.json of its own, given as a file, was
    read through the dataset, so the raw recording was prepared in its place."""
    root = tmp_path / "ds"
    (path,) = _dataset(root)
    copy = root / "derivatives" / "sub-01" / "eeg" / path.fpath.name
    copy.parent.mkdir(parents=True)
    raw = mne.io.read_raw(path.fpath, preload=True, verbose="error")
    raw.set_annotations(None)
    mne.export.export_raw(copy, raw.crop(0, 20), fmt="edf", verbose="error")
    (job,) = discover([str(copy)])
    assert job.bids_root is None and job.task == "eeg"
    assert read_recording(copy).n_times < 30 * 250  # the copy (20 s), not the raw one (30 s)
    with pytest.raises(BadRecording, match="not at its place in the BIDS dataset"):
        read_recording(copy, bids_root=root)


def test_a_folder_in_a_dataset_out_of_its_layout_is_a_plain_folder(tmp_path):
    """derivatives/ (without a description of its own) or code/ given as SRC: read plainly,
    of their own folder's task (the sub-X/eeg layout below them is not the dataset's)."""
    root = tmp_path / "ds"
    (path,) = _dataset(root)
    for extra in ("derivatives", "code"):
        (root / extra / "sub-01" / "eeg").mkdir(parents=True)
        (root / extra / "sub-01" / "eeg" / path.fpath.name).write_bytes(path.fpath.read_bytes())
        (job,) = discover([str(root / extra)])
        assert (job.task, job.bids_root) == (extra, None)


def test_a_datalad_split_fif_is_prepared_once(tmp_path):
    """The parts of a split FIF recording in a datalad dataset are links to annex objects
    named by their hashes: told apart by the resolved names, the second part was also
    prepared as a recording of its own (its samples twice in the folder)."""
    root = tmp_path / "ds"
    folder = root / "sub-01" / "eeg"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    annex = tmp_path / "annex"
    annex.mkdir()
    x = np.random.default_rng(0).normal(size=(len(NAMES), 250 * 500)) * 2e-5  # 3.5 MB
    raw = mne.io.RawArray(x, mne.create_info(NAMES, 250.0, "eeg"), verbose="error")
    raw.save(annex / "sub-01_task-x_eeg.fif", split_size="3MB", split_naming="bids",
             verbose="error")  # fmt: skip
    parts = sorted(annex.iterdir())
    assert len(parts) == 2
    for i, part in enumerate(parts):
        object_path = annex / f"SHA256E-s{part.stat().st_size}--{i:064x}.fif"
        part.rename(object_path)
        os.symlink(object_path, folder / part.name)
    jobs = discover([str(root)])
    assert [j.path.rsplit("/", 1)[1] for j in jobs] == ["sub-01_task-x_split-01_eeg.fif"]


@pytest.mark.parametrize(
    ("path", "subject"),
    [
        ("/data/eeg_sub-set/ds/sub-01/ses-a/eeg/sub-01_ses-a_task-mi_eeg.edf", "sub-01"),
        ("/data/sub-studies/ds/sub-02/eeg/sub-02_task-rest_eeg.edf", "sub-02"),
        ("/bids/sub-03/eeg/sub-03_task-rest_eeg.edf", "sub-03"),
    ],
)
def test_the_subject_is_the_sub_entity_nearest_the_file(path, subject):
    """The first ``sub-`` in the path was taken: a folder above the dataset named like one made
    every recording of it one subject, and a subject-wise split of them impossible."""
    assert infer_subject(path) == (subject, "pattern")


def test_two_sessions_of_a_subject_are_one_subject(tmp_path):
    root = tmp_path / "ds"
    _dataset(root, subjects=("01", "02"), sessions=("a", "b"))
    report = prepare([str(root)], tmp_path / "out", progress=False)
    assert report["usable"] == 4 and report["subjects"] == ["sub-01", "sub-02"]


def test_a_dataset_of_several_bids_tasks_gives_a_task_each(tmp_path):
    """Two paradigms of one dataset (task-mi, task-rest) were one eegfast task named after the
    dataset, its classes the union of both: now one task each, whichever part of the dataset is
    given; a dataset of one BIDS task keeps the dataset's name, and TASK= names one task."""
    root = tmp_path / "ds"
    _dataset(root, subjects=("01", "02"))
    _dataset(root, subjects=("01",), task="rest")
    assert {job.task for job in discover([str(root)])} == {"ds-mi", "ds-rest"}
    assert {job.task for job in discover([str(root / "sub-02")])} == {"ds-mi"}
    assert {job.task for job in discover([f"both={root}"])} == {"both"}
    assert {job.task for job in discover([str(root)], default_task="all")} == {"all"}
    single = tmp_path / "one"
    _dataset(single, subjects=("01", "02"))
    assert {job.task for job in discover([str(single)])} == {"one"}
