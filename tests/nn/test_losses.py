"""linear_cross_entropy: the chunked head + cross-entropy against lm_head + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from eegfast.nn.losses import linear_cross_entropy


def reference(hidden, weight, bias, labels, token_weight):
    """What the pretraining head did before: logits kept, then the weighted cross-entropy."""
    logits = F.linear(hidden, weight, bias)
    per_token = F.cross_entropy(logits.float(), labels, reduction="none")
    loss = (per_token * token_weight).sum()
    return loss, per_token.detach(), logits.argmax(-1) == labels


def make_case(T, E, V, with_bias, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, E, generator=g, dtype=dtype)
    weight = (0.3 * torch.randn(V, E, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (T,), generator=g)
    token_weight = torch.rand(T, generator=g) * (torch.rand(T, generator=g) > 0.3)
    return hidden, weight, bias, labels, token_weight


def grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors)


def leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 67),
    E=st.sampled_from([1, 20, 25, 50]),
    V=st.integers(2, 300),
    chunk_rows=st.integers(1, 40),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_the_kept_logits_path_fp32(T, E, V, chunk_rows, with_bias, seed):
    """Loss, per-token CE, correctness and the gradients of hidden, weight and bias, for any
    chunking (chunks that divide T or leave a remainder, one row a chunk, one chunk)."""
    hidden, weight, bias, labels, token_weight = make_case(T, E, V, with_bias, seed)
    ours = leaves(hidden, weight, bias)
    theirs = leaves(hidden, weight, bias)
    out = linear_cross_entropy(*ours, labels, token_weight, chunk_rows=chunk_rows)
    loss, per_token, correct = reference(*theirs, labels, token_weight)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.per_token, per_token, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.correct, correct)
    assert not out.per_token.requires_grad and not out.correct.requires_grad
    for a, b in zip(grads(out.loss, ours), grads(loss, theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_scale_with_the_incoming_gradient():
    hidden, weight, bias, labels, token_weight = make_case(9, 20, 33, True, 0)
    ours, theirs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    out = linear_cross_entropy(*ours, labels, token_weight, chunk_rows=4)
    loss = reference(*theirs, labels, token_weight)[0]
    for a, b in zip(grads(-2.5 * out.loss, ours), grads(-2.5 * loss, theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_the_autocast_head():
    """Under autocast the products run in bf16 as the autocast Linear does; the softmax in
    fp32. Gradients come back in the parameters' and hidden states' dtypes."""
    hidden, weight, bias, labels, token_weight = make_case(50, 25, 129, True, 1)
    ours, theirs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(*ours, labels, token_weight, chunk_rows=16)
        loss, per_token, _ = reference(*theirs, labels, token_weight)
    torch.testing.assert_close(out.loss, loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.per_token, per_token, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads(out.loss, ours), grads(loss, theirs), strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-2)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_the_logits_are_not_kept_for_the_backward():
    """T × V logits are 41× the hidden states at LaBraM's sizes: the kept-logits path saves
    them (and their fp32 log-probabilities), this one only the gradients (T·E + V·E + V)."""
    T, E, V = 256, 20, 2048
    hidden, weight, bias, labels, token_weight = make_case(T, E, V, True, 2)
    ours, theirs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    fused = saved_bytes(lambda: linear_cross_entropy(*ours, labels, token_weight, chunk_rows=64))
    kept = saved_bytes(lambda: reference(*theirs, labels, token_weight))
    assert fused == 4 * (T * E + V * E + V)
    assert kept >= 4 * T * V


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, bias, labels, token_weight = make_case(7, 20, 11, True, 3)
    weight.requires_grad_()
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, bias, labels, token_weight, chunk_rows=3)
    expected = reference(hidden, weight.detach(), bias, labels, token_weight)[0]
    torch.testing.assert_close(out.loss, expected)
    assert not out.loss.requires_grad


def test_compiles_in_one_graph():
    hidden, weight, bias, labels, token_weight = make_case(19, 20, 40, True, 4)
    ours, eager = leaves(hidden, weight, bias), leaves(hidden, weight, bias)

    def head(h, w, b):
        return linear_cross_entropy(h, w, b, labels, token_weight, chunk_rows=8).loss

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    loss = compiled(*ours)
    expected = head(*eager)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(grads(loss, ours), grads(expected, eager), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "hidden": a["hidden"][None]}, r"hidden must be \(T, E\)"),
        (lambda a: {**a, "weight": a["weight"][:, :3]}, r"weight must be \(V, E=20\)"),
        (lambda a: {**a, "bias": a["bias"][:3]}, r"bias must be \(V=11,\)"),
        (lambda a: {**a, "labels": a["labels"].int()}, r"labels must be \(T=7,\) int64"),
        (lambda a: {**a, "token_weight": a["token_weight"][:2]}, r"token_weight must be"),
        (lambda a: {**a, "chunk_rows": 0}, "chunk_rows must be >= 1"),
    ],
)
def test_bad_arguments_are_named(change, message):
    hidden, weight, bias, labels, token_weight = make_case(7, 20, 11, True, 5)
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels)
    args = change({**args, "token_weight": token_weight, "chunk_rows": None})
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**args)


def test_fp16_autocast_gradients_keep_small_token_weights():
    """Under fp16 autocast a GradScaler scales the loss only in the backward: token weights of
    1/T for a large T multiplied into the fp16 products made subnormal gradients (4% off at
    T = 2**18, against the autocast head's 0.03%)."""
    hidden, weight, bias, labels, _ = make_case(256, 64, 2048, True, 6)
    token_weight = torch.full((256,), 2.0**-18)
    scale = 2.0**16  # the GradScaler's initial scale

    def scaled_grads(head, dtype):
        tensors = leaves(hidden, weight, bias)
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None):
            loss = head(*tensors)
        return [g / scale for g in grads(scale * loss, tensors)]

    def ours(h, w, b):
        return linear_cross_entropy(h, w, b, labels, token_weight, chunk_rows=64).loss

    def theirs(h, w, b):
        return reference(h, w, b, labels, token_weight)[0]

    exact = scaled_grads(theirs, None)
    for head in (ours, theirs):
        for got, want in zip(scaled_grads(head, torch.float16), exact, strict=True):
            assert ((got - want).norm() / want.norm()).item() < 2e-3


def test_correct_is_the_first_argmax_as_the_reference():
    """Tied logits count for the first of them only (argmax, as the reference accuracy):
    constant logits are not right for every label."""
    _, weight, _, _, _ = make_case(4, 20, 11, False, 7)
    labels = torch.tensor([0, 3, 5, 10])
    hidden = torch.zeros(4, 20)
    out = linear_cross_entropy(hidden, weight, None, labels, torch.ones(4), chunk_rows=3)
    assert out.correct.tolist() == [True, False, False, False]
    # codes 0 and 1 tie at the top (the same weight row, far the largest logit): code 0 is it
    weight[:2] = 0.0
    weight[:2, 0] = 10.0
    hidden = torch.zeros(2, 20)
    hidden[:, 0] = 1.0
    out = linear_cross_entropy(hidden, weight, None, torch.tensor([0, 1]), torch.ones(2))
    assert out.correct.tolist() == [True, False]


def test_second_derivatives_are_refused():
    """The backward scales gradients computed in the forward (constants): differentiating
    them again would silently drop the second-order term."""
    hidden, weight, bias, labels, token_weight = make_case(9, 20, 33, True, 8)
    h, w, b = leaves(hidden, weight, bias)
    loss = linear_cross_entropy(h, w, b, labels, token_weight, chunk_rows=4).loss
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)
    loss = linear_cross_entropy(h, w, b, labels, token_weight, chunk_rows=4).loss
    (gh,) = torch.autograd.grad(loss, h)  # first order as before
    assert gh.shape == h.shape


@pytest.mark.parametrize("bad", [-1, 11, 2**40])
def test_labels_out_of_range_are_named(bad):
    hidden, weight, bias, labels, token_weight = make_case(7, 20, 11, True, 9)
    labels[4] = bad
    with pytest.raises(ValueError, match=r"labels must be in \[0, V=11\)"):
        linear_cross_entropy(hidden, weight, bias, labels, token_weight, chunk_rows=3)


def test_float64_inputs_keep_float64_precision():
    # fp32 softmax is for low-precision products; a float64 head had its logits, loss and
    # gradients rounded to fp32 as well (loss off by ~1e-7, gradcheck failing).
    hidden, weight, bias, labels, token_weight = make_case(5, 4, 7, True, 0, torch.float64)
    token_weight = token_weight.double()
    out = linear_cross_entropy(hidden, weight, bias, labels, token_weight)
    assert out.loss.dtype == out.per_token.dtype == torch.float64
    logits = F.linear(hidden, weight, bias)
    expected = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(out.per_token, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, b, labels, token_weight, chunk_rows=2).loss,
        tuple(leaves(hidden, weight, bias)),
    )


def test_float64_inputs_under_autocast_keep_float64_products():
    # fp64 is not autocast-eligible: the autocast head's Linear runs fp64 products, while these
    # were taken in the autocast dtype (bf16: loss off by ~1e-3, per_token fp32).
    hidden, weight, bias, labels, token_weight = make_case(9, 20, 33, True, 10, torch.float64)
    token_weight = token_weight.double()
    ours, theirs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(*ours, labels, token_weight, chunk_rows=4)
        logits = F.linear(*theirs)
        assert logits.dtype == torch.float64
        per_token = F.cross_entropy(logits, labels, reduction="none")
        loss = (per_token * token_weight).sum()
    assert out.loss.dtype == out.per_token.dtype == torch.float64
    torch.testing.assert_close(out.per_token, per_token.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out.loss, ours), grads(loss, theirs), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_weight_without_rows_is_named():
    # V = 0 divided by zero choosing the default chunk size (ZeroDivisionError, no argument).
    hidden, _, _, labels, token_weight = make_case(7, 20, 11, False, 11)
    with pytest.raises(ValueError, match=r"weight must have at least one row"):
        linear_cross_entropy(hidden, torch.zeros(0, 20), None, labels, token_weight)
