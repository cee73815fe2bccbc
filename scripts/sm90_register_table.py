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
KERNELS = {"_fwd_kernel": "_FWD", "_bwd_dkdv_kernel": "_DKDV", "_bwd_dq_kernel": "_DQ"}
LIST_ORDER = ("", "_WIDE", "_FP32", "_FP32_WIDE")  # how the lists make up kernel.configs
MASK_FLAGS = ("HAS_PAD", "CAUSAL", "BLOCK_CAUSAL")
POINTERS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
            "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr", "q_n_ptr", "k_n_ptr", "v_p_ptr",
            "g_p_ptr")  # fmt: skip


def case_constants(dtype: str, head_dim: int, masks: bool, pre: bool) -> dict:
    """The constexprs a launch with (B, H, N, D) contiguous inputs of ``dtype`` gets."""
    import torch

    from eegfast.ops._backend import vector_align
    from eegfast.ops.qk_norm_attention_triton import _needs_padded_rows

    block_d = max(16, 1 << (head_dim - 1).bit_length())
    align = vector_align(head_dim)  # contiguous (B, H, N, D): every stride a multiple of D
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    padded = pre and _needs_padded_rows(align, torch_dtype)
    return {
        **dict.fromkeys(("HAS_Q_W", "HAS_Q_B", "HAS_K_W", "HAS_K_B"), True),
        **dict.fromkeys(MASK_FLAGS, masks),
        "BLOCK_D": block_d, "PRECISION": "tf32x3" if dtype == "fp32" else "ieee", "PART": 16,
        "D": head_dim, "ALIGN": align, "PRE_NORMALISED": pre, "PADDED_PLAIN": padded,
    }  # fmt: skip


def config_indices(kernel_name: str, dtype: str, head_dim: int) -> list[int]:
    """Indices into the kernel's configs of the list its launches autotune over."""
    import eegfast.ops.qk_norm_attention_triton as module

    kind = ("_FP32" if dtype == "fp32" else "") + ("_WIDE" if head_dim > 32 else "")
    prefix = KERNELS[kernel_name]
    offset = sum(len(getattr(module, f"{prefix}{k}_CONFIGS"))
                 for k in LIST_ORDER[: LIST_ORDER.index(kind)])  # fmt: skip
    return list(range(offset, offset + len(getattr(module, f"{prefix}{kind}_CONFIGS"))))


def report(kernel_name: str, config_index: int, constants: dict, dtype: str) -> str:
    from eegfast.testing.triton_sm90 import KernelSpec, _compile_in_this_process

    types = {name: "*" + dtype for name in POINTERS}
    types |= {"pad_ptr": "*u8", "ids_ptr": "*i32", "eps": "fp32", "scale": "fp32",
              "qk_scale_log2": "fp32"}  # fmt: skip
    spec = KernelSpec(kernel_name, constants, types, config=config_index)
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
                     for i in config_indices(name, dtype, head_dim)]  # fmt: skip
            cells.append(f"tail {describe(getattr(module, tail).configs[0])}: "
                         f"{report(tail, 0, constants, dtype)}")  # fmt: skip
            loops = "PRENORM" if pre else "fused"
            print(f"| {case} | {name} | {loops} | {'all' if masks else 'none'} | "
                  + "; ".join(cells) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
