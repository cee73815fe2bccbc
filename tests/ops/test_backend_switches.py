"""eegfast.ops._backend: environment switches (EEGFAST_REQUIRE_EXT, EEGFAST_TRITON_PRENORM, ...),
the device guard of the Triton launches and the vector factor of their sizes and strides."""

import pytest

from eegfast.ops._backend import env_switch, vector_align


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), (" On ", True), ("YES", True), ("0", False), ("off", False),
     ("False", False), ("no", False), ("", None), (None, None)],
)  # fmt: skip
def test_env_switch_reads_on_and_off_words(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("EEGFAST_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("EEGFAST_TEST_SWITCH", value)
    for default in (False, True):
        want = default if expected is None else expected
        assert env_switch("EEGFAST_TEST_SWITCH", default) is want


def test_env_switch_rejects_other_values_by_name(monkeypatch):
    monkeypatch.setenv("EEGFAST_TEST_SWITCH", "enabled")
    with pytest.raises(ValueError, match="EEGFAST_TEST_SWITCH='enabled' is not a switch"):
        env_switch("EEGFAST_TEST_SWITCH", True)


def test_launch_device_makes_the_tensors_gpu_current():
    """Triton launches on the current device: the ops enter launch_device(input) around their
    launches, which selects the input's GPU (a no-op on CPU). Constructing the context does not
    touch CUDA, so this runs without a GPU."""
    import contextlib
    from types import SimpleNamespace

    import torch

    from eegfast.ops._backend import launch_device

    assert isinstance(launch_device(torch.zeros(1)), contextlib.nullcontext)
    guard = launch_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [((200, 800, 160000), 8), ((20, 200, 5140), 4), ((6, 10), 2), ((25, 200), 1), ((7,), 1),
     ((0, 16), 8), ((2**31 + 8, 8), 1), ((2**31 - 8, 8), 8)],
)  # fmt: skip
def test_vector_align_is_the_largest_shared_power_of_two_up_to_8(values, expected):
    """Kernels multiply the divided values back inside, so every value must divide exactly;
    past int32 a divided value could arrive as int32 and the product overflow: no factor."""
    assert vector_align(*values) == expected
    assert all(v % vector_align(*values) == 0 for v in values)


def test_require_ext_is_checked_when_the_extension_loads_too(monkeypatch):
    """A value that is not a switch was reported only when the extension was missing; with it
    built, EEGFAST_REQUIRE_EXT=maybe passed silently."""
    from eegfast.ops import _backend

    monkeypatch.setenv("EEGFAST_REQUIRE_EXT", "maybe")
    _backend._load_extension.cache_clear()
    try:
        with pytest.raises(ValueError, match="EEGFAST_REQUIRE_EXT='maybe' is not a switch"):
            _backend.extension()
    finally:
        monkeypatch.delenv("EEGFAST_REQUIRE_EXT")
        _backend._load_extension.cache_clear()
    assert _backend.extension() is not None


def test_backend_errors_name_the_environment_variable_that_chose_it(monkeypatch):
    """With EEGFAST_BACKEND choosing a backend that cannot run, the errors said
    "backend='triton' is not available" (or "backend='cuda': ..."), naming an argument the
    caller never passed; they name the variable, and the argument when it was passed."""
    from types import SimpleNamespace

    import torch

    from eegfast.ops import _backend

    monkeypatch.setattr(_backend, "_triton_status", lambda: _backend.BackendStatus(False, "test"))
    no_cuda_kernels = SimpleNamespace(build_info=lambda: {"cuda": False})
    monkeypatch.setattr(_backend, "extension", lambda: no_cuda_kernels)
    cases = [("triton", "cpu", " is not available: test"),
             ("cuda", "cuda", ": eegfast._C was built without CUDA kernels")]  # fmt: skip
    for name, device, reason in cases:
        monkeypatch.setenv("EEGFAST_BACKEND", name)
        with pytest.raises(RuntimeError, match=f"^EEGFAST_BACKEND='{name}'{reason}"):
            _backend.resolve_backend(None, torch.device(device), ("triton",))
        monkeypatch.delenv("EEGFAST_BACKEND")
        with pytest.raises(RuntimeError, match=f"^backend='{name}'{reason}"):
            _backend.resolve_backend(name, torch.device(device), ("triton",))
    monkeypatch.setattr(_backend, "_triton_status", lambda: _backend.BackendStatus(True, "test"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("EEGFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="^EEGFAST_BACKEND='triton' on CPU tensors needs"):
        _backend.resolve_backend(None, torch.device("cpu"), ("triton",))


@pytest.mark.triton
def test_wrap_triton_passes_interpreted_kernels_through():
    """Under TRITON_INTERPRET=1 ``@triton.jit`` gives an InterpretedFunction, which torch's
    wrap_triton refused before torch 2.13 ("wrap_triton only works on functions annotated with
    triton.jit"): every Triton op failed on the CPU under torch 2.6 and 2.11. eegfast's
    wrap_triton returns such a kernel, bare or under heuristics, to launch eagerly, as torch
    2.13 does; others go to torch's."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from eegfast.ops._backend import wrap_triton

    def body(x_ptr, BLOCK):
        pass

    kernel = InterpretedFunction(body)
    assert wrap_triton(kernel) is kernel
    tuned = triton.heuristics({"BLOCK": lambda args: 16})(kernel)
    assert wrap_triton(tuned) is tuned
    with pytest.raises(RuntimeError, match="wrap_triton only works on"):
        wrap_triton(body)
