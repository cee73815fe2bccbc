"""Metric, baseline, optimiser, validation and config checks that a mutation audit found
missing: each test fails on a one-line change of the code it names (a dropped clamp, an
off-by-one bound, a skipped check, a lost argument) that the other tests let through."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from eegfast.data import collate_padded
from eegfast.train import validation as validation_mod
from eegfast.train.baseline import band_power_features, fit_predict_logistic
from eegfast.train.config import ConfigError, OptimConfig, RunConfig, resolve_config
from eegfast.train.data import ItemInfo, TrainData
from eegfast.train.distributed import DistInfo
from eegfast.train.metrics import confusion, group_folds
from eegfast.train.optim import (
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
    param_groups,
)
from eegfast.train.validation import (
    ValidationSplitError,
    Validator,
    hold_out,
    tokenizer_evaluator,
    window_keys,
)
from tests.train.fakes import TinyClassifier
from tests.train.test_validation_split import _data

# --- metrics -----------------------------------------------------------------------------------


def test_group_folds_lowers_the_fold_count_to_the_number_of_groups():
    """3 subjects and ``folds=5`` (the synthetic report passes its folds as they are): 3
    folds, each testing one subject (scikit-learn refuses more splits than groups)."""
    folds = group_folds([0, 1] * 3, ["a", "a", "b", "b", "c", "c"], 5)
    assert len(folds) == 3
    assert sorted(sorted(test.tolist()) for _, test in folds) == [[0, 1], [2, 3], [4, 5]]


def test_group_folds_stratify_when_every_class_is_in_exactly_k_groups():
    """Class 0 in groups a (10 windows) and b (1), class 1 in c (6) and d (5), 2 folds: each
    class is in as many groups as there are folds, so the folds are stratified and each tests
    both classes. (GroupKFold balances the sizes instead: {a, b} against {c, d}, one class
    per fold, where balanced accuracy scores one class only.)"""
    groups = ["a"] * 10 + ["b"] + ["c"] * 6 + ["d"] * 5
    labels = np.array([0] * 11 + [1] * 11)
    for seed in range(4):
        for _, test in group_folds(labels, groups, 2, seed=seed):
            assert set(labels[test].tolist()) == {0, 1}


def test_group_folds_are_drawn_from_the_seed():
    """Stratified folds are shuffled by ``seed`` (train.seed): the same seed gives the same
    folds, some other seed other folds."""
    labels = [0] * 6 + [1] * 6
    groups = [f"g{i // 2}" for i in range(12)]

    def tests(seed):
        return [sorted(test.tolist()) for _, test in group_folds(labels, groups, 3, seed=seed)]

    assert tests(0) == tests(0)
    assert any(tests(seed) != tests(0) for seed in range(1, 6))


def test_confusion_has_a_row_and_column_for_every_class_even_unseen_ones():
    """3 classes, a fold whose windows are all class 0 and predicted 0 or 2: (3, 3), rows the
    true class, columns the predicted one."""
    probabilities = np.eye(3)[[0, 2, 0]]
    matrix = confusion([0, 0, 0], probabilities, 3)
    assert matrix.tolist() == [[2, 0, 1], [0, 0, 0], [0, 0, 0]]


# --- the band-power baseline -------------------------------------------------------------------


def test_band_powers_are_log_welch_densities_over_half_open_1_hz_bands():
    """A unit sine of 4 Hz (power 1/2) over 1-s Hann segments: its 4 Hz bin holds 1/3 and the
    3 and 5 Hz bins 1/12 each. Bands are [lo, hi) in 1 Hz bins, so delta (1, 2, 3 Hz) has
    mean 1/36 and theta (4..7 Hz) (1/3 + 1/12) / 4 = 5/48; a 30 Hz sine is gamma's (30..44
    Hz: 5/12 / 15 = 1/36), beta (13..29 Hz) has its 29 Hz bin only (1/12 / 17)."""
    t = np.arange(600) / 200.0
    x = np.stack([np.sin(2 * np.pi * 4 * t), np.sin(2 * np.pi * 30 * t)]).reshape(2, 3, 200)
    features = band_power_features(x).reshape(2, 5)  # electrode-major, bands in order
    np.testing.assert_allclose(features[0, :2], np.log([1 / 36, 5 / 48]), rtol=1e-6)
    np.testing.assert_allclose(features[1, 3:], np.log([1 / 12 / 17, 1 / 36]), rtol=1e-6)


def test_logistic_baseline_puts_each_class_in_its_own_column_when_one_is_not_trained():
    """Training windows of classes 0 and 2 only (of 3): the probabilities go to columns 0 and
    2, class 1's column is 0."""
    rng = np.random.default_rng(0)
    train_x = np.concatenate([rng.normal(-3, 1, (10, 2)), rng.normal(3, 1, (10, 2))])
    train_y = np.array([0] * 10 + [2] * 10)
    probs = fit_predict_logistic(train_x, train_y, np.array([[3.0, 3.0], [-3.0, -3.0]]), 3)
    assert probs.argmax(1).tolist() == [2, 0]
    assert probs[:, 1].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_logistic_baseline_standardises_its_features():
    """Features are standardised before the L2-regularised fit, so the units of a feature
    (band powers in V² or µV²) do not change the prediction."""
    rng = np.random.default_rng(0)
    train_x = rng.standard_normal((40, 2))
    train_y = (train_x[:, 0] + 0.5 * rng.standard_normal(40) > 0).astype(int)
    test_x = rng.standard_normal((5, 2))
    units = np.array([1e4, 1e-4])
    np.testing.assert_allclose(
        fit_predict_logistic(train_x * units, train_y, test_x * units, 2),
        fit_predict_logistic(train_x, train_y, test_x, 2),
        atol=1e-9,
    )


# --- optimiser and schedule --------------------------------------------------------------------


def test_frozen_parameters_are_in_no_group_and_a_fully_frozen_model_is_refused():
    model = TinyClassifier(depth=2)
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    names = {n for g in param_groups(model, 0.05, layer_decay=0.75) for n in g["names"]}
    assert names and not any(n.startswith("blocks.0.") for n in names)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), torch.device("cpu"))


def test_the_optimizer_takes_the_configured_betas_and_eps():
    config = OptimConfig(betas=(0.8, 0.95), eps=1e-6, fused="false")
    optimizer = build_optimizer(TinyClassifier(), config, torch.device("cpu"))
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in optimizer.param_groups)


def test_without_layer_decay_there_are_two_groups_decay_and_no_decay():
    """``layer_decay=1``: one group with weight decay and one without (an optimizer state
    saved by a run loads only into the same groups)."""
    groups = param_groups(TinyClassifier(depth=3), 0.05)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0)]


def test_warmup_ends_at_the_base_lr_and_the_lr_never_exceeds_it_or_rises_after_the_end():
    kw = dict(total_steps=20, warmup_steps=4, base_lr=1.0, min_lr=0.1)
    assert cosine_with_warmup(4, **kw) == pytest.approx(1.0)  # the first step after warm-up
    assert max(cosine_with_warmup(s, **kw) for s in range(30)) == pytest.approx(1.0)
    # past total_steps (a resumed run's step count beyond a shorter schedule): min_lr
    assert [cosine_with_warmup(s, **kw) for s in (20, 25, 36)] == pytest.approx([0.1] * 3)


def test_the_warmup_fraction_is_rounded_to_steps_and_warmup_steps_wins():
    """``warmup_fraction=0.1`` of 17 steps: 1.7, rounded to 2 warm-up steps (lr/2, then lr);
    ``warmup_steps=4`` takes 4 whatever the fraction."""
    model = TinyClassifier()
    config = OptimConfig(lr=1.0, min_lr=0.0, warmup_fraction=0.1, fused="false")
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config, total_steps=17)
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, cosine_with_warmup(2, **_kw(17, 2))])
    config = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4, warmup_fraction=0.1, fused="false")
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    build_scheduler(optimizer, config, total_steps=17)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


def _kw(total: int, warmup: int) -> dict:
    return dict(total_steps=total, warmup_steps=warmup, base_lr=1.0, min_lr=0.0)


# --- the held-out split ------------------------------------------------------------------------


def test_a_subject_split_never_takes_the_last_recordings_even_when_closest():
    """1 + 2 recordings, 0.6 held out (2): after the small subject, the large one would bring
    the count as close to 2 (3) as leaving it out (1), but would leave nothing to train on."""
    data = _data({"small": 1, "large": 2})
    for seed in range(8):
        split = hold_out(data, 0.6, seed)
        assert split.train and split.val


def test_a_subject_as_far_over_the_wanted_count_as_without_it_is_taken():
    """10 recordings, 0.1 held out (1): a subject of 2 drawn first is 1 over, as far as
    leaving it out is short, and is taken; the subject of 1 is taken when drawn first."""
    data = _data({"a": 2, "b": 2, "c": 1, "d": 5})
    held = {len(hold_out(data, 0.1, seed).recordings) for seed in range(12)}
    assert held == {1, 2}


def test_when_every_subject_is_over_twice_the_wanted_count_the_smallest_is_held_out():
    data = _data({"a": 3, "b": 5, "c": 4})  # 12 recordings, 0.05 -> 1 wanted
    for seed in range(6):
        split = hold_out(data, 0.05, seed)
        assert split.subjects == ["a"] and len(split.recordings) == 3


def test_subjects_listing_every_recording_are_refused_not_all_held_out():
    """The same two files under two subject names: any subject held out takes every
    recording; refused, naming data.val_fraction (it held out everything and trained on
    nothing)."""
    items = [
        ItemInfo(0, "t", subject, f"/eeg/r{r}.edf", -1, (0, 1), 4)
        for subject in ("a", "b")
        for r in range(2)
    ]
    with pytest.raises(ValidationSplitError, match=r"data.val_fraction=0.4: every subject"):
        hold_out(TrainData(None, items, {"t": []}, []), 0.4, 0)


def test_a_resume_takes_the_recorded_mask_seed_or_else_the_checkpoints_train_seed():
    """The masks' seed is the run's first train.seed: the record's, whatever the seed of the
    checkpoint's config (a run resumed before with another seed) or of this resume; a record
    of an older version without it takes the checkpoint's train.seed."""
    data = _data({f"s{k}": 2 for k in range(4)})
    record = hold_out(data, 0.25, 7).record()
    config = {"train": {"seed": 3}}
    assert hold_out(data, 0.25, 5, resumed={"validation": record, "config": config}).seed == 7
    del record["seed"]
    assert hold_out(data, 0.25, 5, resumed={"validation": record, "config": config}).seed == 3


def test_a_resume_without_the_held_out_recordings_or_with_only_them_is_refused():
    data = _data({f"s{k}": 2 for k in range(4)})
    first = hold_out(data, 0.25, 0)
    resumed = {"validation": first.record()}
    (subject,) = first.subjects
    others = _data({f"s{k}": 2 for k in range(4) if f"s{k}" != subject})
    with pytest.raises(ValidationSplitError, match=r"data.val_fraction=0.25: none of the 2"):
        hold_out(others, 0.25, 0, resumed=resumed)
    with pytest.raises(ValidationSplitError, match="none to train on"):
        hold_out(_data({subject: 2}), 0.25, 0, resumed=resumed)


def test_a_held_out_recording_left_out_of_one_resume_stays_held_out_in_the_next():
    """Resumed once without one of its held-out recordings, a run recorded only those present:
    resumed again with every recording, it trained on the one left out before (validation
    data leaked into training)."""
    data = _data({"s": 6})
    first = hold_out(data, 0.34, 0)
    assert first.unit == "recording" and len(first.recordings) == 2
    gone, kept = first.recordings
    fewer = TrainData(None, [i for i in data.items if i.recording != gone], {"t": []}, [])
    second = hold_out(fewer, 0.34, 0, resumed={"validation": first.record()})
    assert second.recordings == [kept]  # (what it validates on now)
    assert second.record()["recordings"] == [gone, kept]
    third = hold_out(data, 0.34, 0, resumed={"validation": second.record()})
    assert third.recordings == [gone, kept]
    assert all(data.items[i].recording not in (gone, kept) for i in third.train)


def test_validation_mask_keys_follow_the_file_name_not_its_folder():
    """The same recordings prepared in another folder (another machine, a moved folder) get
    the same masks; another window of a recording another one."""

    def data(folder: str) -> TrainData:
        items = [ItemInfo(0, "t", "s", f"{folder}/r{r}.edf", -1, (0, 1), 4) for r in (0, 0, 1)]
        return TrainData(None, items, {"t": []}, [])

    keys = window_keys(data("/old/place"), [0, 1, 2])
    assert keys == window_keys(data("/elsewhere"), [0, 1, 2])
    assert len(set(keys.values())) == 3


# --- the validator ---------------------------------------------------------------------------


def _windows(values: list[float], electrodes: list[tuple[int, ...]] | None = None) -> TrainData:
    """One window per value, all of it that value; ``electrodes``: each window's input_chans
    (C + 1 entries)."""
    electrodes = electrodes or [(0, 1, 2)] * len(values)
    items = [
        ItemInfo(0, "t", "s", f"/eeg/r{i}.edf", -1, chans, 4) for i, chans in enumerate(electrodes)
    ]
    dataset = [
        {"x": torch.full((len(chans) - 1, 1, 200), float(v)), "input_chans": torch.tensor(chans)}
        for v, chans in zip(values, electrodes, strict=True)
    ]
    return TrainData(dataset, items, {"t": []}, [])


def _mean_evaluator(modes: list[bool] | None = None):
    """loss: the batch's mean value; codes: each window's value - 1 (-1 for 0: none)."""

    def evaluate(model, batch):
        assert not batch["channel_padding_mask"].any(), "a batch mixed electrode sets"
        if modes is not None:
            modes.append(model.training)
        x = batch["x"]
        return x.mean(), {"double": 2 * x.mean()}, x[:, 0, 0, 0].long() - 1

    return evaluate


def test_validation_losses_are_means_over_windows_not_batches():
    """Windows 1, 2, 3 in batches of 2 ([1, 2] and [3]): val/loss is 2 (a mean over the
    batches would be 2.25); the codes -1 (none), 1, 2 of 4 use half the codebook, evenly."""
    validator = Validator(
        _windows([0.0, 2.0, 3.0]),
        [0, 1, 2],
        _mean_evaluator(),
        device=torch.device("cpu"),
        batch_size=2,
        num_codes=4,
    )
    scalars = validator(nn.Linear(1, 1))
    assert scalars["val/loss"] == pytest.approx(5 / 3)
    assert scalars["val/double"] == pytest.approx(10 / 3)
    assert scalars["val/codebook_usage"] == 0.5
    assert scalars["val/perplexity"] == pytest.approx(2.0)


def test_validation_batches_never_mix_electrode_sets():
    validator = Validator(
        _windows([1.0, 2.0, 3.0], [(0, 1, 2), (0, 1, 2, 3), (0, 1, 2)]),
        [0, 1, 2],
        _mean_evaluator(),
        device=torch.device("cpu"),
        batch_size=4,
    )
    assert validator(nn.Linear(1, 1))["val/loss"] == pytest.approx(2.0)


def test_the_validator_evaluates_in_eval_mode_and_leaves_the_mode_as_it_found_it():
    modes: list[bool] = []
    validator = Validator(_windows([1.0]), [0], _mean_evaluator(modes), device=torch.device("cpu"))
    model = nn.Linear(1, 1)
    for training in (True, False):
        model.train(training)
        validator(model)
        assert model.training is training
    assert modes == [False, False]


def test_two_ranks_evaluate_every_held_out_window_once(monkeypatch):
    """5 windows in batches of 2 on 2 ranks: rank 0 takes batches 0 and 2, rank 1 batch 1 and
    batch 0 again with weight 0 (the same number of forward passes on each). The mean over
    both ranks is that of the 5 windows, and the code counts are each window's once."""
    reduced: dict[int, torch.Tensor] = {}

    def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
        reduced[info.rank] = values.clone()
        # rank 0 runs first here: its own sums; rank 1 gets the mean of both, as the real one
        return values if info.rank == 0 else (reduced[0] + values) / 2

    monkeypatch.setattr(validation_mod, "all_reduce_mean", all_reduce_mean)
    data = _windows([1.0, 2.0, 3.0, 4.0, 5.0])
    passes = []
    for rank in (0, 1):
        validator = Validator(
            data,
            list(range(5)),
            _mean_evaluator(),
            device=torch.device("cpu"),
            dist_info=DistInfo(rank=rank, world_size=2),
            batch_size=2,
            num_codes=8,
        )
        passes.append(len(validator.batches))
        scalars = validator(nn.Linear(1, 1))
    assert passes == [2, 2]
    assert scalars["val/loss"] == pytest.approx(3.0)
    assert scalars["val/codebook_usage"] == 5 / 8
    assert scalars["val/perplexity"] == pytest.approx(5.0)


def test_validation_batches_hold_batch_size_windows():
    sizes: list[int] = []

    def evaluate(model, batch):
        sizes.append(len(batch["x"]))
        return batch["x"].mean(), {}, None

    validator = Validator(
        _windows([1.0] * 5), list(range(5)), evaluate, device=torch.device("cpu"), batch_size=2
    )
    validator(nn.Linear(1, 1))
    assert sizes == [2, 2, 1]


def test_the_tokenizer_evaluator_passes_the_batchs_electrode_padding():
    """Windows of 2 and 3 electrodes in one batch: the tokenizer is given which electrodes
    are padding (without it the padded zeros were reconstructed and scored as EEG)."""
    seen = {}

    def tokenizer(x, input_chans, *, channel_padding_mask=None):
        seen["mask"] = channel_padding_mask
        zero = torch.zeros(())
        return SimpleNamespace(
            loss=zero, commitment_loss=zero, amplitude_loss=zero, phase_loss=zero, indices=None
        )

    batch = collate_padded(
        [
            {"x": torch.zeros(2, 1, 200), "input_chans": torch.arange(3)},
            {"x": torch.zeros(3, 1, 200), "input_chans": torch.arange(4)},
        ]
    )
    tokenizer_evaluator(torch.device("cpu"))(tokenizer, batch)
    assert seen["mask"].tolist() == [[False, False, True], [False, False, False]]


# --- the run configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=true", "train.epochs: expected int, got True"),
        ("optim.lr=false", "optim.lr: expected float, got False"),
        ("optim.lr.scale=3", "unknown config key 'optim.lr.scale'"),
        ("=3", "--set expects key=value"),
        ("data.val_fraction=1", r"data.val_fraction must be in \[0, 1\), got 1.0"),
        ("optim.eps=0", r"optim.eps must be > 0, got 0.0"),
        ("optim.warmup_fraction=1.5", r"optim.warmup_fraction must be in \[0, 1\], got 1.5"),
        ("upcycle.top_k=0", r"upcycle.top_k must be >= 1, got 0"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(override, message):
    """A YAML bool is no number (True is no epoch count), a key under a setting is unknown,
    and each range keeps out the values that break its use (eps 0 divides by zero,
    top_k 0 routes to no expert, a val_fraction of 1 trains on nothing)."""
    with pytest.raises(ConfigError, match=message):
        resolve_config(RunConfig(), None, [override])


def test_a_warmup_fraction_of_one_is_valid():
    assert resolve_config(RunConfig(), None, ["optim.warmup_fraction=1"]).optim.warmup_fraction == 1


def test_with_overrides_checks_the_ranges():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        RunConfig().with_overrides({"optim.lr": 0})


def test_set_wins_over_a_commands_own_flags(tmp_path):
    """Defaults, file, the command's flags, then --set: ``--set train.epochs=3`` beats the
    ``--epochs 2`` a command passes as a flag."""
    config = resolve_config(RunConfig(), None, ["train.epochs=3"], flags={"train.epochs": 2})
    assert config.train.epochs == 3


def test_a_range_error_names_the_file_only_when_the_file_set_the_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=f"^{path}: optim.lr must be > 0"):
        resolve_config(RunConfig(), path)
    path.write_text("optim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="^optim.lr must be > 0"):
        resolve_config(RunConfig(), path, ["optim.lr=0"])


@pytest.mark.parametrize(("name", "text"), [("RUN.YAML", "train:\n  epochs: 2\n"), ("e.yml", "")])
def test_config_files_by_upper_case_suffix_and_empty_ones_are_read(tmp_path, name, text):
    """``RUN.YAML`` is YAML; an empty YAML file (or one of comments only) sets nothing."""
    path = tmp_path / name
    path.write_text(text)
    assert resolve_config(RunConfig(), path).train.epochs == (2 if text else 1)
