"""Start-up cost and optional dependencies: what `import eegfast.<layer>` and a command's
`--help` pull in, TRITON_INTERPRET set after `import eegfast`, a missing triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eegfast.ops import _backend
from eegfast.ops._backend import assume_constant_result, compiler_disable

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = _backend._triton_status().reason.startswith("triton ")  # installed, usable or not


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter in the checkout, without the suite's
    TRITON_INTERPRET (conftest.py sets it before anything imports triton)."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True
    )


def _modules_after(statement: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are in sys.modules after ``statement`` in a fresh interpreter."""
    found = f"[n for n in {names!r} if n in sys.modules]"
    code = f"import json, sys\n{statement}\nprint(json.dumps({found}))"
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow  # a fresh Python importing torch
def test_importing_models_imports_neither_dynamo_nor_triton_nor_the_data_stack():
    """torch.compiler.assume_constant_result / disable on module-level functions imported
    torch._dynamo at `import eegfast.ops` (and so eegfast.nn, eegfast.models): about a second
    for every model user, and triton with it."""
    heavy = (
        "torch._dynamo",
        "triton",
        "mne",
        "sklearn",
        "scipy",
        "pandas",
        "matplotlib",
        "tensorboard",
        "torch.utils.tensorboard",
        "safetensors",
        "eegfast.train",
        "eegfast.data",
    )
    assert _modules_after("import eegfast.models", heavy) == []


@pytest.mark.slow  # a fresh Python importing torch, a Triton kernel under the interpreter
@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU path")
def test_triton_interpret_set_after_importing_eegfast_runs_the_kernels():
    """TRITON_INTERPRET=1 must be set before triton is imported (triton.language's own @jit
    helpers, tl.zeros and the like, are made compiled or interpreted then): since
    `import eegfast.nn` imported triton, a user setting it afterwards got
    InterpreterError("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    code = (
        "import os, torch\n"
        "import eegfast.nn\n"
        "from eegfast.ops import vq_nearest\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "z, codes = torch.randn(9, 8, generator=g), torch.randn(5, 8, generator=g)\n"
        "got = vq_nearest(z, codes, backend='triton')\n"
        "assert torch.equal(got, vq_nearest(z, codes, backend='reference')), got\n"
        "print('ok')\n"
    )
    done = _fresh_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_assume_constant_result_sets_the_mark_of_torchs_decorator():
    """The mark is set without torch's decorator (which imports torch._dynamo): it must still
    be the one torch's sets, or Dynamo would trace the backend choice instead of folding it."""

    def ours() -> int:
        return 0

    def theirs() -> int:
        return 0

    assert assume_constant_result(ours) is ours
    assert vars(ours) == vars(torch.compiler.assume_constant_result(theirs))
    assert vars(_backend.resolve_backend) == vars(ours)


def test_compiler_disable_runs_the_function_eagerly_inside_a_compiled_one():
    """compiler_disable defers torch._dynamo's import to the first call; under torch.compile
    the function (and what it calls) must still run outside the graph, as with
    torch.compiler.disable."""
    seen: list[bool] = []

    def inner(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.compiler.is_compiling())
        return x + 1

    @compiler_disable
    def disabled(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.compiler.is_compiling())
        return inner(x)

    compiled = torch.compile(lambda x: disabled(x * 2) * 3, backend="eager")
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 9.0))
    assert seen == [False, False]


@pytest.mark.slow  # a fresh Python
def test_a_commands_help_does_not_import_torch_through_the_train_package():
    """Every command module lives under eegfast.train, whose __init__ imported the training
    loop (torch, safetensors): `eegfast doctor --help` took seconds before printing a line."""
    statement = (
        "import contextlib, io\n"
        "from eegfast import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    cli.main(['doctor', '--help'])\n"
        "assert 'usage: eegfast doctor' in out.getvalue()"
    )
    assert _modules_after(statement, ("torch", "safetensors", "eegfast.train.engine")) == []


def test_the_train_package_still_exports_its_names():
    import eegfast.train as train
    from eegfast.train import engine, objectives
    from eegfast.train.config import RunConfig

    assert train.fit is engine.fit and train.RunConfig is RunConfig
    assert train.register_objective is objectives.register_objective
    assert set(train.__all__) <= set(dir(train))
    for name in train.__all__:
        assert getattr(train, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        train.nope  # noqa: B018


@pytest.mark.slow  # a fresh Python importing torch
def test_training_commands_do_not_import_scikit_learn_or_scipy_at_start_up():
    """eegfast.train.metrics and .baseline imported scikit-learn and scipy.signal at module
    level (~1 s more), for `finetune|evaluate|predict|tokenizer|quickstart --help` too."""
    statement = "import eegfast.train.commands.finetune, eegfast.train.commands.evaluate"
    assert _modules_after(statement, ("sklearn", "scipy")) == []


@pytest.fixture
def no_triton(monkeypatch):
    """triton made unimportable, the cached status forgotten before and after."""
    monkeypatch.setitem(sys.modules, "triton", None)
    _backend._triton_status.cache_clear()
    yield
    _backend._triton_status.cache_clear()


def test_a_missing_triton_says_how_to_install_it(no_triton):
    """A missing triton was reported as "triton is not installed (import of triton halted;
    None in sys.modules)": it names the package, not the pip command or eegfast's extra."""
    from eegfast.ops import available_backends, vq_nearest

    status = available_backends()["triton"]
    assert not status.available
    assert "pip install triton" in status.reason and "[triton] extra" in status.reason
    with pytest.raises(RuntimeError, match=r"backend='triton'.*pip install triton"):
        vq_nearest(torch.zeros(2, 4), torch.ones(3, 4), backend="triton")


@pytest.mark.slow  # a fresh Python importing torch
def test_a_compiler_disabled_function_called_eagerly_imports_no_dynamo():
    """torch._disable_dynamo imported torch._dynamo (and triton's native libraries) at the
    first call: inside a gloo process group's run (the quantizer's k-means init), a process
    then sometimes aborted at exit ("terminate called without an active exception"). Called
    while nothing compiles, a compiler_disable'd function runs without that import."""
    code = (
        "import sys, torch\n"
        "from eegfast.ops._backend import compiler_disable\n"
        "f = compiler_disable(lambda x: x + 1)\n"
        "assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = _fresh_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
