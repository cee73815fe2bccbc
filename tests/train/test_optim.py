"""Parameter groups, layer-wise lr decay, the schedule, the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from eegfast.train.config import OptimConfig
from eegfast.train.optim import build_optimizer, build_scheduler, cosine_with_warmup, param_groups
from eegfast.train.sampler import EpochBatchSampler
from tests.train.fakes import TinyClassifier, TinyPretrain


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens():
    model = TinyPretrain()
    groups = param_groups(model, weight_decay=0.05)
    names = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert names["student.pos_embed"] == 0.0 and names["mask_token"] == 0.0
    assert names["student.blocks.0.norm1.weight"] == 0.0
    assert names["lm_head.bias"] == 0.0
    assert names["student.blocks.0.mlp.0.weight"] == 0.05 and names["lm_head.weight"] == 0.05


def test_layer_decay_scales_lr_by_depth():
    model = TinyClassifier(depth=2)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0  # layer L + 1
    assert scale["blocks.1.mlp.0.weight"] == 0.5
    assert scale["blocks.0.mlp.0.weight"] == 0.25
    assert scale["patch_embed.weight"] == scale["pos_embed"] == 0.125
    optimizer = build_optimizer(
        model,
        OptimConfig(lr=1.0, layer_decay=0.5, warmup_steps=0, warmup_fraction=0.0),
        torch.device("cpu"),
    )
    build_scheduler(
        optimizer,
        OptimConfig(lr=1.0, min_lr=0.0, layer_decay=0.5, warmup_fraction=0.0),
        total_steps=10,
    )
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == pytest.approx([0.125, 0.25, 0.5, 1.0])


def test_fused_adamw_by_default_on_cpu_and_an_error_naming_the_key():
    """``optim.fused=auto`` takes torch's fused AdamW on CPU too: the default per-parameter
    loop reads every step count back to the host; both give the same update."""
    model = TinyClassifier(depth=1)
    cpu = torch.device("cpu")
    assert build_optimizer(model, OptimConfig(), cpu).defaults["fused"]
    assert not build_optimizer(model, OptimConfig(fused="false"), cpu).defaults["fused"]
    with pytest.raises(ValueError, match="optim.fused must be auto, true or false"):
        build_optimizer(model, OptimConfig(fused="yes"), cpu)
    weights = {}
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        model = TinyClassifier(depth=1)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, fused=fused), cpu)
        for _ in range(3):
            model(torch.randn(4, 2, 2, 200)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights["auto"], weights["false"], rtol=1e-5, atol=1e-6)


def test_cosine_schedule_with_warmup():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1)
    assert cosine_with_warmup(0, **kw) == pytest.approx(0.1)
    assert cosine_with_warmup(9, **kw) == pytest.approx(1.0)
    assert cosine_with_warmup(60, **kw) == pytest.approx(0.55)
    assert cosine_with_warmup(110, **kw) == pytest.approx(0.1)
    values = [cosine_with_warmup(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert not math.isnan(cosine_with_warmup(0, total_steps=1, warmup_steps=0, base_lr=1, min_lr=0))


def test_sampler_groups_splits_ranks_and_resumes():
    keys = ["a"] * 10 + ["b"] * 7
    whole = EpochBatchSampler(keys, 4, seed=3)
    batches = whole.global_batches()
    assert len(batches) == 2 + 1  # drop_last: 2 full "a" batches, 1 full "b" batch
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    ranks = [EpochBatchSampler(keys, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for joined, r0, r1 in zip(batches, *ranks, strict=True):
        assert sorted(r0 + r1) == sorted(joined) and not set(r0) & set(r1)
    whole.set_epoch(0, start_batch=2)
    assert list(whole) == batches[2:]
    whole.set_epoch(1)
    assert whole.global_batches() != batches  # reshuffled per epoch
    with pytest.raises(ValueError, match="divisible by the world size"):
        EpochBatchSampler(keys, 3, world_size=2)


def test_accumulation_cuts_the_same_global_batches_into_micro_batches():
    keys = ["a"] * 12 + ["b"] * 8
    plain = EpochBatchSampler(keys, 4, seed=1).global_batches()
    accum = EpochBatchSampler(keys, 4, micro_batches=2, seed=1)
    micro = list(accum)
    assert [micro[i] + micro[i + 1] for i in range(0, len(micro), 2)] == plain
    assert len(accum) == 2 * len(plain)
    two_ranks = [
        list(EpochBatchSampler(keys, 4, micro_batches=2, seed=1, rank=r, world_size=2))
        for r in range(2)
    ]
    assert [a + b for a, b in zip(*two_ranks, strict=True)] == micro


def test_no_weight_decay_on_the_stacked_biases_of_upcycled_experts():
    """An upcycled MoE keeps its biases as (experts, out) tensors (and the router's per-task
    bias as (tasks, experts)): biases, without weight decay like the dense MLP's they came from;
    the expert weights and the router's weight keep it."""
    from eegfast.train.arch import build_model

    upcycle = {"num_experts": 4, "top_k": 2, "num_tasks": 2}
    model = build_model({"kind": "classifier", "name": "labram_tiny", "upcycle": upcycle})
    decay = {n: g["weight_decay"] for g in param_groups(model, 0.05, 0.65) for n in g["names"]}
    mlp = "blocks.0.mlp."
    assert [decay[mlp + n] for n in ("fc1_bias", "fc2_bias", "task_bias")] == [0.0] * 3
    assert [decay[mlp + n] for n in ("fc1_weight", "fc2_weight", "router.weight")] == [0.05] * 3


def test_layer_decay_counts_the_blocks_of_a_pretraining_wrapper():
    """``student.blocks`` (no ``blocks`` of its own): deeper blocks get larger lrs, none more
    than the heads' (scale 1)."""
    model = TinyPretrain()  # student with 2 blocks
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for n in g["names"]}
    assert scale["lm_head.weight"] == 1.0
    assert scale["student.blocks.1.mlp.0.weight"] == 0.5
    assert scale["student.blocks.0.mlp.0.weight"] == 0.25
    assert scale["student.patch_embed.weight"] == scale["mask_token"] == 0.125


def test_layer_decay_groups_a_labram_model_as_the_reference_recipe():
    """The reference's fine-tuning groups (BEiT's rule) put the patch embedding, cls_token and
    pos_embed in layer 0 and everything that is neither a block nor one of those (time_embed,
    fc_norm, head) in the top group at lr scale 1; time_embed had been in layer 0 (0.65^13 of
    the lr for LaBraM-Base's 12 blocks, against 1 in the reference)."""
    from eegfast.models import create_model

    model = create_model("labram_tiny", n_outputs=2)
    depth = len(model.blocks)
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.65) for n in g["names"]}
    bottom = 0.65 ** (depth + 1)
    assert scale["time_embed"] == scale["fc_norm.weight"] == scale["head.weight"] == 1.0
    assert scale["pos_embed"] == scale["cls_token"] == bottom
    assert {v for n, v in scale.items() if n.startswith("patch_embed.")} == {bottom}
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65**depth)
    decay = {n: g["weight_decay"] for g in param_groups(model, 0.05, 0.65) for n in g["names"]}
    assert decay["time_embed"] == decay["pos_embed"] == decay["cls_token"] == 0.0


def test_the_schedule_never_rises_above_a_small_lr():
    """optim.min_lr (1e-6 by default) above optim.lr: the cosine climbed from lr to min_lr, 100x
    the lr asked for at the end; it now stays at lr (its floor is at most lr)."""
    kw = dict(total_steps=100, warmup_steps=0, base_lr=1e-8, min_lr=1e-6)
    values = [cosine_with_warmup(s, **kw) for s in range(0, 101)]
    assert max(values) == pytest.approx(1e-8) and values[-1] == pytest.approx(1e-8)
