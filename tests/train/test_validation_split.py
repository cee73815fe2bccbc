"""data.val_fraction: held-out recordings for ``eegfast tokenizer`` and ``eegfast pretrain``,
evaluated at every checkpoint (it was read by nothing: pretrain refused it, the tokenizer
trained on every window)."""

from __future__ import annotations

import pytest
import torch

from eegfast.cli import main as cli
from eegfast.train import checkpoint as ckpt
from eegfast.train.commands import pretrain as pretrain_cmd
from eegfast.train.data import ItemInfo, TrainData, load_data
from eegfast.train.runlog import read_metrics
from eegfast.train.validation import (
    ValidationSplitError,
    Validator,
    hold_out,
    tokenizer_evaluator,
)
from tests.train.test_run_folder import (  # noqa: F401  (module fixtures)
    prepared,
    pretrain_argv,
    tokenizer_argv,
    tokenizer_run,
)


def _data(recordings_by_subject: dict[str, int], windows: int = 2) -> TrainData:
    """Items only (the split reads no signal): ``windows`` per recording."""
    items = [
        ItemInfo(0, "t", subject, f"/eeg/{subject}_r{r}.edf", -1, (0, 1), 4)
        for subject, count in recordings_by_subject.items()
        for r in range(count)
        for _ in range(windows)
    ]
    return TrainData(None, items, {"t": []}, [])


def _recordings(data: TrainData, positions) -> set[str]:
    return {data.items[i].recording for i in positions}


# --- the split ---------------------------------------------------------------------------------


def test_several_subjects_hold_out_whole_subjects_and_recordings():
    data = _data({f"s{k}": 3 for k in range(4)})
    splits = set()
    for seed in range(8):
        split = hold_out(data, 0.25, seed)
        assert split.unit == "subject" and len(split.subjects) == 1
        assert sorted(split.train + split.val) == list(range(len(data.items)))
        assert not _recordings(data, split.train) & _recordings(data, split.val)
        train_subjects = {data.items[i].subject for i in split.train}
        assert not train_subjects & {data.items[i].subject for i in split.val}
        assert split.recordings == sorted(_recordings(data, split.val))
        assert hold_out(data, 0.25, seed) == split  # the same on every rank, every call
        splits.add(tuple(split.subjects))
    assert len(splits) > 1  # the seed chooses


def test_one_subject_holds_out_recordings():
    data = _data({"only": 5}, windows=3)
    split = hold_out(data, 0.4, 1)
    assert split.unit == "recording" and split.subjects == []
    assert len(split.recordings) == 2 and len(split.val) == 6
    assert not _recordings(data, split.train) & _recordings(data, split.val)


def test_subject_split_never_holds_out_every_recording():
    # one small subject and one large: taking the large one after the small one would leave
    # nothing to train on, whichever order the seed gives
    data = _data({"small": 1, "large": 9})
    for seed in range(6):
        split = hold_out(data, 0.5, seed)
        assert split.train and split.val


@pytest.mark.parametrize(
    ("recordings", "fraction"), [({"a": 1, "b": 1}, 0.9), ({"a": 1}, 0.1), ({"a": 3}, 0.9)]
)
def test_a_fraction_leaving_nothing_to_train_on_is_refused(recordings, fraction):
    with pytest.raises(ValidationSplitError, match=f"data.val_fraction={fraction}"):
        hold_out(_data(recordings), fraction, 0)


def test_zero_holds_nothing_out():
    assert hold_out(_data({"a": 2}), 0.0, 0) is None


def test_a_resume_keeps_the_recorded_split_and_refuses_another_fraction():
    data = _data({f"s{k}": 2 for k in range(6)})
    first = hold_out(data, 0.3, 0)
    other = next(s for s in range(1, 50) if hold_out(data, 0.3, s).val != first.val)
    resumed = {"validation": first.record()}
    assert hold_out(data, 0.3, other, resumed=resumed).val == first.val
    with pytest.raises(ValidationSplitError, match=r"data.val_fraction=0.5: .*started with "):
        hold_out(data, 0.5, 0, resumed=resumed)
    with pytest.raises(ValidationSplitError, match="data.val_fraction=0.0"):
        hold_out(data, 0.0, 0, resumed=resumed)
    # a run started without a validation split (its checkpoints ranked by the training loss)
    with pytest.raises(ValidationSplitError, match="started with data.val_fraction=0.0"):
        hold_out(data, 0.3, 0, resumed={"step": 4})


def test_a_resume_holds_out_a_held_out_subjects_new_recordings_too():
    data = _data({f"s{k}": 2 for k in range(4)})
    first = hold_out(data, 0.25, 0)
    (subject,) = first.subjects
    grown = _data({**{f"s{k}": 2 for k in range(4)}, subject: 3})  # one more recording of it
    again = hold_out(grown, 0.25, 0, resumed={"validation": first.record()})
    assert {grown.items[i].subject for i in again.val} == {subject}
    assert subject not in {grown.items[i].subject for i in again.train}
    assert len(again.recordings) == 3


# --- the tokenizer's evaluation ----------------------------------------------------------------


def test_tokenizer_validation_leaves_the_codebook_and_its_ema_alone(prepared):  # noqa: F811
    from eegfast.train.arch import build_model

    data = load_data([prepared])
    model = build_model({"kind": "tokenizer", "name": "vqnsp_tiny", "kwargs": {}})
    batch = data.subset(range(4))
    from eegfast.train.data import collate_fn

    x = collate_fn()([batch.dataset[i] for i in range(4)])
    model.train()
    model(x["x"], x["input_chans"])  # k-means initialisation and one EMA step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    validator = Validator(
        data,
        list(range(len(data))),
        tokenizer_evaluator(torch.device("cpu")),
        batch_size=4,
        device=torch.device("cpu"),
        num_codes=model.config.num_codes,
    )
    scalars = validator(model)  # called in training mode: it evaluates in eval mode
    assert model.training
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert "val_loss" not in scalars and 0 < scalars["val/codebook_usage"] <= 1
    assert validator(model) == {**scalars}  # and again: nothing moved
    model(x["x"], x["input_chans"])  # (a training-mode forward does move the EMA)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tokenizer_logs_validation_at_every_checkpoint_and_trains_without_it(
    prepared,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "tok"
    argv = tokenizer_argv(prepared, out, "train.max_steps=2", "train.checkpoint_every=1")
    assert cli([*argv, "--set", "data.val_fraction=0.5"]) == 0
    printed = capsys.readouterr().out
    metrics = read_metrics(out / "metrics.csv")
    assert [s for s, _ in metrics["val/loss"]] == [1, 2]
    assert "val/codebook_usage" in metrics and "val/perplexity" in metrics
    assert "step-00000002: val/amplitude_loss" in printed
    meta = ckpt.checkpoint_meta(out / "checkpoints" / "step-00000002")
    assert meta["metric"] == pytest.approx(metrics["val/loss"][-1][1], rel=1e-6)
    assert meta["validation"]["windows"] == 6 and len(meta["validation"]["recordings"]) == 1
    assert "of 6 training windows" in printed  # the summary reads the training windows


# --- pretraining -------------------------------------------------------------------------------


def _spy(monkeypatch):
    """Record the windows (positions in the whole data) each training and each validation
    batch held, from the step function, through the Subset fit() trains on."""
    seen = {"train": [], "val": []}
    subsets = []
    real_fit, real_objective = pretrain_cmd.fit, pretrain_cmd.get_objective

    def fit(model, step, dataset, *args, **kwargs):
        subsets.append(list(getattr(dataset, "indices", range(len(dataset)))))
        return real_fit(model, step, dataset, *args, **kwargs)

    def get_objective(name):
        step = real_objective(name)

        def spied(model, batch, ctx):
            if model.training:  # training: positions in fit()'s dataset
                seen["train"] += [subsets[-1][i] for i in batch["index"].tolist()]
            else:  # validation: positions in the whole data
                seen["val"] += batch["index"].tolist()
            return step(model, batch, ctx)

        return spied

    monkeypatch.setattr(pretrain_cmd, "fit", fit)
    monkeypatch.setattr(pretrain_cmd, "get_objective", get_objective)
    return seen


def test_pretraining_never_trains_on_held_out_recordings_and_ranks_checkpoints_by_them(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    seen = _spy(monkeypatch)
    out = tmp_path / "pre"
    sets = ("train.max_steps=4", "train.checkpoint_every=1", "data.val_fraction=0.5")
    assert cli(pretrain_argv(prepared, tokenizer_run, out, *sets)) == 0
    printed = capsys.readouterr().out
    data = load_data([prepared])
    meta = ckpt.checkpoint_meta(out / "checkpoints" / "step-00000004")
    held = set(meta["validation"]["recordings"])
    assert len(held) == 1 and meta["validation"]["unit"] == "recording"
    assert seen["train"] and not {data.items[i].recording for i in seen["train"]} & held
    assert {data.items[i].recording for i in seen["val"]} == held
    # every held-out window, once per checkpoint
    windows = sorted(i for i, item in enumerate(data.items) if item.recording in held)
    assert sorted(seen["val"]) == sorted(windows * 4)
    # the backbone did not see the held-out recording (finetune's transductive note)
    names = {r.rsplit("/", 1)[-1] for r in held}
    assert not names & set(meta["pretrained_on"]["recordings"])
    metrics = read_metrics(out / "metrics.csv")
    val = dict(metrics["val/loss"])
    assert sorted(val) == [1, 2, 3, 4] and [s for s, _ in metrics["val/accuracy"]] == [1, 2, 3, 4]
    assert "step-00000004: val/accuracy" in printed and "validation: 6 windows" in printed
    for info in ckpt.list_checkpoints(out / "checkpoints"):
        assert info.meta["metric"] == pytest.approx(val[info.step], rel=1e-6)
    best = ckpt.best_checkpoint(out / "checkpoints")  # (pruning always keeps the best)
    assert val[best.step] == min(val.values())


def test_pretraining_validation_is_deterministic_with_the_same_masks(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
):
    curves = []
    for name in ("a", "b"):
        out = tmp_path / name
        sets = ("train.max_steps=2", "train.checkpoint_every=1", "data.val_fraction=0.5")
        assert cli(pretrain_argv(prepared, tokenizer_run, out, *sets)) == 0
        curves.append(read_metrics(out / "metrics.csv")["val/loss"])
    assert curves[0] == curves[1]


def test_validation_masks_are_the_same_at_every_evaluation(prepared, tokenizer_run):  # noqa: F811
    from eegfast.train.arch import build_model
    from eegfast.train.objectives import StepContext, get_objective
    from eegfast.train.validation import objective_evaluator

    data = load_data([prepared])
    tokenizer = pretrain_cmd.load_tokenizer(str(tokenizer_run), torch.device("cpu"))
    vocab = tokenizer.config.num_codes
    model = build_model(
        {"kind": "pretrain", "name": "labram_tiny_pretrain", "kwargs": {"vocab_size": vocab}}
    )
    ctx = StepContext(torch.device("cpu"), seed=3, tokenizer=tokenizer, epoch=5, step=40)
    validator = Validator(
        data,
        list(range(6)),
        objective_evaluator(get_objective("masked"), ctx),
        batch_size=3,
        device=torch.device("cpu"),
    )
    first = validator(model)
    ctx.epoch, ctx.step = 6, 50  # training moves on: the validation masks do not
    assert validator(model) == first
    assert "val_loss" not in first and 0 <= first["val/accuracy"] <= 1


def test_a_resumed_pretraining_run_keeps_its_held_out_recordings(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    data = load_data([prepared])
    first = hold_out(data, 0.5, 0)
    other = next(s for s in range(1, 50) if hold_out(data, 0.5, s).val != first.val)
    out = tmp_path / "pre"
    assert cli(pretrain_argv(prepared, tokenizer_run, out, "data.val_fraction=0.5")) == 0
    resumed = pretrain_argv(
        prepared, tokenizer_run, out, "train.max_steps=4", "--resume", "auto", f"train.seed={other}"
    )
    assert cli([*resumed, "--set", "data.val_fraction=0.5"]) == 0
    for step in (2, 4):
        meta = ckpt.checkpoint_meta(out / "checkpoints" / f"step-{step:08d}")
        assert meta["validation"]["recordings"] == first.recordings
    capsys.readouterr()
    assert cli([*resumed, "--set", "data.val_fraction=0"]) == 2
    err = capsys.readouterr().err
    assert "data.val_fraction=0.0: the run being resumed was started with" in err


def test_pretraining_refuses_a_fraction_that_holds_out_every_recording(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "pre"
    assert cli(pretrain_argv(prepared, tokenizer_run, out, "data.val_fraction=0.9")) == 2
    err = capsys.readouterr().err.strip()
    assert "data.val_fraction=0.9 would hold out 2 of the data's 2 recording(s)" in err
    assert len(err.splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_a_resume_with_another_seed_keeps_the_validation_masks(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
):
    """The masks of the validation came from the current train.seed: a run resumed with
    another seed kept its held-out recordings but evaluated them with other masks, so the
    val/loss of its later checkpoints (which rank them all) did not compare with the earlier
    ones'. They are the run's first seed's."""
    from eegfast.train.arch import load_trained
    from eegfast.train.objectives import StepContext, get_objective
    from eegfast.train.validation import objective_evaluator

    out = tmp_path / "pre"
    sets = ("data.val_fraction=0.5", "train.checkpoint_every=1")  # train.batch_size=2, seed 0
    assert cli(pretrain_argv(prepared, tokenizer_run, out, *sets)) == 0
    resumed = [*sets, "train.max_steps=3", "--resume", "auto", "train.seed=7"]
    assert cli(pretrain_argv(prepared, tokenizer_run, out, *resumed)) == 0
    logged = dict(read_metrics(out / "metrics.csv")["val/loss"])[3]
    meta = ckpt.checkpoint_meta(out / "checkpoints" / "step-00000003")
    assert meta["validation"]["seed"] == 0

    data = load_data([prepared])
    split = hold_out(data, 0.5, 0)
    device = torch.device("cpu")
    tokenizer = pretrain_cmd.load_tokenizer(str(tokenizer_run), device)
    model, _ = load_trained(out / "checkpoints" / "step-00000003")

    def val_loss(seed: int) -> float:
        ctx = StepContext(device, seed=seed, tokenizer=tokenizer, mask_ratio=0.5)
        evaluate = objective_evaluator(get_objective("masked"), ctx)
        return Validator(data, split.val, evaluate, device=device, batch_size=2)(model)["val/loss"]

    first, other = val_loss(0), val_loss(7)
    # the seeds' masks differ, by more than the check below tells apart (metrics.csv keeps 8
    # digits, 5e-8 relative; on this untrained model the masks move the loss only by 1e-6 to
    # 1e-5 relative: 1.8e-6 under torch 2.11)
    assert abs(first - other) > 1e-6 * abs(first)
    assert logged == pytest.approx(first, rel=2e-7)
