"""The cuda backend on GPUs that eegfast._C's CUDA kernels were not compiled for.

setup.py compiles them for TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX). On another GPU (a T4,
sm_75) the backend still counted as available, and every op failed with "no kernel image is
available for execution on the device" instead of falling back to Triton or the reference.
The extension now has a probe per .cu file (``torch.ops.eegfast._vq_cuda_kernel_image`` and
``_moe_cuda_kernel_image``: the CUDA error of looking one kernel up on a device, and the
architectures compiled for). Here the Python side runs with those probes replaced (no GPU), and
the host functions behind them are compiled with nvcc into a small program.
"""

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eegfast.ops import _backend
from eegfast.testing import requires_cuda

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
NO_KERNEL_IMAGE = 209  # cudaErrorNoKernelImageForDevice
INVALID_DEVICE_FUNCTION = 98  # cudaErrorInvalidDeviceFunction
PROBES = ("_vq_cuda_kernel_image", "_moe_cuda_kernel_image")


@pytest.fixture
def t4(monkeypatch):
    """A machine with a CUDA build of eegfast._C (compiled for 8.0 and 9.0) and T4 GPUs
    (compute capability 7.5), without Triton. Returns ``set_probe(fn)``: makes ``fn(index) ->
    cudaError_t value`` the answer of both probes; ``calls`` lists the indices probed."""
    fake_module = SimpleNamespace(build_info=lambda: {"cuda": True})
    monkeypatch.setattr(_backend, "_load_extension", lambda: (fake_module, "eegfast._C loaded"))
    monkeypatch.setattr(_backend, "_triton_status", lambda: _backend.BackendStatus(False, "none"))
    monkeypatch.delenv("EEGFAST_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    calls = []

    def set_probe(error_of_index):
        def probe(index):
            calls.append(index)
            return error_of_index(index), [800, 900]

        for name in PROBES:
            monkeypatch.setattr(torch.ops.eegfast, name, probe, raising=False)

    set_probe.calls = calls
    clear_caches()
    yield set_probe
    clear_caches()


def clear_caches() -> None:
    """The per-device answers and the once-per-device warnings of _backend."""
    _backend._cuda_kernel_image_problem.cache_clear()
    _backend._warn_no_kernel_image_once.cache_clear()


CUDA0 = torch.device("cuda", 0)
HINT = (
    r"compiled for compute capability 8\.0, 9\.0 \(TORCH_CUDA_ARCH_LIST\) and cannot run on "
    r"cuda:0 \(Tesla T4, compute capability 7\.5, sm_75\): rebuild the extension with "
    r'TORCH_CUDA_ARCH_LIST="7\.5"'
)


def test_automatic_choice_passes_over_cuda_kernels_without_an_image_for_the_gpu(t4, monkeypatch):
    t4(lambda index: NO_KERNEL_IMAGE)
    with pytest.warns(RuntimeWarning, match=HINT):
        assert _backend.resolve_backend(None, CUDA0, ("cuda",)) == "reference"
    monkeypatch.setattr(_backend, "_triton_status", lambda: _backend.BackendStatus(True, "3.x"))
    assert _backend.resolve_backend("auto", CUDA0, ("cuda", "triton")) == "triton"
    # vq_nearest times the ready GPU backends against each other: the CUDA one failed there
    assert _backend.automatic_gpu_candidates(None, CUDA0, ("triton", "cuda")) == ("triton",)


def test_explicit_cuda_backend_raises_the_rebuild_hint(t4, monkeypatch):
    t4(lambda index: INVALID_DEVICE_FUNCTION)  # the older runtimes' error for the same thing
    with pytest.raises(
        RuntimeError, match="^backend='cuda': eegfast._C's CUDA kernels were " + HINT
    ):
        _backend.resolve_backend("cuda", CUDA0, ("cuda",))
    monkeypatch.setenv("EEGFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="^EEGFAST_BACKEND='cuda': "):
        _backend.resolve_backend(None, CUDA0, ("triton", "cuda"))
    # qk_norm_attention has no kernel in eegfast._C: its "cuda" runs on Triton
    assert _backend.resolve_backend(None, CUDA0, ("triton",)) == "cuda"


def test_ptx_too_new_for_the_driver_says_so(t4):
    """A Blackwell GPU reaches the kernels as compute_90 PTX; a driver older than the toolkit
    that compiled it cannot JIT-compile it (cudaErrorUnsupportedPtxVersion)."""
    t4(lambda index: 222)
    with pytest.raises(RuntimeError, match="PTX from a CUDA toolkit newer than this NVIDIA dr"):
        _backend.resolve_backend("cuda", CUDA0, ("cuda",))
    assert not _backend.available_backends()["cuda"].available


def test_available_backends_says_why_cuda_cannot_run(t4):
    t4(lambda index: NO_KERNEL_IMAGE)
    status = _backend.available_backends()["cuda"]
    assert not status.available
    assert re.search(HINT, status.reason), status.reason


def test_the_probe_is_asked_once_per_device(t4):
    """A machine with two kinds of GPU: the kernels run on cuda:0 but not on cuda:1."""
    t4(lambda index: 0 if index == 0 else NO_KERNEL_IMAGE)
    cuda1 = torch.device("cuda", 1)
    with pytest.warns(RuntimeWarning, match="cannot run on cuda:1") as warned:
        for _ in range(3):
            assert _backend.resolve_backend(None, CUDA0, ("cuda",)) == "cuda"
            assert _backend.resolve_backend("cuda", CUDA0, ("cuda",)) == "cuda"
            assert _backend.automatic_gpu_candidates(None, CUDA0, ("cuda",)) == ("cuda",)
            assert _backend.resolve_backend(None, cuda1, ("cuda",)) == "reference"
    assert len(warned) == 1  # once per device
    assert sorted(t4.calls) == [0, 0, 1]  # one call per probe and device (cuda:1's first fails)
    assert _backend.available_backends()["cuda"] == _backend.BackendStatus(True, "Tesla T4")


def test_cuda_is_ready_when_the_extension_cannot_tell(t4, monkeypatch):
    """An extension built before the probes, or a probe that fails otherwise (the op then
    reports its own CUDA error): ready, as before."""
    monkeypatch.setattr(_backend, "_KERNEL_IMAGE_PROBES", ("_no_such_probe",))  # an older build
    assert _backend.resolve_backend(None, CUDA0, ("cuda",)) == "cuda"
    monkeypatch.setattr(_backend, "_KERNEL_IMAGE_PROBES", PROBES)
    t4(lambda index: 35)  # cudaErrorInsufficientDriver
    clear_caches()
    assert _backend.resolve_backend("cuda", CUDA0, ("cuda",)) == "cuda"
    assert _backend.available_backends()["cuda"].available


HARNESS = r"""
#include "vq/vq_cuda.cu"
#include "moe/moe_cuda.cu"
#include <cstdio>
int main() {
  int archs[4] = {0, 0, 0, 0};
  const int n_vq = eegfast::vq_cuda::compiled_archs(archs, 4);
  std::printf("vq archs %d %d %d\n", n_vq, archs[0], archs[1]);
  int first = 0;
  const int n_moe = eegfast::moe_cuda::compiled_archs(&first, 1);  // capacity 1: no overrun
  std::printf("moe archs %d %d\n", n_moe, first);
  const cudaError_t vq = eegfast::vq_cuda::kernel_image_status();
  const cudaError_t moe = eegfast::moe_cuda::kernel_image_status();
  // where a lookup fails on a GPU, it must not stay in the runtime's last-error slot, where
  // the next launch check of torch or a launcher would report it
  std::printf("status %d %d last %d\n", int(vq), int(moe), int(cudaGetLastError()));
}
"""


def test_kernel_image_probes_compile_and_run(tmp_path):
    """The host functions behind the probes, compiled as setup.py compiles the .cu files (PTX
    only, for 8.0 and 9.0: no kernel machine code is needed), and run: without a GPU, their
    lookups fail; with one, they succeed and leave no error behind."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    (tmp_path / "harness.cu").write_text(HARNESS)
    exe = tmp_path / "harness"
    cmd = [NVCC, "-std=c++17", "-O0"]
    cmd += ["-gencode", "arch=compute_80,code=compute_80"]
    cmd += ["-gencode", "arch=compute_90,code=compute_90"]
    cmd += [f"-I{ROOT / 'csrc'}", str(tmp_path / "harness.cu"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert "vq archs 2 800 900" in out
    assert "moe archs 2 800" in out
    (vq, moe, last) = map(int, re.search(r"status (-?\d+) (-?\d+) last (-?\d+)", out).groups())
    if torch.cuda.is_available():  # compute_80 / compute_90 PTX runs on an A100 and newer
        assert (vq, moe, last) == (0, 0, 0)
    else:  # no driver or no device: every runtime call, cudaGetLastError too, fails the same
        assert vq == moe != 0


@pytest.mark.gpu
@requires_cuda
def test_kernel_image_probes_find_the_kernels_on_this_gpu():
    """The probes of the extension built here, on the GPU at hand (scripts/gpu_check.sh builds
    for it): no lookup error, the architectures compiled for, and the backend taken as ready."""
    module, _ = _backend._load_extension()
    if module is None or not module.build_info().get("cuda"):
        pytest.skip("eegfast._C was built without CUDA")
    major, minor = torch.cuda.get_device_capability(0)
    for name in PROBES:
        error, archs = getattr(torch.ops.eegfast, name)(0)
        assert error == 0, (name, error)
        assert archs and all(a % 10 == 0 and a >= 500 for a in archs), (name, archs)
        assert any(a <= major * 100 + minor * 10 for a in archs), (name, archs)
    torch.ones(1, device="cuda").add_(1)  # no error left pending for the next launch
    torch.cuda.synchronize()
    clear_caches()
    assert _backend._cuda_kernel_image_problem(0) is None
    assert _backend.available_backends()["cuda"].available


@pytest.mark.parametrize("ready", [True, False])
def test_moe_dispatch_triton_on_a_gpu_takes_the_reference_where_cuda_kernels_cannot_run(
    monkeypatch, ready
):
    """Triton has no dispatch kernel: backend="triton" on a GPU asked for "cuda", which raised
    where eegfast._C's kernels have no image for the GPU (or it was built without CUDA), though
    the docstring promises the reference there."""
    from eegfast.ops import moe

    monkeypatch.setattr(moe, "_cuda_extension_ready", lambda device: ready)
    gpu = torch.device("cuda", 0)
    assert moe._dispatch_request("triton", gpu) == ("cuda" if ready else "reference")
    assert moe._dispatch_request("triton", torch.device("cpu")) == "triton"
    assert moe._dispatch_request(None, gpu) is None
    assert moe._dispatch_request("cuda", gpu) == "cuda"
