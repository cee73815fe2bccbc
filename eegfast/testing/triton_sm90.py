"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

The test suite runs Triton kernels under ``TRITON_INTERPRET=1``, which accepts code the real
compiler rejects: globals that are not ``tl.constexpr``, types that change across branches,
dot shapes the tensor cores cannot take. :func:`compile_for_sm90` compiles kernels to sm_90
machine code in a subprocess with the interpreter off (``@triton.jit`` decides at import
whether a kernel is interpreted), and reports what each compilation produced.

A kernel is described by a :class:`KernelSpec`: the module attribute that holds it (a
``triton.jit`` function or an autotuned one, whose first config, or the one the spec names,
supplies the block sizes and warps), its constexpr values (those it does not take are ignored,
so one dict can serve several kernels), and the types of its other arguments (pointers default
to ``*fp32``, scalars to ``i32``). Pointer arguments are taken as 16-byte aligned, as Triton
specialises a launch on tensors whose data pointers are (fresh PyTorch allocations): that
alignment decides whether loads are vectorised and software-pipelined, so compiling without it
would not show the machine code a real launch gets.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class KernelSpec:
    name: str  # attribute of the module
    constants: dict[str, object] = field(default_factory=dict)  # constexpr arguments
    types: dict[str, str] = field(default_factory=dict)  # e.g. {"z_ptr": "*bf16", "eps": "fp32"}
    num_warps: int = 4
    num_stages: int = 3
    aligned_pointers: bool = True  # pointer arguments divisible by 16 bytes
    config: int = 0  # which of an autotuned kernel's configs
    sass: bool = False  # also return the machine code, disassembled (see loop_mixes)


@dataclass
class LoopMix:
    """One loop of a kernel's machine code: its instructions per iteration, by opcode."""

    instructions: int
    opcodes: dict[str, int]

    def count(self, *prefixes: str) -> int:
        """Instructions whose opcode starts with any of ``prefixes`` (e.g. "MUFU", "HGMMA")."""
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefixes))


_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def loop_mixes(sass: str) -> list[LoopMix]:
    """The loops of ``nvdisasm`` output (a branch back to an earlier label closes one; the
    instructions from that label to the branch are its body; a branch to itself, as kernels
    end, is none), in program order. Software pipelining gives each source loop one
    steady-state body: what one more iteration costs."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _SASS_INSTRUCTION.match(line)
        if found:
            instructions.append(_SASS_PREDICATE.sub("", found.group(1)))
    loops = []
    for end, text in enumerate(instructions):
        target = re.match(r"BRA\S*\s+(?:`\()?(\.L_x_\d+)", text)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start < end:
            opcodes: dict[str, int] = {}
            for body in instructions[start : end + 1]:
                op = body.split()[0].split(".")[0]
                opcodes[op] = opcodes.get(op, 0) + 1
            loops.append(LoopMix(end + 1 - start, opcodes))
    return loops


def _bundled_tool(name: str) -> Path:
    """The path of a CUDA tool (ptxas, nvdisasm) triton bundles for its NVIDIA backend."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def has_ptxas() -> bool:
    """Whether this triton install can compile for NVIDIA GPUs (it bundles ptxas)."""
    return _bundled_tool("ptxas").exists()


def compile_for_sm90(module: str, specs: list[KernelSpec], timeout: float = 300) -> dict:
    """{kernel name: {"ttgir": ..., "ptx": ..., "registers": int, "spill_bytes": int,
    "shared_bytes": int}} of each
    kernel of ``module`` compiled for sm_90: its Triton GPU IR, its PTX, and the registers per
    thread and bytes of spill stores that ptxas reported for its machine code; with
    ``KernelSpec.sass``, also "sass": that machine code disassembled (see :func:`loop_mixes`).

    Raises RuntimeError with the compiler's message when one does not compile.
    """
    request = json.dumps({"module": module, "specs": [asdict(s) for s in specs]})
    # ptxas runs only on a cache miss, and prints its report only when asked to
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1",
           "TRITON_DUMP_PTXAS_LOG": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "eegfast.testing.triton_sm90"],
        input=request,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compiling {module} for sm_90 failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _ptxas_report(ptx: str) -> str:
    """ptxas -v's report for ``ptx``, from the ptxas triton itself compiles sm_90 with (one of
    those it bundles, for the PTX version it writes)."""
    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(90).path
    except (AttributeError, TypeError):  # other triton versions
        ptxas = _bundled_tool("ptxas")
    # The options triton's own ptxas call adds that change register allocation (read from its
    # source: they differ between versions), so that the report is of the same binary.
    try:
        own_call = inspect.getsource(compiler.CUDABackend.make_cubin)
    except (AttributeError, OSError, TypeError):
        own_call = ""
    options = [flag for flag in ("-lineinfo", "--regAllocOptLevel=2") if flag in own_call]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx, encoding="utf-8")
        command = [str(ptxas), *options, "-v", "--gpu-name=sm_90a", str(source), "-o",
                   f"{source}.o"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def _compile_in_this_process(module_name: str, specs: list[dict]) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    results = {}
    for spec in specs:
        kernel = getattr(module, spec["name"])
        constants = dict(spec["constants"])
        options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
        if hasattr(kernel, "configs"):  # autotuned: the config chosen by the spec
            config = kernel.configs[spec["config"]]
            constants = {**config.kwargs, **constants}
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            kernel = kernel.fn
        constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
        signature = {}
        for arg in kernel.arg_names:
            if arg in constants:
                signature[arg] = "constexpr"
            else:
                default = "*fp32" if arg.endswith("_ptr") else "i32"
                signature[arg] = spec["types"].get(arg, default)
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        attrs = {}
        if spec["aligned_pointers"]:
            attrs = {
                (index,): [["tt.divisibility", 16]]
                for index, kind in enumerate(signature.values())
                if kind.startswith("*")
            }
        source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        ptxas_log = io.StringIO()  # what ptxas -v says (printed by triton when asked to)
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        log = ptxas_log.getvalue()
        if "bytes spill stores" not in log:  # a triton without the knob: ask ptxas directly
            log = _ptxas_report(compiled.asm["ptx"])
        registers = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        if registers is None or spills is None:
            raise RuntimeError(f"no ptxas report for {spec['name']}:\n{log[-2000:]}")
        results[spec["name"]] = {
            "ttgir": compiled.asm["ttgir"],
            "ptx": compiled.asm["ptx"],
            "registers": int(registers.group(1)),
            "spill_bytes": int(spills.group(1)),
            "shared_bytes": int(compiled.metadata.shared),
        }
        if spec.get("sass"):
            results[spec["name"]]["sass"] = _disassemble(compiled.asm["cubin"])
    return results


def _disassemble(cubin: bytes) -> str:
    """nvdisasm's listing of a cubin (the nvdisasm triton bundles beside its ptxas)."""
    nvdisasm = _bundled_tool("nvdisasm")
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        done = subprocess.run([str(nvdisasm), "-c", str(binary)], capture_output=True,
                              text=True, timeout=300, check=True)  # fmt: skip
    return done.stdout


if __name__ == "__main__":
    request = json.load(sys.stdin)
    print(json.dumps(_compile_in_this_process(request["module"], request["specs"])))
