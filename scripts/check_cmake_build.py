"""Smoke-test the CMake-built extension: load it as eegfast._C and compare ops to the reference.

Usage: python scripts/check_cmake_build.py BUILD_DIR
"""

import importlib.util
import sys
from pathlib import Path


def main(build_dir: str) -> int:
    candidates = sorted(Path(build_dir).glob("_C*.so"))
    if not candidates:
        print(f"no _C*.so in {build_dir}: did the CMake build run?", file=sys.stderr)
        return 1
    # Register the CMake-built module under the package's name before eegfast imports its own.
    spec = importlib.util.spec_from_file_location("eegfast._C", candidates[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules["eegfast._C"] = module
    spec.loader.exec_module(module)

    import torch

    from eegfast.ops import vq_code_stats, vq_nearest, vq_nearest_reference
    from eegfast.ops.vq import vq_code_stats_reference

    if importlib.import_module("eegfast._C") is not module:
        print("the CMake-built module was not the one eegfast uses", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(301, 25, generator=gen), torch.randn(77, 25, generator=gen)
    for metric in ("cosine", "l2"):
        indices = vq_nearest(z, codebook, metric, backend="cpu")
        expected = vq_nearest_reference(z, codebook, metric)[0]
        if not torch.equal(indices, expected):
            print(f"CMake build: vq_nearest ({metric}) differs from the reference", file=sys.stderr)
            return 1
    counts, sums = vq_code_stats(z, indices, 77, backend="cpu")
    ref_counts, ref_sums = vq_code_stats_reference(z, indices, 77)
    torch.testing.assert_close(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums)
    print(f"CMake build OK: {candidates[0]} ({module.build_info()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build-cmake"))
