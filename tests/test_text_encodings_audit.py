"""Text files are UTF-8 whatever the locale: the files eegfast writes (reports, CSV tables,
metrics.csv, config.yaml, JSON) and reads (index.json, records, meta.json, config files,
sidecars). Without ``encoding=`` Python uses the locale's encoding (cp1252 on Western Windows,
cp932 on Japanese Windows, ASCII under LC_ALL=C without UTF-8 mode): a subject "Łukasz" or a
task "Müller" then raised UnicodeEncodeError at the end of a run, or was written in a form
that other tools (and eegfast on another machine) read as other characters."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eegfast.data.prepare import _fingerprint
from eegfast.train.config import read_config_file

ROOT = Path(__file__).resolve().parents[1]
NAME = "\u0141\u00f3d\u017a M\u00fcller 5 \u00b5V"  # "Łódź Müller 5 µV": not all in cp1252

# Run in a locale whose encoding is ASCII: each call below failed there before its fix (the
# same calls on Windows failed, or wrote cp1252, for the characters outside cp1252).
_SCRIPT = r"""
import json, locale

out = {"encoding": locale.getpreferredencoding(False)}

from eegfast.fileio import write_text_atomic
write_text_atomic(folder / "report.md", f"# {name}\n")  # every report, CSV table, config.yaml

from eegfast.train.runlog import RunLogger, read_metrics
log = RunLogger(folder / "run", tensorboard=False)
log.log(1, {f"val/{name}": 0.5})
log.close()
out["tags"] = list(read_metrics(folder / "run" / "metrics.csv"))

from eegfast.train.config import read_config_file
(folder / "c.yaml").write_bytes(f"train:\n  run_name: {name}\n".encode())
out["config"] = read_config_file(folder / "c.yaml")["train"]["run_name"]

from eegfast.data.index import load_index
index = {"format_version": 1, "window_seconds": 4, "recordings": [],
         "tasks": {name: {"labels": [name]}}}
(folder / "prepared").mkdir()
(folder / "prepared" / "index.json").write_bytes(json.dumps(index, ensure_ascii=False).encode())
out["index"] = load_index(folder / "prepared")["tasks"][name]["labels"]

from eegfast.train.checkpoint import _read_meta_file
meta = {"step": 1, "task": name}
(folder / "meta.json").write_bytes(json.dumps(meta, ensure_ascii=False).encode())
out["meta"] = _read_meta_file(folder / "meta.json")["task"]
print(json.dumps(out))
"""


def _ascii_locale() -> dict[str, str]:
    """The environment of a process whose locale encoding is ASCII: the C locale without
    UTF-8 mode or locale coercion."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIO"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    return env


def test_text_files_are_utf8_in_a_non_utf8_locale(tmp_path):
    env = _ascii_locale()
    # (name and folder as ASCII escapes: the command line is decoded in the locale's encoding)
    script = (
        "from pathlib import Path\n"
        + f"name = {ascii(NAME)}\nfolder = Path({ascii(str(tmp_path))})\n"
        + _SCRIPT
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    out = json.loads(done.stdout.decode().splitlines()[-1])
    if out["encoding"].lower().replace("-", "") in ("utf8", "utf8mb4"):
        pytest.skip("no locale with another encoding than UTF-8 here")
    assert (tmp_path / "report.md").read_bytes() == f"# {NAME}\n".encode()
    assert out["tags"] == [f"val/{NAME}"]
    assert (tmp_path / "run" / "metrics.csv").read_bytes().decode("utf-8").count(NAME) == 1
    assert out["config"] == NAME
    assert out["index"] == [NAME]
    assert out["meta"] == NAME


@pytest.mark.parametrize("command", ["prepare", "finetune"])
def test_help_prints_in_a_non_utf8_locale(command):
    # "µV" and "±" in the help: UnicodeEncodeError where stdout cannot hold them (piped on
    # a Japanese Windows: cp932; LC_ALL=C), as for reports and file names printed later
    done = subprocess.run(
        [sys.executable, "-m", "eegfast", command, "--help"],
        capture_output=True,
        cwd=ROOT,
        env=_ascii_locale(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"\\xb5" in done.stdout or b"\\xb1" in done.stdout  # escaped, the rest as it is
    assert b"usage: eegfast " + command.encode() in done.stdout


def test_a_toml_config_saved_with_a_byte_order_mark_reads(tmp_path):
    # Notepad's "UTF-8 with BOM" and PowerShell 5's `Set-Content -Encoding UTF8` start the
    # file with one: tomllib said "Invalid statement (at line 1, column 1)"
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbf[train]\nrun_name = '" + NAME.encode() + b"'\n")
    assert read_config_file(config) == {"train": {"run_name": NAME}}
    (tmp_path / "c.yaml").write_bytes(b"\xef\xbb\xbftrain:\n  run_name: " + NAME.encode() + b"\n")
    assert read_config_file(tmp_path / "c.yaml") == {"train": {"run_name": NAME}}


@pytest.mark.parametrize("codepage", ["UTF-8", None])
def test_a_utf8_brainvision_header_names_its_files(tmp_path, codepage):
    # A UTF-8 header (the format's default; MNE reads it so) read as Latin-1 named
    # "MÃ¼ller.eeg", not there: the marker file was not fingerprinted, and a later run
    # reused the output made from it after it was edited
    stem = "M\u00fcller"
    lines = ["Brain Vision Data Exchange Header File Version 1.0", "[Common Infos]"]
    lines += [f"Codepage={codepage}"] if codepage else []
    lines += [f"DataFile={stem}.eeg", f"MarkerFile={stem}.vmrk", ""]
    header = tmp_path / f"{stem}.vhdr"
    header.write_bytes("\r\n".join(lines).encode())
    (tmp_path / f"{stem}.eeg").write_bytes(b"\0" * 8)
    (tmp_path / f"{stem}.vmrk").write_bytes(b"markers")
    companions = _fingerprint(header)["companions"]
    assert companions[f"{stem}.eeg"] == [8, (tmp_path / f"{stem}.eeg").stat().st_mtime_ns]
    assert companions[f"{stem}.vmrk"] is not None
    # an older ANSI header (cp1252) still names its files
    (tmp_path / "a.vhdr").write_bytes(b"Codepage=ANSI\nDataFile=M\xfcller.eeg\n")
    assert _fingerprint(tmp_path / "a.vhdr")["companions"][f"{stem}.eeg"] is not None


def _unspecified_encodings(path: Path) -> list[str]:
    """``open``/``Path.open``/``read_text``/``write_text`` calls in text mode without an
    ``encoding=`` in the file ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in ("read_text", "write_text"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        elif name == "open":
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if func.value.id in ("os", "archive", "tarfile", "zipfile"):
                    continue  # not a text file
            # the mode: open(file, mode) / path.open(mode)
            args = node.args[1:] if isinstance(func, ast.Name) else node.args
            mode = (
                args[0] if args else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            if isinstance(mode, ast.Constant) and "b" in str(mode.value):
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_text_file_of_the_package_names_its_encoding():
    # the locale's encoding is the platform's (cp1252 on Windows): every text file eegfast
    # reads or writes is UTF-8 (BIDS sidecars are by definition, the rest eegfast writes)
    found = [s for p in sorted((ROOT / "eegfast").rglob("*.py")) for s in _unspecified_encodings(p)]
    assert found == []
