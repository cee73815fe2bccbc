"""``eegfast generate --include-prompt`` keeps the prompt's annotations (events, BAD spans) on
the prompt part of the written file: onsets from the prompt window's start, spans clipped to
it, channel-specific ones on the electrodes written; the generated part keeps its marker."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import mne
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eegfast.cli import main as cli
from eegfast.models.hybrid import create_hybrid_model
from eegfast.train.commands.generate import load_prompt, write_output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain")
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _labelled_fif(folder, *, meas_date: bool = True):
    """A 30-s recording at 250 Hz (Cz, Pz, EOG) with annotations, cropped to [10, 30) s and
    saved: its data start 10 s after the measurement start (first_samp 2500), so MNE's
    onsets are 10 s past the data's. Onsets on the cropped data's time axis:
    rest [0, 4), task [4, 8.5), BAD_blink [6, 6.5) on Cz, blink [7, 7.5) on the EOG
    channel only, stim marker at 7, task [8.5, 14)."""
    info = mne.create_info(["Cz", "Pz", "EOG"], 250.0, ["eeg", "eeg", "eog"])
    signal = np.random.default_rng(0).normal(scale=2e-5, size=(3, 30 * 250))
    raw = mne.io.RawArray(signal, info, verbose="error")
    if meas_date:
        raw.set_meas_date(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC))
    raw.set_annotations(
        mne.Annotations(
            [5.0, 14.0, 16.0, 17.0, 17.0, 18.5],
            [9.0, 4.5, 0.5, 0.5, 0.0, 5.5],
            ["rest", "task", "BAD_blink", "blink", "stim", "task"],
            ch_names=[[], [], ["Cz"], ["EOG"], [], []],
        )
    )
    raw.crop(10.0, None, include_tmax=False)
    path = folder / "labelled_raw.fif"
    raw.save(path, verbose="error")
    return path


def _annotations(raw) -> list[tuple[float, float, str, tuple[str, ...]]]:
    a = raw.annotations
    return [
        (round(float(o), 3), round(float(d), 3), str(text), tuple(names))
        for o, d, text, names in zip(a.onset, a.duration, a.description, a.ch_names, strict=True)
    ]


@pytest.mark.parametrize("meas_date", [True, False])
def test_prompt_keeps_the_annotations_of_its_window(tmp_path, meas_date):
    """The window [5, 9) s: the first task is clipped at its start, the second at its end;
    rest ends before it; the EOG-only blink concerns no electrode of the prompt. With or
    without a measurement date MNE counts onsets from raw.first_time (10 s here), not from
    the data's first sample."""
    path = _labelled_fif(tmp_path, meas_date=meas_date)
    prompt = load_prompt(path, start=5.0, prompt_seconds=4, notch=0)
    assert prompt.names == ("CZ", "PZ") and prompt.start_s == 5.0
    got = [(round(o, 6), round(d, 6), text, names) for o, d, text, names in prompt.annotations]
    assert got == [
        (0.0, 3.5, "task", ()),
        (1.0, 0.5, "BAD_blink", ("CZ",)),
        (2.0, 0.0, "stim", ()),
        (3.5, 0.5, "task", ()),
    ]


def test_include_prompt_writes_the_prompts_annotations_into_the_edf(checkpoint, tmp_path, capsys):
    """Only the 'generated' marker was written: the prompt's events and BAD spans were lost."""
    path = _labelled_fif(tmp_path)
    out = tmp_path / "augmented.edf"
    code = cli(
        ["generate", "--model", str(checkpoint), "--prompt", str(path), "--seconds", "1",
         "--out", str(out), "--start", "5", "--prompt-seconds", "4", "--notch", "0",
         "--mode", "regression", "--include-prompt", "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    raw = mne.io.read_raw_edf(out, verbose="error")
    assert raw.n_times == 5 * 200
    assert _annotations(raw) == [
        (0.0, 3.5, "task", ()),
        (1.0, 0.5, "BAD_blink", ("Cz",)),
        (2.0, 0.0, "stim", ()),
        (3.5, 0.5, "task", ()),
        (4.0, 0.0, "generated", ()),
    ]
    # without --include-prompt the file holds no prompt, and none of its annotations
    out = tmp_path / "alone.edf"
    code = cli(
        ["generate", "--model", str(checkpoint), "--prompt", str(path), "--seconds", "1",
         "--out", str(out), "--start", "5", "--prompt-seconds", "4", "--notch", "0",
         "--mode", "regression", "--label", "synthetic", "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert _annotations(mne.io.read_raw_edf(out, verbose="error")) == [(0.0, 1.0, "synthetic", ())]


def test_npy_output_lists_the_prompts_annotations_in_its_sidecar(tmp_path):
    signal = np.zeros((2, 600), np.float32)
    events = [(0.0, 1.5, "task", ()), (1.0, 0.0, "BAD_x", ("PZ",))]
    out = write_output(
        tmp_path / "g.npy", signal, ("CZ", "PZ"), generated_from_s=2.0, annotations=events
    )
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["annotations"] == [
        {"onset": 0.0, "duration": 1.5, "description": "task", "channels": []},
        {"onset": 1.0, "duration": 0.0, "description": "BAD_x", "channels": ["Pz"]},
    ]
    # an annotation reaching into the generated part is no prompt annotation: named error
    with pytest.raises(ValueError, match="annotations: 'task' at 0 s for 2.5 s"):
        write_output(
            tmp_path / "h.edf",
            signal,
            ("CZ", "PZ"),
            generated_from_s=2.0,
            annotations=[(0.0, 2.5, "task", ())],
        )


def test_an_array_prompt_has_no_annotations(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x=np.ones((2, 400), np.float32), channels=np.array(["Cz", "Pz"]))
    assert load_prompt(path, prompt_seconds=2).annotations == ()


def test_a_folder_where_the_npy_sidecar_goes_is_refused_before_generating(tmp_path, capsys):
    """With --overwrite, a folder OUT.json passed the up-front check: the run generated, wrote
    the .npy, then failed on the sidecar (IsADirectoryError, exit 1)."""
    (tmp_path / "g.json").mkdir()
    code = cli(
        ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "p.npz", "--seconds",
         "1", "--out", str(tmp_path / "g.npy"), "--overwrite", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    assert "g.json is a folder, not a file" in capsys.readouterr().err
    assert not (tmp_path / "g.npy").exists()


def test_a_prompts_one_sample_markers_stay_markers_at_200_hz(tmp_path):
    """A 160-Hz BrainVision prompt's stimulus markers are one sample long (MNE: 1/160 s), which
    ``prepare`` reads as onset markers there; written at 200 Hz they were 1.25 samples long,
    events no window fits, and ``prepare`` refused the augmented file."""
    from eegfast.data.prepare import Settings, discover, process_file
    from tests.data.test_formats_audit import _write_brainvision

    sfreq = 160.0
    data = np.random.default_rng(6).normal(0, 20, (3, int(40 * sfreq)))
    markers = [("Stimulus", "S  1", int(s * sfreq) + 1, 1) for s in (12, 18, 24)]
    path = _write_brainvision(tmp_path / "p160.vhdr", data, sfreq, markers)
    prompt = load_prompt(path, start=10.0, prompt_seconds=20, notch=0)
    assert [(round(o, 6), d, text) for o, d, text, _ in prompt.annotations] == [
        (2.0, 0.0, "Stimulus/S  1"),
        (8.0, 0.0, "Stimulus/S  1"),
        (14.0, 0.0, "Stimulus/S  1"),
    ]
    out = write_output(
        tmp_path / "gen" / "augmented.edf",
        np.concatenate((prompt.x, prompt.x[:, :800]), axis=1),
        prompt.names,
        generated_from_s=prompt.seconds,
        annotations=prompt.annotations,
    )
    record = process_file(discover([str(out)])[0], Settings(), str(tmp_path / "prepared"))
    assert record["status"] == "ok", record.get("reason")
    assert record["skipped_onset_markers"] == {"Stimulus/S  1": 3, "generated": 1}
