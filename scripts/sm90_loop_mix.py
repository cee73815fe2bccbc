"""Instructions per iteration of the attention kernels' loops, compiled for sm_90 (no GPU).

    python scripts/sm90_loop_mix.py [--dtype bf16] [--head-dim 20] [--config 0]

Compiles the forward, dK / dV and dQ kernels of LaBraM's case (no masks) in both loop variants
(fused LayerNorm, PRE_NORMALISED) and prints, for each loop of their machine code that runs
tensor-core products, its instruction count and the largest opcode classes (see
eegfast.testing.triton_sm90.loop_mixes): a static cost model of one more key (or query) tile,
to compare changes of a loop body where no GPU is lent to time them.
"""

from __future__ import annotations

import argparse

from sm90_register_table import KERNELS, MODULE, argument_types, case_constants

from eegfast.testing.triton_sm90 import KernelSpec, compile_for_sm90, loop_mixes

SHOWN = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "SHFL", "F2FP", "LDS", "LDG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--head-dim", type=int, default=20, choices=range(1, 129),
                        metavar="D", help="1 to 128 (default 20)")  # fmt: skip
    parser.add_argument("--config", type=int, default=0, help="autotune config index")
    args = parser.parse_args(argv)
    types = argument_types(args.dtype)
    for pre in (False, True):
        # what a launch with contiguous inputs gets (case_constants), dQ in its own kernel
        constants = dict(case_constants(args.dtype, args.head_dim, False, pre), ATOMIC_DQ=False)
        specs = [KernelSpec(name, constants, types, config=args.config, sass=True)
                 for name in KERNELS]  # fmt: skip
        compiled = compile_for_sm90(MODULE, specs)
        for name in KERNELS:
            kernel = compiled[name]
            print(f"{name} ({'pre-normalised' if pre else 'fused'}, {args.dtype}, "
                  f"D = {args.head_dim}): {kernel['registers']} registers")  # fmt: skip
            for loop in loop_mixes(kernel["sass"]):
                if loop.count("HGMMA"):
                    mix = ", ".join(f"{op} {loop.count(op)}" for op in SHOWN if loop.count(op))
                    print(f"  loop of {loop.instructions} instructions: {mix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
