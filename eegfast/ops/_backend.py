"""Finding the native extension and Triton, and choosing a backend for each call.

Backends:
- ``reference``: plain PyTorch, differentiable, the definition of correctness.
- ``cpu``: C++ kernels in ``eegfast._C`` (CPU tensors).
- ``cuda``: CUDA kernels in ``eegfast._C`` (CUDA tensors, when built with CUDA).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

Selection: the ``backend=`` argument of an op, else ``EEGFAST_BACKEND``, else automatic by the
device of the inputs (``backend="auto"`` asks for the automatic choice whatever
``EEGFAST_BACKEND`` says; ``EEGFAST_BACKEND=auto`` is the same as unset). A missing extension
warns once and falls back to the reference, unless ``EEGFAST_REQUIRE_EXT=1``, where it is an
error. CUDA kernels compiled for other GPU architectures (``TORCH_CUDA_ARCH_LIST``) are not
ready on this GPU: the automatic choice warns once and passes over them, ``backend="cuda"``
raises, both saying how to rebuild.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import torch
import torch.autograd.forward_ad as forward_ad

BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class BackendStatus:
    """One backend's entry in :func:`available_backends`: whether it can run here and what
    was found, or why not (``str()``: ``"yes (...)"`` / ``"no (...)"``)."""

    available: bool
    reason: str  # what was found, or why the backend cannot be used

    def __str__(self) -> str:
        return ("yes" if self.available else "no") + f" ({self.reason})"


class ExtensionMissingError(RuntimeError):
    """The native extension is required (EEGFAST_REQUIRE_EXT=1) but could not be loaded."""


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes ``t``'s GPU the current device, for the Triton launches inside it:
    Triton launches on the current device and its stream, so tensors on another GPU (a model
    on cuda:1 in a process whose current device is 0) would be read from the wrong one. A
    no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def vector_align(*values: int) -> int:
    """The largest of 8, 4, 2, 1 that divides every value (sizes and strides in elements).

    Triton kernels take such values divided by it and multiply them back (with the factor a
    constexpr): the compiler then knows that row starts and mask bounds are multiples of it,
    and with 16-byte aligned pointers loads and stores whole vectors, asynchronously copied
    and pipelined; a stride it cannot bound makes every element a separate scalar access. 1
    when a value exceeds int32: it reaches the kernel as int64, but divided it could arrive as
    int32, where the product that restores it would overflow.
    """
    if max(values, default=0) > 2**31 - 1:
        return 1
    for align in (8, 4, 2):
        if all(v % align == 0 for v in values):
            return align
    return 1


def _env_flag(name: str) -> bool:
    """A switch read the way Triton reads its own (TRITON_INTERPRET): anything else is off."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def env_switch(name: str, default: bool | None) -> bool | None:
    """eegfast's environment switch ``name``: 1 / true / yes / on or 0 / false / no / off (any
    case); ``default`` when unset or empty (None where unset means "decide for me"). Anything
    else raises ValueError naming the variable, rather than quietly meaning off."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r} is not a switch: use 1, true, yes, on or 0, false, no, off"
    )


@functools.cache
def _load_extension() -> tuple[ModuleType | None, str]:
    # The switch is checked here, once, whether or not the import works: read only when the
    # extension is missing, a typo (EEGFAST_REQUIRE_EXT=maybe) went unnoticed until then.
    env_switch("EEGFAST_REQUIRE_EXT", False)
    try:
        module = importlib.import_module("eegfast._C")
    except ImportError as error:
        return None, f"eegfast._C could not be imported: {error}"
    return module, "eegfast._C loaded"


def extension() -> ModuleType | None:
    """The native module, or None (after one warning) when it is not built.

    Raises ExtensionMissingError instead when EEGFAST_REQUIRE_EXT=1.
    """
    module, reason = _load_extension()
    if module is None:
        if env_switch("EEGFAST_REQUIRE_EXT", False):
            raise ExtensionMissingError(
                f"{reason}. EEGFAST_REQUIRE_EXT=1 forbids the fallback to the reference "
                "implementation; build it with `pip install --no-build-isolation -e .`"
            )
        _warn_missing_extension_once(reason)
    return module


@functools.cache
def _warn_missing_extension_once(reason: str) -> None:
    warnings.warn(
        f"{reason}; eegfast ops fall back to the (slow) reference implementation. "
        "Build the extension with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=4,
    )


def triton_interpreting() -> bool:
    return _env_flag("TRITON_INTERPRET")


def wrap_triton(kernel: Callable) -> Callable:
    """``torch.library.wrap_triton(kernel)``, or under the Triton interpreter the kernel itself,
    launched eagerly, as torch does there from 2.13. (``@triton.jit`` under TRITON_INTERPRET=1
    gives an ``InterpretedFunction``, which wrap_triton before torch 2.13 refused: "wrap_triton
    only works on functions annotated with triton.jit", every Triton op failing on the CPU.)
    An autotuned kernel counts by the function it tunes."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction

    inner = kernel
    while isinstance(inner, Autotuner | Heuristics):
        inner = inner.fn
    if isinstance(inner, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


_F = TypeVar("_F", bound=Callable)


# torch.compiler.assume_constant_result and torch.compiler.disable import torch._dynamo when
# they decorate: about a second at `import eegfast.ops` (and so eegfast.nn, eegfast.models), and
# torch._dynamo imports triton where installed, after which a TRITON_INTERPRET=1 set by the user
# no longer works (triton.language makes its own @jit helpers, tl.zeros and the like, compiled
# or interpreted when triton is imported). These two mark functions without that import.
def assume_constant_result(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo: the mark
    that decorator sets, which Dynamo reads when it traces a call of ``fn``."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def compiler_disable(fn: _F) -> _F:
    """``torch.compiler.disable(fn)`` (recursive) without importing torch._dynamo: while it is
    not imported nothing is being compiled, and ``fn`` runs as it is; once it is, through
    ``torch._dynamo.disable`` (a graph break, then ``fn`` runs eagerly). torch's own lazy form,
    ``torch._disable_dynamo``, imported torch._dynamo (and triton's native libraries with it)
    at the first call: inside a gloo process group's run (the quantizer's k-means init, the
    ranks' sums) a process then sometimes aborted at exit ("terminate called without an
    active exception", 2 runs in 12 of a two-rank test)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return fn(*args, **kwargs)
        return dynamo.disable(fn, recursive=True)(*args, **kwargs)

    return run  # type: ignore[return-value]


@functools.cache
def _triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as error:
        # (the error names the module only: say how to get it)
        return BackendStatus(
            False,
            f"triton is not installed ({error}): `pip install triton`, eegfast's [triton] extra",
        )
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on CUDA")
    if triton_interpreting():
        return BackendStatus(True, f"triton {triton.__version__}, interpreter on CPU")
    return BackendStatus(False, f"triton {triton.__version__} but no CUDA device")


def available_backends() -> dict[str, BackendStatus]:
    """What is built and usable on this machine, and if not, why."""
    module, reason = _load_extension()
    info = module.build_info() if module is not None else {}
    statuses = {
        "reference": BackendStatus(True, f"PyTorch {torch.__version__}"),
        "cpu": BackendStatus(module is not None, reason),
    }
    if module is None:
        statuses["cuda"] = BackendStatus(False, reason)
    elif not info.get("cuda", False):
        statuses["cuda"] = BackendStatus(
            False, "extension built without CUDA (torch has no CUDA or EEGFAST_CUDA=0)"
        )
    elif not torch.cuda.is_available():
        statuses["cuda"] = BackendStatus(False, "built with CUDA but no CUDA device is visible")
    else:  # the current device's (resolve_backend asks for the tensors' device)
        problem = _cuda_kernel_image_problem(torch.cuda.current_device())
        statuses["cuda"] = BackendStatus(problem is None, problem or torch.cuda.get_device_name())
    statuses["triton"] = _triton_status()
    return statuses


# Evaluated once while torch.compile traces a call (not traced into): the choice depends only on
# the arguments, the environment and what is installed, none of which change inside a graph.
@assume_constant_result
def resolve_backend(
    requested: str | None, device: torch.device, gpu_preference: tuple[str, ...]
) -> str:
    """The backend to run an op with on tensors living on ``device``.

    ``gpu_preference`` lists the op's GPU backends, fastest first (measured in benchmarks/).
    """
    name = requested or os.environ.get("EEGFAST_BACKEND") or "auto"
    source = "backend" if requested else "EEGFAST_BACKEND"
    # the errors name what chose the backend: "backend='triton'" when only EEGFAST_BACKEND
    # said so sent the user looking for an argument they never passed
    choice = f"{source}={name!r}"
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"{source} must be one of {('auto', *BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            for candidate in gpu_preference:
                if candidate == "cuda" and _cuda_extension_ready(device):
                    return "cuda"
                if candidate == "triton" and _triton_status().available:
                    return "triton"
            return "reference"
        if device.type == "cpu":
            return "cpu" if extension() is not None else "reference"
        return "reference"
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise ValueError(f"{source}={name!r} cannot run on tensors on {device}")
        module = extension()
        if module is None:
            return "reference"
        if name == "cuda" and not module.build_info()["cuda"]:
            raise RuntimeError(f"{choice}: eegfast._C was built without CUDA kernels")
        # (only for ops with eegfast._C CUDA kernels: qk_norm_attention runs "cuda" on Triton)
        if name == "cuda" and "cuda" in gpu_preference:
            problem = _cuda_kernel_image_problem(_cuda_index(device))
            if problem is not None:
                raise RuntimeError(f"{choice}: {problem}")
    if name == "triton":
        status = _triton_status()
        if not status.available:
            raise RuntimeError(f"{choice} is not available: {status.reason}")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(f"{choice} on CPU tensors needs TRITON_INTERPRET=1")
    return name


def automatic_gpu_candidates(
    requested: str | None, device: torch.device, gpu_preference: tuple[str, ...]
) -> tuple[str, ...]:
    """The GPU backends an op may time against each other for one call: those of
    ``gpu_preference`` that are ready, when the backend is automatic (``backend=`` None or
    ``"auto"``, and EEGFAST_BACKEND unset or ``auto`` where it applies, as in
    :func:`resolve_backend`) and the tensors are on a CUDA device; else none."""
    if (requested or os.environ.get("EEGFAST_BACKEND") or "auto") != "auto":
        return ()
    if device.type != "cuda":
        return ()
    ready = {
        "cuda": lambda: _cuda_extension_ready(device),
        "triton": lambda: _triton_status().available,
    }
    return tuple(name for name in gpu_preference if name in ready and ready[name]())


def _cuda_extension_ready(device: torch.device) -> bool:
    """Whether eegfast._C's CUDA kernels can run on ``device`` (a CUDA device): built, with
    CUDA, for its architecture. The automatic choice passes over them otherwise, with one
    warning per device saying how to rebuild."""
    module = extension()
    if module is None or not module.build_info()["cuda"]:
        return False
    problem = _cuda_kernel_image_problem(_cuda_index(device))
    if problem is not None:
        _warn_no_kernel_image_once(problem)
    return problem is None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# cudaError_t values of a kernel lookup that mean "compiled for other architectures":
# cudaErrorInvalidDeviceFunction, cudaErrorNoKernelImageForDevice (the runtime's choice of the
# two depends on its version)
_NO_KERNEL_IMAGE_ERRORS = (98, 209)
# cudaErrorUnsupportedPtxVersion: the kernels exist for this GPU only as PTX (+PTX in
# TORCH_CUDA_ARCH_LIST), from a CUDA toolkit newer than the driver, which cannot JIT-compile it
_PTX_TOO_NEW_ERROR = 222
# eegfast._C ops that look up one kernel of a .cu file on a device (csrc/*/*_cuda_bind.cpp)
_KERNEL_IMAGE_PROBES = ("_vq_cuda_kernel_image", "_moe_cuda_kernel_image")


@functools.cache
def _cuda_kernel_image_problem(index: int) -> str | None:
    """Why eegfast._C's CUDA kernels cannot run on GPU ``index``: they were compiled
    (TORCH_CUDA_ARCH_LIST) for architectures it cannot run, where every op failed with "no
    kernel image is available for execution on the device" (or reach it as PTX that its driver
    is too old to compile). None when they can run there, or
    when the extension cannot tell (built before it had the probes: taken as ready, as then).
    Other CUDA errors of the probe are left to the ops, which report them themselves."""
    # the probe creates the device's context: torch's initialisation first, so that torch
    # knows (its check against CUDA in a forked child, its lazy-init hooks)
    torch.cuda.init()
    for name in _KERNEL_IMAGE_PROBES:
        try:
            probe = getattr(torch.ops.eegfast, name)
        except AttributeError:  # an older build
            continue
        error, archs = probe(index)
        if error in (*_NO_KERNEL_IMAGE_ERRORS, _PTX_TOO_NEW_ERROR):
            major, minor = torch.cuda.get_device_capability(index)
            gpu = (
                f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability "
                f"{major}.{minor}, sm_{major}{minor})"
            )
            if error == _PTX_TOO_NEW_ERROR:
                return (
                    f"eegfast._C's CUDA kernels reach {gpu} as PTX from a CUDA toolkit newer "
                    "than this NVIDIA driver, which cannot compile it "
                    "(cudaErrorUnsupportedPtxVersion): update the driver, or rebuild the "
                    f'extension with TORCH_CUDA_ARCH_LIST="{major}.{minor}" pip install '
                    "--no-build-isolation -e ."
                )
            # __CUDA_ARCH_LIST__ entries: 800 for compute_80, i.e. 8.0 in TORCH_CUDA_ARCH_LIST
            built = ", ".join(f"{a // 100}.{a % 100 // 10}" for a in archs)
            return (
                f"eegfast._C's CUDA kernels were compiled for compute capability "
                f"{built or 'other than this GPU'} (TORCH_CUDA_ARCH_LIST) and cannot run on "
                f"{gpu}: rebuild the extension with "
                f'TORCH_CUDA_ARCH_LIST="{major}.{minor}" pip install --no-build-isolation -e . '
                f'(a list such as "{major}.{minor};8.0;9.0+PTX" serves several GPUs)'
            )
    return None


@functools.cache
def _warn_no_kernel_image_once(problem: str) -> None:
    warnings.warn(
        f"{problem}; the automatic backend choice uses Triton or the reference instead.",
        RuntimeWarning,
        stacklevel=4,
    )


_AUTODIFF_TRANSFORMS = (
    torch._C._functorch.TransformType.Grad,
    torch._C._functorch.TransformType.Jvp,
)


def needs_reference_autodiff(tensors: tuple) -> bool:
    """Whether this call is differentiated in a way the kernels cannot be: forward-mode AD
    (a dual tensor of torch.autograd.forward_ad among ``tensors``, or torch.func.jvp / jacfwd)
    or a torch.func gradient transform (grad, vjp, jacrev, hessian). The kernels have no jvp
    (their tangent came out zero, or missing) and their autograd.Function no setup_context
    (functorch refused it with a message naming neither eegfast nor the op); the reference
    supports all of these, so the differentiable ops run it then. vmap alone is fine on the
    ops (the batching fallback).

    Cheap when none is active: one lookup of the functorch stack and of the dual level."""
    if torch.compiler.is_compiling():
        # Dynamo traces torch.func transforms and folds maybe_current_level (None without one:
        # no graph break), but not get_interpreter_stack, and it wraps peek_interpreter_stack's
        # None as an object (never None): any transform takes the reference here (vmap alone
        # would not need to; the kernels' op under a traced grad fails to trace)
        return torch._C._functorch.maybe_current_level() is not None
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
        interpreter.key() in _AUTODIFF_TRANSFORMS
        for interpreter in torch._C._functorch.get_interpreter_stack()
    ):
        return True
    if forward_ad._current_level >= 0:  # inside torch.autograd.forward_ad.dual_level()
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


class _RaisingWhenDifferentiated(torch.autograd.Function):
    """Identity on ``grad`` (a copy) whose backward raises ``message``; its inputs include the
    ``anchors`` so that the autograd engine sees a path from the output to them."""

    @staticmethod
    def forward(ctx, message: str, grad: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
        ctx.message = message
        return grad.clone()

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(ctx.message)


def raising_when_differentiated(grads: tuple, message: str, anchors: tuple) -> tuple:
    """``grads`` (tensors and Nones) as outputs of nodes that raise ``message`` when a
    gradient flows into them: what a backward run with create_graph=True returns, so that its
    constant (graph-less) gradients are never differentiated as if they were exact.

    ``anchors``: the tensors the gradients depend on (the op's inputs and grad_out; Nones are
    skipped). The nodes hang off them: a node without such edges is pruned by
    ``torch.autograd.grad(..., inputs=x)`` when x reaches the loss by another path as well,
    and the second-order gradient came out silently without the kernel's term.
    """
    linked = tuple(a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad)
    return tuple(
        None if g is None else _RaisingWhenDifferentiated.apply(message, g, *linked) for g in grads
    )
