"""Choosing between launch variants of a GPU op by timing them, once per case.

``triton.autotune`` picks block sizes among configs of one kernel. Some choices change which
kernels run (a pre-pass or not, one launch or two), so no config list can hold them; here each
variant is a Python callable, timed on the op's own inputs the first time a case is seen, and
the fastest is remembered for the process.

Under ``torch.compile`` the op's body runs on fake tensors while the graph is traced, and the
variant it takes is baked into the graph. The choice is then timed on real stand-ins of the
fake inputs (random values, same shapes, strides, dtypes and device), outside every dispatch
mode, so compiled code gets a measured variant too. Symbolic shapes cannot be stood in for:
there the first candidate (the default) is taken.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

log = logging.getLogger(__name__)

Variant = TypeVar("Variant", bound=Hashable)
# (what, case) -> the variant chosen; filled by measured_choice, read by chosen_variants.
_CHOSEN: dict[tuple[str, Hashable], Any] = {}


def time_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run()`` on the current GPU (triton's do_bench: warm-up, L2
    flushed between calls); wall-clock for CPU work (the Triton interpreter)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(run, warmup=10, rep=40, return_mode="median"))
    run()  # warm-up
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def is_traced(tensors: Sequence[object]) -> bool:
    """Whether any of ``tensors`` is fake (the op's body traced by torch.compile / export)."""
    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def has_static_shape(tensors: Sequence[object]) -> bool:
    """Whether all sizes and strides of the tensors are plain ints, not symbols (stand-ins need
    them)."""
    return all(
        all(isinstance(s, int) for s in (*t.shape, *t.stride()))
        for t in tensors
        if isinstance(t, torch.Tensor)
    )


def stand_in(x: torch.Tensor, fill: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
    """A real tensor with x's sizes, strides, dtype and device, standard-normal floats (zeros
    for other dtypes) or ``fill(out)``'s values. Call it outside the dispatch modes (as
    measured_choice's ``run`` is)."""
    out = torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device=x.device)
    if fill is not None:
        fill(out)
    elif out.is_floating_point():
        out.normal_()
    else:
        out.zero_()
    return out


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def measured_choice(
    what: str,
    case: Hashable,
    candidates: Sequence[Variant],
    make_run: Callable[[], Callable[[Variant], object]],
    *,
    measure: bool,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> Variant:
    """The fastest of ``candidates`` for ``case`` of ``what``, remembered for the process.

    The first time a case is seen, ``make_run()`` gives ``run`` (it prepares inputs: stand-ins
    while tracing) and ``timer`` (default :func:`time_ms`) times ``run(variant)`` for each
    candidate; both outside every dispatch mode, under no_grad. A single candidate, or
    ``measure`` False (nothing can be timed: the interpreter, symbolic shapes), gives
    ``candidates[0]`` without remembering it; so does a call while a CUDA graph is being
    captured (timing would synchronise the stream). A candidate whose timing raises (out of
    memory, out of shared memory, say) is left out, with a warning naming the error: the
    fastest of the others is remembered, or ``candidates[0]`` when none ran, and the call itself
    then runs that variant (and raises if the failure was not the timing's)."""
    if not candidates:
        raise ValueError(f"{what}: no variant to choose from")
    if len(candidates) == 1:
        return candidates[0]
    chosen = _CHOSEN.get((what, case))
    if chosen is not None:
        return chosen
    if not measure or _capturing_cuda_graph():
        return candidates[0]
    timer = timer or time_ms
    times: dict[Variant, float] = {}
    failures: dict[Variant, BaseException] = {}
    try:
        with _disable_current_modes(), torch.no_grad():
            run = make_run()
            for variant in candidates:
                try:
                    times[variant] = timer(lambda variant=variant: run(variant))
                except Exception as error:  # noqa: BLE001 - the others may still run
                    failures[variant] = error
    except Exception as error:  # noqa: BLE001 - a failed timing must not fail the call
        failures = {variant: error for variant in candidates if variant not in times}
    usable = [variant for variant in candidates if variant in times]
    chosen = min(usable, key=times.__getitem__) if usable else candidates[0]
    if failures:
        details = "; ".join(f"{v}: {type(e).__name__}: {e}" for v, e in failures.items())
        warnings.warn(
            f"{what}: timing the variants {[str(v) for v in failures]} failed ({details}); "
            f"using {chosen}",
            RuntimeWarning,
            stacklevel=2,
        )
    _CHOSEN[(what, case)] = chosen
    if not usable:
        return chosen
    log.info(
        "%s %s: %s (%s)",
        what,
        case,
        chosen,
        ", ".join(f"{variant}: {ms:.4f} ms" for variant, ms in times.items()),
    )
    return chosen


def chosen_variants(what: str | None = None) -> dict[tuple[str, Hashable], Any]:
    """The variants chosen so far in this process ({(what, case): variant}), all or ``what``'s."""
    return {key: v for key, v in _CHOSEN.items() if what is None or key[0] == what}


def forget_choices(what: str | None = None) -> None:
    """Drop the remembered choices (all, or ``what``'s): the next call of each case times again."""
    for key in [key for key in _CHOSEN if what is None or key[0] == what]:
        del _CHOSEN[key]
