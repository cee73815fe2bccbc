"""torch.compile of the models as training uses it: one graph for every token count N = C·A + 1
(batches of other electrode sets and window lengths), not one per N until dynamo's recompile
limit sends the model back to eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from eegfast.models import create_model
from eegfast.nn import linear_cross_entropy
from eegfast.nn.layers import TemporalConv


def counting_compiler(graphs: list):
    """A torch.compile backend that records each graph dynamo makes and runs it as traced."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_masked_pretraining_does_not_recompile_for_every_token_count():
    """The loss's chunk loop ran over range(0, T): each T = 2·B·C·A pinned a graph of its own
    (6 shapes, 6 graphs). Now the first shape, then C and then A dynamic: 3."""
    torch._dynamo.reset()
    graphs: list = []
    torch.manual_seed(0)
    model = create_model("labram_tiny_pretrain", depth=1)
    model.compile(backend=counting_compiler(graphs))
    for C, A in [(4, 2), (6, 2), (4, 3), (5, 4), (7, 3), (3, 2)]:
        x = torch.randn(2, C, A, 200)
        chans = torch.arange(C + 1).expand(2, C + 1).clone()
        padding = torch.zeros(2, C, dtype=torch.bool)
        padding[1, -1] = True
        targets = torch.randint(0, 256, (2, C * A))
        mask = torch.rand(2, C * A) < 0.5
        out = model(x, chans, targets, mask=mask, channel_padding_mask=padding)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    assert len(graphs) <= 3, f"{len(graphs)} graphs for 6 token counts"


def test_linear_cross_entropy_compiles_once_for_row_counts_of_as_many_chunks():
    """Row counts of the same number of chunks share a graph, and give eager's values."""
    torch._dynamo.reset()
    graphs: list = []
    compiled = torch.compile(
        lambda h, w, b, y, tw: linear_cross_entropy(h, w, b, y, tw, chunk_rows=4).loss,
        backend=counting_compiler(graphs),
    )
    torch.manual_seed(0)
    w, b = torch.randn(10, 6), torch.randn(10)
    for rows in (5, 6, 7):  # two chunks of 4 each, the second one short
        h, y = torch.randn(rows, 6), torch.randint(0, 10, (rows,))
        tw = torch.full((rows,), 1 / rows)
        want = linear_cross_entropy(h, w, b, y, tw, chunk_rows=4).loss
        torch.testing.assert_close(compiled(h, w, b, y, tw), want)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 row counts of 2 chunks"


def test_pretraining_with_its_own_random_masks_compiles_for_new_batch_shapes():
    """mask=None draws the masks inside forward: torch.rand(..., generator=None) cannot take
    the symbolic sizes of a dynamic batch or token count, and the second batch shape failed
    in tracing ("SymIntArrayRef expected to contain only concrete integers")."""
    torch._dynamo.reset()
    graphs: list = []
    torch.manual_seed(0)
    model = create_model("labram_tiny_pretrain", depth=1)
    compiled = torch.compile(model, backend=counting_compiler(graphs))
    for B, C, A in [(2, 4, 2), (3, 5, 2)]:  # B and C·A made dynamic at the second call
        x, chans = torch.randn(B, C, A, 200), torch.arange(C + 1)
        targets = torch.randint(0, 256, (B, C * A))
        torch.manual_seed(B * 10 + C)
        out = compiled(x, chans, targets)
        torch.manual_seed(B * 10 + C)
        want = model(x, chans, targets)
        assert torch.equal(out.mask, want.mask)  # the same draws as eager
        assert out.mask.sum(1).tolist() == [C * A // 2] * B
        torch.testing.assert_close(out.loss, want.loss)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 2 batch shapes"


def _inductor_or_skip() -> None:
    """Skip unless inductor can build CPU code here (it needs a C++ compiler)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # no compiler, or another PyTorch layout
        pytest.skip(f"inductor cannot build CPU code here: {error}")


def _patch_embedding_case():
    torch.manual_seed(0)
    conv = TemporalConv(4)
    x = torch.randn(2, 3, 2, 200, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True  # the last electrode of sample 1 (both its patches)
    return conv, x, padding


def _outputs_and_grads(fn, conv, x, padding):
    x.grad = None
    conv.zero_grad(set_to_none=True)
    out = fn(x, padding)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.slow
def test_patch_embedding_compiles_with_inductor_when_electrodes_and_patches_are_dynamic():
    """With C and A both dynamic (a run's third electrode set / window length, or
    mark_dynamic), inductor failed on the (B, 1, C·A, T) view into the first convolution,
    which the backward keeps: "cannot determine truth value of Relational: 200*s27*s53 < 200"
    (it orders a view's strides without the shapes' ranges)."""
    _inductor_or_skip()
    torch._dynamo.reset()
    conv, x, padding = _patch_embedding_case()
    for dim in (0, 1, 2):
        torch._dynamo.mark_dynamic(x, dim)
    for dim in (0, 1):
        torch._dynamo.mark_dynamic(padding, dim)
    got = _outputs_and_grads(torch.compile(conv), conv, x, padding)
    want = _outputs_and_grads(conv, conv, x, padding)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_patch_embedding_traced_gives_the_eager_outputs_and_gradients():
    """Traced, the first convolution runs over (B·C·A, 1, 1, T) (see the test above): the
    same products as eager's (B, 1, C·A, T), with and without padding (its weight and bias
    gradients sum them in another order; the bias's, cancelled by the GroupNorm, are ~0)."""
    torch._dynamo.reset()
    conv, x, padding = _patch_embedding_case()
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    for mask in (padding, None):
        got = _outputs_and_grads(compiled, conv, x, mask)
        want = _outputs_and_grads(conv, conv, x, mask)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
