"""Audit of the sample fetcher and of ``ShardDataset`` indexing (found in a review)."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast import datasets
from eegfast.data import ShardDataset
from eegfast.data.labels import LabelRules
from eegfast.data.prepare import Settings, prepare
from eegfast.data.preprocess import PreprocessConfig
from eegfast.datasets import SAMPLE_FILES, SampleDataError, sample


@pytest.fixture(scope="module")
def prepared(sample_files, tmp_path_factory):
    """One 19-channel arithmetic recording in 2-s windows."""
    out = tmp_path_factory.mktemp("prepared-audit")
    settings = Settings(
        preprocess=PreprocessConfig(window_seconds=2),
        labels=LabelRules(filename_rules=(("_2$", "task"),)),
    )
    prepare([f"arith={sample_files['Subject00_2.edf']}"], out, settings, progress=False)
    return out


@pytest.fixture
def fake_download(sample_files, monkeypatch):
    """pooch.retrieve replaced by a copy from the local sample folder (no network here)."""
    import pooch

    calls = []

    def retrieve(url, known_hash, fname, path, progressbar):
        calls.append(url)
        shutil.copy(sample_files[fname], Path(path) / fname)
        return str(Path(path) / fname)

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    return calls


# --- eegfast.datasets -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_local_folder_mirror_is_named_not_a_checksum_failure(tmp_path, monkeypatch, how):
    """A local folder as the mirror (pooch downloads only URLs) was reported as "download of
    S001R04.edf ... failed its SHA-256 check (Unrecognized URL protocol 'file' ...)"."""
    folder = tmp_path / "my-copy"
    folder.mkdir()
    monkeypatch.delenv("EEGFAST_SAMPLE_MIRROR", raising=False)
    kwargs = {"mirror": str(folder)} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("EEGFAST_SAMPLE_MIRROR", str(folder))
    name = "mirror" if how == "argument" else "EEGFAST_SAMPLE_MIRROR"
    with pytest.raises(SampleDataError, match=f"{name}: .*is not a URL.*EEGFAST_DATA") as info:
        sample(locations=[], cache=tmp_path / "cache", **kwargs)
    assert "SHA-256" not in str(info.value)
    assert not (tmp_path / "cache").exists()  # refused before anything was made


def test_mirror_urls_pooch_downloads_are_accepted(tmp_path, fake_download):
    for mirror in ("https://example.org/eeg/", "FTP://example.org/eeg", "doi:10.5281/zenodo.1"):
        cache = tmp_path / mirror.split(":")[0]
        assert sample(locations=[], mirror=mirror, cache=cache)[0].parent == cache


def test_incomplete_attribution_notice_is_written_again(tmp_path, sample_files, fake_download):
    """A notice cut short by an interrupted write was kept for ever (only its existence was
    checked), so the cache's data travelled without their full attribution."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in SAMPLE_FILES[1:]:
        shutil.copy(sample_files[f.name], cache / f.name)
    (cache / "ATTRIBUTION.txt").write_text(datasets.ATTRIBUTION[:40])
    sample(locations=[], mirror="http://127.0.0.1:9/", cache=cache)
    assert fake_download == [f"http://127.0.0.1:9/{SAMPLE_FILES[0].name}"]
    assert (cache / "ATTRIBUTION.txt").read_text() == datasets.ATTRIBUTION + "\n"


def test_interrupted_attribution_write_leaves_no_partial_notice(
    tmp_path, fake_download, monkeypatch
):
    """The notice was written in place: a Ctrl-C part-way left a truncated ATTRIBUTION.txt."""
    real_write_text = Path.write_text

    def write_half_then_interrupt(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_half_then_interrupt)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        sample(locations=[], mirror="http://127.0.0.1:9/", cache=cache)
    monkeypatch.undo()
    notice = cache / "ATTRIBUTION.txt"
    assert not notice.exists() or notice.read_text() == datasets.ATTRIBUTION + "\n"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f.name for f in SAMPLE_FILES)


# --- ShardDataset indexing ------------------------------------------------------------------


def test_non_integer_index_is_refused(prepared):
    """``ds[2.7]`` returned item 2 and ``get_batch([1.5])`` item 1, without a word."""
    ds = ShardDataset(prepared)
    assert ds[np.int64(3)]["window"] == ds[torch.tensor(3)]["window"] == ds[3]["window"] == 3
    with pytest.raises(TypeError, match="index: expected an int, got float"):
        ds[2.7]
    with pytest.raises(TypeError, match="indices: expected integers, got dtype float64"):
        ds.get_batch([1.5, 2.0])
    with pytest.raises(TypeError, match="indices: expected integers, got dtype bool"):
        ds.get_batch([True, False])


def test_get_batch_negative_and_out_of_range_indices(prepared):
    """A negative index came back as itself in ``batch["index"]`` (not the item it read), and
    an index past the end raised numpy's "index 91 is out of bounds for axis 0" naming no
    argument."""
    ds = ShardDataset(prepared)
    n = len(ds)
    batch = ds.get_batch([-1, 0, -n])
    assert sorted(batch["index"].tolist()) == [0, 0, n - 1]
    for row, item in zip(batch["x"], batch["index"].tolist(), strict=True):
        torch.testing.assert_close(row, ds[item]["x"], rtol=0, atol=0)
    for bad in ([0, n], [-n - 1]):
        with pytest.raises(IndexError, match=f"indices: .* out of range for {n} windows"):
            ds.get_batch(bad)


def test_a_subject_filter_matching_nothing_warns(prepared):
    # ints for string subject ids (or a typo) gave an empty data set without a word
    have = ShardDataset(prepared).subjects
    with pytest.warns(UserWarning, match=r"subjects: none of \[1\]"):
        empty = ShardDataset(prepared, subjects=[1])
    assert len(empty) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a filter matching some subjects is quiet
        assert len(ShardDataset(prepared, subjects=[have[0], "not-here"])) > 0
