"""Packaging and build plumbing: `eegfast doctor` where the extension is required, the
Makefile's rebuild stamp, the CMake build's C++ standard and the version's two spellings."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import eegfast
from eegfast import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh Python importing torch and eegfast
def test_doctor_reports_when_the_required_extension_is_missing():
    """Under EEGFAST_REQUIRE_EXT=1 (what CI exports) a missing extension raised at the import of
    eegfast.ops: a traceback instead of the report that says why it is missing. A fresh process,
    where importing eegfast._C fails, as an unbuilt or broken one does."""
    code = (
        "import sys\n"
        "sys.modules['eegfast._C'] = None  # the import raises ImportError\n"
        "from eegfast import cli\n"
        "raise SystemExit(cli.main(['doctor']))\n"
    )
    env = {**os.environ, "EEGFAST_REQUIRE_EXT": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "kernel backends" in done.stdout
    assert re.search(r"^  cpu +no +eegfast\._C could not be imported", done.stdout, re.M)
    assert "EEGFAST_REQUIRE_EXT=1" in done.stdout  # the environment as set, not as lifted
    assert "EEGFAST_REQUIRE_EXT=1 but the native extension is missing" in done.stderr


def test_doctor_names_a_require_ext_value_that_is_not_a_switch(monkeypatch, capsys):
    monkeypatch.setenv("EEGFAST_REQUIRE_EXT", "maybe")
    assert cli.main(["doctor", "--json"]) == 2
    captured = capsys.readouterr()
    assert "EEGFAST_REQUIRE_EXT='maybe' is not a switch" in captured.err
    assert json.loads(captured.out)["environment"]["EEGFAST_REQUIRE_EXT"] == "maybe"
    assert os.environ["EEGFAST_REQUIRE_EXT"] == "maybe"  # put back after the report


def test_doctor_leaves_an_unset_require_ext_unset(monkeypatch, capsys):
    monkeypatch.delenv("EEGFAST_REQUIRE_EXT", raising=False)
    assert cli.main(["doctor", "--json"]) == 0
    assert "EEGFAST_REQUIRE_EXT" not in json.loads(capsys.readouterr().out)["environment"]
    assert "EEGFAST_REQUIRE_EXT" not in os.environ


def _stamp_is_current(tree: Path) -> bool:
    """`make -q` on the Makefile's install stamp: whether make would leave the build alone."""
    # Under `make test` this make inherits the outer one's MAKEFLAGS: `make test VENV=env`
    # (or an exported VENV) made the stamp env/.eegfast-installed, and .venv's one, without a
    # rule then, was always current.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "-q", "VENV=.venv", ".venv/.eegfast-installed"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize(
    "changed",
    ["csrc/sources.txt", "csrc/qk_norm_attention/qk_norm_attention_kernels.h", "pyproject.toml"],
)
def test_make_rebuilds_when_the_source_list_a_header_or_pyproject_changes(tmp_path, changed):
    """A source dropped from csrc/sources.txt (or moved to or from its cuda: lines) changes what
    is built with no listed file newer than the stamp: the list itself must be a prerequisite."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    for name in ("Makefile", "setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tree / name)
    stamp = tree / ".venv" / ".eegfast-installed"
    stamp.parent.mkdir()
    stamp.touch()
    files = [p for p in tree.rglob("*") if p.is_file() and p != stamp]
    for path in files:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    os.utime(stamp, (1_000_000_100, 1_000_000_100))
    assert _stamp_is_current(tree)
    os.utime(tree / changed, (1_000_000_200, 1_000_000_200))
    assert not _stamp_is_current(tree)


def _torch_extension_cxx_standard() -> int:
    """The C++ standard torch's extension builder (setup.py's build) compiles with."""
    import torch.utils.cpp_extension

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(torch.utils.cpp_extension))
    if not found:
        pytest.skip("torch.utils.cpp_extension names no -std=c++NN flag")
    return max(int(n) for n in found)


@pytest.mark.slow  # CMake's configure step, finding Torch
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_cmake_compiles_with_the_cxx_standard_of_setup_py(tmp_path):
    """CMakeLists.txt pinned C++17 while setup.py's build takes torch's standard (C++20 from
    torch 2.13): `make cmake-check` checked a build unlike the installed one. Configure only."""
    build = tmp_path / "build"
    configured = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        ],
        capture_output=True,
        text=True,
    )
    if configured.returncode != 0 and "Could NOT find" in configured.stderr:
        pytest.skip(f"CMake finds no Torch/OpenMP/Python here: {configured.stderr[-300:]}")
    assert configured.returncode == 0, configured.stderr
    commands = json.loads((build / "compile_commands.json").read_text())
    standards = {
        re.search(r"-std=(?:c|gnu)\+\+(\d+)", c["command"]).group(1)
        for c in commands
        if c["file"].endswith(".cpp")
    }
    assert standards == {str(_torch_extension_cxx_standard())}


def test_version_agrees_between_pyproject_and_the_package():
    """Two spellings of one version: `eegfast --version` and doctor print eegfast.__version__,
    pip and the wheel's name take pyproject's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == eegfast.__version__


def test_package_metadata_has_the_license_without_a_deprecated_form(tmp_path):
    # pyproject's `license = {text = ...}` table is deprecated from setuptools 77 (builds
    # refused from 2027-02-18); setup.py gives the license in the form the building setuptools
    # takes. Metadata only (egg_info compiles nothing).
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "eegfast", tmp_path / "eegfast", ignore=shutil.ignore_patterns("*.so"))
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info"],
        cwd=tmp_path,
        env={**os.environ, "EEGFAST_CUDA": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "license" not in run.stderr.lower(), run.stderr
    info = (tmp_path / "eegfast.egg-info" / "PKG-INFO").read_text()
    assert re.search(r"^License(-Expression)?: Apache-2.0$", info, re.MULTILINE), info
