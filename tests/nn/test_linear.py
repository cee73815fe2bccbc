"""fused_linear: the oneDNN epilogue path against the eager composition it replaces."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import eegfast.nn.linear as fl
from eegfast.nn import Block, fused_linear

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


def eager(x, weight, bias=None, *, gelu=False, scale=None, residual=None):
    y = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(y)
    if scale is not None:
        y = y * scale
    return y if residual is None else residual + y


def took_fast_path(weight) -> bool:
    return weight in fl._PACKED


@needs_onednn
@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    epilogue=st.sampled_from(["none", "gelu", "scale", "residual", "scale+residual"]),
    with_bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_path_matches_eager(lead, k, n, epilogue, with_bias, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    if transposed and len(lead) == 2:  # non-contiguous input
        x = torch.randn(lead[1], lead[0], k, generator=gen).transpose(0, 1)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if with_bias else None
    kwargs = {}
    if epilogue == "gelu":
        kwargs["gelu"] = True
    if "scale" in epilogue:
        kwargs["scale"] = torch.rand(n, generator=gen) + 0.05
    if "residual" in epilogue:
        kwargs["residual"] = torch.randn(*lead, n, generator=gen)
    with torch.no_grad():
        got = fused_linear(x, weight, bias, **kwargs)
    assert took_fast_path(weight)
    torch.testing.assert_close(got, eager(x, weight, bias, **kwargs), atol=2e-5, rtol=2e-5)
    if "residual" in kwargs:  # the residual is an input, never overwritten
        assert not got.data_ptr() == kwargs["residual"].data_ptr()


@needs_onednn
def test_packed_weight_follows_in_place_updates():
    weight, bias, scale = torch.randn(6, 5), torch.randn(6), torch.rand(6)
    x = torch.randn(4, 5)
    with torch.no_grad():
        first = fused_linear(x, weight, bias, scale=scale)
        for tensor in (weight, bias, scale):  # an optimizer step / load_state_dict
            tensor.mul_(1.5)
            torch.testing.assert_close(
                fused_linear(x, weight, bias, scale=scale), eager(x, weight, bias, scale=scale)
            )
        # through .data (weight init, an EMA teacher's copy_), which bumps no version counter
        # of the tensor itself: the packed weight (scale folded in) is checked against its values
        for tensor in (weight, scale):
            tensor.data.mul_(-2.0)
            torch.testing.assert_close(
                fused_linear(x, weight, bias, scale=scale), eager(x, weight, bias, scale=scale)
            )
    assert not torch.allclose(first, fused_linear(x, weight, bias, scale=scale))


@needs_onednn
def test_packed_weights_are_freed_with_the_weight_or_on_request():
    x = torch.randn(4, 5)
    with torch.no_grad():
        weight = torch.randn(6, 5)
        fused_linear(x, weight)
        assert took_fast_path(weight)
        before = len(fl._PACKED)
        del weight
        assert len(fl._PACKED) == before - 1
        kept = torch.randn(6, 5)
        fused_linear(x, kept)
    assert fl.clear_packed_weights() >= 1 and not took_fast_path(kept)


@needs_onednn
def test_a_bias_built_anew_per_call_does_not_repack_the_weight():
    # LaBraM's qkv bias is a fresh concatenation on every call; the weight packs once.
    weight, scale, x = torch.randn(6, 5), torch.rand(6), torch.randn(4, 5)
    with torch.no_grad():
        packs, outputs = [], []
        for _ in range(2):
            bias = torch.cat((torch.ones(3), torch.zeros(3)))
            outputs.append(fused_linear(x, weight, bias, scale=scale))
            packs.append(fl._PACKED[weight][1])
    assert packs[0] is packs[1]
    torch.testing.assert_close(outputs[1], eager(x, weight, bias, scale=scale))


def test_autograd_takes_the_eager_path_with_gradients():
    weight = torch.randn(6, 5, requires_grad=True)
    scale = torch.rand(6, requires_grad=True)
    x, residual = torch.randn(3, 5, requires_grad=True), torch.randn(3, 6)
    out = fused_linear(x, weight, None, scale=scale, residual=residual)
    assert not took_fast_path(weight)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, weight, scale)]
    for t in (x, weight, scale):
        t.grad = None
    eager(x, weight, None, scale=scale, residual=residual).square().sum().backward()
    for got, t in zip(grads, (x, weight, scale), strict=True):
        torch.testing.assert_close(got, t.grad)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_disabled_onednn_and_other_dtypes_use_eager():
    x, weight = torch.randn(3, 5), torch.randn(4, 5)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        torch.testing.assert_close(fused_linear(x, weight, gelu=True), eager(x, weight, gelu=True))
        assert fl.onednn_status() == (
            False,
            "disabled by torch.backends.mkldnn.flags(enabled=False)",
        )
    assert not took_fast_path(weight)
    assert fl.onednn_status()[0] is True
    with torch.no_grad():
        got = fused_linear(x.double(), weight.double(), gelu=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, eager(x.double(), weight.double(), gelu=True))


def test_bad_arguments_are_named():
    x, weight = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="residual must have shape"):
        fused_linear(x, weight, residual=torch.randn(3, 5))
    with pytest.raises(ValueError, match="gelu=True cannot be combined"):
        fused_linear(x, weight, gelu=True, scale=torch.ones(4))


@needs_onednn
def test_block_inference_takes_fused_path_and_matches_training_math():
    torch.manual_seed(0)
    block = Block(40, 2, init_values=0.1, drop_path=0.1)
    x = torch.randn(3, 9, 40)
    block.train()  # drop path active: the unfused stochastic path; eval is deterministic
    with torch.no_grad():
        fused = block.eval()(x)
    assert took_fast_path(block.mlp.fc2.weight) and took_fast_path(block.attn.proj.weight)
    expected = block(x)  # autograd on: the eager composition
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_fused_block_under_torch_compile_is_traced_eagerly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8)

    def fn(x):
        return fused_linear(x, lin.weight, lin.bias, gelu=True)

    with torch.no_grad():
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager(x, lin.weight, lin.bias, gelu=True))


@needs_onednn
@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.randn(1, 5).expand(4, 5),  # stride 0
        lambda: torch.randn(4, 10)[:, ::2],  # strided last dim
        lambda: torch.randn(3, 4, 5).permute(1, 0, 2),
        lambda: torch.randn(2, 3, 4, 5),
    ],
    ids=["expanded", "strided-last-dim", "permuted", "4d"],
)
def test_fast_path_input_layouts(make_x):
    x, weight, bias = make_x(), torch.randn(6, 5), torch.randn(6)
    residual = torch.randn(*x.shape[:-1], 6).transpose(0, -2)  # non-contiguous residual too
    residual = residual.contiguous().transpose(0, -2)
    with torch.no_grad():
        got = fused_linear(x, weight, bias, residual=residual)
    assert took_fast_path(weight)
    torch.testing.assert_close(got, eager(x, weight, bias, residual=residual))


@needs_onednn
def test_packs_made_in_inference_mode_serve_no_grad_and_back():
    weight, bias, scale = torch.randn(6, 5), torch.randn(6), torch.rand(6)
    x, residual = torch.randn(3, 5), torch.randn(3, 6)
    with torch.inference_mode():
        first = fused_linear(x, weight, bias, scale=scale, residual=residual)
    with torch.no_grad():
        second = fused_linear(x, weight, bias, scale=scale, residual=residual)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(second, eager(x, weight, bias, scale=scale, residual=residual))


@needs_onednn
def test_weights_made_in_inference_mode_take_the_fast_path_and_follow_updates():
    # A model built or loaded under torch.inference_mode holds inference tensors, which have
    # no version counter: reading it had raised "Inference tensors do not track version
    # counter" on every no-grad call of an eegfast Linear layer.
    with torch.inference_mode():
        weight, bias, scale = torch.randn(6, 5), torch.randn(6), torch.rand(6)
    x, residual = torch.randn(3, 5), torch.randn(3, 6)
    with torch.no_grad():
        got = fused_linear(x, weight, bias, scale=scale, residual=residual)
    assert took_fast_path(weight)
    torch.testing.assert_close(got, eager(x, weight, bias, scale=scale, residual=residual))
    with torch.inference_mode():
        weight.mul_(-2.0)  # in place, as load_state_dict under inference_mode would
        scale.add_(1.0)
        got = fused_linear(x, weight, bias, scale=scale, residual=residual)
    torch.testing.assert_close(got, eager(x, weight, bias, scale=scale, residual=residual))


def _dual_tangent(x, weight, bias):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        return fwAD.unpack_dual(fused_linear(dual, weight, bias, gelu=True)).tangent


def _jvp_tangent(x, weight, bias):
    return torch.func.jvp(
        lambda w: fused_linear(x, w, bias, scale=torch.full((6,), 0.5)), (weight,), (weight,)
    )[1]


def _vmap_over_weights(x, weight, bias):
    return torch.func.vmap(lambda w: fused_linear(x, w, bias))(torch.stack((weight, -weight)))


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (_dual_tangent, lambda x, w, b: F.linear(torch.ones_like(x), w) * _gelu_slope(x, w, b)),
        (_jvp_tangent, lambda x, w, b: 0.5 * F.linear(x, w)),
        (_vmap_over_weights, lambda x, w, b: torch.stack((F.linear(x, w, b), F.linear(x, -w, b)))),
    ],
    ids=["forward_ad", "func.jvp", "func.vmap-weights"],
)
def test_forward_ad_and_torch_func_see_the_eager_linear(transform, expected):
    # The oneDNN op has no tangent formula nor batching rule: forward-mode AD had lost the
    # tangent (None) or made it wrong, and vmap over the weights failed inside the packing.
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 5, generator=gen), torch.randn(6, 5, generator=gen)
    bias = torch.randn(6, generator=gen)
    got = transform(x, weight, bias)
    assert got is not None
    torch.testing.assert_close(got, expected(x, weight, bias))


def _gelu_slope(x, weight, bias):
    y = F.linear(x, weight, bias).requires_grad_()
    return torch.autograd.grad(F.gelu(y).sum(), y)[0]


def test_flop_counter_and_jit_trace_see_the_linears_without_autograd():
    # Under no_grad a Block's Linears took the oneDNN op: FlopCounterMode counted 0 FLOPs for
    # them, and torch.jit.trace failed ("Unsupported value kind: Tensor") on the packed weight.
    from torch.utils.flop_counter import FlopCounterMode

    block = Block(8, 2).eval()
    x = torch.randn(2, 5, 8)
    with torch.enable_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            block(x)
    with torch.no_grad():
        counter_no_grad = FlopCounterMode(display=False)
        with counter_no_grad:
            block(x)
        assert counter_no_grad.get_total_flops() == counter.get_total_flops() > 0
        traced = torch.jit.trace(block, (x,))
        torch.testing.assert_close(traced(x), block(x))
