"""Symmetric masked EEG modelling: reference keys, equivalence with two sequential passes,
masking, padding, and transfer of the backbone into the classifier."""

import pytest
import torch

from eegfast.models import (
    LaBraMPretrain,
    create_model,
    load_checkpoint,
    pretrain_to_classifier_state_dict,
    random_patch_mask,
)
from eegfast.models.reference import RefPretrain
from eegfast.testing import requires_cuda
from tests.models._spec import random_reference_state, reference_shapes


def test_keys_and_shapes_match_reference():
    model = create_model("labram_base_pretrain", device="meta")
    assert isinstance(model, LaBraMPretrain)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_shapes("labram_base_pretrain")
    report = load_checkpoint(model, {"model": random_reference_state("labram_base_pretrain",
                                                                     device="meta")})  # fmt: skip
    assert report.ok and len(report.loaded) == len(got)


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    model = create_model("labram_tiny_pretrain", attention_backend="reference")
    ref = RefPretrain(100, 2, 4, 4, vocab_size=256)
    state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    for key in state:
        if "norm" in key and key.endswith("weight"):
            state[key] += 1.0
    model.load_state_dict(state)
    ref.load_state_dict(state)
    return model, ref


def reference_loss(ref, x, chans, targets, mask):
    x_rec, x_rec_sym = ref(x, chans, mask)
    labels, labels_sym = targets[mask], targets[~mask]
    ce = torch.nn.functional.cross_entropy
    loss = ce(x_rec, labels) + ce(x_rec_sym, labels_sym)
    acc = torch.cat([x_rec.argmax(-1) == labels, x_rec_sym.argmax(-1) == labels_sym]).float()
    return loss, acc.mean()


def test_one_batched_forward_equals_two_sequential_passes():
    model, ref = tiny_pair()
    B, C, A = 3, 4, 3
    x = torch.randn(B, C, A, 200)
    chans = torch.tensor([0, 3, 9, 27, 81])
    targets = torch.randint(0, 256, (B, C * A))
    mask = random_patch_mask(B, C * A, 0.5, generator=torch.Generator().manual_seed(1))
    out = model(x, chans, targets, mask)
    loss, acc = reference_loss(ref, x, chans, targets, mask)
    assert abs(out.loss.item() - loss.item()) <= 1e-5
    assert abs(out.accuracy.item() - acc.item()) <= 1e-6
    torch.testing.assert_close(out.loss_masked + out.loss_complement, out.loss)
    torch.testing.assert_close(
        model.student(x, chans, mask), ref.student(x, chans, mask), atol=1e-5, rtol=1e-5
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, chans, targets, mask).loss
    assert abs(low.item() - out.loss.item()) < 0.05 * out.loss.item()
    out.loss.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("projection_head", "student.lm_head")):
            assert p.grad is None  # unused in the objective, as in the reference
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_random_patch_mask():
    gen = torch.Generator().manual_seed(0)
    mask = random_patch_mask(64, 40, 0.5, generator=gen)
    assert mask.dtype == torch.bool and (mask.sum(1) == 20).all()
    assert len({tuple(m.tolist()) for m in mask}) == 64  # different per sample
    assert (random_patch_mask(4, 40, 0.25, generator=gen).sum(1) == 10).all()
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 30:] = True
    padded = random_patch_mask(2, 40, 0.5, padding_mask=padding, generator=gen)
    assert padded.sum(1).tolist() == [20, 15] and not (padded & padding).any()


def test_default_mask_uses_mask_ratio_and_padding():
    model, _ = tiny_pair()
    B, C, A = 2, 3, 2
    x, targets = torch.randn(B, C, A, 200), torch.randint(0, 256, (B, C * A))
    chans = torch.tensor([[0, 1, 2, 3], [0, 4, 5, 0]])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    out = model(x, chans, targets, channel_padding_mask=padding,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.mask.sum(1).tolist() == [3, 2] and torch.isfinite(out.loss)
    # the padded sample's loss does not depend on what is in its padded electrode
    x2 = x.clone()
    x2[1, 2] = 100.0
    again = model(x2, chans, targets, out.mask, channel_padding_mask=padding)
    torch.testing.assert_close(again.loss, out.loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        model(x, chans, targets[:, :-1])
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("labram_tiny_pretrain", mask_ratio=1.0)


def test_backbone_transfers_into_classifier():
    pretrain, _ = tiny_pair(seed=3)
    classifier = create_model("labram_tiny", num_classes=5)
    report = load_checkpoint(classifier, {"model": pretrain.state_dict()})
    assert report.ok
    assert sorted(report.initialised) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                          "head.weight"]  # fmt: skip
    mapped = pretrain_to_classifier_state_dict(pretrain.state_dict())
    assert not any(k.startswith(("mask_token", "norm.", "lm_head", "projection")) for k in mapped)
    for key, value in mapped.items():
        assert torch.equal(classifier.state_dict()[key], value), key
    # the classifier's features are the student's tokens without masking, pooled
    x, chans = torch.randn(1, 2, 2, 200), torch.tensor([0, 1, 2])
    classifier.eval()
    tokens, _ = classifier.encode(x, chans)
    student = pretrain.student.eval()
    expected = student.run_blocks(student.embed_patches(student.patch_embed(x), 2, chans))
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(ValueError, match="student"):
        pretrain_to_classifier_state_dict(classifier.state_dict())


def test_compiles_to_one_graph_with_padding():
    model, _ = tiny_pair(seed=4)
    B, C, A = 2, 3, 2
    x, targets = torch.randn(B, C, A, 200), torch.randint(0, 256, (B, C * A))
    chans = torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    mask = random_patch_mask(B, C * A, 0.5, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, chans, targets, mask, channel_padding_mask=padding)
    eager = model(x, chans, targets, mask, channel_padding_mask=padding)
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    assert model.student.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.gpu
@requires_cuda
def test_gpu_pretraining_step_never_waits_for_the_gpu():
    """A pretraining step as benchmarks/bench_pretrain.py runs it (tokenizer targets, one batched
    forward over both views, backward, clipping, fused AdamW; bf16 autocast) asks nothing of
    the GPU that makes the host wait, once warm (compilation, autotuning and the attention's
    launch choices happen in the first step): CUDA raises on any synchronising call."""
    torch.manual_seed(0)
    B, C, A = 4, 6, 4
    model = create_model("labram_tiny_pretrain", device="cuda")
    tokenizer = create_model("vqnsp_tiny", device="cuda").eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(B, C, A * 200, device="cuda")
    chans = torch.arange(C + 1, device="cuda")
    mask = random_patch_mask(B, C * A, 0.5, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.inference_mode():
                targets = tokenizer.get_codebook_indices(x, chans)
            loss = model(x, chans, targets.clone(), mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_non_finite_padded_electrodes_and_mask_checks():
    """NaN/inf in a padded electrode give the loss of a zero fill (padding multiplied by 0 let
    them through); a padding mask or per-sample input_chans that do not fit x are named."""
    model, _ = tiny_pair(seed=5)
    B, C, A = 2, 3, 2
    x, targets = torch.randn(B, C, A, 200), torch.randint(0, 256, (B, C * A))
    chans = torch.tensor([0, 1, 2, 3])
    padding = torch.tensor([[False, False, False], [False, False, True]])
    mask = random_patch_mask(B, C * A, 0.5, padding_mask=padding.repeat_interleave(A, dim=1),
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    x[1, 2] = 0.0
    expected = model(x, chans, targets, mask, channel_padding_mask=padding)
    for fill in (float("nan"), float("inf")):
        junk = x.clone()
        junk[1, 2] = fill
        got = model(junk, chans, targets, mask, channel_padding_mask=padding)
        torch.testing.assert_close(got.loss, expected.loss)
        tokens = model.student(junk, chans, mask, channel_padding_mask=padding)
        assert torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match=r"channel_padding_mask must be a \(B, C\) = \(2, 3\)"):
        model(x, chans, targets, mask, channel_padding_mask=padding[:, :2])
    with pytest.raises(ValueError, match=r"channel_padding_mask must be a \(B, C\)"):
        model.student(x, chans, channel_padding_mask=padding.float())
    with pytest.raises(ValueError, match=r"input_chans must have shape \(B, C \+ 1\) = \(2, 4\)"):
        model(x, chans.expand(3, -1), targets, mask)


def test_random_patch_mask_masks_the_larger_half_as_the_reference():
    """The reference keeps floor(n·(1 - ratio)) patches; round() masked 2 of 5 patches but
    4 of 7 (half-to-even), so the masked share depended on the parity of n / 2."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 7, 9, 115):
        mask = random_patch_mask(3, n, 0.5, generator=gen)
        assert (mask.sum(1) == n - int(n * 0.5)).all(), n
    # ratios whose product with n is an integer give exactly that many (no float round-up)
    assert random_patch_mask(1, 10, 0.7, generator=gen).sum().item() == 7
    assert random_patch_mask(1, 10, 0.9, generator=gen).sum().item() == 9
    padding = torch.tensor([[False] * 5 + [True] * 2])
    assert random_patch_mask(1, 7, 0.5, padding_mask=padding, generator=gen).sum().item() == 3


def test_targets_of_any_integer_dtype_are_accepted_and_others_named():
    """int32 targets (e.g. codes saved compactly) failed as the loss's "labels must be int64";
    float targets are refused under their own name."""
    model, _ = tiny_pair(seed=6)
    B, C, A = 2, 3, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 1, 2, 3])
    targets = torch.randint(0, 256, (B, C * A))
    mask = random_patch_mask(B, C * A, 0.5, generator=torch.Generator().manual_seed(2))
    expected = model(x, chans, targets, mask).loss
    for narrow in (targets.int(), targets.short()):
        torch.testing.assert_close(model(x, chans, narrow, mask).loss, expected)
    for bad in (targets.float(), targets > 0):
        with pytest.raises(ValueError, match="targets must be integer code indices"):
            model(x, chans, bad, mask)


def test_patches_without_a_target_are_left_out_not_trained_as_code_0():
    """A -1 target at a real patch (codes of a padded batch passed without its mask) was
    trained as code 0; it counts in no loss or accuracy, as a padded patch does."""
    model, _ = tiny_pair(seed=7)
    B, C, A = 2, 3, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # every patch is predicted as code 5, with certainty
        model.lm_head.bias[5] = 1e4
    targets = torch.full((B, C * A), 5)
    targets[0, :A] = -1  # electrode 0 of sample 0 has no codes
    mask = random_patch_mask(B, C * A, 0.5, generator=torch.Generator().manual_seed(3))
    out = model(x, chans, targets, mask)
    for accuracy in (out.accuracy, out.accuracy_masked, out.accuracy_complement):
        assert accuracy.item() == 1.0
    assert out.loss.item() < 1e-3  # as code 0 these patches would cost ~1e4 each


def test_student_checks_its_mask_and_takes_0_1_masks_of_any_dtype():
    """The student's mask was used unchecked: a float or int 0/1 mask (the reference takes
    any, by ``type_as``) failed in ``torch.where``, and one of the wrong shape in a broadcast,
    neither naming ``mask``."""
    model, _ = tiny_pair(seed=8)
    B, C, A = 2, 3, 2
    x, chans = torch.randn(B, C, A, 200), torch.tensor([0, 1, 2, 3])
    mask = random_patch_mask(B, C * A, 0.5, generator=torch.Generator().manual_seed(4))
    expected = model.student(x, chans, mask)
    for other in (mask.float(), mask.long(), mask.to(torch.uint8)):
        torch.testing.assert_close(model.student(x, chans, other), expected, rtol=0, atol=0)
    targets = torch.randint(0, 256, (B, C * A))
    torch.testing.assert_close(
        model(x, chans, targets, mask.float()).loss, model(x, chans, targets, mask).loss
    )
    for bad in (mask[:, :-1], mask.view(B, C, A)):
        with pytest.raises(ValueError, match=r"mask must have shape \(B, C·A\) = \(2, 6\)"):
            model.student(x, chans, bad)
