"""Second audit of the ops' Python layer: ``backend="auto"`` and the packed attention's errors.

``resolve_backend`` takes ``backend="auto"`` (its error lists it among the choices) as the
automatic choice, one that overrides EEGFAST_BACKEND; the callers that decide what the
automatic choice may fall back to compared ``backend`` with None only, so ``"auto"`` behaved as
an explicit kernel choice there.
"""

import importlib

import pytest
import torch

from eegfast.ops import _backend, moe, qk_norm_attention_packed, qk_norm_attention_reference
from eegfast.ops.qk_norm_attention import qk_norm_attention

# (the module, not eegfast.ops.qk_norm_attention: the package exports the function by that name)
attention_module = importlib.import_module("eegfast.ops.qk_norm_attention")


@pytest.mark.parametrize(("backend", "env"), [("auto", None), ("auto", "cpu"), ("", None)])
def test_attention_dropout_with_the_automatic_choice_runs_the_reference(backend, env, monkeypatch):
    """dropout_p > 0 with backend="auto" raised "dropout_p > 0 is only implemented by
    backend='reference', got backend='auto'" although the automatic choice takes the reference
    for dropout (backend=None did; so did EEGFAST_BACKEND=auto). An explicit "auto" overrides
    EEGFAST_BACKEND=cpu, as it does in resolve_backend; "" is no choice, as there."""
    if env is None:
        monkeypatch.delenv("EEGFAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EEGFAST_BACKEND", env)
    q = torch.randn(2, 3, 9, 20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = qk_norm_attention(q, q, q, dropout_p=0.25, backend=backend)
    torch.manual_seed(5)
    expected = qk_norm_attention_reference(q, q, q, dropout_p=0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_attention_explicit_kernel_with_dropout_still_raises():
    q = torch.randn(1, 2, 5, 20)
    with pytest.raises(ValueError, match="got backend='cpu'"):
        qk_norm_attention(q, q, q, dropout_p=0.1, backend="cpu")


def test_attention_float64_with_backend_auto_on_a_gpu_runs_the_reference(monkeypatch):
    """float64 inputs on a GPU run the reference when the choice is automatic (the Triton
    kernels do not take them); with backend="auto" the automatic choice (Triton) raised
    TypeError "backend='auto': the Triton kernels take float32, ...". No GPU needed: the
    automatic choice is stood in for."""
    monkeypatch.setattr(attention_module, "resolve_backend", lambda *args: "triton")
    cuda = torch.device("cuda")
    for requested in (None, "auto"):
        assert attention_module._choose_backend(requested, cuda, False, True) == "reference"
    with pytest.raises(TypeError, match="backend='triton': the Triton kernels take"):
        attention_module._choose_backend("triton", cuda, False, True)


def test_moe_float64_with_backend_auto_on_a_gpu_runs_the_reference(monkeypatch):
    """As for the attention: moe_expert_ffn / moe_combine's backend with "auto" raised
    TypeError for float64 where None took the reference."""
    monkeypatch.setattr(moe, "resolve_backend", lambda *args: "triton")
    x = torch.zeros(3, 4, dtype=torch.float64)
    for requested in (None, "auto"):
        assert moe._ffn_backend(requested, x) == "reference"
    with pytest.raises(TypeError, match="backend='triton': the Triton MoE kernels take"):
        moe._ffn_backend("triton", x)


def test_automatic_gpu_candidates_with_backend_auto_or_env_auto(monkeypatch):
    """The GPU backends an op times against each other (vq_nearest) were none with
    backend="auto" or EEGFAST_BACKEND=auto, both the automatic choice in resolve_backend."""
    monkeypatch.setattr(_backend, "_triton_status", lambda: _backend.BackendStatus(True, "test"))
    cuda = torch.device("cuda")
    monkeypatch.delenv("EEGFAST_BACKEND", raising=False)
    for requested in (None, "", "auto"):
        assert _backend.automatic_gpu_candidates(requested, cuda, ("triton",)) == ("triton",)
    assert _backend.automatic_gpu_candidates("triton", cuda, ("triton",)) == ()
    assert _backend.automatic_gpu_candidates(None, torch.device("cpu"), ("triton",)) == ()
    monkeypatch.setenv("EEGFAST_BACKEND", "auto")
    assert _backend.automatic_gpu_candidates(None, cuda, ("triton",)) == ("triton",)
    monkeypatch.setenv("EEGFAST_BACKEND", "triton")
    assert _backend.automatic_gpu_candidates(None, cuda, ("triton",)) == ()
    assert _backend.automatic_gpu_candidates("auto", cuda, ("triton",)) == ("triton",)


def test_packed_attention_errors_name_qkv_and_num_heads():
    """An integer qkv was refused as "q must be float32, ...", an argument the packed form's
    caller never passed; num_heads = 0 as "qkv's last dim (60) must be 3 * num_heads * D"."""
    with pytest.raises(TypeError, match=r"^qkv must be float32, .* got torch.int64"):
        qk_norm_attention_packed(torch.ones(1, 5, 60, dtype=torch.int64), 1)
    for num_heads in (0, -2):
        with pytest.raises(ValueError, match=f"^num_heads must be >= 1, got {num_heads}"):
            qk_norm_attention_packed(torch.ones(1, 5, 60), num_heads)
