"""Gaps a mutation audit of hybrid pretraining (eegfast.train.hybrid), the synthetic-EEG report
(eegfast.train.synthetic_report), eegfast.train.arch and the pretrain / tokenizer / upcycle
commands found in the tests: each test here fails on a one-line slip that the other tests let
through (a padding mask not passed on, a setting not wired, a synthetic arm trained on copies of
the real windows). Tiny models, a step or two, no training runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eegfast.models import create_model
from eegfast.train.hybrid import create_hybrid_pretrain_model, hybrid_step
from eegfast.train.objectives import StepContext, masked_step
from tests.train.test_run_folder import prepared, tokenizer_run  # noqa: F401

# --- eegfast.train.hybrid: what the step hands the model ---------------------------------------


def _padded_batch() -> dict:
    """Two windows (B=2, C=4, A=2): the first has 3 electrodes and a padded fourth."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 2, 200)
    x[0, 3] = 0.0
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[0, 3] = True
    chans = torch.arange(5).repeat(2, 1)
    chans[0, 4] = 0
    return {"x": x, "input_chans": chans, "channel_padding_mask": padding, "index": torch.arange(2)}


def _spy(model, seen: dict):
    """Record the targets, mask and channel padding mask ``model``'s forward is given."""

    def forward(x, input_chans, targets, mask=None, **kwargs):
        seen.update(targets=targets, mask=mask, padding=kwargs.get("channel_padding_mask"))
        return model.__class__.forward(model, x, input_chans, targets, mask, **kwargs)

    model.forward = forward
    return model


def test_hybrid_step_masks_and_pads_a_padded_batch_as_the_masked_step():
    """The masked half draws the step's masks over the real electrodes only (never a padded
    one's tokens) and the model gets the batch's channel padding mask: the masks drawn without
    the padding, or the model run without it (attending to the zero electrodes), passed the
    tests, which only compared the tokenizer's codes."""
    batch = _padded_batch()
    tokenizer = create_model("vqnsp_tiny").eval()
    ctx = StepContext(torch.device("cpu"), tokenizer=tokenizer)
    masked, hybrid = {}, {}
    masked_step(_spy(create_model("labram_tiny_pretrain"), masked), batch, ctx)
    hybrid_step(_spy(create_hybrid_pretrain_model("labram_tiny_pretrain"), hybrid), batch, ctx)
    assert torch.equal(hybrid["padding"], batch["channel_padding_mask"])
    assert torch.equal(hybrid["mask"], masked["mask"])
    assert not hybrid["mask"][0, 6:].any()  # electrode 3's two patches: padding, never masked


@pytest.mark.parametrize(
    ("hybrid", "codes"),
    [
        ({"mask_weight": 0.0}, True),  # the forecast's next-code targets
        ({"mask_weight": 0.5, "predict_tokens": False}, True),  # the masked half's targets
        ({"mask_weight": 0.0, "predict_tokens": False}, False),  # signal forecasting only
    ],
)
def test_hybrid_step_codes_the_batch_whenever_either_part_needs_codes(hybrid, codes):
    """The tokenizer runs when the masked half (λ > 0) or the forecast's code head needs
    targets, and is not needed otherwise; needing both (``and``) went unnoticed as every test
    used the default λ = 0.5 with the code head on."""
    batch = _padded_batch()
    seen: dict = {}
    model = _spy(create_hybrid_pretrain_model("labram_tiny_pretrain", hybrid=hybrid), seen)
    tokenizer = create_model("vqnsp_tiny").eval()
    out = hybrid_step(model, batch, StepContext(torch.device("cpu"), tokenizer=tokenizer))
    assert (seen["targets"] is not None) == codes
    assert out.loss.isfinite()
    if codes:
        with pytest.raises(ValueError, match="needs a trained tokenizer"):
            hybrid_step(model, batch, StepContext(torch.device("cpu")))
    else:  # no tokenizer needed
        assert hybrid_step(model, batch, StepContext(torch.device("cpu"))).loss.isfinite()
    if hybrid.get("predict_tokens", True):
        assert "ar_token_loss" in out.metrics


# --- eegfast.train.synthetic_report: the data, the training pieces, the report ---------------


def _fake_recordings(monkeypatch):
    """load_tasks over stand-in recordings: every sample holds its own index (so a window's
    first sample says where it starts); eegmmidb runs have cues T1 at 1 s (4.1 s long), T2 at
    7 s (4.3 s), T0 at 12 s and a T1 too close to the end for a window."""
    import eegfast.train.synthetic_report as report

    def read(path, notch, channels=None):
        n = 40 * 200 if "Subject" in path.name else 20 * 200
        signal = np.tile(np.arange(n, dtype=np.float32), (3, 1))
        cues = SimpleNamespace(
            onset=[1.0, 7.0, 12.0, 17.5],
            duration=[4.1, 4.3, 1.0, 4.1],
            description=["T1", "T2", "T0", "T1"],
        )
        return signal, ["C3", "C4", "CZ"], cues

    monkeypatch.setattr(report, "_read", read)
    names = [f"Subject0{s}_{k}.edf" for s in (0, 1) for k in (1, 2)]
    return {name: Path(name) for name in [*names, "S001R04.edf", "S001R08.edf"]}


def test_report_windows_start_where_their_recordings_say_and_carry_their_labels(monkeypatch):
    """eegmat windows tile each recording from its second second on, labelled by the file
    (_1 rest, _2 arithmetic); eegmmidb windows start at their cue's onset, T1 left fist and T2
    right, and the continuation note takes the shortest cue. A window shifted by a sample,
    overlapping windows, swapped cue labels or the longest cue passed every test."""
    from eegfast.train.synthetic_report import ReportSettings, load_tasks

    files = _fake_recordings(monkeypatch)
    eegmat, eegmmidb = load_tasks(files, ReportSettings(window_seconds=4))
    # 40-s recordings: windows at 1, 5, ..., 33 s (one second kept free at either end)
    starts = list(range(200, 34 * 200 + 1, 800))
    assert eegmat.x.shape == (4 * len(starts), 3, 4, 200)
    np.testing.assert_array_equal(eegmat.x[: len(starts), 0, 0, 0], starts)
    last = eegmat.x[:, 1].reshape(len(eegmat.x), -1)[:, -1]  # each window's last sample
    np.testing.assert_array_equal(last, [s + 799 for s in starts] * 4)
    assert eegmat.labels.tolist() == ([0] * len(starts) + [1] * len(starts)) * 2
    assert eegmat.groups.tolist() == ["Subject00"] * 2 * len(starts) + ["Subject01"] * 2 * len(
        starts
    )
    np.testing.assert_array_equal(eegmmidb.x[:, 0, 0, 0], [200, 1400] * 2)
    assert eegmmidb.labels.tolist() == [0, 1, 0, 1]
    assert eegmmidb.groups.tolist() == ["S001R04"] * 2 + ["S001R08"] * 2
    assert "cues last 4.1 s" in eegmmidb.continuation_note


def test_report_spreads_a_limited_number_of_windows_over_the_whole_recording():
    from eegfast.train.synthetic_report import _spread

    assert _spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert _spread(list(range(3)), 4) == [0, 1, 2]


def _tiny_windows(n: int = 6, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(n, 3, 2, 200, generator=torch.Generator().manual_seed(seed))


def _chans() -> torch.Tensor:
    from eegfast.electrodes import labram_input_chans

    return torch.tensor(labram_input_chans(["C3", "C4", "CZ"]))


def test_report_tokenizer_is_frozen_in_eval_mode_and_the_hybrid_gets_the_reports_lambda():
    """The tokenizer handed to the hybrid's training must be in eval mode (in training mode
    every target lookup updated its codebook's EMA); the hybrid model is built with the
    settings' λ (mask_weight), which the report prints beside its results."""
    from eegfast.train.synthetic_report import ReportSettings, train_hybrid, train_tokenizer

    settings = ReportSettings(tokenizer_steps=1, hybrid_steps=1, batch_size=2, mask_weight=0.3)
    x, chans = _tiny_windows(), _chans()
    tokenizer, losses = train_tokenizer(x, chans, settings, seed=0)
    assert not tokenizer.training and len(losses) == 1
    assert not any(p.requires_grad for p in tokenizer.parameters())
    model, history = train_hybrid(x, chans, tokenizer, settings, seed=0)
    assert model.config.mask_weight == 0.3 and len(history) == 1


def test_report_hybrid_draws_new_masks_as_it_revisits_a_window(monkeypatch):
    """The masks are seeded by (seed, epoch, window): fit advances the epoch on each pass over
    the data, but the report's loop (windows drawn with replacement) set only ctx.step, which
    the masks do not read, so every window kept one mask for the whole of its training."""
    import eegfast.train.hybrid as hybrid
    from eegfast.train.synthetic_report import ReportSettings, train_hybrid

    drawn = []

    def step_masks(ctx, batch, token_padding):
        drawn.append(original(ctx, batch, token_padding))
        return drawn[-1]

    original = hybrid.step_masks
    monkeypatch.setattr(hybrid, "step_masks", step_masks)
    tokenizer = create_model("vqnsp_tiny").eval()
    settings = ReportSettings(hybrid_steps=3, batch_size=1)
    train_hybrid(_tiny_windows(1), _chans(), tokenizer, settings, seed=0)  # one window, 3 times
    assert len(drawn) == 3
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])
    # ... and the same run draws the same masks (the report is reproducible)
    again = len(drawn)
    train_hybrid(_tiny_windows(1), _chans(), tokenizer, settings, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(drawn[:again], drawn[again:], strict=True))


def test_report_finetuning_starts_from_the_hybrid_checkpoint_and_gives_probabilities():
    """finetune_and_predict must load the hybrid checkpoint's backbone (dropped, the classifier
    started from scratch), train finetune_steps steps (0 here: the loaded model itself) and
    return each test window's class probabilities (softmax over classes, not windows)."""
    from eegfast.models.checkpoint import load_checkpoint
    from eegfast.train.synthetic_report import ReportSettings, finetune_and_predict

    torch.manual_seed(1)
    state = create_hybrid_pretrain_model("labram_tiny_pretrain").state_dict()
    x, chans = _tiny_windows(), _chans()
    settings = ReportSettings(finetune_steps=0, hybrid_steps=3, tokenizer_steps=3, batch_size=2)
    probs = finetune_and_predict(state, x, torch.tensor([0, 1] * 3), x[:4], chans, 3, settings, 5)
    torch.manual_seed(5)
    expected = create_model("labram_tiny", n_outputs=3)
    load_checkpoint(expected, state)
    with torch.no_grad():
        want = expected.eval()(x[:4], chans).softmax(-1).numpy()
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)


def test_band_ratios_are_the_median_over_electrodes():
    """One electrode 10x louder in the synthetic windows: its power ratio is 100 and the two
    others' 1; the median over electrodes is 1 (a mean would say 34)."""
    from eegfast.train.synthetic_report import band_power_ratios

    real = np.random.default_rng(0).normal(size=(20, 3, 2, 200))
    synthetic = real.copy()
    synthetic[:, 0] *= 10
    ratios = band_power_ratios(real, synthetic)
    for kind in ("absolute", "relative"):
        assert all(abs(v - 1) < 1e-9 for v in ratios[kind].values()), kind


def test_band_powers_leave_each_bands_upper_edge_to_the_next_band():
    """Bands are [lo, hi) on the 1-Hz Welch grid: a tone at exactly 8 Hz is alpha (8-13 Hz);
    theta (4-8 Hz) gets only its Hann-window leakage into the 7-Hz bin. Counted in both bands,
    the 8-Hz bin raised theta's ratio several times over."""
    from scipy.signal import welch

    from eegfast.train.synthetic_report import band_power_ratios

    real = np.random.default_rng(0).normal(size=(10, 2, 2, 200))
    tone = np.sin(2 * np.pi * 8.0 * np.arange(400) / 200).reshape(2, 200)
    synthetic = real + 3.0 * tone

    def theta(x):  # (C,) mean 4-7 Hz power over the windows
        freqs, psd = welch(x.reshape(len(x), 2, -1), fs=200, nperseg=200)
        return psd[..., (freqs >= 4) & (freqs < 8)].mean(-1).mean(0)

    ratios = band_power_ratios(real, synthetic)
    assert ratios["absolute"]["alpha"] > 5
    assert ratios["absolute"]["theta"] == pytest.approx(np.median(theta(synthetic) / theta(real)))
    for band in ("delta", "beta", "gamma"):
        assert abs(ratios["absolute"][band] - 1) < 1e-6, band


def test_auroc_refuses_prompt_indices_outside_the_real_windows():
    from eegfast.train.synthetic_report import real_vs_synthetic_auroc

    real = np.random.default_rng(0).normal(size=(6, 2, 2, 200))
    with pytest.raises(ValueError, match="prompts must hold one index into real"):
        real_vs_synthetic_auroc(real, real, prompts=np.arange(1, 7))


def test_augmentation_verdict_at_the_minimum_of_sources_and_without_a_change():
    from eegfast.train.finetune import MIN_VERDICT_UNITS
    from eegfast.train.synthetic_report import _augmentation_verdict

    gain = {"p_value": 0.01, "only_with": 9, "only_without": 1}
    assert _augmentation_verdict(gain, 0.1, MIN_VERDICT_UNITS) == "a significant gain"
    assert _augmentation_verdict(gain, 0.1, MIN_VERDICT_UNITS - 1).startswith("no verdict")
    # more (or fewer) windows right, balanced accuracy unchanged: no consistent change
    loss = {"p_value": 0.01, "only_with": 1, "only_without": 9}
    assert _augmentation_verdict(loss, -0.1, 8) == "a significant loss"
    for test in (gain, loss):
        assert _augmentation_verdict(test, 0.0, 8).startswith("no consistent difference")


def test_training_summary_is_the_mean_of_the_last_steps():
    from eegfast.train.synthetic_report import _mean_last

    history = [{"loss": float(i), "masked_loss": 2.0 * i} for i in range(20)]
    assert _mean_last(history, 10) == {"loss": 14.5, "masked_loss": 29.0}


def test_report_trains_the_augmented_arms_on_the_synthetic_windows(monkeypatch):
    """Both "+synthetic" arms train on the real training windows and their continuations, the
    band-power models are scored on the test windows in order, and the generation speed counts
    windows x patches. The earlier tests stubbed the generator with a copy of its prompts,
    under which an arm trained on the real windows twice looked the same (here the
    "generator" doubles its prompt, which every band power tells apart)."""
    import eegfast.train.synthetic_report as report
    from eegfast.train.baseline import band_power_features

    class Tokenizer:
        config = SimpleNamespace(num_codes=8)

        def get_codebook_indices(self, x, chans):
            return torch.zeros(x.shape[0], x.shape[1] * x.shape[2], dtype=torch.long)

    seen: dict[str, list] = {"labram": [], "bandpower": [], "test": []}

    def finetune(state, x, y, test_x, chans, num_classes, settings, seed):
        seen["labram"].append((x.clone(), y.clone()))
        return np.full((len(test_x), num_classes), 1.0 / num_classes)

    def band_power(fx, fy, test_features, num_classes, seed=0):
        seen["bandpower"].append((fx, fy))
        seen["test"].append(test_features)
        return np.full((len(test_features), num_classes), 1.0 / num_classes)

    clock = iter(range(1000))
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(report, "train_tokenizer", lambda *a: (Tokenizer(), [1.0, 0.5]))
    step = {"loss": 1.0, "masked_loss": 1.0}
    monkeypatch.setattr(report, "train_hybrid", lambda *a: (torch.nn.Linear(1, 1), [step]))
    monkeypatch.setattr(report, "synthesize", lambda model, x, *a: 2.0 * x)
    monkeypatch.setattr(report, "finetune_and_predict", finetune)
    monkeypatch.setattr(report, "fit_predict_band_power", band_power)
    rng = np.random.default_rng(0)
    n = 16
    task = report.TaskData(
        "t", rng.normal(size=(n, 3, 2, 200)).astype(np.float32), np.arange(n) % 2,
        np.array([f"s{i % 4}" for i in range(n)]), ("C3", "C4", "CZ"), ("a", "b"), "stub",
    )  # fmt: skip
    bar = SimpleNamespace(update=lambda k: None)
    result = report.run_task(task, report.ReportSettings(folds=2), torch.device("cpu"), bar)
    feats = np.stack([band_power_features(w) for w in task.x])
    for f, fold in enumerate(result["folds"]):
        train = np.flatnonzero(np.isin(task.groups, fold["train_groups"]))
        test = np.flatnonzero(np.isin(task.groups, fold["test_groups"]))
        x_tr = torch.from_numpy(task.x[train])
        (x_real, _), (x_aug, y_aug) = seen["labram"][2 * f : 2 * f + 2]
        torch.testing.assert_close(x_real, x_tr)
        torch.testing.assert_close(x_aug, torch.cat((x_tr, 2.0 * x_tr)))
        assert y_aug.tolist() == [*task.labels[train], *task.labels[train]]
        (f_real, _), (f_aug, _) = seen["bandpower"][2 * f : 2 * f + 2]
        syn = np.stack([band_power_features(w) for w in 2.0 * task.x[train]])
        np.testing.assert_allclose(f_aug, np.concatenate((f_real, syn)), rtol=1e-5)
        np.testing.assert_allclose(seen["test"][2 * f], feats[test])
        # one clock tick for the generation: windows x patches per tick
        assert fold["generation_patches_per_s"] == len(train) * 2


def test_report_command_passes_its_seed_tasks_and_quick_settings(monkeypatch, tmp_path):
    import eegfast.train.synthetic_report as report

    got = {}
    monkeypatch.setattr(
        report, "run_report", lambda out, settings, **kw: got.update(kw, s=settings)
    )
    args = ["--out", str(tmp_path), "--quick", "--seed", "7", "--tasks", "eegmat"]
    assert report.main(args) == 0
    assert got["s"] == dataclasses.replace(report.ReportSettings.quick(), seed=7)
    assert got["tasks"] == ("eegmat",) and got["quick"] is True


def test_report_figures_are_replaced_not_rewritten_in_place(tmp_path):
    """A PNG is written to a temporary and renamed over the old one (a hard link to the old
    file keeps its content): written in place, a stopped run left half a figure."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eegfast.train.synthetic_report import _save_png

    path = tmp_path / "band_ratios.png"
    path.write_text("old")
    os.link(path, tmp_path / "kept")
    fig = plt.figure()
    _save_png(fig, path)
    plt.close(fig)
    assert (tmp_path / "kept").read_text() == "old"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_hybrid_step_takes_a_compiled_model_under_ddp():
    """``torch.compile`` wraps the model in ``_orig_mod``: the step's type check must look
    through it (as through DDP's ``module``), or compiled hybrid pretraining was refused. A
    compiled model under DDP (``DDP(torch.compile(m))``) gave TypeError: the unwrapping asked
    ``bool(module)``, and a compiled module's ``__len__`` raises for a model without one."""
    from eegfast.train.hybrid import unwrap_model as _unwrap  # (the step's unwrapping)

    model = create_hybrid_pretrain_model("labram_tiny_pretrain")
    assert _unwrap(torch.compile(model)) is model  # (compiles nothing until called)
    ddp = torch.nn.DataParallel(torch.compile(model))  # DDP's layout: the module as .module
    assert _unwrap(ddp) is model


# --- eegfast.train.arch -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"heads": {"mi": 0}}, "heads must map task names to class counts"),
        ({"heads": {"mi": True}}, "heads must map task names to class counts"),
        ({"upcycle": "moe"}, "its upcycle must be an object or null"),
        ({"upcycle": [["num_experts", 2]]}, "its upcycle must be an object or null"),
    ],
)
def test_arch_record_refuses_a_head_of_no_classes_and_an_upcycle_of_no_object(record, problem):
    """A head needs at least one class (a bool is no class count): a record with ``0`` built a
    head of no outputs. An upcycle record that is no object was either torch's error from deep
    in the build or, a list of pairs, taken as one."""
    from eegfast.train.arch import check_arch_record

    arch = {"kind": "classifier", "name": "labram_tiny", "heads": {"mi": 1}}
    check_arch_record(arch, "run/meta.json")
    with pytest.raises(ValueError, match=rf"run/meta\.json: .*{problem}"):
        check_arch_record({**arch, **record}, "run/meta.json")


def test_a_hybrid_run_initialises_a_classifier_with_its_backbone(tmp_path):
    """A hybrid pretraining run maps to the classifier's keys like a masked one (its
    forecasting head and the hybrid settings left behind)."""
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.arch import backbone_from_checkpoint, build_model

    kwargs = {"vocab_size": 64, "hybrid": {"mask_weight": 0.3}, "drop_path_rate": 0.1}
    arch = {"kind": "hybrid", "name": "labram_tiny_pretrain", "kwargs": kwargs}
    torch.manual_seed(0)
    weights = build_model(arch).state_dict()
    ckpt.save_checkpoint(tmp_path / "checkpoints", 5, weights, {"step": 5}, {"arch": arch})
    backbone, state, _ = backbone_from_checkpoint(tmp_path)
    assert backbone == {"kind": "classifier", "name": "labram_tiny", "kwargs": {"num_classes": 0}}
    assert not any(k.startswith("forecast_head.") for k in state)
    model = build_model(backbone)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("fc_norm.") for k in missing)
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, weights["student.blocks.0.attn.qkv.weight"]
    )


# --- eegfast pretrain: which tokenizer -------------------------------------------------------


def _tokenizer_run(folder, steps_and_metrics):
    """A tokenizer run folder with a checkpoint per (step, val/loss or None)."""
    from eegfast.train import checkpoint as ckpt

    arch = {"kind": "tokenizer", "name": "vqnsp_tiny", "kwargs": {}}
    for step, metric in steps_and_metrics:
        weights = {"w": torch.full((2,), float(step))}
        meta = {"arch": arch, "metric": metric, "metric_name": "val/loss", "config": {}}
        ckpt.save_checkpoint(folder / "checkpoints", step, weights, {"step": step}, meta)
    return folder


def test_pretraining_takes_a_tokenizer_runs_best_checkpoint_not_its_newest(tmp_path):
    from eegfast.train.commands.pretrain import tokenizer_checkpoint

    run = _tokenizer_run(tmp_path / "tok", [(10, 0.5), (20, 0.9)])
    path, note = tokenizer_checkpoint(run)
    assert path.name == "step-00000010"
    assert "step-00000010" in note and "lowest val/loss (0.5), not the newest step-00000020" in note
    run = _tokenizer_run(tmp_path / "plain", [(10, None), (20, None)])
    path, note = tokenizer_checkpoint(run)
    assert path.name == "step-00000020" and "its newest checkpoint" in note


def test_a_resumed_pretraining_refuses_a_tokenizer_whose_weights_changed(tmp_path):
    """A resumed run continues only with the tokenizer checkpoint it started with, found by its
    sha256: other weights under the same path would change the targets mid-run."""
    from safetensors.torch import save_file

    from eegfast.train import checkpoint as ckpt
    from eegfast.train.commands.common import CommandError
    from eegfast.train.commands.pretrain import tokenizer_for_run, tokenizer_record

    run = _tokenizer_run(tmp_path / "tok", [(10, 0.5)])
    recorded = tokenizer_record(run)
    path, notes = tokenizer_for_run(str(run), recorded)
    assert Path(path) == run / "checkpoints" / "step-00000010" and notes == []
    save_file({"w": torch.zeros(2)}, str(run / "checkpoints" / "step-00000010" / ckpt.WEIGHTS))
    with pytest.raises(CommandError, match="which is gone or changed"):
        tokenizer_for_run(str(run), recorded)


def test_a_resumed_run_without_tokenizer_uses_its_recorded_checkpoint_once_the_named_is_gone(
    tmp_path,
):
    """The run's config named a tokenizer run folder that is no longer there: the recorded
    checkpoint (folder, or the file for a reference file) is the one to continue with."""
    from eegfast.train.commands.pretrain import recorded_tokenizer

    kept = tmp_path / "kept"
    kept.mkdir()
    record = {"checkpoint": str(kept), "file": "model.safetensors", "sha256": "0" * 64}
    config = {"model": {"tokenizer": str(tmp_path / "gone")}}
    assert recorded_tokenizer({"tokenizer": record, "config": config}) == str(kept)
    file_record = {**record, "file": "vqnsp.pth"}
    assert recorded_tokenizer({"tokenizer": file_record, "config": config}) == str(
        kept / "vqnsp.pth"
    )
    config = {"model": {"tokenizer": str(kept)}}  # still there: as the config named it
    assert recorded_tokenizer({"tokenizer": file_record, "config": config}) == str(kept)


def test_pretraining_warns_for_windows_one_second_longer_than_the_tokenizers(monkeypatch):
    """3-s windows against a tokenizer trained on 2-s ones: its codes for the third patch come
    from a time-embedding row it never trained (a warning), and 2-s windows are fine."""
    from eegfast.train.commands import pretrain

    seen = {"trained_on": {"electrode_rows": [1, 2], "window_seconds": 2}}
    for seconds, warned in ((3, True), (2, False)):
        coverage = {"electrode_rows": [1, 2], "window_seconds": seconds}
        monkeypatch.setattr(pretrain, "embedding_coverage", lambda data, c=coverage: c)
        warnings = pretrain.beyond_tokenizer(seen, data=None)
        assert bool(warnings) == warned, seconds
        if warned:
            assert "3-s windows" in warnings[0] and "at most 2 s" in warnings[0]


def test_pretraining_wires_its_settings_into_the_step_and_keeps_its_records_on_resume(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    """pretrain.mask_ratio reaches the step's masks (not only the model config), the target
    cache's limit is in MiB, the tokenizer's table is checked against the data, and a resumed
    run keeps its model.init record and the embedding rows it trained before (its meta.json),
    continuing with its own tokenizer when none is given (and saying so)."""
    from eegfast.cli import main as cli
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.commands import pretrain
    from tests.train.test_run_folder import pretrain_argv

    fits, tables = [], []
    real_fit, real_check = pretrain.fit, pretrain.check_table_rows

    def fit(*args, **kwargs):
        fits.append(kwargs["ctx"])
        return real_fit(*args, **kwargs)

    def check_table_rows(data, rows, what):
        tables.append(what)
        return real_check(data, rows, what)

    monkeypatch.setattr(pretrain, "fit", fit)
    monkeypatch.setattr(pretrain, "check_table_rows", check_table_rows)
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(pretrain_argv(prepared, tokenizer_run, first)) == 0
    sets = [f"model.init={first}", "pretrain.mask_ratio=0.3", "pretrain.cache_targets_max_mb=1"]
    assert cli(pretrain_argv(prepared, tokenizer_run, second, *sets)) == 0
    ctx = fits[-1]
    assert ctx.mask_ratio == 0.3 and ctx.target_cache.max_bytes == 2**20
    assert tables[-2] == "labram_tiny_pretrain"
    assert tables[-1].startswith(f"the tokenizer {tokenizer_run}")
    meta_file = ckpt.latest_checkpoint(second / "checkpoints").path / ckpt.META
    meta = json.loads(meta_file.read_text())
    assert meta["init"] == str(first)
    meta["trained_on"]["electrode_rows"].append(100)  # as if trained on another electrode too
    meta_file.write_text(json.dumps(meta))
    capsys.readouterr()
    argv = ["pretrain", "--data", str(prepared), "--out", str(second), "--resume", "auto"]
    argv += ["--set", "train.max_steps=4", "--set", "train.batch_size=2", "--no-progress"]
    assert cli(argv) == 0
    assert "this run's own tokenizer" in capsys.readouterr().out
    latest = ckpt.latest_checkpoint(second / "checkpoints")
    resumed = latest.meta
    assert latest.step == 4 and resumed["init"] == str(first)
    assert 100 in resumed["trained_on"]["electrode_rows"]


def test_pretraining_validation_masks_use_the_splits_seed_and_its_own_cache(monkeypatch):
    """The held-out windows are masked with the split's seed (a resumed run's first
    train.seed, whatever train.seed is now: every checkpoint's val/loss on the same masks),
    with a target cache of their own (the training one is keyed by training positions), in
    one rank's micro-batches."""
    from eegfast.train.commands import pretrain
    from eegfast.train.config import RunConfig
    from eegfast.train.objectives import TargetCache

    seen = {}
    monkeypatch.setattr(
        pretrain, "objective_evaluator", lambda step, ctx, cache=None: seen.update(ctx=ctx, c=cache)
    )
    monkeypatch.setattr(pretrain, "Validator", lambda *args, **kwargs: kwargs)
    config = RunConfig().with_overrides({"train.batch_size": 16, "train.grad_accum": 2})
    runtime = SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(world_size=2))
    ctx = StepContext(torch.device("cpu"), seed=3, target_cache=TargetCache(64, max_bytes=999))
    split = SimpleNamespace(val=[0, 1], seed=7)
    kwargs = pretrain._validator(config, runtime, None, split, masked_step, ctx, 64)
    assert seen["ctx"].seed == 7 and ctx.seed == 3
    assert seen["c"] is not ctx.target_cache and seen["c"].max_bytes == 999
    assert kwargs["batch_size"] == 4


# --- eegfast tokenizer ------------------------------------------------------------------------


def test_tokenizer_refuses_a_model_that_is_no_tokenizer(prepared, tmp_path, capsys):  # noqa: F811
    from eegfast.cli import main as cli

    argv = ["tokenizer", "--data", str(prepared), "--out", str(tmp_path / "t")]
    assert cli([*argv, "--model", "labram_tiny", "--no-progress"]) == 2
    assert "--model labram_tiny is not a tokenizer (vqnsp_*)" in capsys.readouterr().err
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_tokenizer_run_summarises_and_records_its_training_windows_only(
    prepared,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """With windows held out, the end-of-run codebook summary ("... of N training windows")
    and the checkpoint's trained_on record read the training windows, and the validation runs
    one rank's micro-batches."""
    from eegfast.cli import main as cli
    from eegfast.train.commands import tokenizer
    from tests.train.test_run_folder import tokenizer_argv

    seen: dict = {}
    real = {name: getattr(tokenizer, name) for name in ("hold_out", "embedding_coverage")}

    def hold_out(*args, **kwargs):
        seen["split"] = real["hold_out"](*args, **kwargs)
        return seen["split"]

    def coverage(data, *args):
        seen["coverage"] = len(data)
        return real["embedding_coverage"](data, *args)

    def validator(*args, **kwargs):
        seen["batch_size"] = kwargs["batch_size"]
        return real_validator(*args, **kwargs)

    real_validator = tokenizer.Validator
    monkeypatch.setattr(tokenizer, "hold_out", hold_out)
    monkeypatch.setattr(tokenizer, "embedding_coverage", coverage)
    monkeypatch.setattr(tokenizer, "Validator", validator)
    monkeypatch.setattr(
        tokenizer, "codebook_summary", lambda m, data, d: seen.update(n=len(data)) or "-"
    )
    sets = ("data.val_fraction=0.5", "train.batch_size=4", "train.grad_accum=2")
    assert cli(tokenizer_argv(prepared, tmp_path / "tok", *sets)) == 0
    n_train = len(seen["split"].train)
    assert 0 < n_train and seen["split"].val
    assert seen["n"] == n_train and seen["coverage"] == n_train and seen["batch_size"] == 2


def test_codebook_summary_leaves_an_eval_model_in_eval_mode(prepared):  # noqa: F811
    from eegfast.train.commands.tokenizer import codebook_summary
    from eegfast.train.data import load_data

    torch.manual_seed(0)
    model = create_model("vqnsp_tiny").eval()
    codebook_summary(model, load_data([str(prepared)]), torch.device("cpu"), max_windows=2)
    assert not model.training


# --- eegfast upcycle --------------------------------------------------------------------------


@pytest.fixture
def pretrained_run(tmp_path):
    """A (random) masked-pretraining checkpoint of labram_tiny."""
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.arch import build_model

    arch = {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": 64}}
    torch.manual_seed(0)
    weights = build_model(arch).state_dict()
    meta = {"arch": arch, "command": "pretrain"}
    ckpt.save_checkpoint(tmp_path / "pre" / "checkpoints", 10, weights, {"step": 10}, meta)
    return tmp_path / "pre"


def _upcycle(model, out, *extra) -> int:
    from eegfast.cli import main as cli

    return cli(["upcycle", "--model", str(model), "--out", str(out), *extra])


def test_upcycle_wires_every_setting_into_the_model_with_set_after_the_flags(
    pretrained_run, tmp_path
):
    """--set comes after --experts/--top-k (later wins, as in the training commands), and the
    noise, layers and tasks reach the recorded architecture the fine-tuning rebuilds."""
    from eegfast.train import checkpoint as ckpt

    out = tmp_path / "moe"
    extra = ["--experts", "4", "--set", "upcycle.num_experts=3", "--top-k", "2", "--tasks", "a,b"]
    extra += ["--set", "upcycle.layers=[1]", "--set", "upcycle.noise_std=0.01"]
    assert _upcycle(pretrained_run, out, *extra) == 0
    meta = ckpt.read_meta(out)
    assert meta["arch"]["upcycle"] == {
        "num_experts": 3, "top_k": 2, "layers": [1], "noise_std": 0.01, "num_tasks": 2,
    }  # fmt: skip
    assert meta["task_names"] == ["a", "b"] and meta["probe_max_abs_diff"] > 0  # noise added


def test_upcycle_noise_follows_the_seed(pretrained_run, tmp_path):
    """The experts' noise is drawn from train.seed: the same seed gives the same model."""
    from eegfast.train import checkpoint as ckpt

    noisy = ["--set", "upcycle.noise_std=0.01"]
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert _upcycle(pretrained_run, tmp_path / name, *noisy, "--set", f"train.seed={seed}") == 0
        runs[name] = ckpt.load_weights(tmp_path / name)
    for key, value in runs["a"].items():
        torch.testing.assert_close(value, runs["b"][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(value, runs["c"][key]) for key, value in runs["a"].items())


def test_upcycle_refuses_an_upcycled_model(pretrained_run, tmp_path, capsys):
    assert _upcycle(pretrained_run, tmp_path / "moe") == 0
    capsys.readouterr()
    assert _upcycle(tmp_path / "moe", tmp_path / "twice") == 2
    assert "this backbone is already a MoE model" in capsys.readouterr().err
    assert not (tmp_path / "twice" / "checkpoints").exists()


def test_upcycle_checks_a_checkpoint_file_against_the_model_set(tmp_path, capsys):
    """model.name set: a checkpoint file without an eegfast record must be that model, not
    whatever its shapes fit."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(create_model("labram_tiny").state_dict(), str(path))
    assert _upcycle(path, tmp_path / "moe", "--set", "model.name=labram_base") == 2
    err = capsys.readouterr().err
    assert "labram_base" in err and not (tmp_path / "moe" / "checkpoints").exists()
    assert _upcycle(path, tmp_path / "moe", "--set", "model.name=labram_tiny") == 0
