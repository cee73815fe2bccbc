"""Second review of session 30's commits (324d042..e5a072d): what the first pass missed.

- vq_nearest's Triton kernel scores cosine with the raw codes, scaled by 1/|c| after the dot:
  the overflow re-check took |z| as the largest fp32 value, as the CPU and CUDA kernels (which
  pack unit codes) may, and missed dots of |z| |c| near FLT_MAX.
- moe_dispatch(backend="triton") asks whether the CUDA kernels can run on the GPU: that
  question (the extension's import, its build info, the kernel-image probe) is not traceable,
  and it broke a torch.compile(fullgraph=True) of an MoE layer with backend="triton".
"""

from __future__ import annotations

import pytest
import torch

from eegfast.ops import available_backends, vq_nearest, vq_nearest_reference
from eegfast.ops import moe as moe_ops


def _huge_cosine_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """z (1, 9) of norm 3e10 and codebook (2, 9): code 0 (norm 3e30, exact cosine 1/9) has fp32
    products of 1e40 (inf) with both signs, so its fp32 dot is -inf or NaN; code 1 (norm ~1.4,
    cosine ~2e-5) keeps a finite score and won by an infinite gap."""
    z = torch.tensor([[-1e10] * 4 + [1e10] * 5])
    codebook = torch.stack([torch.full((9,), 1e30), torch.zeros(9)])
    codebook[1, 0], codebook[1, 4] = 1.0, 1.0001
    return z, codebook


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_cosine_nearest_rescores_rows_whose_raw_code_dots_may_overflow(backend):
    ready = available_backends()[backend]
    if not ready.available:
        pytest.skip(ready.reason)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    z, codebook = (t.to(device) for t in _huge_cosine_codes())
    ref_indices, ref_scores = vq_nearest_reference(z, codebook, "cosine")
    assert ref_indices.tolist() == [0]
    indices, scores = vq_nearest(z, codebook, "cosine", return_scores=True, backend=backend)
    assert indices.tolist() == [0]
    torch.testing.assert_close(scores, ref_scores)


def test_moe_dispatch_request_for_triton_traces_in_one_graph(monkeypatch):
    """An MoE layer with backend="triton" compiled with fullgraph=True: the dispatch request is
    decided once while tracing (as resolve_backend is), not traced into."""
    if not torch.cuda.is_available():
        # a CUDA build of eegfast._C without a GPU (a CUDA torch on a CPU machine): its
        # kernel-image probe would initialise CUDA, which fails; the answer is not the point
        monkeypatch.setattr(moe_ops, "_cuda_extension_ready", lambda device: False)

    def fn(x: torch.Tensor) -> torch.Tensor:
        request = moe_ops._dispatch_request("triton", torch.device("cuda", 0))
        return x + (1.0 if request == "cuda" else 2.0)

    x = torch.zeros(3)
    expected = fn(x)
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, expected)
