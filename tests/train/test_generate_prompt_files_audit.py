"""Audit of `eegfast generate --prompt FILE`: .npz prompts that declare more than they hold
(a zip bomb), members that are no arrays, and prompt paths that are no regular file."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from eegfast.train.commands import generate
from eegfast.train.commands.generate import GenerateError, load_prompt


def _deflated_zeros_npz(path, shape: tuple[int, int]):
    """A .npz whose 'x' is float32 zeros of ``shape``, deflated (1000:1: small on disk, all
    of it decompressed by a load), with 'channels' naming its rows."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(member, header)
            left, chunk = 4 * shape[0] * shape[1], bytes(1 << 22)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        with archive.open("channels.npy", "w") as member:
            np.lib.format.write_array(member, np.array(["FP1", "CZ", "O1"][: shape[0]]))
    return path


def test_an_npz_prompt_longer_than_the_limit_is_refused_before_it_is_read(tmp_path):
    """A .npz member is decompressed whole into the array its header declares: a small file
    of deflated zeros declaring hours x many channels asked for that memory and time (a zip
    bomb). Its header is now checked first: 24 h at most (a 65 kB file here, 69 MB loaded)."""
    samples = 24 * 3600 * 200 + 200  # (the limit: generate.MAX_NPZ_PROMPT_SECONDS)
    assert getattr(generate, "MAX_NPZ_PROMPT_SECONDS", 24 * 3600) == 24 * 3600
    path = _deflated_zeros_npz(tmp_path / "bomb.npz", (1, samples))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(GenerateError, match=r"--prompt bomb\.npz: .*more than 24 h at 200 Hz"):
        load_prompt(path)
    # within the limit it is read as before
    prompt = load_prompt(_deflated_zeros_npz(tmp_path / "ok.npz", (3, 2000)), prompt_seconds=4)
    assert prompt.x.shape == (3, 800) and prompt.names == ("FP1", "CZ", "O1")


@pytest.mark.parametrize(
    ("shape", "message"),
    [((500, 400), "more rows than the 128 electrodes"), ((1, 1, 400), r"expected \(C, T\)")],
)
def test_an_npz_prompt_of_another_shape_is_refused_before_it_is_read(tmp_path, shape, message):
    """Checked from the header: a 3-D 'x' escaped the limit on its length."""
    path = tmp_path / "rows.npz"
    np.savez(path, x=np.zeros(shape, np.float32), channels=np.array(["FP1"] * shape[0]))
    with pytest.raises(GenerateError, match=rf"rows\.npz: not a readable .*{message}"):
        load_prompt(path)


def test_an_npz_member_that_is_no_array_is_a_named_error(tmp_path):
    """np.load returns a member that is not a .npy file as bytes: 'x' of raw bytes was an
    AttributeError traceback ('bytes' object has no attribute 'ndim')."""
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x", b"not an array")
        with archive.open("channels.npy", "w") as member:
            np.lib.format.write_array(member, np.array(["FP1"]))
    with pytest.raises(GenerateError, match=r"--prompt raw\.npz: not a readable .*member x"):
        load_prompt(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_prompt_that_is_no_regular_file_says_so(tmp_path):
    """A FIFO given as --prompt was reported as "file not found"."""
    fifo = tmp_path / "prompt.npz"
    os.mkfifo(fifo)
    with pytest.raises(GenerateError, match=f"--prompt: not a regular file: {fifo}"):
        load_prompt(fifo)
    with pytest.raises(GenerateError, match="--prompt: file not found"):
        load_prompt(tmp_path / "missing.npz")
