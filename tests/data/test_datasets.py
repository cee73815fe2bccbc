import functools
import http.server
import shutil
import threading

import pytest

from eegfast import datasets
from eegfast.datasets import SAMPLE_FILES, SampleDataError, sample, verify_sample


@pytest.fixture(scope="module")
def sample_dir():
    """The real sample folder (../shared/data in a checkout), found the normal way."""
    try:
        return sample(download=False)[0].parent
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")


@pytest.fixture
def serve():
    """Serve a folder over HTTP on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def start(folder):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_sample_found_without_download(sample_dir):
    paths = sample(download=False)
    assert [p.name for p in paths] == [f.name for f in SAMPLE_FILES]
    assert all(p.is_file() for p in paths)


def test_sample_checksums(sample_dir):
    assert verify_sample(sample_dir) == []


def test_env_var_wins(sample_dir, tmp_path, monkeypatch):
    mirror = tmp_path / "mine"
    mirror.mkdir()
    for f in SAMPLE_FILES:
        (mirror / f.name).symlink_to(sample_dir / f.name)
    monkeypatch.setenv("EEGFAST_DATA", str(mirror))
    assert sample(download=False, cache=tmp_path / "cache")[0].parent == mirror


def test_explicit_path_must_hold_files(tmp_path):
    with pytest.raises(SampleDataError, match="path: .* does not hold the sample files"):
        sample(tmp_path)


def test_no_download_when_disallowed(tmp_path):
    with pytest.raises(SampleDataError, match="download=False"):
        sample(download=False, locations=[tmp_path / "nowhere"])


def test_download_from_local_server(sample_dir, tmp_path, serve):
    url = serve(sample_dir)
    cache = tmp_path / "cache"
    paths = sample(locations=[], mirror=url, cache=cache)
    assert [p.parent for p in paths] == [cache] * len(SAMPLE_FILES)
    assert verify_sample(cache) == []
    assert datasets.ATTRIBUTION in (cache / "ATTRIBUTION.txt").read_text()
    # the cache is now found first, without touching the server
    assert sample(download=False, cache=cache, locations=[cache]) == paths


def _copy_with_one_file_damaged(source, folder, name, offset, bits):
    """The six sample files copied into ``folder``, ``name`` with the byte at ``offset``
    XOR-ed with ``bits`` (the same size, other bytes); returns that file's path."""
    folder.mkdir()
    for f in SAMPLE_FILES:
        shutil.copy(source / f.name, folder / f.name)
    victim = folder / name
    data = bytearray(victim.read_bytes())
    data[offset] ^= bits
    victim.write_bytes(bytes(data))
    return victim


def test_download_checksum_mismatch_leaves_nothing(sample_dir, tmp_path, serve):
    bad = tmp_path / "bad-mirror"
    victim = _copy_with_one_file_damaged(sample_dir, bad, SAMPLE_FILES[2].name, 5000, 0xFF)
    url = serve(bad)
    cache = tmp_path / "cache"
    with pytest.raises(SampleDataError, match=f"{victim.name} .*SHA-256"):
        sample(locations=[], mirror=url, cache=cache)
    names = sorted(p.name for p in cache.iterdir())
    # the files before the bad one were verified and kept; nothing else (no temp files)
    assert names == sorted(f.name for f in SAMPLE_FILES[:2])


def test_download_unreachable(tmp_path, serve):
    url = serve(tmp_path / "empty")  # folder does not exist -> 404
    with pytest.raises(SampleDataError, match="could not download S001R04.edf"):
        sample(locations=[], mirror=url, cache=tmp_path / "cache")


def test_cache_file_damaged_in_place_is_downloaded_again(sample_dir, tmp_path, serve):
    """A cached file with the published size but other bytes was found (sizes only were
    checked) and read as the sample."""
    cache = tmp_path / "cache"
    victim = _copy_with_one_file_damaged(sample_dir, cache, SAMPLE_FILES[0].name, 100_000, 0x01)
    with pytest.raises(SampleDataError, match="not found in"):
        sample(download=False, locations=[cache], cache=cache)
    paths = sample(locations=[cache], mirror=serve(sample_dir), cache=cache)
    assert paths[0] == victim and verify_sample(cache) == []


@pytest.mark.parametrize("below", ["", "sub"])
def test_cache_that_cannot_be_created_is_a_sample_data_error(tmp_path, below):
    """A cache folder that cannot be made (here: a file stands in its way) was a bare
    FileExistsError / NotADirectoryError, with no word on what to do."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = blocker / below if below else blocker
    with pytest.raises(SampleDataError, match=f"cannot create the sample cache folder {cache}"):
        sample(locations=[], mirror="http://127.0.0.1:9/", cache=cache)
