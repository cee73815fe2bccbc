"""Review of the CUDA VQ kernels (csrc/vq/vq_cuda.cu) before their first GPU run.

What a machine without a GPU can check: the CPU kernel, whose exactness argument the CUDA
kernel mirrors (finish_row / finalize_kernel), and the host-side decisions of vq_cuda.cu,
compiled with nvcc into a small host program (no kernel is launched).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from eegfast.ops import available_backends, vq_nearest, vq_nearest_reference

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")


def overflow_cases():
    """(z (1, D), codebook (2, D), metric) whose fp32 scores overflow for the exact winner,
    code 0, while code 1 keeps a finite fp32 score."""
    # l2: code 0 equals the row (distance 0): z.c = 9e38 -> inf, bias -|c|^2 / 2 -> -inf,
    # inf - inf = NaN; code 1 (distance 9e38) scored 0 and won by an infinite gap.
    yield (
        torch.tensor([[3e19, 0.0, 0.0, 0.0]]),
        torch.tensor([[3e19, 0.0, 0.0, 0.0], [0.0] * 4]),
        "l2",
    )
    # cosine: code 0's partial sum reaches -inf after the four negative features (exact
    # similarity 1/3); code 1 (similarity ~0) scored a finite value and won.
    z = torch.tensor([[-3e38] * 4 + [3e38] * 5])
    codebook = torch.stack([torch.ones(9) / 3, torch.zeros(9)])
    codebook[1, 0], codebook[1, 4] = 1.0, 1.0001
    yield z, codebook, "cosine"


def backend_param(name: str):
    ready = available_backends()[name]
    marks = [pytest.mark.skipif(not ready.available, reason=ready.reason)]
    if name == "cuda":  # selected by scripts/gpu_check.sh's `pytest -m gpu`
        marks.append(pytest.mark.gpu)
    return pytest.param(name, marks=marks)


# The CUDA case runs where a GPU is lent (finalize_kernel makes the same decision as the CPU);
# the Triton one under TRITON_INTERPRET=1 here (bf16 only on a GPU: the interpreter's is not
# reliable).
@pytest.mark.parametrize(
    "backend", [backend_param("cpu"), backend_param("cuda"), backend_param("triton")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(2))
def test_nearest_rescores_rows_whose_fp32_scores_may_overflow(case, dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bf16 is unreliable in the Triton interpreter")
    z, codebook, metric = list(overflow_cases())[case]
    device = "cuda" if backend == "cuda" else "cpu"
    z, codebook = z.to(device, dtype), codebook.to(device, dtype)
    ref_indices, ref_scores = vq_nearest_reference(z, codebook, metric)
    assert ref_indices.tolist() == [0]
    indices, scores = vq_nearest(z, codebook, metric, return_scores=True, backend=backend)
    assert indices.tolist() == ref_indices.tolist()
    torch.testing.assert_close(scores, ref_scores)


HARNESS = r"""
#include "vq/vq_cuda.cu"
#include <cstdio>
namespace v = eegfast::vq_cuda;
int main() {
  std::printf("streamed %zu\n", v::tiles_smem_bytes(false, 128));
  // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_6x, sm_75, sm_86 / sm_89, sm_80, sm_90
  const int optins[] = {49152, 65536, 101376, 166912, 232448};
  for (int optin : optins)
    for (long dpad = 16; dpad <= 160; dpad += 16)
      std::printf("resident %d %ld %d %zu\n", optin, dpad, int(v::use_resident_z(dpad, optin)),
                  v::tiles_smem_bytes(true, dpad));
  std::printf("overflow %d %d %d\n", int(v::fp32_may_overflow(1.8e39, 4)),
              int(v::fp32_may_overflow(1.71e38, 4)), int(v::fp32_may_overflow(1e30, 256)));
}
"""


@pytest.fixture(scope="module")
def host_decisions(tmp_path_factory) -> str:
    """Output of the harness above, compiled with nvcc against vq_cuda.cu (PTX only: the
    kernels are not needed, only the host functions of the same translation unit)."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    work = tmp_path_factory.mktemp("vq_cuda_host")
    (work / "harness.cu").write_text(HARNESS)
    exe = work / "harness"
    cmd = [NVCC, "-std=c++17", "-O0", "-gencode", "arch=compute_90,code=compute_90"]
    cmd += [f"-I{ROOT / 'csrc'}", str(work / "harness.cu"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout


def test_cuda_nearest_keeps_z_resident_only_where_the_device_grants_the_shared_memory(
    host_decisions,
):
    # The resident z tile needs 82 KiB at dpad = 128: sm_75 (64 KiB per block) and sm_6x
    # (48 KiB) refused the launch for dpad >= 96 / >= 64 (cudaFuncSetAttribute failed).
    (streamed,) = re.findall(r"streamed (\d+)", host_decisions)
    assert int(streamed) <= 48 * 1024  # the streamed variant fits any device
    rows = re.findall(r"resident (\d+) (\d+) (\d) (\d+)", host_decisions)
    assert len(rows) == 50
    for optin, dpad, resident, smem in ((int(a), int(b), c == "1", int(d)) for a, b, c, d in rows):
        assert resident == (dpad <= 128 and smem <= optin), (optin, dpad)
        if optin >= 166912:  # A100 and H100 keep the fast path for every dpad <= 128
            assert resident == (dpad <= 128)
    assert ("65536", "96", "0") in {row[:3] for row in rows}


def test_cuda_nearest_rechecks_rows_whose_fp32_scores_may_overflow(host_decisions):
    # finalize_kernel's predicate: bound 1.8e39 (the l2 case above) must go to the float64
    # re-check; 1.71e38 is within a factor 2 of FLT_MAX (re-checked too); 1e30 is safe.
    assert re.findall(r"overflow (\d) (\d) (\d)", host_decisions) == [("1", "1", "0")]
