"""``eegfast generate`` and the synthetic-EEG report, second audit: a .npy prompt's sidecar and
--channels, --seed, the real-vs-synthetic AUROC's folds and the eegmmidb label note."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eegfast.train.commands.generate import GenerateError, load_prompt, write_output


def _generated_npy(tmp_path):
    """A .npy as generate writes it (rows Cz, Fp1, O2 with the constant 1, 2, 3 in model units)
    and its sidecar."""
    signal = np.repeat(np.array([[1.0], [2.0], [3.0]], np.float32), 400, axis=1)
    return write_output(tmp_path / "g.npy", signal, ["CZ", "FP1", "O2"])


def test_channels_pick_among_the_rows_a_npy_sidecar_names(tmp_path):
    """With a sidecar naming the rows, --channels took over as the row names: "Fp1,Cz,O2"
    called the Cz row Fp1 and the Fp1 row Cz (no error), and "O2" was refused for its row
    count. It picks rows by name, as for a .npz or a recording."""
    path = _generated_npy(tmp_path)
    prompt = load_prompt(path, channels=["Fp1", "Cz", "O2"], prompt_seconds=2)
    assert prompt.names == ("FP1", "CZ", "O2")
    np.testing.assert_allclose(prompt.x[:, 0], [2.0, 1.0, 3.0])
    prompt = load_prompt(path, channels=["O2"], prompt_seconds=2)
    assert prompt.names == ("O2",)
    np.testing.assert_allclose(prompt.x, 3.0)
    with pytest.raises(GenerateError, match=r"g.npy: has no electrodes \['C3'\]"):
        load_prompt(path, channels=["C3"], prompt_seconds=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"sfreq": 100.0}, "says 100.0 Hz"), ({"units": "V"}, "says units 'V'")],
)
def test_npy_sidecar_rate_and_units_are_checked_with_channels_too(tmp_path, change, message):
    """The sidecar's rate was only checked without --channels: with it, a 100 Hz window was
    taken as 200 Hz. A sidecar in other units than µV is refused too (it was read as µV)."""
    path = _generated_npy(tmp_path)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **change}))
    for channels in (None, ["Cz"]):
        with pytest.raises(GenerateError, match=message):
            load_prompt(path, channels=channels, prompt_seconds=2)


def test_channels_name_the_rows_beside_a_json_that_is_no_sidecar(tmp_path):
    """A .json of something else beside the .npy (no channel list): --channels names the rows."""
    np.save(tmp_path / "w.npy", np.ones((2, 400), np.float32))
    (tmp_path / "w.json").write_text('{"subject": 3}')
    assert load_prompt(tmp_path / "w.npy", channels=["C3", "C4"]).names == ("C3", "C4")
    with pytest.raises(GenerateError, match="has no channel list"):
        load_prompt(tmp_path / "w.npy")


# --------------------------------------------------------------------------------------------
# The synthetic report's real-vs-synthetic AUROC
# --------------------------------------------------------------------------------------------


def _varied_windows(n: int, seed: int, channels: int = 4) -> np.ndarray:
    """AR(1) windows (n, channels, 4, 200), each with its own gain and smoothness per electrode
    (windows differ from each other more than a generator's distortion would)."""
    rng = np.random.default_rng(seed)
    gain = np.exp(rng.normal(0, 1.0, (n, channels, 1)))
    a = rng.uniform(0.5, 0.95, (n, channels, 1))
    e = rng.normal(size=(n, channels, 800))
    x = np.zeros_like(e)
    for t in range(1, 800):
        x[..., t] = a[..., 0] * x[..., t - 1] + e[..., t]
    return (0.1 * gain * x).reshape(n, channels, 4, 200).astype(np.float32)


def test_auroc_keeps_each_prompt_in_the_fold_of_its_continuation():
    """A generator that copies its prompt is indistinguishable from real: AUROC exactly 0.5
    when each real window is in the fold of its continuation (the same multiset of scores on
    both sides of every test fold)."""
    from eegfast.train.synthetic_report import real_vs_synthetic_auroc

    real = _varied_windows(30, 0)
    order = np.random.default_rng(1).permutation(30)
    mean, std = real_vs_synthetic_auroc(real, real[order], prompts=order)
    assert mean == 0.5 and std == 0.0
    with pytest.raises(ValueError, match="prompts must hold one index into real"):
        real_vs_synthetic_auroc(real, real, prompts=np.arange(29))


def _run_stubbed_task(monkeypatch, task):
    """run_task with its training stages stubbed out (a generator that copies its prompt,
    classifiers that guess): only the report's own bookkeeping runs."""
    import eegfast.train.synthetic_report as report

    class Tokenizer:
        config = SimpleNamespace(num_codes=8)

        def get_codebook_indices(self, x, chans):
            return torch.zeros(x.shape[0], x.shape[1] * x.shape[2], dtype=torch.long)

    def finetune(state, x, y, test_x, chans, num_classes, settings, seed):
        return np.full((len(test_x), num_classes), 1.0 / num_classes)

    monkeypatch.setattr(report, "train_tokenizer", lambda *a: (Tokenizer(), [1.0, 0.5]))
    step = {"loss": 1.0, "masked_loss": 1.0}
    monkeypatch.setattr(report, "train_hybrid", lambda *a: (torch.nn.Linear(1, 1), [step]))
    monkeypatch.setattr(report, "synthesize", lambda model, x, *a: x.clone())  # copies prompts
    monkeypatch.setattr(report, "finetune_and_predict", finetune)
    bar = SimpleNamespace(update=lambda n: None)
    return report.run_task(task, report.ReportSettings(folds=2), torch.device("cpu"), bar)


def _stub_task(name: str = "t", note: str = ""):
    from eegfast.train.synthetic_report import TaskData

    n = 48
    extra = {"continuation_note": note} if note else {}
    return TaskData(
        name, _varied_windows(n, 0), np.arange(n) % 2, np.array([f"s{i % 4}" for i in range(n)]),
        ("C3", "C4", "CZ", "PZ"), ("a", "b"), "stub task", **extra,
    )  # fmt: skip


def test_report_auroc_is_not_pulled_down_by_prompts_in_other_folds(monkeypatch):
    """run_task scored real windows against their own continuations split across the CV folds:
    fitted on a continuation labelled synthetic, the classifier called its prompt synthetic,
    and a copying generator scored ~0.16 ("better than indistinguishable") instead of 0.5."""
    result = _run_stubbed_task(monkeypatch, _stub_task())
    assert result["quality"]["real_vs_synthetic_auroc"] == (0.5, 0.0)


def test_report_says_eegmmidb_synthetic_windows_continue_into_rest(monkeypatch):
    """An eegmmidb cue lasts 4.1 s and rest follows it: the 4 s a synthetic window continues a
    4-s cue window over are 98% rest, yet the window carried the cue's label, and the report
    presented its augmentation result as that of imagery windows without a word."""
    from eegfast.datasets import SampleDataError, sample
    from eegfast.train.synthetic_report import (
        ReportSettings,
        _cue_continuation_note,
        load_tasks,
        markdown,
    )

    assert _cue_continuation_note(4.1, 2) == ""  # 2-s windows: the continuation is cue time
    assert "63% of each synthetic window" in _cue_continuation_note(4.1, 3)  # 1.9 s of 3 s
    try:
        files = {p.name: p for p in sample(download=False)}
    except SampleDataError as err:
        pytest.skip(f"sample data not available: {err}")
    tasks = {t.name: t for t in load_tasks(files, ReportSettings.quick())}
    assert tasks["eegmat"].continuation_note == ""  # one state per recording
    note = tasks["eegmmidb"].continuation_note
    assert "cues last 4.1 s" in note and "98% of each synthetic window" in note
    result = _run_stubbed_task(monkeypatch, _stub_task("eegmmidb", note))
    settings = {"window_seconds": 4}
    text = markdown(
        {"settings": settings, "quick": True, "device": "cpu", "seconds": 1.0,
         "tasks": {"eegmmidb": result}}
    )  # fmt: skip
    assert f"Note: {note}" in text


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_torch_cannot_take_is_an_argument_error(tmp_path, seed):
    """A --seed past 64 bits was torch's traceback ("Overflow when unpacking long long"),
    naming no argument."""
    from eegfast.models.hybrid import create_hybrid_model
    from eegfast.train.commands.generate import Prompt, generate_signal

    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain").eval()
    prompt = Prompt(np.zeros((1, 200), np.float32), ("CZ",), "mem", 0.0)
    with pytest.raises(GenerateError, match=r"--seed must be in \[-2\*\*63, 2\*\*64\)"):
        generate_signal(model, prompt, 1, seed=seed)
    assert generate_signal(model, prompt, 1, seed=2**64 - 1).shape == (1, 200)
