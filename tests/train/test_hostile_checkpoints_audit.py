"""Audit of checkpoints and config files that were damaged, edited by hand or come from
elsewhere: weights that do not fit their architecture record, records that are no records,
integer or non-finite weights, a config nested past the readers' recursion. Each is one line
naming the file (exit status 2 from a command), never a traceback or a model of garbage."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from eegfast.cli import main as cli
from eegfast.models import create_model
from eegfast.models.checkpoint import CheckpointMismatchError, load_checkpoint
from eegfast.train import checkpoint as ckpt
from eegfast.train.arch import backbone_from_checkpoint, build_model, load_trained
from eegfast.train.commands.generate import GenerateError, load_prompt
from eegfast.train.config import ConfigError, read_config_file
from tests.data.test_hostile_inputs_audit import _folder

ARCH = {
    "kind": "classifier",
    "name": "labram_tiny",
    "kwargs": {"num_classes": 0},
    "heads": {"mi": 2},
}


def _run(root: Path, edit=None, arch: object = ARCH) -> Path:
    """A fine-tuned run folder (one checkpoint) of ``ARCH``'s model, its weights changed by
    ``edit(state_dict)`` and its meta.json recording ``arch``."""
    torch.manual_seed(0)
    weights = build_model(ARCH).state_dict()
    if edit is not None:
        edit(weights)
    ckpt.save_checkpoint(root / "checkpoints", 1, weights, {}, {"arch": arch})
    return root


def _weights_file(run: Path) -> str:
    return str(run / "checkpoints" / "step-00000001" / ckpt.WEIGHTS)


def _loaders(run: Path):
    return (lambda: load_trained(run), lambda: backbone_from_checkpoint(run))


def _wider_head(weights):
    weights["heads.mi.weight"] = torch.zeros(3, 7)


def _no_head_bias(weights):
    del weights["heads.mi.bias"]


@pytest.mark.parametrize("edit", [_wider_head, _no_head_bias])
def test_weights_that_do_not_fit_their_arch_record_name_the_file(tmp_path, edit):
    """A weights file replaced by another run's (or a meta.json edited): torch's RuntimeError
    "Error(s) in loading state_dict", a traceback from predict, evaluate and finetune."""
    run = _run(tmp_path / "run", edit)
    for load in _loaders(run):
        with pytest.raises(CheckpointMismatchError, match="does not hold the weights") as info:
            load()
        assert _weights_file(run) in str(info.value) and "heads.mi." in str(info.value)


ABSURD_ARCHES = {
    "a string": "labram_tiny",
    "no name": {"kind": "classifier", "kwargs": {}},
    "kwargs a list": {**ARCH, "kwargs": [1, 2]},
    "negative classes": {**ARCH, "heads": {"mi": -3}},
    "classes as text": {**ARCH, "heads": {"mi": "two"}},
    "unknown model": {**ARCH, "name": "labram_gigantic"},
    "unknown option": {**ARCH, "kwargs": {"num_classes": 0, "depht": 3}},
}


@pytest.mark.parametrize("case", ABSURD_ARCHES)
def test_an_arch_record_eegfast_does_not_write_names_the_meta_json(tmp_path, case):
    """AttributeError ('str' object has no attribute 'get'), KeyError 'name', TypeError,
    torch's RuntimeError "negative dimension -3", or an error naming no file."""
    run = _run(tmp_path / "run", arch=ABSURD_ARCHES[case])
    meta = str(run / "checkpoints" / "step-00000001" / ckpt.META)
    for load in _loaders(run):
        with pytest.raises(ValueError, match=rf"^{meta}: .*arch"):
            load()


def test_an_arch_record_of_absurd_sizes_asks_for_no_memory(tmp_path):
    """A record of 1.5 G parameters beside 2 M parameters of weights: the model was built (6 GB
    allocated and initialised) before its shapes were compared; under a 3 GB address-space
    limit that was a MemoryError traceback (without one, the machine's memory)."""
    run = _run(tmp_path / "run")
    huge = {**ARCH, "kwargs": {"num_classes": 0, "conv_channels": 160, "embed_dim": 4000,
                               "depth": 48}}  # fmt: skip
    meta = run / "checkpoints" / "step-00000001" / ckpt.META
    meta.write_text(json.dumps({"arch": huge}))
    child = textwrap.dedent(
        f"""
        import resource
        from eegfast.models.checkpoint import CheckpointMismatchError
        from eegfast.train.arch import load_trained
        # 3 GB beyond what the imports mapped (a CUDA build of torch maps several GB of
        # libraries: a limit of 3 GB in all failed its import)
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
        limit = (kib << 10) + (3 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            load_trained({str(run)!r})
        except CheckpointMismatchError:
            print("refused")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip() == "refused", done.stderr[-2000:]


def _int64(weights):
    for key, value in weights.items():
        weights[key] = (value * 100).to(torch.int64)


def _nan(weights):
    weights["backbone.blocks.0.attn.proj.weight"][0, 0] = float("nan")


def _inf(weights):
    weights["heads.mi.bias"][1] = float("-inf")


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (_int64, r"53 tensors are not floating point: .*\(int64\)"),
        (_nan, r"1 tensors hold NaN or inf: backbone\.blocks\.0\.attn\.proj\.weight"),
        (_inf, r"1 tensors hold NaN or inf: heads\.mi\.bias"),
    ],
)
def test_integer_or_non_finite_weights_are_refused_naming_the_file(tmp_path, edit, said):
    """int64 weights loaded without a word (``load_state_dict`` casts them: a model of whole
    numbers); a NaN weight made every output NaN, and predict's argmax the first class for
    every window, also without a word."""
    run = _run(tmp_path / "run", edit)
    for load in _loaders(run):
        with pytest.raises(ValueError, match=rf"model\.safetensors: not usable weights \({said}"):
            load()
    # the same tensors through the Python API, and as a reference-style file (no meta.json)
    state = ckpt.load_weights(run)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if "heads" not in k}
    if any(not v.is_floating_point() or not torch.isfinite(v).all() for v in backbone.values()):
        model = create_model("labram_tiny", num_classes=0)
        with pytest.raises(ValueError, match="state dict: not usable weights"):
            load_checkpoint(model, backbone)
        single = tmp_path / "classifier.pth"
        torch.save({"model": backbone}, single)
        with pytest.raises(ValueError, match=r"classifier\.pth: not usable weights"):
            load_trained(single)


def test_float64_weights_load_cast_to_the_models_dtype(tmp_path):
    run = _run(tmp_path / "run", lambda w: w.update({k: v.double() for k, v in w.items()}))
    model, _ = load_trained(run)
    saved = ckpt.load_weights(run)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, saved[key].float())


@pytest.mark.parametrize("how", ["nan weights", "arch a string"])
def test_predict_with_an_unusable_checkpoint_is_one_line_and_status_2(tmp_path, capsys, how):
    """predict read the heads of a string record (AttributeError) and wrote predictions of a
    NaN model (every window the first class)."""
    if how == "nan weights":
        run = _run(tmp_path / "run", _nan)
    else:
        run = _run(tmp_path / "run", arch="labram_tiny")
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(run), "--data", str(data), "--out", str(out)]
    assert cli([*argv, "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eegfast predict: ") and "\n" not in err, err
    assert ("not usable weights" if how == "nan weights" else "arch") in err
    assert not (out / "predictions.csv").exists()


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_config_nested_past_the_readers_recursion_is_a_config_error(tmp_path, suffix):
    """`a: [[[[...]]]]` 100 000 levels deep: both readers raised RecursionError, a traceback
    with exit status 1 from every training command."""
    config = tmp_path / f"deep{suffix}"
    value = "[" * 100_000 + "]" * 100_000
    config.write_text(f"train: {value}\n" if suffix == ".yaml" else f"x = {value}\n")
    with pytest.raises(ConfigError, match=rf"{config}: values nested too deeply"):
        read_config_file(config)


CHANNELS = ["FP1", "FP2", "C3", "C4"]


def _claiming_npy(shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header claims ``shape`` (float32), followed by 4 kB of data only."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return head.getvalue() + bytes(4000)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_prompt_whose_header_claims_terabytes_is_a_named_error(tmp_path, suffix):
    """numpy allocates the array a .npy header claims before reading it: (4, 10**12) float32
    was a MemoryError traceback from `eegfast generate` ("Unable to allocate 14.6 TiB")."""
    data = _claiming_npy((len(CHANNELS), 10**12))
    prompt = tmp_path / f"prompt{suffix}"
    if suffix == ".npy":
        prompt.write_bytes(data)
        (tmp_path / "prompt.json").write_text(json.dumps({"channels": CHANNELS}))
    else:
        with zipfile.ZipFile(prompt, "w") as archive:
            archive.writestr("x.npy", data)
            with archive.open("channels.npy", "w") as member:
                np.lib.format.write_array(member, np.array(CHANNELS))
    with pytest.raises(GenerateError, match=rf"--prompt prompt\{suffix}: not a readable"):
        load_prompt(prompt)


def test_a_set_value_nested_past_the_readers_recursion_is_a_config_error():
    """`--set train.epochs=[[[[...` raised RecursionError, a traceback from every command."""
    from eegfast.train.config import parse_override

    with pytest.raises(ConfigError, match="--set train.epochs: the value is nested too deeply"):
        parse_override("train.epochs=" + "[" * 100_000 + "]" * 100_000)
