"""torch.compile of the models as training uses it: one graph for every token count N = C·A + 1
(batches of other electrode sets and window lengths), not one per N until dynamo's recompile
limit sends the model back to eager."""

from __future__ import annotations

import torch
import torch._dynamo

from eegfast.models import create_model
from eegfast.nn import linear_cross_entropy


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
