"""``eegfast generate``: real prompts, EDF/.npy outputs that MNE reads, clear argument errors."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eegfast.cli import main as cli
from eegfast.models.hybrid import create_hybrid_model
from eegfast.train.commands.generate import GenerateError, display_names, load_prompt
from tests.train._sample import sample_recording_cut

EEGMAT_NAMES = [
    "Fp1",
    "Fp2",
    "F3",
    "F4",
    "F7",
    "F8",
    "T7",
    "T8",
    "C3",
    "C4",
    "P7",
    "P8",
    "P3",
    "P4",
    "O1",
    "O2",
    "Fz",
    "Cz",
    "Pz",
]  # fmt: skip  (Subject00_2.edf's 19 EEG electrodes, 10-10 names, recording order)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain")
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def eegmat(tmp_path_factory):
    """A 20-s cut of the real Subject00_2 recording (keeps preprocessing fast)."""
    return sample_recording_cut("Subject00_2.edf", 20.0, tmp_path_factory.mktemp("prompt"))


def _run(capsys, *args) -> tuple[int, str]:
    code = cli(["generate", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_edf_output_loads_with_mne(checkpoint, eegmat, tmp_path, capsys):
    out = tmp_path / "synthetic.edf"
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", eegmat, "--seconds", 3, "--out", out,
        "--prompt-seconds", 4, "--top-k", 10, "--include-prompt",
    )  # fmt: skip
    assert code == 0, text
    raw = mne.io.read_raw_edf(out, preload=True, verbose="error")
    assert raw.ch_names == EEGMAT_NAMES
    assert raw.info["sfreq"] == 200.0
    assert raw.get_data().shape == (19, (4 + 3) * 200)
    # an onset marker (no duration: eegfast prepare reads it as no class) where the generated
    # part starts
    assert [(a["onset"], a["duration"], a["description"]) for a in raw.annotations] == [
        (4.0, 0.0, "generated")
    ]
    data = raw.get_data()
    assert np.isfinite(data).all() and data[:, 800:].std() > 0
    # the prompt part is the preprocessed recording's last 4 s (EDF keeps 16 bits per sample)
    prompt = load_prompt(eegmat, prompt_seconds=4)
    assert prompt.start_s == 16.0
    step = (data.max(1) - data.min(1))[:, None] * 1e4 / (2**16 - 1)  # 16-bit EDF, units
    assert np.all(np.abs(data[:, :800] * 1e4 - prompt.x) <= step)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_npy_output_with_channel_subset_and_sidecar(checkpoint, eegmat, tmp_path, capsys):
    out = tmp_path / "synthetic.npy"
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", eegmat, "--seconds", 2.5, "--out", out,
        "--channels", "Cz,fp1,EEG O2", "--mode", "regression", "--start", 3,
    )  # fmt: skip
    assert code == 0, text
    signal = np.load(out)
    assert signal.shape == (3, 500) and signal.dtype == np.float32
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["channels"] == ["Cz", "Fp1", "O2"]
    assert meta["sfreq"] == 200.0 and meta["units"] == "uV"
    assert meta["prompt_start_s"] == 3.0 and meta["prompt_seconds"] == 8.0


def test_generated_npy_is_a_prompt_without_channels(checkpoint, eegmat, tmp_path, capsys):
    """A .npy that generate wrote feeds back as --prompt: its sidecar names the electrodes;
    without a sidecar --channels is asked for."""
    first = tmp_path / "first.npy"
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", eegmat, "--seconds", 3, "--out", first,
        "--channels", "Cz,Fp1,O2", "--mode", "regression",
    )  # fmt: skip
    assert code == 0, text
    second = tmp_path / "second.npy"
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", first, "--seconds", 1, "--out", second,
        "--prompt-seconds", 2, "--mode", "regression",
    )  # fmt: skip
    assert code == 0, text
    assert json.loads(second.with_suffix(".json").read_text())["channels"] == ["Cz", "Fp1", "O2"]
    first.with_suffix(".json").unlink()
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", first, "--seconds", 1, "--out",
        tmp_path / "third.npy", "--prompt-seconds", 2,
    )  # fmt: skip
    assert code == 2 and "needs --channels (or a first.json sidecar" in text, text


def test_cache_and_no_cache_give_the_same_file(checkpoint, eegmat, tmp_path, capsys):
    outs = []
    for flag in ((), ("--no-cache",)):
        out = tmp_path / f"g{len(outs)}.npy"
        code, text = _run(
            capsys, "--model", checkpoint, "--prompt", eegmat, "--seconds", 3, "--out", out,
            "--temperature", 0, "--prompt-seconds", 3, *flag,
        )  # fmt: skip
        assert code == 0, text
        outs.append(np.load(out))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)  # µV, float32 model


def test_npy_prompt_window(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    prompt = tmp_path / "window.npy"
    np.save(prompt, rng.normal(0, 20, (2, 600)).astype(np.float32))  # 3 s of 2 electrodes, µV
    out = tmp_path / "g.edf"
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", prompt, "--channels", "C3,C4",
        "--seconds", 1.5, "--out", out,
    )  # fmt: skip
    assert code == 0, text
    assert "whole seconds" in text  # EDF records are 1 s: 1.5 s -> 2 s
    raw = mne.io.read_raw_edf(out, preload=True, verbose="error")
    assert raw.ch_names == ["C3", "C4"] and raw.get_data().shape == (2, 400)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--seconds": "0"}, "--seconds must be > 0"),
        ({"--seconds": "-2"}, "--seconds must be > 0"),
        # refused up front, not after hours of generating towards an output no memory holds
        ({"--seconds": "1e12"}, "GiB, more than half of this machine's"),
        ({"--channels": "C3,XYZ"}, "unknown electrodes ['XYZ']"),
        ({"--model": "missing.safetensors"}, "checkpoint not found"),
        ({"--out": "out.txt"}, "--out must end in .edf or .npy"),
        ({"--prompt": "short.npy"}, "shorter than one patch"),
        ({"--prompt": "nan.npy"}, "NaN"),
        ({"--prompt": "nothing.edf"}, "file not found"),
        ({"--temperature": "nan"}, "--temperature must be >= 0, got nan"),
        # the regression head draws nothing: sampling options were ignored without a word
        (
            {"--mode": "regression", "--temperature": "0.5"},
            "--temperature: sampling options of --mode tokens",
        ),
        (
            {"--mode": "regression", "--top-k": "5"},
            "--top-k: sampling options of --mode tokens",
        ),
        ({"--start": "nan"}, "--start must be a number >= 0, got nan"),
        ({"--start": "inf"}, "--start must be a number >= 0, got inf"),
    ],
)
def test_bad_arguments_give_clear_errors(checkpoint, tmp_path, capsys, change, message):
    np.save(tmp_path / "ok.npy", np.ones((2, 400), np.float32))
    np.save(tmp_path / "short.npy", np.ones((2, 150), np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 400), np.nan, np.float32))
    args = {
        "--model": str(checkpoint),
        "--prompt": str(tmp_path / "ok.npy"),
        "--channels": "C3,C4",
        "--seconds": "1",
        "--out": str(tmp_path / "out.edf"),
    }
    for key, value in change.items():
        literal = key in (
            "--seconds",
            "--channels",
            "--temperature",
            "--start",
            "--mode",
            "--top-k",
        )
        args[key] = value if literal else str(tmp_path / value)
    try:
        code, text = _run(capsys, *[part for kv in args.items() for part in kv])
    except SystemExit as exit_:  # argparse errors
        code, text = exit_.code, capsys.readouterr().err
    assert code == 2
    assert message in text
    assert not (tmp_path / "out.edf").exists()


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    np.save(tmp_path / "ok.npy", np.ones((1, 400), np.float32))
    out = tmp_path / "out.npy"
    out.write_bytes(b"keep me")
    base = ["--model", checkpoint, "--prompt", tmp_path / "ok.npy", "--channels", "Cz"]
    code, text = _run(capsys, *base, "--seconds", 1, "--out", out)
    assert code == 2 and "--overwrite" in text and out.read_bytes() == b"keep me"
    code, text = _run(capsys, *base, "--seconds", 1, "--out", out, "--overwrite")
    assert code == 0, text
    assert np.load(out).shape == (1, 200)


def test_existing_sidecar_needs_overwrite(checkpoint, tmp_path, capsys):
    np.save(tmp_path / "ok.npy", np.ones((1, 400), np.float32))
    out, sidecar = tmp_path / "summary.npy", tmp_path / "summary.json"
    sidecar.write_text('{"keep": "me"}')
    base = ["--model", checkpoint, "--prompt", tmp_path / "ok.npy", "--channels", "Cz"]
    code, text = _run(capsys, *base, "--seconds", 1, "--out", out)
    assert code == 2 and f"sidecar {sidecar} exists" in text and "--overwrite" in text
    assert sidecar.read_text() == '{"keep": "me"}' and not out.exists()
    code, text = _run(capsys, *base, "--seconds", 1, "--out", out, "--overwrite")
    assert code == 0, text
    assert "Cz" in sidecar.read_text()


@pytest.mark.parametrize("sfreq", [None, "fast", 100.0])
def test_sidecar_without_a_usable_rate_is_refused(checkpoint, tmp_path, capsys, sfreq):
    np.save(tmp_path / "p.npy", np.ones((1, 400), np.float32))
    (tmp_path / "p.json").write_text(json.dumps({"channels": ["Cz"], "sfreq": sfreq}))
    code, text = _run(
        capsys, "--model", checkpoint, "--prompt", tmp_path / "p.npy", "--seconds", 1,
        "--out", tmp_path / "o.npy",
    )  # fmt: skip
    assert code == 2 and f"says {sfreq} Hz" in text and "200 Hz" in text, text
    assert not (tmp_path / "o.npy").exists()


def test_model_with_extended_table_generates_its_extra_electrodes(tmp_path, capsys):
    """Bipolar derivations (rows past the reference's 128 electrodes) are refused for a reference
    table and accepted for a model built with the extended one."""
    torch.manual_seed(0)
    paths = {}
    for rows in (129, 137):
        model = create_hybrid_model("labram_tiny_pretrain", pos_rows=rows)
        paths[rows] = tmp_path / f"model{rows}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths[rows]))
    np.save(tmp_path / "bipolar.npy", np.ones((2, 400), np.float32))
    args = ["--prompt", tmp_path / "bipolar.npy", "--channels", "FP1-F3,F3-C3", "--seconds", 1]
    code, text = _run(capsys, "--model", paths[129], *args, "--out", tmp_path / "a.npy")
    assert code == 2 and "past its 128 electrode rows" in text, text
    code, text = _run(capsys, "--model", paths[137], *args, "--out", tmp_path / "b.npy")
    assert code == 0, text
    assert np.load(tmp_path / "b.npy").shape == (2, 200)
    assert json.loads((tmp_path / "b.json").read_text())["channels"] == ["FP1-F3", "F3-C3"]


def test_not_a_hybrid_checkpoint_is_refused(tmp_path, capsys):
    from eegfast.models import create_model

    path = tmp_path / "masked.safetensors"
    state = create_model("labram_tiny_pretrain").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    np.save(tmp_path / "ok.npy", np.ones((1, 400), np.float32))
    code, text = _run(
        capsys, "--model", path, "--prompt", tmp_path / "ok.npy", "--channels", "Cz",
        "--seconds", 1, "--out", tmp_path / "o.npy",
    )  # fmt: skip
    assert code == 2 and "not a hybrid checkpoint" in text


def test_prompt_helpers(tmp_path):
    assert display_names(("FP1", "CZ", "T7", "POZ")) == ["Fp1", "Cz", "T7", "POz"]
    np.save(tmp_path / "w.npy", np.ones((2, 400), np.float32))
    with pytest.raises(GenerateError, match="needs --channels"):
        load_prompt(tmp_path / "w.npy")
    with pytest.raises(GenerateError, match="electrodes given twice"):
        load_prompt(tmp_path / "w.npy", channels=["T3", "T7"])


# --------------------------------------------------------------------------------------------
# The synthetic-data report's measures (eegfast.train.synthetic_report)
# --------------------------------------------------------------------------------------------


def _noise_windows(n, seed, scale=1.0, smooth=0.9):
    """AR(1) noise windows (n, 3, 2, 200): a 1/f-like spectrum, like EEG."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, 3, 400))
    x = np.zeros_like(e)
    for t in range(1, 400):
        x[..., t] = smooth * x[..., t - 1] + e[..., t]
    return (scale * 0.1 * x).reshape(n, 3, 2, 200).astype(np.float32)


def test_band_power_ratios_and_real_vs_synthetic_auroc():
    from eegfast.train.synthetic_report import band_power_ratios, real_vs_synthetic_auroc

    real = _noise_windows(24, 0)
    same = band_power_ratios(real, real)
    assert all(abs(v - 1) < 1e-9 for kind in same.values() for v in kind.values())
    half = band_power_ratios(real, 0.5 * real)  # power scales with amplitude squared
    assert all(abs(v - 0.25) < 1e-6 for v in half["absolute"].values())
    assert all(abs(v - 1) < 1e-6 for v in half["relative"].values())
    alike, _ = real_vs_synthetic_auroc(real, _noise_windows(24, 1))
    whiter, _ = real_vs_synthetic_auroc(real, _noise_windows(24, 3, smooth=0.0))
    assert alike < 0.8 and whiter > 0.95


def test_relative_band_ratio_is_a_ratio_of_power_shares():
    """White noise (flat spectrum: each band's share of the 1-45 Hz power is its width / 44 Hz)
    against the same noise with the gamma band's (30-45 Hz, 15 Hz wide) power doubled: the
    gamma share grows by 2 / (1 + 15/44), every other share shrinks by 1 / (1 + 15/44)."""
    from eegfast.train.synthetic_report import band_power_ratios

    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2, 4 * 200))
    spectrum = np.fft.rfft(real, axis=-1)
    freqs = np.fft.rfftfreq(real.shape[-1], d=1 / 200)
    spectrum[..., (freqs >= 30) & (freqs < 45)] *= np.sqrt(2.0)
    louder = np.fft.irfft(spectrum, n=real.shape[-1], axis=-1)
    ratios = band_power_ratios(real.reshape(400, 2, 4, 200), louder.reshape(400, 2, 4, 200))
    grow = 1 / (1 + 15 / 44)
    assert abs(ratios["absolute"]["gamma"] - 2) < 0.1
    assert abs(ratios["relative"]["gamma"] - 2 * grow) < 0.06
    for band in ("delta", "theta", "alpha", "beta"):
        assert abs(ratios["relative"][band] - grow) < 0.06, band


def test_mcnemar_counts_discordant_windows():
    from eegfast.train.synthetic_report import mcnemar

    a = np.array([True] * 10 + [False] * 10)
    b = np.array([True] * 10 + [True] * 9 + [False])
    result = mcnemar(a, b)
    assert (result["only_without"], result["only_with"], result["n"]) == (0, 9, 20)
    assert abs(result["p_value"] - 2 * 0.5**9) < 1e-12  # exact two-sided binomial
    assert mcnemar(a, a)["p_value"] == 1.0


def _report_results(y, correct, groups):
    """A synthetic report's results for one task from per-arm correctness of its test windows
    (two folds: the first and second half of the windows)."""
    from eegfast.train.synthetic_report import ARMS, mcnemar

    halves = (slice(0, len(y) // 2), slice(len(y) // 2, None))

    def bacc(ok, part):
        return float(np.mean([ok[part][y[part] == c].mean() for c in np.unique(y[part])]))

    folds = [
        {
            "fold": f,
            "train_groups": [],
            "test_groups": sorted(set(groups[part].tolist())),
            "n_train": 10,
            "n_test": len(y[part]),
            "scores": {arm: {"balanced_accuracy": bacc(correct[arm], part)} for arm in ARMS},
            "generation_patches_per_s": 1.0,
        }
        for f, part in enumerate(halves)
    ]
    summary = {
        arm: {"balanced_accuracy": (np.mean([bacc(correct[arm], p) for p in halves]), 0.0)}
        for arm in ARMS
    }
    step = {"loss": 1.0, "masked_loss": 1.0}
    task = {
        "quality": {
            "band_ratio": {kind: dict.fromkeys(BANDS, 1.0) for kind in ("absolute", "relative")},
            "rms_uv": {"real": 10.0, "synthetic": 10.0},
            "real_vs_synthetic_auroc": (0.5, 0.0),
        },
        "n_windows": len(y),
        "summary": summary,
        "folds": folds,
        "training": [
            {"codes_used": 5, "codebook_size": 8, "hybrid_first": step, "hybrid_last": step}
        ],
        "paired_test": {
            model: mcnemar(correct[f"{model}_real"], correct[f"{model}_real+synthetic"])
            for model in ("labram", "bandpower")
        },
    }
    return {"settings": {"window_seconds": 4}, "quick": True, "device": "cpu", "seconds": 1.0,
            "tasks": {"t": task}}  # fmt: skip


BANDS = ("delta", "theta", "alpha", "beta", "gamma")


def test_synthetic_report_verdict_needs_sources_and_a_consistent_direction():
    """The verdict took its direction from the balanced-accuracy change and its significance
    from McNemar's test, which counts windows right: with synthetic windows getting many more
    of the common class right and half of the rare class wrong, balanced accuracy fell while
    the test said more windows were right, and the report called it "a significant loss".
    And McNemar's p over windows of 2 subjects (the bundled data) was read as a verdict, which
    the fine-tuning report refuses below 6 subjects/recordings."""
    from eegfast.train.synthetic_report import markdown

    y = np.array(([0] * 450 + [1] * 50) * 2)
    common, rare = y == 0, y == 1
    index = np.arange(len(y))
    without = np.where(common, index % 9 != 0, True)  # 8/9 of class 0, all of class 1
    with_synthetic = np.where(common, True, index % 2 == 0)  # all of class 0, half of class 1
    correct = {
        "labram_real": without,
        "labram_real+synthetic": with_synthetic,
        "bandpower_real": without,
        "bandpower_real+synthetic": without,
    }
    assert with_synthetic.sum() > without.sum()  # more windows right: McNemar's direction
    assert rare.any() and common.any()
    eight = np.array([f"s{i % 8}" for i in range(len(y))])

    def verdict(model, groups):
        text = markdown(_report_results(y, correct, groups))
        return next(x for x in text.splitlines() if x.startswith(f"- t, {model}:"))

    line = verdict("labram", eight)
    assert "changed balanced accuracy by -0.194" in line
    assert "significant loss" not in line and "significant gain" not in line
    assert "no consistent difference" in line
    assert verdict("bandpower", eight).endswith("no significant difference.")
    # the same windows from 2 subjects: no verdict at all
    two = np.array([f"s{i % 2}" for i in range(len(y))])
    assert "no verdict (the test windows come from 2 subjects/runs" in verdict("labram", two)
    # a consistent, significant change over enough subjects is called one
    correct["labram_real+synthetic"] = np.ones(len(y), dtype=bool)
    line = verdict("labram", eight)
    assert line.endswith("a significant gain.")


def test_generation_stays_within_the_window_length_the_model_was_pretrained_on(
    tmp_path, capsys, monkeypatch
):
    """A hybrid run records its windows' length (``trained_on``); time rows past it were never
    trained. The prompt defaults to that length, a longer one is refused, and the context
    slides within it: with rows 3 and up NaN, 6 s are generated from a 3-s-trained model
    (the context had grown to 16 patches, through the untrained rows). (The NaN rows are a
    sentinel: the loader's refusal of non-finite weights is switched off for them.)"""
    from eegfast.models import checkpoint as model_checkpoint

    monkeypatch.setattr(model_checkpoint, "check_weight_values", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = create_hybrid_model("labram_tiny_pretrain")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["student.time_embed"][:, 3:] = float("nan")
    folder = tmp_path / "step-00000010"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    meta = {"step": 10, "trained_on": {"electrode_rows": [1, 2], "window_seconds": 3}}
    (folder / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "prompt.npy", rng.standard_normal((2, 2000)).astype(np.float32) * 20)
    base = ["--model", folder, "--prompt", tmp_path / "prompt.npy", "--channels", "C3,C4"]
    code, text = _run(capsys, *base, "--seconds", 6, "--out", tmp_path / "out.npy")
    assert code == 0, text
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (2, 1200) and np.isfinite(out).all()
    assert json.loads((tmp_path / "out.json").read_text())["prompt_seconds"] == 3
    code, text = _run(
        capsys, *base, "--seconds", 1, "--prompt-seconds", 4, "--out", tmp_path / "long.npy"
    )
    assert code == 2
    assert "--prompt-seconds 4 exceeds the model's context of 3 s (its 3-s pretraining" in text


def test_edf_keeps_a_quiet_channel_beside_a_loud_one(tmp_path):
    """Each channel gets its own EDF physical range: with one shared range (MNE's default) a
    1 mV channel set the 16-bit step of a 10 µV one, which read back ~0.05 µV off."""
    from eegfast.train.commands.generate import write_output

    rng = np.random.default_rng(0)
    quiet, loud = rng.standard_normal(1000) * 10.0, rng.standard_normal(1000) * 1000.0  # µV
    signal = np.stack([quiet, loud]).astype(np.float32) / 100.0  # model units (100 µV)
    path = write_output(tmp_path / "two.edf", signal, ["C3", "C4"])
    back = mne.io.read_raw_edf(path, preload=True, verbose="error").get_data() * 1e6  # µV
    assert np.abs(back[0] - signal[0] * 100.0).max() < 0.01
    assert np.abs(back[1] - signal[1] * 100.0).max() < 0.5


def test_a_prompt_shorter_than_prompt_seconds_is_noted(checkpoint, tmp_path, capsys):
    """--prompt-seconds 4 of a 2.5-s prompt (or --start near the end) prompted with the 2 whole
    seconds there are, saying so only in the sidecar's prompt_seconds; now also a note."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "short.npy", rng.standard_normal((2, 500)).astype(np.float32) * 20)
    base = ["--model", checkpoint, "--prompt", tmp_path / "short.npy", "--channels", "C3,C4"]
    code, text = _run(
        capsys, *base, "--seconds", 1, "--prompt-seconds", 4, "--out", tmp_path / "a.npy"
    )
    assert code == 0, text
    assert "note: --prompt-seconds 4: " in text
    assert "short.npy has 2 s (whole patches) from 0.5 s on" in text
    assert json.loads((tmp_path / "a.json").read_text())["prompt_seconds"] == 2
    code, text = _run(
        capsys, *base, "--seconds", 1, "--prompt-seconds", 2, "--out", tmp_path / "b.npy"
    )
    assert code == 0 and "note: --prompt-seconds" not in text, text
