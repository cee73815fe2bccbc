"""Short cuts of the bundled sample recordings, so that tests preprocess seconds, not minutes."""

from __future__ import annotations

from pathlib import Path

import mne
import pytest

from eegfast.datasets import SampleDataError, sample


def sample_recording_cut(name: str, seconds: float, folder: Path) -> Path:
    """``folder/<stem>_cut.fif``: the first ``seconds`` of the sample recording ``name`` (e.g.
    ``"Subject00_2.edf"``); skips the calling test when the sample data are not available."""
    try:
        files = {p.name: p for p in sample(download=False)}
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    raw = mne.io.read_raw_edf(files[name], preload=True, verbose="error")
    raw.crop(0, seconds, include_tmax=False)
    path = Path(folder) / f"{Path(name).stem}_cut.fif"
    raw.save(path, verbose="error")
    return path


def prepare_windows(out: Path, sources: list[str], *extra: str) -> Path:
    """``eegfast prepare SOURCES --out OUT --window 4 EXTRA``: 4-s windows of recordings
    (``TASK=FILE`` sources), asserting it succeeded; returns ``out``."""
    from eegfast.cli import main as cli

    argv = ["prepare", *sources, "--out", str(out), "--window", "4", *extra, "--no-progress"]
    assert cli(argv) == 0
    return out


def two_prepared_folders(root: Path, seconds: float, stride: float) -> tuple[Path, Path]:
    """Folder ``a`` (float32): a 19- and a 64-electrode recording (two electrode sets, tasks
    ``arith`` and ``mi``); folder ``b`` (float16): another 19-electrode ``arith`` one. 4-s
    windows every ``stride`` s of ``seconds``-s cuts of the sample recordings."""
    cut = {n: sample_recording_cut(n, seconds, root) for n in ("Subject00_2.edf", "S001R04.edf")}
    a = prepare_windows(
        root / "a",
        [f"arith={cut['Subject00_2.edf']}", f"mi={cut['S001R04.edf']}"],
        "--stride",
        f"{stride:g}",
    )
    b_cut = sample_recording_cut("Subject01_2.edf", seconds, root)
    b = prepare_windows(
        root / "b", [f"arith={b_cut}"], "--stride", f"{stride:g}", "--dtype", "float16"
    )
    return a, b
