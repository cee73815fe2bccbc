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

from eegfast.testing.triton_sm90 import KernelSpec, compile_for_sm90, loop_mixes

MODULE = "eegfast.ops.qk_norm_attention_triton"
KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
POINTERS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
            "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr", "q_n_ptr", "k_n_ptr", "v_p_ptr",
            "g_p_ptr")  # fmt: skip
SHOWN = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "SHFL", "F2FP", "LDS", "LDG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--head-dim", type=int, default=20, choices=range(1, 129),
                        metavar="D", help="1 to 128 (default 20)")  # fmt: skip
    parser.add_argument("--config", type=int, default=0, help="autotune config index")
    args = parser.parse_args(argv)
    block_d = max(16, 1 << (args.head_dim - 1).bit_length())
    align = next(a for a in (8, 4, 2, 1) if args.head_dim % a == 0)
    constants = dict(HAS_Q_W=True, HAS_Q_B=True, HAS_K_W=True, HAS_K_B=True, HAS_PAD=False,
                     CAUSAL=False, BLOCK_CAUSAL=False, BLOCK_D=block_d, PRECISION="ieee",
                     D=args.head_dim, ALIGN=align, PADDED_PLAIN=False, ATOMIC_DQ=False,
                     PART=16)  # fmt: skip
    types = {**dict.fromkeys(POINTERS, "*" + args.dtype), "pad_ptr": "*u8", "ids_ptr": "*i32",
             "eps": "fp32", "scale": "fp32", "qk_scale_log2": "fp32",
             "unshifted_limit": "fp32"}  # fmt: skip
    for pre in (False, True):
        specs = [KernelSpec(name, dict(constants, PRE_NORMALISED=pre), types,
                            config=args.config, sass=True) for name in KERNELS]  # fmt: skip
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
