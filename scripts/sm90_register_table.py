"""Registers and spill bytes of every autotuned attention config, compiled for sm_90.

Compiles each config of the three Triton attention kernels (the list a launch of that input
dtype and head dim autotunes over), and each tail kernel, with and without all masks, in both
loop variants (fused LayerNorm, PRE_NORMALISED), and prints a Markdown table of ptxas's report:
``registers/spill bytes``. No GPU is needed; the installed Triton and its bundled ptxas decide
the numbers, so run it under each Triton a GPU machine may have (the config lists are chosen
not to spill under any of them)::

    python scripts/sm90_register_table.py bf16-20 fp16-25 bf16-50 fp32-20 > table.md
"""

from __future__ import annotations

import argparse
import itertools
import os

# before anything imports triton: compile, do not interpret
os.environ.update(TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")

from dataclasses import asdict  # noqa: E402

MODULE = "eegfast.ops.qk_norm_attention_triton"
KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
MASK_FLAGS = ("HAS_PAD", "CAUSAL", "BLOCK_CAUSAL")
POINTERS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
            "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr", "q_n_ptr", "k_n_ptr", "v_p_ptr",
            "g_p_ptr")  # fmt: skip


def torch_dtype(dtype: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def case_constants(dtype: str, head_dim: int, masks: bool, pre: bool) -> dict:
    """The constexprs a launch with (B, H, N, D) contiguous inputs of ``dtype`` gets."""
    from eegfast.ops._backend import vector_align
    from eegfast.ops.qk_norm_attention_triton import _block_d, _needs_padded_rows

    align = vector_align(head_dim)  # contiguous (B, H, N, D): every stride a multiple of D
    padded = pre and _needs_padded_rows(align, torch_dtype(dtype))
    return {
        **dict.fromkeys(("HAS_Q_W", "HAS_Q_B", "HAS_K_W", "HAS_K_B"), True),
        **dict.fromkeys(MASK_FLAGS, masks),
        "BLOCK_D": _block_d(head_dim), "PRECISION": "tf32x3" if dtype == "fp32" else "ieee",
        "PART": 16, "D": head_dim, "ALIGN": align, "PRE_NORMALISED": pre, "PADDED_PLAIN": padded,
    }  # fmt: skip


def argument_types(dtype: str) -> dict[str, str]:
    """The types of the kernels' non-constexpr arguments for inputs of ``dtype``."""
    types = {name: "*" + dtype for name in POINTERS}
    return types | {"pad_ptr": "*u8", "ids_ptr": "*i32", "eps": "fp32", "scale": "fp32",
                    "qk_scale_log2": "fp32", "unshifted_limit": "fp32"}  # fmt: skip


def config_indices(kernel_name: str, dtype: str, block_d: int) -> list[int]:
    """Indices into the kernel's configs of those its launches autotune over: what its own
    pruning keeps for the input dtype and BLOCK_D."""
    import torch

    import eegfast.ops.qk_norm_attention_triton as module

    kernel = getattr(module, kernel_name)
    q = torch.empty(0, dtype=torch_dtype(dtype))
    kept = kernel.early_config_prune(kernel.configs, {"q_ptr": q}, BLOCK_D=block_d)
    return [next(i for i, c in enumerate(kernel.configs) if c is config) for config in kept]


def report(kernel_name: str, config_index: int, constants: dict, dtype: str) -> str:
    from eegfast.testing.triton_sm90 import KernelSpec, _compile_in_this_process

    spec = KernelSpec(kernel_name, constants, argument_types(dtype), config=config_index)
    compiled = _compile_in_this_process(MODULE, [asdict(spec)])[kernel_name]
    return f"{compiled['registers']}/{compiled['spill_bytes']}"


def describe(config) -> str:
    blocks = ", ".join(str(v) for v in config.kwargs.values())
    return f"({blocks}) w{config.num_warps} s{config.num_stages}"


def parse_case(text: str) -> tuple[str, int]:
    """ "bf16-20" -> ("bf16", 20), for argparse (its error names the argument)."""
    dtype, _, head_dim = text.partition("-")
    if dtype not in ("bf16", "fp16", "fp32") or not head_dim.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: want dtype-D, dtype bf16, fp16 or fp32")
    if not 1 <= int(head_dim) <= 128:
        raise argparse.ArgumentTypeError(f"{text!r}: the kernels take head dims 1 to 128")
    return dtype, int(head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=parse_case,
                        help="dtype-D, e.g. bf16-20 fp16-25 fp32-50")  # fmt: skip
    args = parser.parse_args()
    import triton

    import eegfast.ops.qk_norm_attention_triton as module

    print(f"Triton {triton.__version__}, sm_90; registers/spill bytes per thread\n")
    print("| case | kernel | loops | masks | configs |\n|---|---|---|---|---|")
    for dtype, head_dim in args.cases:
        case = f"{dtype}-{head_dim}"
        for name, pre, masks in itertools.product(KERNELS, (False, True), (False, True)):
            constants = case_constants(dtype, head_dim, masks, pre)
            kernel = getattr(module, name)
            tail = name.replace("_kernel", "_tail_kernel")
            cells = [f"{describe(kernel.configs[i])}: {report(name, i, constants, dtype)}"
                     for i in config_indices(name, dtype, constants["BLOCK_D"])]  # fmt: skip
            cells.append(f"tail {describe(getattr(module, tail).configs[0])}: "
                         f"{report(tail, 0, constants, dtype)}")  # fmt: skip
            loops = "PRENORM" if pre else "fused"
            print(f"| {case} | {name} | {loops} | {'all' if masks else 'none'} | "
                  + "; ".join(cells) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
