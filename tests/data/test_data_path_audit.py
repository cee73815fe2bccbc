"""Audit of the data path: index.json's size, prompt and shard files that are not what they
claim (zip bombs, FIFOs), and prepare's workers in a script without a main guard."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import mne
import numpy as np
import pytest

from eegfast.data.index import load_index
from eegfast.data.prepare import Settings, discover, prepare, process_file
from eegfast.data.preprocess import PreprocessConfig

NAMES = ["FP1", "CZ", "O1"]


def _fif(path, seconds: float = 20.0, sfreq: float = 250.0):
    rng = np.random.default_rng(len(path.name))
    data = 2e-5 * rng.standard_normal((len(NAMES), int(seconds * sfreq)))
    info = mne.create_info(NAMES, sfreq, "eeg")
    mne.io.RawArray(data, info, verbose="error").save(path, overwrite=True, verbose="error")
    return path


def test_json_text_is_json_with_plain_lists_on_one_line():
    from eegfast.data.prepare import _json_text

    payload = {
        "a": [1, 2, 3],
        "nested": {"names": ["FP1", "CZ"], "empty": [], "none": {}, 1: 0.5, 2.5: None, None: True},
        "rows": [{"x": [0.25, float("nan")]}, [1, [2, 3]], "é"],
        "pair": (1, 2),
    }
    text = _json_text(payload)
    expected = json.dumps(payload, indent=1)
    # the same JSON value (NaN compared by its text)
    assert json.dumps(json.loads(text)) == json.dumps(json.loads(expected))
    assert '"a": [1, 2, 3]' in text and '"names": ["FP1", "CZ"]' in text
    with pytest.raises(TypeError):  # never stringified
        _json_text({"n": np.int64(3)})
    with pytest.raises(TypeError):
        _json_text({(1, 2): 0})


def test_index_json_lines_do_not_grow_with_the_windows(tmp_path):
    """index.json (and each record) put every window's start and label on a line of its own
    (indent=1): a corpus of 2M windows gave a 40 MB file of 4M lines. Now a recording's lists
    are one line each, and the index loads as before."""
    src = _fif(tmp_path / "long_raw.fif", seconds=120.0)
    # 1-s windows, 0.25-s stride: 477 windows
    settings = Settings(preprocess=PreprocessConfig(window_seconds=1, stride_seconds=0.25))
    report = prepare([str(src)], tmp_path / "out", settings, progress=False)
    assert report["windows"] > 400
    text = (tmp_path / "out" / "index.json").read_text()
    assert text.count("\n") < 80
    index = load_index(tmp_path / "out")
    [entry] = index["recordings"]
    assert entry["n_windows"] == report["windows"] == len(entry["starts"])
    assert entry["starts"][:3] == [0, 50, 100]
    [record] = (tmp_path / "out" / "shards").glob("*.json")
    assert record.read_text().count("\n") < 80
    assert json.loads((tmp_path / "out" / "report.json").read_text())["windows"] == len(
        entry["starts"]
    )


def test_workers_in_a_script_without_main_guard_give_one_clear_error(tmp_path):
    """A script calling `eegfast prepare --workers 2` outside `if __name__ == "__main__":`
    with a start method that runs the script again in each worker (spawn; forkserver once
    torch is imported) reported every recording bad, "the process preparing it died (exit
    code 1)". Now the run stops with one error saying what to do."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a_raw.fif", "b_raw.fif"):
        _fif(src / name)
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing
            import sys

            import eegfast.data.prepare as prepare_module
            from eegfast.cli import main

            # spawn (what macOS and Windows use): like forkserver, it runs this script again
            prepare_module._pool_context = lambda: multiprocessing.get_context("spawn")
            sys.exit(main(["prepare", {str(src)!r}, "--out", {str(tmp_path / "out")!r},
                           "--workers", "2", "--no-progress"]))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "died (exit code" not in done.stderr + done.stdout
    [line] = [x for x in done.stderr.splitlines() if x.startswith("eegfast prepare:")]
    assert "could not start" in line and 'if __name__ == "__main__":' in line
    assert str(script) in line and "--workers 1" in line
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_fifo_in_place_of_a_shard_is_refused_not_waited_on(tmp_path):
    """A FIFO under a shard's name (a folder assembled with named pipes, a copy tool's
    artefact) blocked the data set's open until something wrote to it: a hang, naming
    nothing. Now it is a ValueError naming the shard."""
    from eegfast.data.dataset import ShardDataset

    prepare([str(_fif(tmp_path / "a_raw.fif"))], tmp_path / "out", progress=False)
    [shard] = (tmp_path / "out" / "shards").glob("*.npy")
    shard.unlink()
    os.mkfifo(shard)

    def blocked(*_):  # only so that a regression fails instead of hanging the suite
        raise AssertionError("reading the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match=f"{shard.name}: not a regular file"):
            ShardDataset(tmp_path / "out")[0]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_fifo_given_as_a_recording_is_bad_with_a_clear_reason(tmp_path):
    """A FIFO named as SRC was reported "unreadable: OSError: Need a file for fname but found
    a directory" (MNE's words), and a reader that opened it would wait for a writer."""
    fifo = tmp_path / "pipe_raw.fif"
    os.mkfifo(fifo)
    [job] = discover([str(fifo)])
    record = process_file(job, Settings(), str(tmp_path / "out"))
    assert record["status"] == "bad"
    assert record["reason"] == "not a regular file (a FIFO, socket or device)"
