"""The Triton kernels against the oldest Triton releases the [triton] extra admits (torch 2.6
and 2.7 pin triton 3.2 and 3.3): what those releases refuse, checked without them."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from eegfast.ops import available_backends

OPS = Path(__file__).resolve().parents[2] / "eegfast" / "ops"


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("triton.jit", "jit")


def test_no_triton_kernel_chains_three_boolean_operands():
    """Triton < 3.4 refuses `A or B or C` in a kernel ("chained boolean operators are not
    supported"): the attention's backward kernels (`if HAS_PAD or CAUSAL or BLOCK_CAUSAL`) did
    not compile on a GPU with triton 3.3, while the interpreter, which does not compile, ran
    them. `(A or B) or C` compiles on every release."""
    chains = []
    for path in sorted(OPS.glob("*_triton.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef) and any(map(_is_triton_jit, node.decorator_list)):
                chains += [
                    f"{path.name}:{op.lineno} in {node.name}: {ast.unparse(op)}"
                    for op in ast.walk(node)
                    if isinstance(op, ast.BoolOp) and len(op.values) > 2
                ]
    assert not chains, chains


@pytest.mark.triton
@pytest.mark.skipif(
    not available_backends()["triton"].available,
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)
def test_autotune_looks_up_its_timer_when_it_times(monkeypatch):
    """Triton < 3.4's autotune looks up the GPU driver's timer when the kernel is decorated,
    unless given one: under TRITON_INTERPRET=1 without a GPU (triton 3.3) importing the
    attention kernels failed ("0 active drivers") and every Triton attention test with it.
    The timer passed looks the driver's up at each timing instead."""
    from eegfast.ops import qk_norm_attention_triton as ops

    asked = []

    def benchmarker(kernel_call, quantiles):
        asked.append(quantiles)
        kernel_call()
        return [1.0, 1.0, 1.0]

    captured = {}

    def autotune(**kwargs):
        captured.update(kwargs)
        return lambda fn: fn

    active = SimpleNamespace(get_benchmarker=lambda: benchmarker)
    fake = SimpleNamespace(autotune=autotune, runtime=SimpleNamespace(driver=SimpleNamespace()))
    monkeypatch.setattr(ops, "triton", fake)
    ops._keyed_autotune([], SimpleNamespace(arg_names=["N", "dq_acc_ptr"]))
    timer = captured["do_bench"]
    assert timer is not None, "triton < 3.4 would look the driver up now"
    fake.runtime.driver.active = active  # (looked up only from here on)
    ran = []
    assert timer(lambda: ran.append(1), quantiles=(0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert ran == [1] and asked == [(0.5, 0.2, 0.8)]
    timer_of_a_test = object()
    ops._keyed_autotune([], SimpleNamespace(arg_names=["N"]), do_bench=timer_of_a_test)
    assert captured["do_bench"] is timer_of_a_test and captured["restore_value"] is None
