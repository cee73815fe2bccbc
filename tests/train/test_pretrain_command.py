"""``eegfast pretrain`` settings that change what is trained: model.init (continued
pretraining)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from eegfast.cli import main as cli
from eegfast.models import create_model
from eegfast.train import checkpoint as ckpt
from tests.train.test_run_folder import prepared, pretrain_argv, tokenizer_run  # noqa: F401


def _weights(run):
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints").path / ckpt.WEIGHTS))


def test_model_init_starts_pretraining_from_a_reference_file(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    """model.init was silently ignored: every run started from random weights. A reference
    style file (``{"model": ...}``, ``module.`` prefixes) whose lm_head predicts another number
    of codes than the tokenizer has: the backbone loads, lm_head starts afresh (a note)."""
    torch.manual_seed(5)
    source = create_model("labram_tiny_pretrain", vocab_size=512)
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    init = tmp_path / "labram-pretrain.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, init)
    out = tmp_path / "pre"
    # lr ~0: the one step leaves the weights as loaded
    argv = pretrain_argv(prepared, tokenizer_run, out, f"model.init={init}", "optim.lr=1e-20")
    assert cli([*argv, "--set", "train.max_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert f"initialised from {init}" in printed
    assert "predicts 512 codes and the tokenizer has 256: lm_head starts afresh" in printed
    got = _weights(out)
    for key, value in state.items():
        if key.startswith(("lm_head.", "student.lm_head.")):
            assert got[key].shape[0] == 256, key
            continue
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    meta = ckpt.latest_checkpoint(out / "checkpoints").meta
    assert meta["init"] == str(init)


def test_model_init_from_a_run_keeps_what_it_saw_and_refuses_other_weights(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    """An eegfast pretraining run as model.init: its weights (lm_head too: same codebook) and
    the subjects its backbone saw, kept for finetune's transductive report; a classifier or a
    backbone of another size is a one-line error naming model.init."""
    first = tmp_path / "first"
    assert cli(pretrain_argv(prepared, tokenizer_run, first)) == 0
    meta_file = ckpt.latest_checkpoint(first / "checkpoints").path / ckpt.META
    meta = json.loads(meta_file.read_text())
    meta["pretrained_on"]["subjects"].append("elsewhere-01")
    meta_file.write_text(json.dumps(meta))
    second = tmp_path / "second"
    argv = pretrain_argv(prepared, tokenizer_run, second, f"model.init={first}", "optim.lr=1e-20")
    assert cli([*argv, "--set", "train.max_steps=1"]) == 0
    assert "lm_head starts afresh" not in capsys.readouterr().out
    before, after = _weights(first), _weights(second)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0, msg=key)
    seen = ckpt.latest_checkpoint(second / "checkpoints").meta["pretrained_on"]["subjects"]
    assert "elsewhere-01" in seen and len(seen) == 2

    classifier = tmp_path / "classifier.safetensors"
    from safetensors.torch import save_file

    save_file(create_model("labram_tiny").state_dict(), str(classifier))
    bad = pretrain_argv(prepared, tokenizer_run, tmp_path / "bad", f"model.init={classifier}")
    assert cli(bad) == 2
    err = capsys.readouterr().err
    assert f"model.init {classifier}: not a pretraining checkpoint" in err
    larger = pretrain_argv(prepared, tokenizer_run, tmp_path / "bad2", f"model.init={first}")
    assert cli([*larger, "--model", "labram_base_pretrain"]) == 2
    err = capsys.readouterr().err
    assert f"model.init {first}: state dict does not match LaBraMPretrain" in err


def test_drop_path_and_mask_ratio_reach_the_pretraining_model_and_stay_behind(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
):
    """model.drop_path was ignored by pretraining, and the model config recorded mask_ratio 0.5
    whatever pretrain.mask_ratio was. Fine-tuning from the run takes its own drop path (0 too),
    not pretraining's."""
    from eegfast.train.arch import backbone_from_checkpoint, build_model

    out = tmp_path / "pre"
    argv = pretrain_argv(prepared, tokenizer_run, out, "model.drop_path=0.3",
                         "pretrain.mask_ratio=0.4")  # fmt: skip
    assert cli([*argv, "--set", "train.max_steps=1"]) == 0
    arch = ckpt.latest_checkpoint(out / "checkpoints").meta["arch"]
    model = build_model(arch)
    assert model.config.mask_ratio == 0.4
    rates = [float(block.drop_path) for block in model.student.blocks]
    assert max(rates) == pytest.approx(0.3)
    backbone, _, _ = backbone_from_checkpoint(out)
    assert "drop_path_rate" not in backbone["kwargs"] and "mask_ratio" not in backbone["kwargs"]
    backbone, _, _ = backbone_from_checkpoint(out, drop_path=0.0)
    assert backbone["kwargs"]["drop_path_rate"] == 0.0


def test_model_init_from_a_checkpoints_weights_file_keeps_what_it_saw(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
):
    """model.init naming a checkpoint's ``model.safetensors`` (not its folder) read it as a
    file without a record: what the init run's backbone saw was dropped from pretrained_on, so
    finetune could no longer tell when it tests on EEG the backbone was pretrained on."""
    first = tmp_path / "first"
    assert cli(pretrain_argv(prepared, tokenizer_run, first)) == 0
    checkpoint = ckpt.latest_checkpoint(first / "checkpoints").path
    meta = json.loads((checkpoint / ckpt.META).read_text())
    meta["pretrained_on"]["subjects"].append("elsewhere-01")
    meta["pretrained_on"]["recordings"].append("elsewhere-01_r1.edf")
    (checkpoint / ckpt.META).write_text(json.dumps(meta))
    second = tmp_path / "second"
    init = checkpoint / ckpt.WEIGHTS
    argv = pretrain_argv(prepared, tokenizer_run, second, f"model.init={init}")
    assert cli([*argv, "--set", "train.max_steps=1"]) == 0
    seen = ckpt.latest_checkpoint(second / "checkpoints").meta["pretrained_on"]
    assert "elsewhere-01" in seen["subjects"]
    assert "elsewhere-01_r1.edf" in seen["recordings"]


def test_a_hybrid_init_for_another_codebook_size_keeps_all_but_the_code_parts(tmp_path):
    """A hybrid run continued as a hybrid one with a tokenizer of another codebook size was
    refused (the forecasting head's token logits and code embedding are sized by the codebook)
    while a masked model in the same case loads with lm_head afresh: every tensor not over the
    codes loads, the ones over the codes start afresh, with a note naming them."""
    from safetensors.torch import save_file

    from eegfast.train.arch import build_model
    from eegfast.train.commands.pretrain import load_init

    def hybrid(vocab: int):
        kwargs = {"vocab_size": vocab, "hybrid": {"mask_weight": 0.5}}
        return build_model({"kind": "hybrid", "name": "labram_tiny_pretrain", "kwargs": kwargs})

    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in hybrid(512).state_dict().items()}
    init = tmp_path / "hybrid-512.safetensors"
    save_file(state, str(init))
    model = hybrid(256)
    notes, meta = load_init(model, str(init))
    assert meta == {}
    assert any("lm_head and the forecasting head's token parts start afresh" in n for n in notes)
    over_codes = (
        "lm_head.",
        "student.lm_head.",
        "forecast_head.token.",
        "forecast_head.code_embed.",
    )
    got = model.state_dict()
    assert any(k.startswith("forecast_head.signal.") for k in got)
    for key, value in got.items():
        if key.startswith(over_codes):
            assert value.shape[0] == 256, key
        else:
            torch.testing.assert_close(value, state[key], atol=0, rtol=0, msg=key)


def test_resume_continues_the_runs_model_and_refuses_another(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    """``--resume auto`` without ``--model`` built the default labram_base_pretrain for a run of
    another model, and its checkpoint then failed to load with a traceback of every shape;
    it continues the run's own model, and another model named explicitly is a one-line error."""
    out = tmp_path / "pre"
    assert cli(pretrain_argv(prepared, tokenizer_run, out)) == 0  # labram_tiny_pretrain
    argv = pretrain_argv(prepared, tokenizer_run, out, "train.max_steps=4", "--resume", "auto")
    at = argv.index("--model")
    unnamed = argv[:at] + argv[at + 2 :]
    capsys.readouterr()
    assert cli(unnamed) == 0
    assert "resumed from" in capsys.readouterr().out
    meta = ckpt.latest_checkpoint(out / "checkpoints").meta
    assert meta["step"] == 4 and meta["arch"]["name"] == "labram_tiny_pretrain"
    other = [*argv[: at + 1], "labram_base_pretrain", *argv[at + 2 :]]
    other[other.index("train.max_steps=4")] = "train.max_steps=6"
    assert cli(other) == 2
    err = capsys.readouterr().err
    assert "--model labram_base_pretrain: the run being resumed trains " in err
    assert "labram_tiny_pretrain" in err and len(err.strip().splitlines()) == 1
    assert ckpt.latest_checkpoint(out / "checkpoints").meta["step"] == 4


def test_pretraining_warns_for_electrodes_and_windows_the_tokenizer_never_saw(
    prepared,  # noqa: F811
    tokenizer_run,  # noqa: F811
    tmp_path,
    capsys,
):
    """The tokenizer records the electrode rows and window length it trained on; pretraining
    on data beyond them (whose targets come from embedding rows still at their initial
    values) warns, naming the electrodes and the lengths. Before, nothing was said."""
    import shutil

    from eegfast.electrodes import LABRAM_CHANNEL_NAMES
    from eegfast.train.data import load_data

    data = load_data([prepared])
    rows = sorted({r for item in data.items for r in item.electrodes if r != 0})
    metas = sorted(tokenizer_run.glob("checkpoints/*/meta.json"))
    recorded = json.loads(metas[-1].read_text())["trained_on"]
    assert recorded == {"electrode_rows": rows, "window_seconds": 4}

    assert cli(pretrain_argv(prepared, tokenizer_run, tmp_path / "fits")) == 0
    assert "warning: the data have" not in capsys.readouterr().out
    # pretraining records the same for its own model (generate keeps within its window)
    pretrained = ckpt.latest_checkpoint(tmp_path / "fits" / "checkpoints").meta["trained_on"]
    assert pretrained == {"electrode_rows": rows, "window_seconds": 4}

    narrower = tmp_path / "tok"
    shutil.copytree(tokenizer_run, narrower)
    for meta_path in narrower.glob("checkpoints/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["trained_on"] = {"electrode_rows": rows[2:], "window_seconds": 2}
        meta_path.write_text(json.dumps(meta))
    assert cli(pretrain_argv(prepared, narrower, tmp_path / "beyond")) == 0
    printed = capsys.readouterr().out
    names = ", ".join(LABRAM_CHANNEL_NAMES[r - 1] for r in rows[:2])
    assert f"warning: the data have 2 electrode(s) the tokenizer was not trained on ({names})" in (
        printed
    )
    assert "the data have 4-s windows and the tokenizer was trained on windows of at most 2 s" in (
        printed
    )
