"""The commands take the reference LaBraM's checkpoint files, which have no eegfast meta.json
(``labram-base.pth``: ``{"model": ...}`` with ``student.*`` and ``module.`` prefixes;
``vqnsp.pth``; a classifier state dict): finetune --init, evaluate --model, upcycle --model and
pretrain --tokenizer read the model from the tensor shapes."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from eegfast.cli import main as cli
from eegfast.models import create_model, pretrain_to_classifier_state_dict
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import backbone_from_checkpoint, load_trained
from eegfast.train.commands.pretrain import load_tokenizer
from tests.train.test_run_folder import prepared  # noqa: F401


def _random(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict of ``name`` with random values (not the model's initialisation)."""
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    return {k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items()}


def _as_reference_file(state: dict[str, torch.Tensor], path):
    """As the reference saves its checkpoints: wrapped, DDP prefixes, an epoch beside."""
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 49}, path)
    return path


@pytest.fixture
def labram_pth(tmp_path):
    state = _random("labram_tiny_pretrain", seed=3)
    return _as_reference_file(state, tmp_path / "labram-base.pth"), state


def _latest_weights(run):
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints").path / ckpt.WEIGHTS))


def _finetune_argv(prepared, init, out, *extra):  # noqa: F811
    argv = ["finetune", "--data", str(prepared), "--init", str(init), "--out", str(out)]
    for item in (
        "train.max_steps=1",
        "train.batch_size=4",
        "finetune.band_power_baseline=false",
        "optim.lr=1e-20",  # one step that leaves the weights as loaded
        "optim.weight_decay=0",
    ):
        argv += ["--set", item]
    return [*argv, *extra, "--no-progress"]


def test_finetune_init_from_the_reference_pretraining_file(
    prepared,  # noqa: F811
    labram_pth,
    tmp_path,
    capsys,
):
    """It stopped with "no architecture record (meta.json 'arch'); not an eegfast run"."""
    path, state = labram_pth
    out = tmp_path / "ft"
    assert cli(_finetune_argv(prepared, path, out)) == 0, capsys.readouterr().err
    assert f"initialised from `{path}`" in (out / "report.md").read_text()
    runs = sorted(p.parent for p in out.glob("fold*/*/checkpoints"))
    assert runs
    backbone = pretrain_to_classifier_state_dict(state)
    for run in runs:
        meta = ckpt.latest_checkpoint(run / "checkpoints").meta
        assert meta["arch"]["name"] == "labram_tiny" and meta["arch"]["kind"] == "classifier"
        got = _latest_weights(run)
        for key, value in backbone.items():
            torch.testing.assert_close(got[f"backbone.{key}"], value, atol=1e-6, rtol=0)
    # what the run recorded lets it resume
    capsys.readouterr()
    assert cli(_finetune_argv(prepared, path, out, "--resume", "auto")) == 0, (
        capsys.readouterr().err
    )
    # a model named with --set model.name must be the file's
    capsys.readouterr()
    named = _finetune_argv(prepared, path, tmp_path / "ft2", "--set", "model.name=labram_base")
    assert cli(named) == 2
    err = capsys.readouterr().err
    assert f"{path}: a pretrain checkpoint (embed dim 100, blocks 2) does not fit" in err
    assert "labram_base_pretrain (embed dim 200, blocks 12)" in err
    assert not list((tmp_path / "ft2").glob("fold*"))
    named[named.index("model.name=labram_base")] = "model.name=labram_tiny"
    assert cli(named) == 0


def test_evaluate_linear_probes_a_reference_file(prepared, labram_pth, tmp_path, capsys):  # noqa: F811
    path, _ = labram_pth
    out = tmp_path / "probe"
    argv = ["evaluate", "--model", str(path), "--data", str(prepared), "--out", str(out)]
    assert cli([*argv, "--set", "finetune.band_power_baseline=false", "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["variant"] for r in rows} == {"linear_probe"}
    assert f"linear probe on frozen features of `{path}`" in (out / "report.md").read_text()


def test_upcycle_a_reference_file(labram_pth, tmp_path, capsys):
    path, state = labram_pth
    out = tmp_path / "moe"
    assert cli(["upcycle", "--model", str(path), "--out", str(out), "--experts", "2"]) == 0, (
        capsys.readouterr().err
    )
    meta = ckpt.read_meta(out)
    assert meta["arch"]["name"] == "labram_tiny" and meta["arch"]["upcycle"]["num_experts"] == 2
    assert meta["source"] == str(path)
    got = _latest_weights(out)
    for key in ("cls_token", "pos_embed", "blocks.1.attn.qkv.weight", "blocks.0.norm2.weight"):
        assert torch.equal(got[key], state[f"student.{key}"]), key
    capsys.readouterr()
    argv = ["upcycle", "--model", str(path), "--out", str(tmp_path / "moe2")]
    assert cli([*argv, "--set", "model.name=labram_large"]) == 2
    assert f"{path}: a pretrain checkpoint (embed dim 100, blocks 2) does not fit " in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "moe2" / "checkpoints").exists()


def test_pretrain_uses_the_codebook_of_a_reference_tokenizer_file(
    prepared,  # noqa: F811
    tmp_path,
    capsys,
):
    """A tokenizer file without a record, with 128 codes (vqnsp_tiny has 256)."""
    state = _random("vqnsp_tiny", seed=4, num_codes=128)
    state["quantize.embedding.weight"] = torch.nn.functional.normalize(
        state["quantize.embedding.weight"], dim=1
    )
    state["quantize.embedding.initted"] = torch.ones(1)
    path = _as_reference_file(state, tmp_path / "vqnsp.pth")
    tokenizer = load_tokenizer(str(path), torch.device("cpu"))
    assert torch.equal(tokenizer.quantize.codebook, state["quantize.embedding.weight"])
    assert not tokenizer.training
    out = tmp_path / "pre"
    argv = ["pretrain", "--data", str(prepared), "--out", str(out), "--tokenizer", str(path)]
    argv += ["--model", "labram_tiny_pretrain", "--set", "train.max_steps=1"]
    assert cli([*argv, "--set", "train.batch_size=2", "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    meta = ckpt.latest_checkpoint(out / "checkpoints").meta
    assert meta["arch"]["kwargs"]["vocab_size"] == 128
    assert _latest_weights(out)["lm_head.weight"].shape[0] == 128
    # resumed against the same file (the record kept its folder only, and looked there for
    # model.safetensors: "gone or changed")
    argv[argv.index("train.max_steps=1")] = "train.max_steps=2"
    resumed = [*argv, "--set", "train.batch_size=2", "--no-progress", "--resume", "auto"]
    assert cli(resumed) == 0, capsys.readouterr().err
    assert ckpt.latest_checkpoint(out / "checkpoints").step == 2


def test_wrong_files_are_one_line_errors_naming_them(prepared, labram_pth, tmp_path, capsys):  # noqa: F811
    path, _ = labram_pth
    argv = ["pretrain", "--data", str(prepared), "--out", str(tmp_path / "pre"), "--tokenizer"]
    assert cli([*argv, str(path), "--model", "labram_tiny_pretrain", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {path}: this is a pretrain checkpoint (labram_tiny_pretrain)" in err
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3, 3)}}, other)
    assert cli(_finetune_argv(prepared, other, tmp_path / "ft")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{other}: not a LaBraM checkpoint eegfast knows" in err and "encoder.weight" in err


def test_backbone_from_a_classifier_state_dict_leaves_its_head_behind(tmp_path):
    state = _random("labram_tiny", seed=5, num_classes=5)
    path = tmp_path / "classifier.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    arch, weights, meta = backbone_from_checkpoint(path, drop_path=0.2)
    assert arch == {
        "kind": "classifier",
        "name": "labram_tiny",
        "kwargs": {"num_classes": 0, "drop_path_rate": 0.2},
    }
    assert meta["source"] == str(path) and meta["command"] == "reference"
    assert weights.keys() == {k for k in state if not k.startswith("head.")}
    # the whole file as a model (what evaluate and predict load first)
    model, meta = load_trained(path)
    assert meta["arch"]["kwargs"] == {"num_classes": 5}
    assert torch.equal(model.head.weight, state["head.weight"])
    tokenizer = _as_reference_file(_random("vqnsp_tiny", seed=6), tmp_path / "vqnsp.pth")
    with pytest.raises(ValueError, match="a 'tokenizer' checkpoint cannot initialise"):
        backbone_from_checkpoint(tokenizer)


def _predict_argv(model, prepared, out, *extra):  # noqa: F811
    argv = ["predict", "--model", str(model), "--data", str(prepared), "--out", str(out)]
    return [*argv, *extra, "--no-progress"]


def test_predict_takes_a_reference_classifier_file(prepared, labram_pth, tmp_path, capsys):  # noqa: F811
    """It stopped with "no architecture record (meta.json 'arch'); not an eegfast run". The
    file's one head is named by --tasks (required: the file names no task), its classes by
    --data's task of that name where the counts match, else class0..; the probabilities are
    the file's model's."""
    from eegfast.data import collate_padded
    from eegfast.train.data import load_data

    state = _random("labram_tiny", seed=7, num_classes=2)
    path = _as_reference_file(state, tmp_path / "classifier.pth")
    assert cli(_predict_argv(path, prepared, tmp_path / "none")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--model {path}: a classifier file" in err
    assert "one head of 2 classes" in err and "--tasks NAME" in err
    assert cli(_predict_argv(path, prepared, tmp_path / "none", "--tasks", "arith,x")) == 2
    assert "--tasks 'arith,x' names 2 tasks" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()

    out = tmp_path / "pred"
    assert cli(_predict_argv(path, prepared, out, "--tasks", "arith")) == 0, capsys.readouterr().err
    assert "taken to be --data's 'arith' classes in --data's order (rest, task)" in (
        capsys.readouterr().out
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(rows[0])[-2:] == ["p_rest", "p_task"] and {r["task"] for r in rows} == {"arith"}
    data = load_data([prepared])
    assert [r["label"] for r in rows] == [data.label_names["arith"][i.label] for i in data.items]
    model = create_model("labram_tiny", num_classes=2)
    model.load_state_dict(state)
    model.eval()
    batch = collate_padded([data.dataset[i] for i in range(len(data))])
    with torch.no_grad():
        expected = model(batch["x"], batch["input_chans"]).softmax(-1).numpy()
    got = [[float(r["p_rest"]), float(r["p_task"])] for r in rows]
    torch.testing.assert_close(torch.tensor(got), torch.from_numpy(expected), atol=2e-5, rtol=0)
    assert [r["predicted"] for r in rows] == [["rest", "task"][k] for k in expected.argmax(1)]

    # another class count than --data's task: class0..; a file without a head: refused
    three = _as_reference_file(_random("labram_tiny", 8, num_classes=3), tmp_path / "c3.pth")
    out3 = tmp_path / "pred3"
    assert cli(_predict_argv(three, prepared, out3, "--tasks", "arith")) == 0
    assert "written as class0..class2" in capsys.readouterr().out
    header = (out3 / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith(",p_class0,p_class1,p_class2")
    pretraining, _ = labram_pth
    assert cli(_predict_argv(pretraining, prepared, tmp_path / "none", "--tasks", "arith")) == 2
    assert "a 'pretrain' checkpoint without task heads" in capsys.readouterr().err
