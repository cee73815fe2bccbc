"""LaBraM classifier: reference keys, checkpoint loading, equivalence, padding, config API."""

import argparse
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from eegfast.electrodes import labram_input_chans
from eegfast.models import (
    CheckpointMismatchError,
    LaBraM,
    create_model,
    get_config,
    list_models,
    load_checkpoint,
    read_state_dict,
)
from eegfast.models.checkpoint import unwrap_state_dict
from eegfast.models.labram import mean_patch_tokens
from eegfast.models.reference import RefTransformer
from tests.models._spec import random_reference_state, reference_n_params, reference_shapes

SIZES = {"labram_base": (200, 12, 10, 8), "labram_large": (400, 24, 16, 16)}


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["labram_base", "labram_large", "labram_huge"])
def test_keys_and_shapes_match_reference(name):
    model = create_model(name, num_classes=6, device="meta")
    assert shapes(model) == reference_shapes(name)
    assert sum(p.numel() for p in model.parameters()) == reference_n_params(name)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) > 0


@pytest.mark.parametrize("name", ["labram_large", "labram_huge"])
def test_large_checkpoints_load_on_meta(name):
    model = create_model(name, num_classes=6, device="meta")
    report = load_checkpoint(model, {"model": random_reference_state(name, device="meta")})
    assert report.ok and len(report.loaded) == len(reference_shapes(name))


@pytest.fixture(scope="module")
def base_classifier():
    return create_model("labram_base", num_classes=6)


def test_reference_checkpoint_loads_every_key(tmp_path, base_classifier):
    state = random_reference_state("labram_base", seed=1)
    ddp = {f"module.{k}": v for k, v in state.items()}
    cases = {
        "plain.pth": state,
        "model.pth": {"model": state, "epoch": 3},
        "module.pth": {"module": ddp},
        "plain.safetensors": state,
        "ddp.safetensors": ddp,
    }
    model = base_classifier
    for file_name, obj in cases.items():
        path = tmp_path / file_name
        if path.suffix == ".pth":
            torch.save(obj, path)
        else:
            save_file(obj, str(path))
        model.pos_embed.data.zero_()
        report = load_checkpoint(model, path)
        assert report.ok and sorted(report.loaded) == sorted(state), file_name
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), file_name


def test_mismatch_report_is_readable_and_strict(base_classifier):
    state = random_reference_state("labram_base", seed=2)
    for i in range(12):
        del state[f"blocks.{i}.attn.q_norm.weight"]
    state["head.weight"] = torch.zeros(4, 200)
    state["extra.thing"] = torch.zeros(1)
    model = base_classifier
    before = model.pos_embed.detach().clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, state)
    message = str(info.value)
    assert "blocks.{0..11}.attn.q_norm.weight" in message
    assert "extra.thing" in message and "head.weight: [6, 200] vs [4, 200]" in message
    torch.testing.assert_close(model.pos_embed, before)  # nothing loaded
    report = load_checkpoint(model, state, strict=False, exclude=("head.",))
    assert report.missing == [f"blocks.{i}.attn.q_norm.weight" for i in range(12)]
    assert report.unexpected == ["extra.thing"] and not report.mismatched
    torch.testing.assert_close(model.pos_embed, state["pos_embed"])


class _PickledObject:
    """A class no checkpoint reader should construct."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": random_reference_state("labram_base"), "extra": _PickledObject(1)}, path)
    with pytest.raises(ValueError, match="weights_only") as info:
        read_state_dict(path)
    assert "_PickledObject" in str(info.value)
    # nor a Namespace holding one: only its plain attributes are allowed
    torch.save({"model": {}, "args": argparse.Namespace(x=_PickledObject(2))}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")


def test_reference_training_checkpoint_with_args_loads(tmp_path):
    """The reference training scripts save {"model", "optimizer", "epoch", "scaler", "args"},
    ``args`` an argparse.Namespace: their checkpoints load without re-saving."""
    state = random_reference_state("labram_base", seed=4)
    args = argparse.Namespace(
        model="labram_base_patch200_200",
        lr=5e-4,
        layer_decay=0.65,
        input_size=(1, 200),
        finetune="",
        nb_classes=6,
        smoothing=0.1,
    )
    path = tmp_path / "checkpoint-best.pth"
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4}]},
            "epoch": 29,
            "scaler": {"scale": 65536.0, "_growth_tracker": 3},
            "args": args,
        },
        path,
    )
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def reference_pair(name, **overrides):
    embed, depth, heads, conv = SIZES.get(name, (100, 2, 4, 4))
    model = create_model(name, num_classes=6, drop_path_rate=0.0, **overrides).eval()
    ref = RefTransformer(embed, depth, heads, conv, num_classes=6).eval()
    state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    for key in state:  # LayerNorm weights around 1, as trained models have
        if key.endswith("norm.weight") or "norm1.weight" in key or "norm2.weight" in key:
            state[key] += 1.0
    model.load_state_dict(state)
    ref.load_state_dict(state)
    return model, ref


@pytest.fixture(scope="module")
def base_pair():
    return reference_pair("labram_base")


@pytest.mark.parametrize("backend", ["reference", None])
def test_base_matches_reference_recreation(base_pair, backend):
    model, ref = base_pair
    for block in model.blocks:
        block.attn.backend = backend
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, 200, generator=gen)
    chans = torch.tensor([0, 1, 3, 20, 42, 64, 100, 128])
    with torch.no_grad():
        expected = ref(x, chans)
        got = model(x, chans)
        features = model.forward_features(x, chans)
    assert features.shape == (2, 200)
    atol = 1e-5 if backend == "reference" else 2e-5  # C++ kernel: other summation order
    assert (got - expected).abs().max().item() <= atol


def test_tiny_gradients_match_reference():
    model, ref = reference_pair("labram_tiny", attention_backend="reference")
    x = torch.randn(3, 4, 2, 200)
    chans = torch.tensor([0, 5, 6, 7, 8])
    model(x, chans).square().sum().backward()
    ref(x, chans).square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        # grads here are O(10..100); conv biases before a 1-channel GroupNorm have ~0 grads
        torch.testing.assert_close(p.grad, grads[name].grad, atol=5e-5, rtol=1e-4, msg=name)


def test_mixed_electrode_sets_with_padding():
    model, _ = reference_pair("labram_tiny")
    a, b = torch.randn(1, 5, 3, 200), torch.randn(1, 3, 3, 200)
    chans_a, chans_b = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 9, 8, 7])
    x = torch.cat([a, torch.cat([b, torch.zeros(1, 2, 3, 200)], dim=1)])
    chans = torch.stack([chans_a, torch.cat([chans_b, torch.zeros(2, dtype=torch.long)])])
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        batched = model(x, chans, channel_padding_mask=padding)
        torch.testing.assert_close(batched[0], model(a, chans_a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], model(b, chans_b)[0], atol=1e-5, rtol=1e-5)


def test_signal_arguments_and_config_errors():
    names = ["Fp1", "EEG Cz-REF", "O2"]
    model = create_model("labram_tiny", n_outputs=3, ch_names=names, n_times=800, sfreq=200)
    assert model.config.num_classes == 3
    assert model.config.input_chans == tuple(labram_input_chans(names))
    x = torch.randn(2, 3, 800)
    torch.testing.assert_close(model.eval()(x), model(x.unflatten(-1, (4, 200))))
    info = [{"ch_name": n} for n in names]
    assert create_model("labram_tiny", chs_info=info).config.input_chans == model.config.input_chans
    with pytest.raises(TypeError, match="valid keys: .*embed_dim"):
        create_model("labram_tiny", embed_dims=3)
    with pytest.raises(ValueError, match="available"):
        create_model("labram_gigantic")
    with pytest.raises(ValueError, match="sfreq"):
        create_model("labram_tiny", sfreq=250)
    with pytest.raises(ValueError, match="n_chans"):
        create_model("labram_tiny", n_chans=4, ch_names=names)
    with pytest.raises(ValueError, match="XYZ"):
        create_model("labram_tiny", ch_names=["Fp1", "XYZ"])
    bipolar = ["Cz", "C3-P3"]  # list index 130: past the reference's 129-row table
    with pytest.raises(ValueError, match="129-row"):
        create_model("labram_tiny", ch_names=bipolar)
    extended = create_model("labram_tiny", ch_names=bipolar, pos_rows=137)
    assert extended.config.input_chans == (0, 42, 131)
    assert extended(torch.randn(1, 2, 1, 200)).shape == (1, 2)
    with pytest.raises(ValueError, match="input_chans is required"):
        create_model("labram_tiny")(torch.randn(1, 3, 1, 200))
    with pytest.raises(ValueError, match="C \\+ 1 = 3"):
        create_model("labram_tiny")(torch.randn(1, 2, 1, 200), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at most 16 patches"):
        model(torch.randn(1, 3, 17, 200))
    with pytest.raises(ValueError, match="conv_channels"):
        get_config("labram_tiny", embed_dim=120)
    assert dataclasses.is_dataclass(get_config("labram_base"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("labram_base").depth = 3
    assert {"labram_base", "labram_huge_pretrain", "vqnsp_base", "labram_tiny"} <= set(
        list_models()
    )


def test_grad_checkpointing_gives_same_gradients():
    model, _ = reference_pair("labram_tiny")
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    model(x, chans).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, chans).sum().backward()
    for g, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model, _ = reference_pair("labram_tiny")
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        full = model(x, chans)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x, chans)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, atol=0.1, rtol=0.05)


def test_torch_compile_traces_without_graph_breaks():
    # aot_eager: dynamo + AOT autograd tracing (custom-op fake/autograd registrations included)
    # without inductor's slow C++ codegen; inductor itself runs in benchmarks/bench_pretrain.py.
    model, _ = reference_pair("labram_tiny")
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, chans, channel_padding_mask=padding)
    torch.testing.assert_close(out, model(x, chans, channel_padding_mask=padding))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_classifier_is_labram_and_padding_mask_shapes():
    model = create_model("labram_tiny", num_classes=4)
    assert isinstance(model, LaBraM)
    out = model(torch.randn(2, 2, 1, 200), torch.tensor([[0, 1, 2], [0, 4, 0]]),
                channel_padding_mask=torch.tensor([[False, False], [False, True]]))  # fmt: skip
    assert out.shape == (2, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_padded_electrodes_are_ignored(fill):
    """NaN/inf in a padded electrode (a common "missing channel" fill) gives the output of a
    zero fill and of the sample alone; padding applied as a product with 0 let them through."""
    model, _ = reference_pair("labram_tiny")
    x = torch.randn(2, 3, 2, 200)
    chans = torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    zeros, junk = x.clone(), x.clone()
    zeros[1, 2] = 0.0
    junk[1, 2] = fill
    with torch.no_grad():
        expected = model(zeros, chans, channel_padding_mask=padding)
        got = model(junk, chans, channel_padding_mask=padding)
        features = model.forward_features(junk, chans, channel_padding_mask=padding)
        alone = model(x[1:, :2], chans[:3])
    assert torch.isfinite(features).all()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[1:], alone, atol=1e-5, rtol=1e-5)


def test_mean_pooling_leaves_out_non_finite_padded_tokens():
    tokens = torch.randn(2, 1 + 4, 3)
    tokens[1, 3:] = float("nan")
    key_padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    pooled = mean_patch_tokens(tokens, key_padding)
    torch.testing.assert_close(pooled[0], tokens[0, 1:].mean(0))
    torch.testing.assert_close(pooled[1], tokens[1, 1:3].mean(0))


def test_padding_mask_and_input_chans_are_checked_against_x():
    model = create_model("labram_tiny", ch_names=["Fp1", "Cz", "O2"], n_outputs=2)
    x = torch.randn(2, 3, 2, 200)  # B = 2, C = 3
    wrong_masks = [
        torch.zeros(2, 4, dtype=torch.bool),
        torch.zeros(3, dtype=torch.bool),
        torch.zeros(2, 1, 3, dtype=torch.bool),
        torch.zeros(2, 3),  # float, not bool
    ]
    for mask in wrong_masks:
        with pytest.raises(ValueError, match=r"channel_padding_mask must be a \(B, C\) = \(2, 3\)"):
            model(x, channel_padding_mask=mask)
    with pytest.raises(ValueError, match=r"input_chans must have shape \(B, C \+ 1\) = \(2, 4\)"):
        model(x, torch.tensor([[0, 1, 42, 83]] * 3))
    with pytest.raises(ValueError, match=r"input_chans must have shape \(C \+ 1,\) or"):
        model(x, torch.tensor([[[0, 1, 42, 83]] * 2]))
    padding = torch.tensor([[False, False, False], [False, False, True]])
    chans = torch.tensor([[0, 1, 42, 83], [0, 1, 42, 0]])
    assert model(x, chans, channel_padding_mask=padding).shape == (2, 2)


class _FakeDDP(torch.nn.Module):
    """DistributedDataParallel's key layout (``module.<key>``) without a process group."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


class _FakeCompiled(torch.nn.Module):
    """torch.compile's OptimizedModule key layout (``_orig_mod.<key>``) without compiling."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


def test_wrapper_key_prefixes_are_unwrapped_in_any_order():
    model = create_model("labram_tiny", num_classes=2)
    for saved in (
        _FakeCompiled(_FakeDDP(model)).state_dict(),  # torch.compile(DDP(model))
        _FakeDDP(_FakeCompiled(model)).state_dict(),  # DDP(torch.compile(model))
    ):
        report = load_checkpoint(create_model("labram_tiny", num_classes=2), saved)
        assert report.ok and len(report.loaded) == len(model.state_dict())
    weight = torch.zeros(1)
    nested = {"_orig_mod.module._orig_mod.module.blocks.0.w": weight, "module.module.cls": weight}
    assert list(unwrap_state_dict(nested)) == ["blocks.0.w", "cls"]


def test_unreadable_checkpoints_name_the_file_and_the_cause(tmp_path):
    state = {"w": torch.arange(3.0)}
    for name in ("upper.SAFETENSORS", "safetensors_named.pth", "no_suffix"):
        save_file(state, str(tmp_path / name))  # recognised by content, not by name
        assert torch.equal(read_state_dict(tmp_path / name)["w"], state["w"]), name
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(state, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    safetensors_bytes = (tmp_path / "upper.SAFETENSORS").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(safetensors_bytes[:-4])
    for name in ("garbage.pth", "empty.pth", "truncated.pth", "truncated.safetensors"):
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            read_state_dict(tmp_path / name)
        assert name in str(info.value) and "non-tensor" not in str(info.value), name
    with pytest.raises(ValueError, match="Unsupported operand"):  # torch's reason is kept
        read_state_dict(tmp_path / "garbage.pth")
    torch.save({"model": state, "extra": _PickledObject(3)}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match="non-tensor.*Unsupported global.*_PickledObject"):
        read_state_dict(tmp_path / "objects.pth")


def test_conflicting_create_model_arguments_name_both():
    with pytest.raises(ValueError, match="n_outputs and num_classes disagree"):
        get_config("labram_tiny", n_outputs=3, num_classes=4)
    assert get_config("labram_tiny", n_outputs=3, num_classes=3).num_classes == 3
    names = ["Fp1", "Cz"]
    rows = tuple(labram_input_chans(names))
    for name in ("labram_tiny", "labram_tiny_pretrain"):
        with pytest.raises(ValueError, match="ch_names and input_chans disagree"):
            get_config(name, ch_names=names, input_chans=(0, 1, 5))
        config = get_config(name, ch_names=names, input_chans=list(rows))
        assert getattr(config, "backbone", config).input_chans == rows
    info = [{"ch_name": n} for n in names]
    with pytest.raises(ValueError, match="chs_info and input_chans disagree"):
        get_config("labram_tiny", chs_info=info, input_chans=(0, 1, 5))


def test_class_counts_must_be_non_negative_ints():
    for bad in (-1, 2.5, True, "2", None):
        with pytest.raises(ValueError, match="n_outputs must be an int >= 0"):
            create_model("labram_tiny", n_outputs=bad)
    for bad in (-3, 2.0, False):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            get_config("labram_tiny", num_classes=bad)
    assert get_config("labram_tiny", n_outputs=0).num_classes == 0
    assert create_model("labram_tiny", n_outputs=3).head.out_features == 3


def test_padding_mask_keeps_a_float64_patch_embedding_in_float64():
    """With a padding mask the GroupNorm statistics were computed in float32 (``x.float()``):
    a float64 model's patch embedding then differed from the unmasked one by ~1e-6."""
    model = create_model("labram_tiny", num_classes=2, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 2, 200, dtype=torch.float64)
    no_padding = torch.zeros(2, 3 * 2, dtype=torch.bool)
    with torch.no_grad():
        plain = model.patch_embed(x)
        masked = model.patch_embed(x, no_padding)
    assert masked.dtype == torch.float64
    torch.testing.assert_close(masked, plain, atol=1e-12, rtol=1e-12)


def test_signal_of_another_dtype_is_cast_to_the_model_dtype():
    """x is cast to the model's dtype (as hybrid.generate casts its prompt); a float64 x
    failed inside the convolution ("Input type (double) and bias type (float)")."""
    model = create_model("labram_tiny", num_classes=2).eval()
    x, chans = torch.randn(2, 3, 2, 200, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    with torch.no_grad():
        for kwargs in ({}, {"channel_padding_mask": padding}):
            expected = model(x.float(), chans, **kwargs)
            got = model(x, chans, **kwargs)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected)
        wide = create_model("labram_tiny", num_classes=2, dtype=torch.float64).eval()
        assert wide(x.float(), chans).dtype == torch.float64
    with pytest.raises(ValueError, match=r"x must be a floating-point signal .*torch\.int64"):
        model(torch.ones(2, 3, 2, 200, dtype=torch.long), chans)


def test_empty_signals_and_negative_electrode_rows_are_refused():
    model = create_model("labram_tiny", num_classes=2)
    for shape, chans in (((2, 0, 2, 200), [0]), ((2, 3, 0, 200), [0, 1, 2, 3])):
        with pytest.raises(ValueError, match="x must hold at least one electrode and one patch"):
            model(torch.randn(shape), torch.tensor(chans))
    with pytest.raises(TypeError, match="x must be a tensor"):
        model([[0.0] * 200], torch.tensor([0, 1]))
    # a negative row would index pos_embed from the end (unchecked on a GPU model)
    with pytest.raises(ValueError, match="input_chans must start with 0"):
        get_config("labram_tiny", input_chans=(0, -1, 5))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # DataParallel's torch.jit use
def test_checkpoints_load_into_compiled_and_data_parallel_models():
    """A model wrapped by torch.compile (or DataParallel) has ``_orig_mod.`` (``module.``)
    keys: loading into it reported every key missing although file keys are unwrapped."""
    source = create_model("labram_tiny", num_classes=2)
    pretrain = create_model("labram_tiny_pretrain")
    data_parallel = torch.nn.DataParallel
    for wrap in (torch.compile, data_parallel, lambda m: torch.compile(data_parallel(m))):
        model = create_model("labram_tiny", num_classes=2)
        wrapped = wrap(model)
        report = load_checkpoint(wrapped, {"model": source.state_dict()})
        assert report.ok and len(report.loaded) == len(source.state_dict())
        assert torch.equal(model.pos_embed, source.pos_embed)
        report = load_checkpoint(wrapped, pretrain.state_dict())  # backbone only
        assert report.ok and "head.weight" in report.initialised
        assert torch.equal(model.pos_embed, pretrain.student.pos_embed)


def test_reset_parameters_reinitialises_every_parameter():
    """reset_parameters re-drew the Linears and embeddings only: a trained model kept its norms,
    convolutions and layer scales. After a reset no parameter keeps a trained value, and the
    deterministic ones are back at their defaults; negative init_values make no layer scale
    (as documented and the reference)."""
    from eegfast.models import create_model

    model = create_model("labram_tiny", num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in model.named_parameters()}
    model.reset_parameters()
    for name, value in model.named_parameters():
        assert not torch.equal(value, trained[name]), f"{name} kept its trained value"
        if "gamma" in name:
            assert torch.all(value == model.config.init_values), name
        elif "norm" in name or ".gn" in name:
            assert torch.all(value == (1.0 if name.endswith("weight") else 0.0)), name
    assert create_model("labram_tiny", num_classes=3, init_values=-0.1).blocks[0].gamma_1 is None
