"""``eegfast doctor``: what this machine offers eegfast — versions, kernels, GPUs, distributed.

Prints a report (``--json`` for a machine-readable one), also when the native extension is
required (``EEGFAST_REQUIRE_EXT=1``) and missing. Exit status 0; 1 when it is required and
missing; 2 when ``EEGFAST_REQUIRE_EXT`` is not a switch (1/0, true/false, yes/no, on/off).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any

from eegfast.cpus import usable_cpu_count


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as err:  # a broken install is reported, not raised
        return f"not available ({type(err).__name__})"


def _environment() -> dict[str, str]:
    """The environment variables that steer eegfast, Triton's interpreter and GPU visibility."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(("EEGFAST_", "TRITON_INTERPRET", "CUDA_VISIBLE"))
    }


def collect() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from eegfast import __version__
    from eegfast.nn.linear import onednn_status
    from eegfast.ops import available_backends, cpu_attention_isa
    from eegfast.train.engine import resolve_precision

    report: dict[str, Any] = {
        "eegfast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpu_count(),  # (its affinity: taskset, Slurm, a cpuset)
        "torch_threads": torch.get_num_threads(),
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "triton",
                "numpy",
                "scipy",
                "sklearn",
                "mne",
                "safetensors",
                "tensorboard",
                "matplotlib",
                "yaml",
            )
        },
        "backends": {
            name: {"available": s.available, "detail": s.reason}
            for name, s in available_backends().items()
        },
        "cpu_inference_fusion": dict(zip(("available", "detail"), onednn_status(), strict=True)),
        "cpu_attention_isa": cpu_attention_isa(),
        "cuda": {
            "available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda,
            "devices": [],
        },
        "distributed": {
            "available": dist.is_available(),
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
        },
        "environment": _environment(),
        "precision_default": "fp32 (CPU)",
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report["cuda"]["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    # this GPU's own bf16 arithmetic (sm_80 on): torch.cuda.is_bf16_supported()
                    # asks about the current GPU only, and says yes where bf16 is emulated
                    "bf16": props.major >= 8 or torch.version.hip is not None,
                }
            )
        # what train.precision=auto picks for a single process (its GPU is cuda:0)
        amp = resolve_precision("auto", torch.device("cuda", 0))
        report["precision_default"] = (
            "bf16 autocast" if amp == torch.bfloat16 else "fp16 autocast with loss scaling"
        )
    return report


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"eegfast {report['eegfast']} on Python {report['python']} ({report['platform']})",
        f"CPU cores: {report['cpu_count']} ({report['usable_cpus']} usable by this process), "
        f"torch threads: {report['torch_threads']}",
        "",
        "versions:",
        *[f"  {name:12s} {version}" for name, version in report["versions"].items()],
        "",
        "kernel backends (eegfast.ops.available_backends()):",
        *[
            f"  {name:10s} {'yes' if b['available'] else 'no ':3s}  {b['detail']}"
            for name, b in report["backends"].items()
        ],
        "CPU inference fusion (eegfast.nn.fused_linear): "
        f"{'yes' if report['cpu_inference_fusion']['available'] else 'no'}, "
        f"{report['cpu_inference_fusion']['detail']}",
        f"CPU attention kernels (eegfast.ops.cpu_attention_isa()): {report['cpu_attention_isa']}"
        + (" (bfloat16 forward on AMX tiles)" if report["cpu_attention_isa"] == "amx" else ""),
        "",
        f"CUDA: {'yes' if report['cuda']['available'] else 'no'} "
        + (
            f"(torch built with CUDA {report['cuda']['torch_cuda']})"
            if report["cuda"]["torch_cuda"]
            else "(torch built without CUDA)"
        ),
        *[
            f"  GPU {d['index']}: {d['name']}, sm_{d['capability'].replace('.', '')}, "
            f"{d['memory_gib']} GiB, bf16 {'yes' if d['bf16'] else 'no'}"
            for d in report["cuda"]["devices"]
        ],
        f"distributed: gloo {'yes' if report['distributed']['gloo'] else 'no'}, "
        f"nccl {'yes' if report['distributed']['nccl'] else 'no'} "
        "(torchrun --nproc_per_node N -m eegfast <command> ...)",
        f"default training precision here: {report['precision_default']}",
    ]
    if report["environment"]:
        lines += ["", "environment:", *[f"  {k}={v}" for k, v in report["environment"].items()]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    # eegfast.ops asks for the extension as it is imported, and under EEGFAST_REQUIRE_EXT=1 a
    # missing one raised there: a traceback instead of the report that says why it is missing
    # (CI exports the variable). The report is collected with the requirement lifted; the
    # requirement then decides the exit status.
    required_as_set = os.environ.get("EEGFAST_REQUIRE_EXT")
    os.environ["EEGFAST_REQUIRE_EXT"] = "0"
    try:
        report = collect()
    finally:
        if required_as_set is None:
            del os.environ["EEGFAST_REQUIRE_EXT"]
        else:
            os.environ["EEGFAST_REQUIRE_EXT"] = required_as_set
    report["environment"] = _environment()
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    from eegfast.ops._backend import env_switch

    try:
        required = env_switch("EEGFAST_REQUIRE_EXT", False)
    except ValueError as err:  # one line naming the variable, as the other commands' errors
        print(f"eegfast doctor: {err}", file=sys.stderr)
        return 2
    if required and not report["backends"]["cpu"]["available"]:
        print(
            "eegfast doctor: EEGFAST_REQUIRE_EXT=1 but the native extension is missing: "
            f"{report['backends']['cpu']['detail']}; build it with "
            "`pip install --no-build-isolation -e .`",
            file=sys.stderr,
        )
        return 1
    return 0
