"""The source distribution holds what building it needs.

setuptools puts the Python packages and the listed extension sources into an sdist, but not
``csrc/sources.txt`` (which setup.py reads before anything is built), the headers, the CUDA
sources or the CMake build: ``pip install eegfast-<version>.tar.gz`` failed on the missing
source list. MANIFEST.in adds them; this builds an sdist of a copy of the checkout's tracked
files and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the sdist is built from the tracked files")
    return listed


@pytest.mark.slow
def test_sdist_holds_every_native_source_header_and_the_source_list(tmp_path):
    pytest.importorskip("setuptools")
    tracked = _tracked_files()
    copy = tmp_path / "src"
    for name in tracked:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
        cwd=copy,
        check=True,
        capture_output=True,
    )
    (archive,) = (tmp_path / "dist").glob("eegfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {n for n in tracked if n.startswith("csrc/")} | {"CMakeLists.txt", "setup.py"}
    needed |= {n for n in tracked if n.startswith("eegfast/") and n.endswith(".py")}
    assert "csrc/sources.txt" in needed
    assert not needed - names, sorted(needed - names)
    assert not {n for n in names if n.endswith((".so", ".o"))}
