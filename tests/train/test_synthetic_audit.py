"""Audit of synthetic EEG generation (``eegfast generate``) and its report: what ``eegfast
prepare`` makes of a generated EDF's annotations, clear errors for prompts and checkpoints the
command cannot use, and the report's generator staying inside the time rows it trained."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eegfast.cli import main as cli
from eegfast.models.hybrid import create_hybrid_model


def _checkpoint(path, **hybrid) -> str:
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain", hybrid=hybrid or None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


def _run(capsys, *args) -> tuple[int, str]:
    code = cli([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _npy_prompt(folder, seconds=4, names=("C3", "C4")):
    rng = np.random.default_rng(0)
    path = folder / "prompt.npy"
    np.save(path, rng.normal(0, 20, (len(names), seconds * 200)).astype(np.float32))  # µV
    return path, ",".join(names)


def _prepared(capsys, edf, out) -> tuple[list[str], list[int]]:
    """``eegfast prepare mi=EDF``: the task's class names and the recording's window labels
    (indices into them, -1 = unlabelled)."""
    code, text = _run(capsys, "prepare", f"mi={edf}", "--out", out, "--window", 4)
    assert code == 0, text
    index = json.loads((out / "index.json").read_text())
    return index["tasks"]["mi"]["labels"], index["recordings"][0]["labels"]


def test_prepared_synthetic_edf_has_no_prompt_or_generated_classes(checkpoint, tmp_path, capsys):
    """The EDF's annotations spanned the prompt ("prompt") and the generated part
    ("generated"): `eegfast prepare` reads every annotation with a duration as a class, so a
    synthetic recording prepared for augmentation got the classes "generated" and "prompt"
    (real EEG) instead of being unlabelled, or labelled as its table/file-name rules say."""
    prompt, names = _npy_prompt(tmp_path)
    edf = tmp_path / "synthetic.edf"
    code, text = _run(
        capsys, "generate", "--model", checkpoint, "--prompt", prompt, "--channels", names,
        "--seconds", 8, "--out", edf, "--include-prompt", "--mode", "regression",
    )  # fmt: skip
    assert code == 0, text
    classes, labels = _prepared(capsys, edf, tmp_path / "prepared")
    assert classes == [] and labels == [-1] * 3  # 12 s: three unlabelled 4-s windows
    raw = mne.io.read_raw_edf(edf, verbose="error")
    # where the generated part starts is still in the file, as an onset marker
    assert [(a["onset"], a["duration"], a["description"]) for a in raw.annotations] == [
        (4.0, 0.0, "generated")
    ]


def test_label_names_the_class_of_the_generated_windows(checkpoint, tmp_path, capsys):
    """--label NAME spans the generated part only: prepare labels its windows NAME and cuts
    none from the real prompt written before it; a .npy's sidecar records the label; names
    prepare would skip as artefact marks are refused."""
    prompt, names = _npy_prompt(tmp_path)
    base = ["generate", "--model", checkpoint, "--prompt", prompt, "--channels", names]
    base += ["--mode", "regression"]
    edf = tmp_path / "left.edf"
    code, text = _run(
        capsys, *base, "--seconds", 8, "--out", edf, "--include-prompt", "--label", "left"
    )
    assert code == 0, text
    raw = mne.io.read_raw_edf(edf, verbose="error")
    assert [(a["onset"], a["duration"], a["description"]) for a in raw.annotations] == [
        (4.0, 8.0, "left")
    ]
    assert raw.n_times == 12 * 200
    classes, labels = _prepared(capsys, edf, tmp_path / "prepared")
    assert classes == ["left"]
    assert labels == [0, 0]  # the 8 generated seconds: two 4-s windows, none of the prompt
    npy = tmp_path / "left.npy"
    code, text = _run(capsys, *base, "--seconds", 1, "--out", npy, "--label", " left ")
    assert code == 0, text
    assert json.loads(npy.with_suffix(".json").read_text())["label"] == "left"
    for bad in ("BAD_left", "edge", "boundary", "New Segment/", "  "):
        code, text = _run(
            capsys, *base, "--seconds", 1, "--out", tmp_path / "x.edf", "--label", bad
        )
        assert code == 2 and "--label" in text, text
        assert bad.strip() == "" or "New Segment" in text  # names each kind it refuses
        assert not (tmp_path / "x.edf").exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "not a readable .npy file"),
        ("pickled", "not a readable .npy file"),
        ("complex", "samples must be real numbers, got dtype complex"),
        ("text", "samples must be real numbers, got dtype <U"),
        ("npz_rows", "expected 'x' (C, T) with C = 2 electrodes, got shape (3, 400)"),
        ("npz_garbage", "not a readable .npz file"),
    ],
)
def test_unusable_prompt_files_give_clear_errors(checkpoint, tmp_path, capsys, kind, message):
    """Numpy prompts that cannot be EEG: a traceback (damaged file, pickled objects, text), a
    silently dropped imaginary part (complex samples) or, for a .npz whose 'x' has more rows
    than 'channels' names, --channels silently picking rows by the wrong names."""
    suffix = ".npz" if kind.startswith("npz") else ".npy"
    path = tmp_path / f"prompt{suffix}"
    channels = "C3"
    if kind in ("garbage", "npz_garbage"):
        path.write_bytes(b"not numpy at all")
    elif kind == "pickled":
        np.save(path, np.array([[1.0, "a"]], dtype=object), allow_pickle=True)
    elif kind == "complex":
        np.save(path, np.ones((1, 400), np.complex64))
    elif kind == "text":
        np.save(path, np.full((1, 400), "1.0"))
    else:  # three rows of samples, two electrode names
        np.savez(path, x=np.ones((3, 400), np.float32), channels=np.array(["C3", "C4"]))
    out = tmp_path / "out.npy"
    code, text = _run(
        capsys, "generate", "--model", checkpoint, "--prompt", path, "--channels", channels,
        "--seconds", 1, "--out", out,
    )  # fmt: skip
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert not out.exists()


def test_checkpoint_without_the_head_a_mode_needs(tmp_path, capsys):
    """A hybrid checkpoint trained without the signal head (or, for --mode tokens, without the
    code head) ended in a ValueError traceback from the generation loop."""
    np.save(tmp_path / "p.npy", np.ones((1, 400), np.float32))
    base = ["generate", "--prompt", tmp_path / "p.npy", "--channels", "Cz", "--seconds", 1]
    codes_only = _checkpoint(tmp_path / "codes.safetensors", predict_signal=False)
    signal_only = _checkpoint(tmp_path / "signal.safetensors", predict_tokens=False)
    code, text = _run(capsys, *base, "--model", codes_only, "--out", tmp_path / "a.npy")
    assert code == 2 and "no signal head" in text, text
    code, text = _run(capsys, *base, "--model", signal_only, "--out", tmp_path / "b.npy")
    assert code == 2 and "use --mode regression" in text, text
    code, text = _run(
        capsys, *base, "--model", signal_only, "--out", tmp_path / "c.npy", "--mode", "regression"
    )
    assert code == 0, text
    assert np.load(tmp_path / "c.npy").shape == (1, 200)


@pytest.mark.parametrize("notch", ["-50", "nan", "inf"])
def test_bad_notch_is_an_argument_error(checkpoint, tmp_path, capsys, notch):
    """--notch -50 / nan / inf reached the preprocessing config and ended in a traceback."""
    info = mne.create_info(["C3", "C4"], 250.0, "eeg")
    signal = np.random.default_rng(0).normal(0, 2e-5, (2, 2500))  # 10 s, volts
    prompt = tmp_path / "rec_raw.fif"
    mne.io.RawArray(signal, info, verbose="error").save(prompt, verbose="error")
    code, text = _run(
        capsys, "generate", "--model", checkpoint, "--prompt", prompt, "--seconds", 1,
        "--out", tmp_path / "o.npy", "--notch", notch,
    )  # fmt: skip
    assert code == 2 and f"--notch must be a frequency > 0 Hz (or 0 for none), got {notch}" in text
    assert not (tmp_path / "o.npy").exists()


def test_report_generation_stays_in_the_trained_time_rows():
    """The report's hybrid model trains on A-patch windows, so time-embedding rows A and later
    never get a gradient; generating A more patches grew the context into them. With those
    rows poisoned (NaN), the continuation must not change (and be finite)."""
    from eegfast.electrodes import labram_input_chans
    from eegfast.train.synthetic_report import ReportSettings, synthesize

    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain").eval()
    chans = torch.tensor(labram_input_chans(["C3", "C4", "CZ"]))
    x = 0.1 * torch.randn(3, 3, 2, 200)  # three 2-s windows: time rows 0 and 1 trained
    settings = ReportSettings(top_k=4)
    clean = synthesize(model, x, chans, settings, seed=0)
    with torch.no_grad():
        model.backbone.time_embed[0, 2:] = float("nan")
    poisoned = synthesize(model, x, chans, settings, seed=0)
    assert poisoned.shape == (3, 3, 2, 200)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean)


def test_report_settings_line_is_one_line():
    """The report's settings and its device/time were joined as separate lines, leaving a line
    that starts with '; device'."""
    from eegfast.train.synthetic_report import markdown
    from tests.train.test_generate import _report_results

    y = np.array([0, 1] * 4)
    ok = np.ones(len(y), dtype=bool)
    arms = ("labram_real", "labram_real+synthetic", "bandpower_real", "bandpower_real+synthetic")
    text = markdown(_report_results(y, dict.fromkeys(arms, ok), np.array(["s0"] * len(y))))
    line = next(x for x in text.splitlines() if x.startswith("Settings:"))
    assert line.endswith("; device cpu; total 1 s.")
    assert not any(x.startswith("; device") for x in text.splitlines())
