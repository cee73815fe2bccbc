"""eegfast.fileio: atomic writes leave the old file or the new one, never a partial one."""

import os
import stat

import numpy as np
import pytest

from eegfast.fileio import (
    is_temporary,
    remove_stale_temporaries,
    write_atomic,
    write_json_atomic,
    write_npy_atomic,
    write_text_atomic,
)


def test_writes_and_permissions_of_a_plain_open(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    write_json_atomic(tmp_path / "b.json", {"x": tmp_path})  # Paths become strings
    assert str(tmp_path) in (tmp_path / "b.json").read_text()
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_npy_atomic(tmp_path / "c.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy", mmap_mode="r"), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "c.npy", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    seen = []

    def killed(tmp):  # a writer killed mid-write leaves its temporary behind
        seen.append(tmp)
        tmp.write_text("partial")
        (tmp_path / "left-behind").write_text(tmp.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.npy", killed)
    assert is_temporary(seen[0]) and not seen[0].exists()  # cleaned up on an exception
    (tmp_path / (tmp_path / "left-behind").read_text()).write_text("partial")  # not on a kill
    (tmp_path / "left-behind").unlink()
    (tmp_path / "keep.tmp-notdotted").write_text("mine")
    assert not is_temporary(tmp_path / "keep.tmp-notdotted")
    assert remove_stale_temporaries(tmp_path) == 1
    assert remove_stale_temporaries(tmp_path / "missing") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tmp-notdotted"]


def test_json_default_stringifies_unless_strict(tmp_path):
    write_json_atomic(tmp_path / "lenient.json", {"p": tmp_path})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(tmp_path / "strict.json", {"p": tmp_path}, default=None)
    assert not (tmp_path / "strict.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenient.json"]


@pytest.mark.parametrize("fail_in", ["write", "fsync", "short write"])
def test_a_full_disk_names_the_target_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path, monkeypatch, fail_in
):
    """ENOSPC from the write (no file named) or from fsync (the temporary named, a file gone
    once the error is seen), or numpy's short write (no errno), is an OSError naming the file
    being written."""
    import errno

    import eegfast.fileio as fileio

    path = write_text_atomic(tmp_path / "index.json", "old")

    def full(*filename: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *filename)

    def writer(tmp):
        if fail_in == "write":
            full()
        if fail_in == "short write":  # what ndarray.tofile raises on a full disk
            raise OSError("30400 requested and 2016 written")
        tmp.write_text("new")

    if fail_in == "fsync":
        monkeypatch.setattr(fileio, "fsync_file", lambda tmp: full(str(tmp)))
    with pytest.raises(OSError) as raised:
        write_atomic(path, writer)
    assert str(path) in str(raised.value)
    if fail_in == "short write":
        assert "30400 requested and 2016 written" in str(raised.value)
        assert "bytes free on its disk" in str(raised.value)
    else:
        assert raised.value.errno == errno.ENOSPC
        assert raised.value.filename == str(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_a_permission_error_stays_a_permission_error_naming_the_target(tmp_path):
    import errno

    def refused(tmp):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(PermissionError) as raised:
        write_atomic(tmp_path / "a.npy", refused)
    assert raised.value.filename == str(tmp_path / "a.npy")
    assert list(tmp_path.iterdir()) == []


def test_an_overwritten_file_keeps_its_permissions(tmp_path):
    """A plain open() of an existing file keeps its mode; the atomic write gave the new file
    0666 less the umask, so a private (0600) file became readable by others."""
    import os
    import stat

    from eegfast.fileio import write_text_atomic

    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    write_text_atomic(private, "{}\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    fresh = write_text_atomic(tmp_path / "new.json", "{}\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
