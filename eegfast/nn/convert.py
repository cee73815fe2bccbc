"""Swap the q/k-LayerNorm attention layers of other codebases for eegfast's fused kernel.

:func:`convert` walks any ``nn.Module`` and replaces, in place, the attention modules it
recognises by their attributes (no import of the other codebase is needed):

- reference-LaBraM / BEiT style: ``qkv`` Linear without bias, ``q_bias`` / ``v_bias``
  parameters (or None; keys get no bias), ``q_norm`` / ``k_norm`` LayerNorm(head_dim),
  ``attn_drop``, ``proj``, ``proj_drop``, ``num_heads``, ``scale``;
- timm's ``Attention`` (``timm.layers.Attention``, used by ``VisionTransformer``) built with
  ``qk_norm=True``: the same fields with an optional ``qkv`` bias, plus ``norm``
  (``scale_norm``) and ``gate`` when present.

The replacement adopts the original's parameters, buffers and submodules as they are (the same
objects, in the same order), so state-dict keys and values, devices, dtypes, optimizer
references and the training flag are unchanged and the state dict still loads into the
original architecture. Its ``forward`` keeps the original's calling convention; calls the fused
kernel cannot serve (an explicit ``attn_mask``, ``rel_pos_bias``, ``return_attention``, attention
dropout in training mode) run the same math in plain PyTorch instead of failing. The
replacements work with torch.compile, torch.export and torch.jit.trace, not torch.jit.script.

A module is left alone, with the reason in :func:`convert_report`, when it cannot be converted
safely: no q/k norm, a norm other than LayerNorm, attention dropout while training, forward
arguments or submodules the replacement does not know, a qkv that is not an ``nn.Linear`` (an
adapter around it), hooks (or a ``forward`` set on the instance), or (``verify=True``, the default)
outputs that differ from the original's on a small random input.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn.attention import labram_qkv_bias
from eegfast.ops import BACKENDS, qk_norm_attention_packed
from eegfast.ops.qk_norm_attention import MAX_HEAD_DIM

# Forward arguments (after the input) each replacement accepts; a module whose forward takes
# anything else is left alone, since dropping an argument would change its outputs.
_TIMM_FORWARD_ARGS = frozenset({"attn_mask", "is_causal"})
_LABRAM_FORWARD_ARGS = frozenset({"rel_pos_bias", "return_attention", "return_qkv"})
_TIMM_CHILDREN = frozenset({"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj",
                            "proj_drop"})  # fmt: skip
_LABRAM_CHILDREN = frozenset({"qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"})
# LaBraM's relative-position fields exist but are None unless a window size is set.
_LABRAM_NONE_ONLY = frozenset({"relative_position_bias_table", "relative_position_index"})
# LayerNorm subclasses whose forward is plain layer_norm (timm's only adds a fast-path switch).
_LAYER_NORM_CLASSES = frozenset({"torch.nn.modules.normalization.LayerNorm",
                                 "timm.layers.norm.LayerNorm"})  # fmt: skip


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_report` replaced (or would replace, with ``dry_run``) and what not.

    converted: qualified module names, in traversal order.
    skipped: (qualified name, reason) of attention-like modules left alone.
    """

    converted: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would convert" if self.dry_run else "converted"
        lines = [f"{verb} {len(self.converted)} attention module(s), left {len(self.skipped)}"]
        lines += [f"  {verb}: {name}" for name in self.converted]
        lines += [f"  left alone: {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def convert(model: nn.Module, *, backend: str | None = None, verify: bool = True) -> int:
    """Replace, in place, the q/k-LayerNorm attention modules of ``model`` by fused ones.

    Args:
        model: any module; its attention submodules are replaced where they sit.
        backend: backend of :func:`eegfast.ops.qk_norm_attention_packed` used by the
            replacements (None = automatic by device).
        verify: compare each replacement with the original on a small random input (eval
            mode, no grad, autocast off) before swapping it in, and leave the module alone if
            they differ. Modules on the meta device cannot run: only the structural checks
            apply to them.

    Returns:
        The number of modules replaced. :func:`convert_report` lists them and, for modules
        that were left alone, why.

    Example::

        model = timm.create_model("vit_small_patch16_224", qk_norm=True)
        assert eegfast.nn.convert(model) == len(model.blocks)
    """
    return len(convert_report(model, backend=backend, verify=verify).converted)


def convert_report(
    model: nn.Module,
    *,
    backend: str | None = None,
    verify: bool = True,
    dry_run: bool = False,
) -> ConversionReport:
    """:func:`convert`, returning which modules were replaced and why others were not.

    With ``dry_run=True`` nothing is replaced (verification still runs); the report says what
    :func:`convert` would do.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    converted: list[str] = []
    skipped: list[tuple[str, str]] = []
    if _attention_style(model) is not None:
        skipped.append(
            ("", "the root module cannot be replaced in place; convert the model that holds it")
        )
    # One decision per module object, so a module shared by two parents is converted once.
    decided: dict[int, nn.Module | None] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            if id(child) not in decided:
                style = _attention_style(child)
                if style is None:
                    decided[id(child)] = None
                    visit(child, qualified)
                    continue
                replacement, reason = _build_replacement(child, style, backend, verify)
                decided[id(child)] = replacement
                if replacement is None:
                    skipped.append((qualified, reason))
                else:
                    converted.append(qualified)
            replacement = decided[id(child)]
            if replacement is not None and not dry_run:
                parent._modules[name] = replacement

    visit(model, "")
    return ConversionReport(tuple(converted), tuple(skipped), dry_run)


# --------------------------------------------------------------------------------------------
# Recognition.
# --------------------------------------------------------------------------------------------


def _attention_style(module: nn.Module) -> str | None:
    """ "labram", "timm" or None (not a qkv/proj self-attention module, or one of ours)."""
    if type(module).__module__.startswith("eegfast."):
        return None  # eegfast's own layers are already fused
    # Any module as qkv, so that one wrapped after the fact (a LoRA adapter) is reported as
    # left alone with its reason rather than not at all.
    if not isinstance(getattr(module, "qkv", None), nn.Module):
        return None
    if not hasattr(module, "proj") or not hasattr(module, "num_heads"):
        return None
    return "labram" if hasattr(module, "q_bias") else "timm"


def _is_layer_norm(module: object) -> bool:
    cls = type(module)
    return isinstance(module, nn.LayerNorm) and f"{cls.__module__}.{cls.__qualname__}" in (
        _LAYER_NORM_CLASSES
    )


# Hook registries of a module. The replacement is a new module object, so it would drop every
# hook of the original; the q/k norms and attention dropout it adopts keep their state-dict
# hooks but are bypassed by the fused kernel, so their forward and backward hooks would not run.
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")  # fmt: skip
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")  # fmt: skip


def _hook_kinds(module: nn.Module, registries: tuple[str, ...]) -> list[str]:
    """Names (without the leading underscore) of the non-empty hook registries of module, and
    "forward replaced on the instance" where it has one: wrappers such as accelerate's hooks
    set ``module.forward``, which ``module(x)`` then runs instead of the class's forward."""
    kinds = [name[1:] for name in registries if getattr(module, name, None)]
    if "forward" in vars(module):
        kinds.append("forward replaced on the instance")
    return kinds


def _why_not_convertible(module: nn.Module, style: str) -> str | None:
    """The reason the module cannot be fused, or None if it can."""
    if "_orig_mod" in module._modules:
        # torch.compile's wrapper calls the module it was built around, whatever _modules holds.
        return "it is wrapped by torch.compile; convert the model before compiling it"
    hooks = _hook_kinds(module, _CALL_HOOKS + _STATE_DICT_HOOKS)
    if hooks:
        return f"it has hooks ({', '.join(hooks)}), which a replacement would drop"
    allowed_args = _TIMM_FORWARD_ARGS if style == "timm" else _LABRAM_FORWARD_ARGS
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # no self
    if not params:
        return "its forward takes no input"
    for param in params[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            return f"its forward takes *{param.name} / **{param.name}, which may change outputs"
        if param.name not in allowed_args:
            return f"its forward takes {param.name!r}, which the fused replacement cannot honour"

    if not isinstance(module.qkv, nn.Linear):
        return (
            f"qkv is {type(module.qkv).__name__}, not an nn.Linear (convert before wrapping qkv "
            "in an adapter such as LoRA)"
        )

    allowed_children = _TIMM_CHILDREN if style == "timm" else _LABRAM_CHILDREN
    unknown = [n for n, m in module._modules.items() if m is not None and n not in allowed_children]
    if style == "labram":
        allowed_params = {"q_bias", "v_bias"}
        unknown += [
            n
            for n, p in module._parameters.items()
            if n not in allowed_params and not (p is None and n in _LABRAM_NONE_ONLY)
        ]
    else:
        unknown += [n for n, p in module._parameters.items() if p is not None]
    unknown += [n for n, b in module._buffers.items() if b is not None]
    for name in _LABRAM_NONE_ONLY:
        if getattr(module, name, None) is not None and name not in unknown:
            unknown.append(name)
    if unknown:
        return f"it has parts the fused replacement does not know: {', '.join(unknown)}"

    qkv = module.qkv
    num_heads = module.num_heads
    if not isinstance(num_heads, int) or num_heads <= 0:
        return f"num_heads must be a positive int, got {num_heads!r}"
    if qkv.out_features % (3 * num_heads) != 0:
        return f"qkv.out_features ({qkv.out_features}) is not 3 * num_heads * head_dim"
    head_dim = qkv.out_features // (3 * num_heads)
    if getattr(module, "head_dim", head_dim) != head_dim:
        return f"head_dim ({module.head_dim}) does not match qkv ({head_dim} per head)"
    if head_dim > MAX_HEAD_DIM:  # checked here too: verification cannot run on meta tensors
        return f"head dim {head_dim} is above the fused kernel's maximum ({MAX_HEAD_DIM})"
    if style == "labram":
        if qkv.bias is not None:
            return "qkv has a Linear bias as well as q_bias/v_bias"
        if (module.q_bias is None) != (getattr(module, "v_bias", None) is None):
            return "only one of q_bias and v_bias is set"
        for name in ("q_bias", "v_bias"):
            bias = getattr(module, name)
            if bias is not None and tuple(bias.shape) != (num_heads * head_dim,):
                return f"{name} has shape {tuple(bias.shape)}, expected ({num_heads * head_dim},)"

    norms = (module.q_norm if hasattr(module, "q_norm") else None,
             module.k_norm if hasattr(module, "k_norm") else None)  # fmt: skip
    for name, norm in zip(("q_norm", "k_norm"), norms, strict=True):
        if norm is None or isinstance(norm, nn.Identity):
            return f"qk_norm is off ({name} is {type(norm).__name__}); nothing to fuse"
        if not _is_layer_norm(norm):
            return f"{name} is {type(norm).__name__}; the fused kernel implements LayerNorm only"
        if tuple(norm.normalized_shape) != (head_dim,):
            return f"{name} normalises {tuple(norm.normalized_shape)}, not the head dim {head_dim}"
        hooks = _hook_kinds(norm, _CALL_HOOKS)
        if hooks:
            return f"{name} has hooks ({', '.join(hooks)}), which the fused kernel would bypass"
    if norms[0].eps != norms[1].eps:
        return f"q_norm.eps ({norms[0].eps}) and k_norm.eps ({norms[1].eps}) differ"
    if not isinstance(getattr(module, "attn_drop", None), nn.Dropout | nn.Identity):
        return "attn_drop is not an nn.Dropout"
    hooks = _hook_kinds(module.attn_drop, _CALL_HOOKS)
    if hooks:
        return f"attn_drop has hooks ({', '.join(hooks)}), which the fused kernel would bypass"
    if module.training and _dropout_p(module) > 0:
        return (
            f"attn_drop.p={_dropout_p(module)} in training mode: the fused kernel has no "
            "attention dropout (call model.eval() first, or set the dropout to 0)"
        )
    scale = getattr(module, "scale", head_dim**-0.5)
    if not isinstance(scale, float | int):
        return f"scale must be a number, got {type(scale).__name__}"
    return None


def _dropout_p(module: nn.Module) -> float:
    attn_drop = getattr(module, "attn_drop", None)
    return float(attn_drop.p) if isinstance(attn_drop, nn.Dropout) else 0.0


def _build_replacement(
    module: nn.Module, style: str, backend: str | None, verify: bool
) -> tuple[nn.Module | None, str]:
    reason = _why_not_convertible(module, style)
    if reason is not None:
        return None, reason
    cls = FusedTimmAttention if style == "timm" else FusedLabramAttention
    replacement = cls(module, backend=backend)
    if verify:
        reason = _verify(module, replacement)
        if reason is not None:
            return None, reason
    return replacement, ""


@torch.no_grad()
def _verify(original: nn.Module, replacement: nn.Module) -> str | None:
    """Compare both modules on a small random input in eval mode; the reason if they differ."""
    weight = original.qkv.weight
    if weight.device.type == "meta":
        return None  # nothing to compute with; the structural checks stand alone
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, 7, original.qkv.in_features, generator=gen, device=weight.device)
    x = x.to(weight.dtype)
    modes = {m: m.training for m in original.modules()}
    modes[replacement] = replacement.training
    try:
        original.eval()
        replacement.eval()
        # In the weights' own dtype whatever autocast region convert is called from: under
        # autocast both ran in bf16/fp16, their difference was held to the fp32 tolerance, and
        # every module was left alone with "outputs differ".
        with torch.autocast(weight.device.type, enabled=False):
            expected = original(x)
            got = replacement(x)
    except Exception as error:  # noqa: BLE001 - any failure means: do not convert
        return f"verification run failed: {type(error).__name__}: {error}"
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "verification: the original does not return one tensor of the replacement's shape"
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = (expected.float() - got.float()).abs().max().item()
    bound = tol * max(1.0, expected.float().abs().max().item())
    if not math.isfinite(err) or err > bound:
        return f"verification: outputs differ from the original (max abs error {err:.3g})"
    return None


# --------------------------------------------------------------------------------------------
# Replacements.
# --------------------------------------------------------------------------------------------


class _FusedQKNormAttention(nn.Module):
    """Adopts an attention module's parameters, buffers and submodules (same objects, same
    names and order) and its plain attributes; subclasses provide the original's forward."""

    def __init__(self, original: nn.Module, *, backend: str | None = None) -> None:
        super().__init__()
        for name, value in vars(original).items():
            if not name.startswith("_") and name != "training" and _is_plain(value):
                setattr(self, name, value)
        for name, param in original._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in original._buffers.items():
            persistent = name not in original._non_persistent_buffers_set
            self.register_buffer(name, buffer, persistent=persistent)
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.training = original.training  # not .train(): children keep their own flags
        self.num_heads = original.num_heads
        self.head_dim = original.qkv.out_features // (3 * original.num_heads)
        self.scale = float(getattr(original, "scale", self.head_dim**-0.5))
        self.backend = backend
        self.original_class = f"{type(original).__module__}.{type(original).__qualname__}"
        # The original's positional order of its extra forward arguments (braindecode's LaBraM
        # takes (x, return_attention, return_qkv), the reference (x, rel_pos_bias, ...)), so
        # that a positional call means what it meant to the original.
        params = list(inspect.signature(type(original).forward).parameters.values())[2:]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.forward_args = tuple(p.name for p in params if p.kind in positional)

    # The keyword arguments of _attend (after the input), which forward accepts by name.
    _ARGS: tuple[str, ...] = ()

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling; without it the
        # failure is TorchScript's complaint about forward's *args, which says nothing of why.
        raise RuntimeError(
            f"the converted {self.original_class} cannot be compiled by torch.jit.script (its "
            "forward and the fused kernel's dispatch are Python); use torch.export, torch.compile "
            "or torch.jit.trace, or script the model before eegfast.nn.convert"
        )

    def extra_repr(self) -> str:
        return (
            f"from={self.original_class}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"backend={self.backend}"
        )

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        """The original's forward: further arguments by name, or positionally in the order
        the original's forward takes them (``forward_args``)."""
        if len(args) > len(self.forward_args):
            raise TypeError(
                f"forward of the converted {self.original_class} takes at most "
                f"{len(self.forward_args)} positional argument(s) after the input "
                f"{self.forward_args}, got {len(args)}"
            )
        bound = dict(zip(self.forward_args, args, strict=False))
        for name, value in kwargs.items():
            if name not in self._ARGS:
                raise TypeError(
                    f"forward of the converted {self.original_class} got an unexpected keyword "
                    f"argument {name!r} (it takes {self._ARGS})"
                )
            if name in bound:
                raise TypeError(
                    f"forward of the converted {self.original_class} got multiple values for "
                    f"argument {name!r}"
                )
            bound[name] = value
        return self._attend(x, **bound)

    def _attend(self, x: torch.Tensor, **kwargs: object) -> object:
        raise NotImplementedError

    def _qkv_bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def _attention_dropout(self) -> float:
        return _dropout_p(self) if self.training else 0.0

    def _fused(self, qkv: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """(B, N, 3·H·D) -> (B, N, H·D) through the fused kernel."""
        return qk_norm_attention_packed(
            qkv,
            self.num_heads,
            self.q_norm.weight,
            self.q_norm.bias,
            self.k_norm.weight,
            self.k_norm.bias,
            eps=self.q_norm.eps,
            scale=self.scale,
            causal=causal,
            backend=self.backend,
        )

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3·H·D) -> normalised q, k and v, each (B, H, N, D)."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v


class FusedTimmAttention(_FusedQKNormAttention):
    """timm ``Attention`` (qk_norm=True) on the fused kernel; made by :func:`convert`.

    ``forward(x (B, N, C), attn_mask=None, is_causal=False) -> (B, N, C_out)`` as timm's
    (positional arguments in the original's order).
    """

    _ARGS = ("attn_mask", "is_causal")

    def _attend(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x)
        dropout_p = self._attention_dropout()
        if attn_mask is None and dropout_p == 0.0:
            out = self._fused(qkv, causal=is_causal)
        else:  # timm's own (SDPA) path: masks and dropout the kernel does not take
            q, k, v = self._split_heads(qkv)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.scale,
            )  # fmt: skip
            out = out.transpose(1, 2).reshape(B, N, -1)
        norm = getattr(self, "norm", None)
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class FusedLabramAttention(_FusedQKNormAttention):
    """Reference-LaBraM attention (q_bias / v_bias, q/k LayerNorm) on the fused kernel; made by
    :func:`convert`.

    ``forward(x (B, N, C), rel_pos_bias=None, return_attention=False, return_qkv=False) ->
    (B, N, C)``, positional arguments in the original's order (braindecode's ``Labram`` has no
    ``rel_pos_bias``: ``(x, return_attention, return_qkv)``). With ``rel_pos_bias`` ((H, N, N)
    or broadcastable, added to the scaled scores) or ``return_attention`` (returns the softmax
    probabilities (B, H, N, N), after attention dropout as the reference) the same math runs in
    plain PyTorch. ``return_qkv=True`` returns ``(out, qkv)`` with qkv the projection before the
    q/k norms, (3, B, H, N, D), as the reference.
    """

    _ARGS = ("rel_pos_bias", "return_attention", "return_qkv")

    def _qkv_bias(self) -> torch.Tensor | None:
        return labram_qkv_bias(self.q_bias, self.v_bias)

    def _attend(
        self,
        x: torch.Tensor,
        rel_pos_bias: torch.Tensor | None = None,
        return_attention: bool = False,
        return_qkv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        if rel_pos_bias is None and not return_attention and self._attention_dropout() == 0.0:
            out = self._fused(qkv)
        else:
            q, k, v = self._split_heads(qkv)
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if rel_pos_bias is not None:
                scores = scores + rel_pos_bias
            probs = self.attn_drop(scores.softmax(dim=-1))
            if return_attention:
                return probs
            out = (probs @ v).transpose(1, 2).reshape(B, N, -1)
        out = self.proj_drop(self.proj(out))
        if return_qkv:
            return out, qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return out


def _is_plain(value: object) -> bool:
    if isinstance(value, bool | int | float | str) or value is None:
        return True
    return isinstance(value, tuple) and all(_is_plain(v) for v in value)
