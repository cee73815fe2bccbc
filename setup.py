"""Builds the native extension ``eegfast._C`` from the sources listed in csrc/sources.txt.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found;
``EEGFAST_CUDA=0`` or ``EEGFAST_CUDA=1`` forces the choice. ``TORCH_CUDA_ARCH_LIST`` defaults to
sm_80 and sm_90 (A100, H100/H200) plus compute_90 PTX for newer GPUs.
"""

import os
from pathlib import Path

import setuptools
import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent


def read_sources() -> tuple[list[str], list[str]]:
    """(always-built sources, CUDA-only sources) from csrc/sources.txt."""
    always, cuda_only = [], []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("cuda:"):
            cuda_only.append(line.removeprefix("cuda:").strip())
        else:
            always.append(line)
    return always, cuda_only


def build_cuda() -> bool:
    forced = os.environ.get("EEGFAST_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            raise RuntimeError(
                "EEGFAST_CUDA=1 but the CUDA backend cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if forced:
        raise RuntimeError(f"EEGFAST_CUDA must be 0 or 1, got {forced!r}")
    return possible


def cpu_opt_level() -> str:
    """EEGFAST_CPU_OPT (default 3): -O level of the C++ sources. 1 builds the CPU kernels about
    five times faster, and slower; for builds whose CPU kernels are not timed (GPU checks)."""
    level = os.environ.get("EEGFAST_CPU_OPT", "3").strip()
    if level not in {"0", "1", "2", "3"}:
        raise RuntimeError(f"EEGFAST_CPU_OPT must be 0, 1, 2 or 3, got {level!r}")
    return level


def extension():
    always, cuda_only = read_sources()
    # No -std flag: torch's extension builder adds the standard its headers need (C++17 up to
    # torch 2.12, C++20 from 2.13, whose ATen headers refuse older standards); a pinned one would
    # override it. -Wno-psabi: 256-bit vector helpers are inlined; the ABI note does not apply.
    cxx = [f"-O{cpu_opt_level()}", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    if build_cuda():
        # +PTX: compute_90 PTX beside the sm_80 / sm_90 code, which newer GPUs (sm_100,
        # sm_120) JIT-compile at the first use; older ones (sm_75, sm_70) need their own entry
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return CUDAExtension(
            "eegfast._C",
            always + cuda_only,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=[("EEGFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "eegfast._C",
        always,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=cxx,
        extra_link_args=["-fopenmp"],
    )


def license_metadata() -> dict[str, str]:
    """The license as the building setuptools takes it: an SPDX expression from setuptools 77
    (PEP 639; its older form, pyproject's ``license = {text = ...}`` table, is deprecated there
    with builds refused from 2027-02-18), the plain field before (which the GPU machines' image
    may have)."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


setup(
    **license_metadata(),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
