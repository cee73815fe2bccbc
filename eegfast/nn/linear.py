"""Linear layers with their epilogue fused, for fp32 inference on CPU.

A transformer block spends most of its CPU time in four Linears, and eager PyTorch adds a
memory pass after each: ``addmm`` first copies the broadcast bias into a fresh output, then
GELU, layer scale and the residual add each read and write the activation again. oneDNN
(shipped inside PyTorch's CPU builds) runs the GEMM on a weight packed once into its blocked
layout and applies bias, GELU or the residual add while the output tile is still in registers.
Layer scale is folded into the packed weight: ``γ ⊙ (x Wᵀ + b) = x (γ ⊙ W)ᵀ + γ ⊙ b``.

:func:`fused_linear` takes that path only where it cannot change what autograd or a compiler
sees: CPU float32 tensors that need no gradient, outside ``torch.compile`` and
``torch.jit.trace`` tracing, dispatch modes (``FlopCounterMode``), ``torch.func`` transforms,
forward-mode AD and CPU autocast, with ``torch.backends.mkldnn`` available and enabled
(``torch.backends.mkldnn.flags(enabled=False)`` turns it off). Everywhere else it is the eager
composition, so results agree within fp32 rounding (GEMM summation order).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "clear_packed_weights",
    "fused_linear",
    "has_call_hooks",
    "linear_call_fusable",
    "onednn_status",
    "scaled_residual",
]

# weight Parameter -> (version key, packed weight scaled by the layer scale if any, probe,
# fingerprint, copy of the scale). Keyed weakly on the tensor's identity, so a dropped model
# frees its packed copies; the version key repacks after any in-place update (optimizer step,
# load_state_dict). An update through ``.data`` (``w.data.mul_(...)``, ``ema.data.copy_(...)``:
# weight init, EMA teachers) bumps only the ``.data`` alias's version counter, so the packed
# copy is also checked against a fingerprint of the weight's values and a copy of the scale.
# The bias is not packed: callers may build it anew on every call (LaBraM's qkv bias is a
# concatenation).
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# The two oneDNN ops are internal to PyTorch (Inductor's CPU lowering uses them): a build
# without them takes the eager path.
_HAS_ONEDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(
    torch.ops.mkldnn, "_reorder_linear_weight"
)


def onednn_status() -> tuple[bool, str]:
    """Whether :func:`fused_linear` can take its oneDNN path in this process, and why not."""
    if not _HAS_ONEDNN_LINEAR:
        return False, "this torch build lacks torch.ops.mkldnn._linear_pointwise"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (torch.backends.mkldnn.is_available())"
    if not torch.backends.mkldnn.enabled:
        return False, "disabled by torch.backends.mkldnn.flags(enabled=False)"
    return True, "oneDNN packed weights with fused epilogues for CPU fp32 inference"


def clear_packed_weights() -> int:
    """Free every cached packed weight (they are rebuilt on the next call); returns how many.

    The cache holds one packed copy per weight used on the oneDNN path, as much memory again as
    those weights; it is freed with the weights themselves, or here.
    """
    count = len(_PACKED)
    _PACKED.clear()
    return count


def _version_key(*tensors: torch.Tensor | None) -> tuple:
    # An inference tensor (a model built or loaded under torch.inference_mode) has no version
    # counter (reading it raises); its in-place updates are caught by the fingerprint instead,
    # as those made through ``.data``.
    return tuple(
        None if t is None else (id(t), None if t.is_inference() else t._version, t.data_ptr())
        for t in tensors
    )


def _weight_probe(weight: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """``weight @ probe`` (N,): one read of the weight, a fingerprint of its values (a change
    goes unseen only if orthogonal to the fixed random probe, or below fp32 rounding)."""
    return torch.mv(weight.detach(), probe)


def _packed_weight(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    key = _version_key(weight, scale)
    hit = _PACKED.get(weight)
    if hit is not None and hit[0] == key:
        _, packed, probe, fingerprint, scale_copy = hit
        if torch.equal(_weight_probe(weight, probe), fingerprint) and (
            scale is None or torch.equal(scale, scale_copy)
        ):
            return packed
    else:
        probe = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5
    w = weight.detach() if scale is None else weight.detach() * scale.detach()[:, None]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
    scale_copy = None if scale is None else scale.detach().clone()
    _PACKED[weight] = (key, packed, probe, _weight_probe(weight, probe), scale_copy)
    return packed


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling():  # the compiler does its own fusion; keep the graph whole
        return False
    # Whoever watches or transforms the ops sees the aten linear: torch.jit.trace (it cannot
    # record the packed weight, and would freeze it), a dispatch mode (FlopCounterMode counted
    # no FLOPs for the oneDNN op), a torch.func transform (vmap over weights failed, jvp lost
    # the tangent) and forward-mode AD (the oneDNN op has no tangent formula: it came out None).
    if torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0:
        return False
    tensors = (x, weight, *(t for t in others if t is not None))
    if not all(type(t) in _PLAIN for t in tensors):  # not subclasses such as fake tensors
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.is_mkldnn for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if x.dim() < 2 or x.numel() == 0 or weight.numel() == 0:  # oneDNN refuses N = 0
        return False
    return onednn_status()[0] and not torch.is_autocast_enabled("cpu")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + scale ⊙ (x Wᵀ + b)``, or ``GELU(x Wᵀ + b)`` with ``gelu=True``.

    Args:
        x: (..., K) input.
        weight: (N, K), as ``nn.Linear.weight``.
        bias: (N,) or None.
        gelu: apply exact (erf) GELU to the output; cannot be combined with ``scale`` or
            ``residual``.
        scale: (N,) per-feature scale (layer scale γ) or None.
        residual: (..., N) tensor added to the (scaled) output, or None.

    Returns:
        (..., N) tensor. A new tensor; ``residual`` is not modified.

    Raises:
        ValueError: naming ``x``, ``weight``, ``bias``, ``scale`` or ``residual`` when its
            shape does not match the others, on every path.
    """
    if gelu and (scale is not None or residual is not None):
        raise ValueError("fused_linear: gelu=True cannot be combined with scale or residual")
    # Checked here for both paths: oneDNN reads a bias or scale as N contiguous floats (a 0-d
    # bias read past its end) and refused a mismatched shape without naming the argument.
    if weight.dim() != 2:
        raise ValueError(f"fused_linear: weight must be (N, K), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear: x must be (..., K) with K = weight.shape[1] = {weight.shape[1]}, "
            f"got shape {tuple(x.shape)}"
        )
    for name, vector in (("bias", bias), ("scale", scale)):
        if vector is not None and vector.shape != (weight.shape[0],):
            raise ValueError(
                f"fused_linear: {name} must have shape (N,) = ({weight.shape[0]},) as "
                f"weight.shape[0], got {tuple(vector.shape)}"
            )
    if residual is not None and residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"fused_linear: residual must have shape {(*x.shape[:-1], weight.shape[0])}, "
            f"got {tuple(residual.shape)}"
        )
    if _onednn_applies(x, weight, bias, scale, residual):
        packed = _packed_weight(weight, scale)
        # γ ⊙ b, as the weight; oneDNN takes a strided bias (a column view) as contiguous
        b = bias if bias is None else (bias.contiguous() if scale is None else bias * scale)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, residual.contiguous(), packed, b, "add"
            )
        return torch.ops.mkldnn._linear_pointwise(
            x, packed, b, "gelu" if gelu else "none", [], "none" if gelu else ""
        )
    y = F.linear(x, weight, bias)
    if gelu:
        # Without autograd, GELU in place: a second activation of this size (4·dim per token
        # in an MLP) would be a fresh allocation whose pages fault in on first touch.
        return torch.ops.aten.gelu_(y) if not y.requires_grad else F.gelu(y)
    return scaled_residual(y, scale, residual)


def scaled_residual(
    y: torch.Tensor, scale: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + scale ⊙ y`` in one pass (either may be None): the eager epilogue."""
    if residual is None:
        return y if scale is None else y * scale
    return residual + y if scale is None else torch.addcmul(residual, scale, y)


_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: hooks of its own or
    global ones (``torch.nn.modules.module.register_module_forward_hook`` and kin), or a
    ``forward`` set on the instance (accelerate's wrappers). A caller that would fold the
    module's work into another op (its weight into a fused GEMM, a residual into its output)
    calls it plainly then, so that the hooks run and see what they would see in the reference.
    """
    # module.__dict__, not vars(module): torch 2.8's dynamo cannot trace vars() of a module (a
    # graph break in every Block of a compiled model; 2.13's can)
    if any(getattr(module, name) for name in _CALL_HOOKS) or "forward" in module.__dict__:
        return True
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def linear_call_fusable(module: torch.nn.Module) -> bool:
    """Whether ``module(x)`` is ``F.linear(x, module.weight, module.bias)``, so that
    :func:`fused_linear` may stand in for it: an ``nn.Linear`` (or a subclass keeping its
    forward) without hooks. A module put in its place (a LoRA adapter exposing its base's
    ``weight``, a dynamically quantized Linear) or a hooked one is called instead."""
    return type(module).forward is torch.nn.Linear.forward and not has_call_hooks(module)
