"""Invariants the models keep, tested as properties on drawn batches (eval mode, CPU).

A sample's output must not depend on what else is in its batch: the samples beside it, how many
padded electrodes a batch of mixed electrode sets gives it (``channel_padding_mask``, wherever
they sit, whatever they hold), nor the order of its electrodes when their embedding rows
(``input_chans``) follow them. Checked for the classifier (tiny and a base-shaped small
config), an upcycled MoE classifier with task routing, the masked-pretraining student, the
VQ-NSP tokenizer's code indices and the hybrid model's block-causal pass and generation, with
the reference backend and the default (C++) one, in float32 and under bfloat16 autocast; and
that runs are bitwise repeatable (eval, and train mode under one seed).

The models' parameters are drawn away from their initialisation (norm scales, biases, layer
scales, head, router), so that e.g. a GroupNorm that pooled padded patches would show.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable
from typing import TypeVar
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.models import (
    HybridConfig,
    HybridPretrainModel,
    LaBraM,
    LaBraMConfig,
    create_model,
    upcycle,
)
from eegfast.models.hybrid import forecast_features, generate
from eegfast.nn import MoEFFN

T = TypeVar("T")

BACKENDS = ("reference", "auto")  # "auto" on CPU tensors: the C++ kernels
POS_ROWS = 129
FAST = settings(max_examples=6)


@contextlib.contextmanager
def backend(name: str):
    """Every eegfast op inside runs ``name`` (EEGFAST_BACKEND; "auto" = the default choice)."""
    with mock.patch.dict(os.environ, {"EEGFAST_BACKEND": name}):
        yield


def _seeded(build: Callable[..., T], seed: int) -> Callable[..., T]:
    """``build`` run from torch's global generator seeded with ``seed`` (restored after): the
    weights _randomised leaves at their initial draw are then the same whatever ran before
    (the whole suite's order made a MoE near-tie under bf16 in one fresh clone)."""

    def run(*args: object, **kwargs: object) -> T:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build(*args, **kwargs)

    return run


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with norm scales, biases and layer scales drawn around their
    initial values, the head and MoE routers at full scale (a router at init is near uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("gamma") or ("norm" in name and leaf == "weight"):
                p.copy_(1 + 0.3 * noise)
            elif leaf in ("bias", "q_bias", "v_bias", "task_bias"):
                p.copy_(0.1 * noise)
            elif name.startswith("head.") or name.endswith("router.weight"):
                p.copy_(noise / p.shape[-1] ** 0.5 * (3.0 if "router" in name else 1.0))
    return model.eval()


@functools.cache
def classifier(kind: str) -> torch.nn.Module:
    if kind == "tiny":
        return _randomised(_seeded(create_model, 1)("labram_tiny", n_outputs=3), 1)
    if kind == "base_shaped":  # base's width, heads and conv channels; two blocks
        config = LaBraMConfig(embed_dim=200, depth=2, num_heads=10, conv_channels=8, num_classes=4)
        return _randomised(_seeded(LaBraM, 2)(config), 2)
    assert kind == "moe"
    model = _seeded(create_model, 3)("labram_tiny", n_outputs=3)
    upcycle(
        model,
        num_experts=4,
        top_k=2,
        noise_std=0.5,
        num_tasks=2,
        generator=torch.Generator().manual_seed(0),
    )
    return _randomised(model, 3)


@functools.cache
def pretrain_model() -> torch.nn.Module:
    return _randomised(_seeded(create_model, 4)("labram_tiny_pretrain", max_patches=8), 4)


@functools.cache
def tokenizer() -> torch.nn.Module:
    return _randomised(_seeded(create_model, 5)("vqnsp_tiny"), 5)


@functools.cache
def hybrid_model() -> HybridPretrainModel:
    return _seeded(HybridPretrainModel, 6)(pretrain_model(), HybridConfig()).eval()


def mixed_batch(seed: int, sizes: list[int], n_patches: int):
    """Samples with ``sizes[i]`` electrodes each, alone and padded into one batch.

    Returns (alone, batch): alone[i] = (x (1, C_i, A, 200), rows (C_i + 1,)); batch = (x, rows
    (B, Cmax + 1), channel_padding_mask (B, Cmax), where (B, Cmax) long: the padded batch's
    slot of each real electrode, -1 for padding). Padded electrodes sit at drawn positions
    and hold NaN, inf or large values; their rows are 0, as the data loader pads them.
    """
    gen = torch.Generator().manual_seed(seed)
    B, C = len(sizes), max(sizes) + 1  # at least one padded electrode somewhere
    x = torch.empty(B, C, n_patches, 200)
    rows = torch.zeros(B, C + 1, dtype=torch.long)
    padding = torch.ones(B, C, dtype=torch.bool)
    where = torch.full((B, C), -1)
    fills = (float("nan"), float("inf"), 1e4)
    alone = []
    for i, size in enumerate(sizes):
        signal = torch.randn(1, size, n_patches, 200, generator=gen)
        own_rows = torch.randperm(POS_ROWS - 1, generator=gen)[:size] + 1
        slots = torch.randperm(C, generator=gen)[:size].sort().values
        x[i] = fills[i % len(fills)]
        x[i, slots] = signal[0]
        rows[i, 1 + slots] = own_rows
        padding[i, slots] = False
        where[i, : len(slots)] = slots
        alone.append((signal, torch.cat((torch.zeros(1, dtype=torch.long), own_rows))))
    return alone, (x, rows, padding, where)


def real_tokens(tokens: torch.Tensor, where: torch.Tensor, i: int, size: int, A: int):
    """Sample i's real patch tokens (size·A, ...) out of padded-batch tokens (B, C·A, ...)."""
    per_electrode = tokens[i].unflatten(0, (-1, A))  # (C, A, ...)
    return per_electrode[where[i, :size]].flatten(0, 1)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal up to ``rel`` of the expected values' scale (fp rounding of other shapes)."""
    scale = expected.abs().max().clamp_min(1e-3).item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


batches = st.tuples(
    st.integers(0, 2**16),  # seed
    st.lists(st.integers(1, 4), min_size=1, max_size=3),  # electrodes of each sample
    st.integers(1, 3),  # patches
)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny", "base_shaped", "moe"])
@FAST
@given(drawn=batches)
def test_classifier_output_of_a_sample_does_not_depend_on_its_batch(kind, name, drawn):
    """Alone (unpadded) or in a batch of other electrode sets with padded electrodes anywhere
    (NaN / inf filled), a sample gets the same logits; the MoE model with per-sample task ids
    (eval: dropless, no coupling through the router)."""
    seed, sizes, A = drawn
    model = classifier(kind)
    alone, (x, rows, padding, _) = mixed_batch(seed, sizes, A)
    tasks = torch.arange(len(sizes)) % 2

    def kwargs(i: slice) -> dict:
        return {"task_id": tasks[i]} if kind == "moe" else {}

    with backend(name), torch.no_grad():
        batched = model(x, rows, channel_padding_mask=padding, **kwargs(slice(None)))
        for i, (signal, own_rows) in enumerate(alone):
            single = model(signal, own_rows, **kwargs(slice(i, i + 1)))
            assert_close_to(batched[i : i + 1], single, 1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny", "base_shaped", "moe"])
@FAST
@given(seed=st.integers(0, 2**16), C=st.integers(2, 6), A=st.integers(1, 3))
def test_classifier_is_invariant_to_electrode_order(kind, name, seed, C, A):
    """Electrodes permuted together with their rows: the same logits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, A, 200, generator=gen)
    rows = torch.cat((torch.zeros(1, dtype=torch.long), torch.randperm(128, generator=gen)[:C] + 1))
    order = torch.randperm(C, generator=gen)
    model = classifier(kind)
    with backend(name), torch.no_grad():
        expected = model(x, rows)
        permuted = model(x[:, order], torch.cat((rows[:1], rows[1:][order])))
    assert_close_to(permuted, expected, 1e-4)


def test_classifier_is_invariant_to_the_order_of_its_electrode_names():
    """Two models of the same weights built from the same electrode names in another order
    (``ch_names``: the default rows follow the names) agree on the permuted signal."""
    names = ["Fp1", "Cz", "O2", "T7", "EEG P3-REF", "fz"]
    order = [2, 0, 5, 3, 1, 4]
    model = _randomised(create_model("labram_tiny", n_outputs=3, ch_names=names), 6)
    with torch.no_grad():
        model.pos_embed.normal_()  # distinct rows, so a row that does not follow shows
    other = create_model("labram_tiny", n_outputs=3, ch_names=[names[i] for i in order])
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, len(names), 2, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_to(other.eval()(x[:, order]), model(x), 1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@FAST
@given(drawn=batches)
def test_student_tokens_of_a_sample_do_not_depend_on_its_batch(name, drawn):
    """The masked-pretraining student: each real patch token, the masked ones included (the
    mask of a sample's patches moved with them), as the sample gets alone."""
    seed, sizes, A = drawn
    student = pretrain_model().student
    alone, (x, rows, padding, where) = mixed_batch(seed, sizes, A)
    B, C = padding.shape
    gen = torch.Generator().manual_seed(seed + 1)
    masks = [torch.rand(1, size * A, generator=gen) < 0.5 for size in sizes]
    mask = torch.zeros(B, C, A, dtype=torch.bool)
    for i, size in enumerate(sizes):
        mask[i, where[i, :size]] = masks[i].view(size, A)
    with backend(name), torch.no_grad():
        batched = student(x, rows, mask.flatten(1), channel_padding_mask=padding)
        for i, (signal, own_rows) in enumerate(alone):
            single = student(signal, own_rows, masks[i])
            assert_close_to(batched[i, 0], single[0, 0], 1e-4)  # cls
            got = real_tokens(batched[:, 1:], where, i, sizes[i], A)
            assert_close_to(got, single[0, 1:], 1e-4)


def _check_codes(got: torch.Tensor, expected: torch.Tensor, features: torch.Tensor, vq) -> None:
    """Code indices equal, except where the expected features' two best codes score within
    fp noise of each other (a near tie that any rounding may flip)."""
    codebook = vq.quantize.codebook
    scores = torch.nn.functional.normalize(features.float(), dim=-1) @ codebook.T
    differ = got != expected
    if differ.any():
        chosen = scores.gather(-1, got.clamp_min(0)[..., None])[..., 0]
        best = scores.gather(-1, expected[..., None])[..., 0]
        assert (got[differ] >= 0).all() and ((best - chosen)[differ] < 1e-5).all(), (
            f"codes differ at {differ.nonzero().tolist()}: {got[differ]} vs {expected[differ]}"
        )


@pytest.mark.parametrize("name", BACKENDS)
@FAST
@given(drawn=batches)
def test_tokenizer_codes_of_a_sample_do_not_depend_on_its_batch(name, drawn):
    """``get_codebook_indices``: a sample's codes alone, in a padded mixed batch (-1 exactly at
    its padded patches) and with its electrodes permuted."""
    seed, sizes, A = drawn
    vq = tokenizer()
    alone, (x, rows, padding, where) = mixed_batch(seed, sizes, A)
    with backend(name), torch.no_grad():
        batched = vq.get_codebook_indices(x, rows, channel_padding_mask=padding)
        assert torch.equal(batched < 0, padding.repeat_interleave(A, dim=1))
        for i, (signal, own_rows) in enumerate(alone):
            single = vq.get_codebook_indices(signal, own_rows)[0]
            features = vq.encode_features(signal, own_rows)[0]
            _check_codes(
                real_tokens(batched[:, :, None], where, i, sizes[i], A)[:, 0], single, features, vq
            )
            order = torch.randperm(sizes[i], generator=torch.Generator().manual_seed(seed))
            permuted = vq.get_codebook_indices(
                signal[:, order], torch.cat((own_rows[:1], own_rows[1:][order]))
            )[0]
            _check_codes(
                permuted.view(-1, A),
                single.view(-1, A)[order],
                features.view(-1, A, features.shape[-1])[order],
                vq,
            )


@pytest.mark.parametrize("name", BACKENDS)
@FAST
@given(drawn=batches, extra=st.integers(1, 3))
def test_hybrid_features_of_a_sample_do_not_depend_on_its_batch_or_its_future(name, drawn, extra):
    """The hybrid model's block-causal pass: a sample's features alone, in a padded mixed batch,
    and with ``extra`` later patches appended (time padding: earlier features unchanged)."""
    seed, sizes, A = drawn
    student = hybrid_model().backbone
    alone, (x, rows, padding, where) = mixed_batch(seed, sizes, A + extra)
    with backend(name), torch.no_grad():
        batched = forecast_features(student, x, rows, channel_padding_mask=padding)
        for i, (signal, own_rows) in enumerate(alone):
            prefix = forecast_features(student, signal[:, :, :A], own_rows)[0]
            full = forecast_features(student, signal, own_rows)[0]
            assert_close_to(full[:, :A], prefix, 1e-4)
            assert_close_to(batched[i, where[i, : sizes[i]]], full, 1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_generation_of_a_sample_does_not_depend_on_its_batch(name, use_cache):
    """Deterministic generation (regression head, and greedy codes) of a padded mixed batch:
    each sample's continuation as alone, its padded electrodes zeros."""
    model = hybrid_model()
    sizes, A = [3, 1, 4], 2
    alone, (x, rows, padding, where) = mixed_batch(7, sizes, A)
    for mode in ("regression", "tokens"):
        kwargs = dict(mode=mode, temperature=0.0, use_cache=use_cache)
        with backend(name):
            batched = generate(model, x, rows, 3, channel_padding_mask=padding, **kwargs)
            assert torch.equal(batched[padding], torch.zeros_like(batched[padding]))
            for i, (signal, own_rows) in enumerate(alone):
                single = generate(model, signal, own_rows, 3, **kwargs)
                assert_close_to(batched[i, where[i, : sizes[i]]], single[0], 1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_padded_batches_give_the_losses_of_the_unpadded_one(name):
    """Pretraining, hybrid and tokenizer losses (eval) of a batch whose samples all have the
    same electrodes, alone and padded with NaN electrodes interleaved among them."""
    gen = torch.Generator().manual_seed(11)
    B, C, A = 3, 4, 3
    x = torch.randn(B, C, A, 200, generator=gen)
    rows = torch.tensor([0, 5, 9, 17, 33])
    slots = torch.tensor([0, 2, 3, 5])  # of 6: electrodes 1 and 4 padded
    xp = torch.full((B, 6, A, 200), float("nan"))
    xp[:, slots] = x
    rows_p = torch.zeros(6 + 1, dtype=torch.long)
    rows_p[1 + slots] = rows[1:]
    padding = torch.ones(B, 6, dtype=torch.bool)
    padding[:, slots] = False
    targets = torch.randint(0, 256, (B, C, A), generator=gen)
    targets_p = torch.full((B, 6, A), -1)
    targets_p[:, slots] = targets
    mask = torch.rand(B, C, A, generator=gen) < 0.5
    mask_p = torch.zeros(B, 6, A, dtype=torch.bool)
    mask_p[:, slots] = mask
    pretrain, hybrid, vq = pretrain_model(), hybrid_model(), tokenizer()
    with backend(name), torch.no_grad():
        for model in (pretrain, hybrid):
            out = model(x, rows, targets.flatten(1), mask.flatten(1))
            out_p = model(
                xp, rows_p, targets_p.flatten(1), mask_p.flatten(1), channel_padding_mask=padding
            )
            assert_close_to(out_p.loss, out.loss, 1e-5)
        out, out_p = vq(x, rows), vq(xp, rows_p, channel_padding_mask=padding)
        for field in ("loss", "amplitude_loss", "phase_loss", "commitment_loss"):
            assert_close_to(getattr(out_p, field), getattr(out, field), 1e-5)


def _run_all(name: str):
    """Outputs of every model on one batch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 200, generator=gen)
    rows = torch.tensor([0, 3, 1, 40, 7])
    targets = torch.randint(0, 256, (2, 12), generator=gen)
    outs = []
    with backend(name):
        for kind in ("tiny", "base_shaped", "moe"):
            outs.append(classifier(kind)(x, rows))
        mask = torch.rand(2, 12, generator=gen) < 0.5
        outs.append(pretrain_model()(x, rows, targets, mask).loss)
        outs.append(hybrid_model()(x, rows, targets, mask).loss)
        outs.append(tokenizer().get_codebook_indices(x, rows))
    return outs


@pytest.mark.parametrize("name", BACKENDS)
def test_eval_runs_are_bitwise_repeatable(name):
    with torch.no_grad():
        first, second = _run_all(name), _run_all(name)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", BACKENDS)
def test_train_mode_runs_under_one_seed_are_bitwise_repeatable(name):
    """Dropout, drop path, MoE jitter, random masks and the tokenizer's k-means start and
    EMA step: the same under the same seed (fresh copies, so the EMA state is the same)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 2, 200, generator=gen)
    rows = torch.tensor([0, 3, 1, 40, 7])
    targets = torch.randint(0, 256, (3, 8), generator=gen)
    moe = copy.deepcopy(classifier("moe"))
    for module in moe.modules():
        if isinstance(module, MoEFFN):
            module.jitter_eps = 0.1
    regularised = LaBraM(
        LaBraMConfig(
            embed_dim=100,
            depth=2,
            num_heads=4,
            conv_channels=4,
            num_classes=2,
            drop_rate=0.1,
            attn_drop_rate=0.1,
            drop_path_rate=0.2,
        )
    )
    runs = [
        (regularised, lambda m: m(x, rows)),
        (moe, lambda m: m(x, rows, task_id=torch.tensor([0, 1, 1]))),
        (pretrain_model(), lambda m: m(x, rows, targets).loss),
        (hybrid_model(), lambda m: m(x, rows, targets).loss),
        (tokenizer(), lambda m: m(x, rows).loss),
    ]
    with backend(name):
        for model, run in runs:
            results = []
            for _ in range(2):
                fresh = copy.deepcopy(model).train()
                torch.manual_seed(123)
                results.append(run(fresh))
            assert torch.equal(results[0], results[1]), type(model).__name__


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny", "base_shaped", "moe"])
def test_bf16_autocast_outputs_are_close_to_float32(kind, name):
    """bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2%) in every GEMM
    input; through two blocks and the pooling the logits stay within a few percent of their
    float32 values (the norms, softmax, router and residual stream are float32)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 3, 200, generator=gen)
    rows = torch.tensor([0, 2, 4, 6, 8, 10])
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    model = classifier(kind)
    with backend(name), torch.no_grad():
        expected = model(x, rows, channel_padding_mask=padding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, rows, channel_padding_mask=padding)
            single = model(x[1:2, :3], rows[:4])
    assert got.dtype == torch.bfloat16
    assert_close_to(got, expected, 5e-2)
    # and padding / batching invariance holds under autocast as well
    assert_close_to(got[1:2], single, 2e-2)
    pretrain, vq = pretrain_model(), tokenizer()
    targets = torch.randint(0, 256, (3, 15), generator=gen)
    mask = torch.rand(3, 15, generator=gen) < 0.5
    with backend(name), torch.no_grad():
        loss = pretrain(x, rows, targets, mask, channel_padding_mask=padding).loss
        codes = vq.get_codebook_indices(x, rows, channel_padding_mask=padding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_bf16 = pretrain(x, rows, targets, mask, channel_padding_mask=padding).loss
            codes_bf16 = vq.get_codebook_indices(x, rows, channel_padding_mask=padding)
    assert_close_to(loss_bf16, loss, 1e-2)
    assert torch.equal(codes_bf16 < 0, codes < 0)
    assert (codes_bf16 == codes).float().mean() > 0.9  # near ties may flip under bf16


@pytest.mark.parametrize("name", BACKENDS)
def test_an_empty_batch_gives_empty_outputs(name):
    """B = 0 (an empty last batch, a filter that kept nothing): empty outputs of every model's
    eval path. The hybrid's block-causal pass and generation failed to reshape their tokens
    ("cannot reshape tensor of 0 elements into shape [0, 2, 4, -1]")."""
    x = torch.randn(0, 4, 2, 200)
    rows = torch.tensor([0, 1, 2, 3, 4])
    padding = torch.zeros(0, 4, dtype=torch.bool)
    hybrid = hybrid_model()
    with backend(name), torch.no_grad():
        for kind in ("tiny", "moe"):
            assert classifier(kind)(x, rows, channel_padding_mask=padding).shape[0] == 0
        assert tokenizer().get_codebook_indices(x, rows).shape == (0, 8)
        assert forecast_features(hybrid.backbone, x, rows).shape == (0, 4, 2, 100)
        for use_cache in (True, False):
            out = generate(
                hybrid,
                x,
                rows,
                2,
                mode="regression",
                use_cache=use_cache,
                channel_padding_mask=padding,
            )
            assert out.shape == (0, 4, 2, 200)
        loss = hybrid(x, rows, torch.zeros(0, 8, dtype=torch.long)).ar_loss
        assert loss.shape == ()
        # the tokenizer's training forward: MKL's FFT refused 0 signals, then its decoder's
        # reshapes had an undefined -1; the codebook is left as it was
        vq = tokenizer().train()
        before = vq.quantize.embedding.weight.clone()
        out = vq(x, rows)
        assert out.indices.shape == (0, 8) and out.loss.shape == ()
        assert torch.equal(vq.quantize.embedding.weight, before)


def test_hybrid_features_take_the_signal_as_the_models_do():
    """``forecast_features`` takes x (B, C, A·200) as (B, C, A, 200), as every model does, and
    names x for patches of another length (it failed with "not enough values to unpack" and
    "shape '[4, 4, 100]' is invalid for input of size 832")."""
    student = hybrid_model().backbone
    x = torch.randn(2, 4, 2, 200, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        expected = forecast_features(student, x, rows)
        assert torch.equal(forecast_features(student, x.flatten(2), rows), expected)
        with pytest.raises(ValueError, match=r"x must have shape \(B, C, A, 200\)"):
            forecast_features(student, torch.randn(2, 4, 2, 100), rows)
