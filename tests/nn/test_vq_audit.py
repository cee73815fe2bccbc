"""NormEMAVectorQuantizer / vq_ema_update audit: codes left unused for a long run, batches
with no usable row at the k-means initialisation, and the float32 state in any model dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eegfast.models import create_model
from eegfast.nn import NormEMAVectorQuantizer
from eegfast.ops import vq_ema_update, vq_nearest


def test_a_code_unused_for_a_long_run_keeps_its_unit_direction():
    """A code no row chooses keeps its value (as the reference): its EMA count and sum decay
    alike (0.99 ** 4000 ~ 3e-18), and the code recomputed from that sum had shrunk under
    normalize's eps (norm ~0.3, then ~1e-5), so it could no longer win even a row on it."""
    codes = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    codebook, embed_sum = codes.clone(), codes.clone()
    cluster_size = torch.ones(4)
    cluster_size[1:] = 0.99**4000  # codes 1..3: unused for 4000 steps
    embed_sum[1:] *= 0.99**4000
    z = codes[:1].repeat(100, 1)  # every row on code 0
    vq_ema_update(z, torch.zeros(100, dtype=torch.long), codebook, cluster_size, embed_sum)
    torch.testing.assert_close(codebook, codes)
    assert vq_nearest(codes, codebook).tolist() == [0, 1, 2, 3]


def test_quantizer_codes_unused_through_training_stay_on_the_unit_sphere():
    """The same through the module over a real run: at decay 0.5, 80 steps during which only
    code 0 is chosen leave the other codes' EMA counts at 0.5 ** 80 ~ 1e-24."""
    quantizer = NormEMAVectorQuantizer(4, 8, decay=0.5, kmeans_init=False)
    quantizer.cluster_size.fill_(1.0)  # every code used once, as after the k-means init
    start = quantizer.codebook.clone()
    z = start[:1].repeat(32, 1)
    for _ in range(80):
        assert quantizer(z).indices.eq(0).all()
    torch.testing.assert_close(quantizer.codebook, start)
    quantizer.eval()
    assert quantizer(start).indices.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("case", ["all padding", "all non-finite"])
def test_a_first_batch_without_usable_rows_leaves_the_initialisation_to_the_next(case):
    """k-means refused a first batch with no usable row (ValueError "z must have shape (N, D)
    with N >= 1, got (0, 8)"): an all-padding batch is a step without codes, and an all-NaN
    one is reported as the non-finite encoder output it is."""
    quantizer = NormEMAVectorQuantizer(16, 8)
    z = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    if case == "all padding":
        out = quantizer(z, torch.zeros(4, 5, dtype=torch.bool))
        assert out.indices.eq(-1).all() and float(out.loss) == 0.0
    else:
        with pytest.raises(FloatingPointError, match="not finite"):
            quantizer(torch.full_like(z, float("nan")))
    assert quantizer.embedding.initted.item() == 0
    assert quantizer.cluster_size.eq(0).all()
    quantizer(z)  # the next usable batch initialises
    assert quantizer.embedding.initted.item() == 1
    assert quantizer(z).loss.item() < 0.5


def test_float64_model_keeps_the_quantizer_float32_and_runs():
    """``model.double()`` cast the codebook to float64, which the VQ kernels refuse: the
    forward failed with "z must be float32, float16 or bfloat16, got torch.float64"."""
    quantizer = NormEMAVectorQuantizer(8, 4).double()
    assert {b.dtype for b in quantizer.buffers()} == {torch.float32}
    out = quantizer(torch.randn(3, 5, 4, dtype=torch.float64))
    assert out.quantized.dtype == torch.float64
    model = create_model("vqnsp_tiny").double()
    x = torch.randn(2, 3, 2, 200, dtype=torch.float64)
    assert torch.isfinite(model(x, torch.tensor([0, 1, 2, 3])).loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_constructor_refuses_a_codebook_dtype_other_than_float32(dtype):
    """A bf16 state from the constructor stalled the EMA (as model.to(bf16) had, see _apply);
    a float64 one was refused by the kernels at the first forward."""
    with pytest.raises(ValueError, match="dtype must be None or torch.float32"):
        NormEMAVectorQuantizer(8, 4, dtype=dtype)
    assert NormEMAVectorQuantizer(8, 4, dtype=torch.float32).codebook.dtype == torch.float32
