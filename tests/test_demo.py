"""The end-to-end demo (eegfast/demo.py) on the bundled real EEG files."""

import json

import pytest

from eegfast import demo

DATA_DIR = demo.REPO_ROOT.parent / "shared" / "data"
EXPECTED = {  # file: (EEG channels after dropping ECG and A2-A1, whole seconds)
    "S001R04.edf": (64, 125),
    "S001R08.edf": (64, 125),
    "Subject00_1.edf": (19, 182),
    "Subject00_2.edf": (19, 62),
    "Subject01_1.edf": (19, 182),
    "Subject01_2.edf": (19, 62),
}


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no sample data folder {DATA_DIR}")
def test_demo_on_the_bundled_eeg(tmp_path, capsys):
    assert demo.main(["--data", str(DATA_DIR), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ODC-By 1.0" in out and "README.md" in out
    assert "cpu" in out.split("\n\n")[0]  # the backends table comes first

    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["lookup_matches_reference"] is True
    assert summary["lookup_mismatches"] == {"kmeans_codebook": 0, "ema_codebook": 0}
    assert summary["num_codes"] == 512 and summary["dim"] == 32
    files = {f["file"]: f for f in summary["files"]}
    assert set(files) == set(EXPECTED)
    for name, (channels, seconds) in EXPECTED.items():
        assert (files[name]["channels"], files[name]["seconds"]) == (channels, seconds)
        assert files[name]["patches"] == channels * seconds
        assert 1 <= files[name]["codes_used"] <= min(512, files[name]["patches"])
        assert 0 < files[name]["usage"] <= 1
        assert 1 <= files[name]["perplexity"] <= files[name]["codes_used"]
    assert summary["num_patches"] == sum(c * s for c, s in EXPECTED.values())
    assert 0 < summary["overall"]["usage"] <= 1
    assert summary["ema_steps"] > 0
    assert summary["timing_ms"]["cpu"] > 0 and summary["timing_ms"]["reference"] > 0
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_missing_data_folder_exits_2_naming_the_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert demo.main(["--data", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "EEGFAST_DATA" in err
    assert not (tmp_path / "out").exists()


def test_folder_without_edf_files_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no EEG here")
    assert demo.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "EEGFAST_DATA" in err


def test_data_folder_comes_from_eegfast_data_else_where_the_sample_is(
    monkeypatch, tmp_path, capsys
):
    """Without EEGFAST_DATA the demo reads the sample where eegfast.datasets.sample() finds it
    (its cache included, as the quickstart does; it looked only at ../shared/data), and says in
    one line when it can neither find nor download it."""
    from eegfast import datasets

    monkeypatch.setenv("EEGFAST_DATA", str(tmp_path))
    assert demo.default_data_dir() == tmp_path
    monkeypatch.delenv("EEGFAST_DATA")
    assert demo.default_data_dir() == datasets.sample(download=False)[0].parent
    cache = tmp_path / "cache" / "eegfast" / "sample"
    cache.mkdir(parents=True)
    for f in datasets.SAMPLE_FILES:  # a copy in the cache, with ../shared/data gone
        (cache / f.name).write_bytes((DATA_DIR / f.name).read_bytes())
    monkeypatch.setattr(datasets, "SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert demo.default_data_dir() == cache
    for f in datasets.SAMPLE_FILES:
        (cache / f.name).unlink()
    monkeypatch.setenv("EEGFAST_SAMPLE_MIRROR", "http://127.0.0.1:9/")  # no network
    assert demo.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m eegfast.demo: could not download") and "EEGFAST_DATA" in err


def test_license_note_without_a_readme_gives_the_attribution(tmp_path):
    """A data folder without README.md (the download cache, an EEGFAST_DATA folder) was
    credited with "attribution and citations in <folder>/README.md", a file that is not there."""
    from eegfast.datasets import ATTRIBUTION

    assert demo.license_note(tmp_path) == ATTRIBUTION
    assert "README.md" not in demo.license_note(tmp_path)
    (tmp_path / "README.md").write_text("attribution")
    assert str(tmp_path / "README.md") in demo.license_note(tmp_path)
    assert "ODC-By 1.0" in demo.license_note(tmp_path)
