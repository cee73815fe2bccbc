"""eegfast.ops._variants: timing launch variants once per case, on stand-ins while tracing."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from eegfast.ops import _variants


@pytest.fixture(autouse=True)
def no_remembered_choices(monkeypatch):
    monkeypatch.setattr(_variants, "_CHOSEN", {})


def timer_from(times: dict):
    """A timer that runs the call once and reports the time of the variant it ran."""
    ran = []

    def timer(call):
        ran.append(call())
        return times[ran[-1]]

    return timer, ran


def test_fastest_variant_is_timed_once_per_case():
    timer, ran = timer_from({"a": 3.0, "b": 1.0, "c": 2.0})
    made = []

    def make_run():
        made.append(1)
        return lambda variant: variant

    def choose(case):
        return _variants.measured_choice("op", case, ["a", "b", "c"], make_run, measure=True,
                                         timer=timer)  # fmt: skip

    assert choose(1) == "b" and ran == ["a", "b", "c"] and made == [1]
    assert choose(1) == "b" and ran == ["a", "b", "c"]  # remembered: not timed again
    assert choose(2) == "b" and len(ran) == 6  # a new case is timed
    assert _variants.chosen_variants("op") == {("op", 1): "b", ("op", 2): "b"}
    assert _variants.chosen_variants("other") == {}
    _variants.forget_choices("op")
    assert _variants.chosen_variants() == {}


def test_single_candidate_or_no_measuring_takes_the_first_without_timing(monkeypatch):
    def never(call):
        raise AssertionError("timed")

    args = dict(make_run=lambda: lambda v: v, timer=never)
    assert _variants.measured_choice("op", 0, ["only"], measure=True, **args) == "only"
    assert _variants.measured_choice("op", 0, ["a", "b"], measure=False, **args) == "a"
    assert _variants.chosen_variants() == {}  # the default is not remembered: timed later
    with monkeypatch.context() as patch:
        patch.setattr(_variants, "_capturing_cuda_graph", lambda: True)
        assert _variants.measured_choice("op", 0, ["a", "b"], measure=True, **args) == "a"
    assert _variants.chosen_variants() == {}
    with pytest.raises(ValueError, match="op: no variant"):
        _variants.measured_choice("op", 0, [], measure=True, **args)


def test_failed_timing_warns_and_keeps_the_first():
    def out_of_memory(call):
        raise torch.OutOfMemoryError("no room for the second variant")

    with pytest.warns(RuntimeWarning, match="op: timing the variants.*no room.*using a"):
        got = _variants.measured_choice("op", 0, ["a", "b"], lambda: lambda v: v, measure=True,
                                        timer=out_of_memory)  # fmt: skip
    assert got == "a" and _variants.chosen_variants() == {("op", 0): "a"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert _variants.measured_choice("op", 0, ["a", "b"], lambda: None, measure=True) == "a"


def test_a_variant_whose_timing_fails_is_left_out():
    """A variant that cannot run (a Triton config past the GPU's shared memory, say) is not
    chosen when another one ran, however fast its failure; the warning names it."""

    def timer(call):
        if call() == "a":
            raise RuntimeError("out of resources: shared memory")
        return 5.0

    with pytest.warns(
        RuntimeWarning, match=r"op: timing the variants \['a'\].*shared memory.*using b"
    ):
        got = _variants.measured_choice("op", 1, ["a", "b"], lambda: lambda v: v, measure=True,
                                        timer=timer)  # fmt: skip
    assert got == "b" and _variants.chosen_variants() == {("op", 1): "b"}


def test_runs_outside_fake_mode_with_real_stand_ins():
    """While a fake mode is active (torch.compile tracing an op's body), the variants run on
    real tensors: stand-ins of the fake inputs' layouts."""
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(4, 6)[:, ::2])
        flags = mode.from_tensor(torch.ones(3, dtype=torch.bool))
        assert _variants.is_traced([fake, 1.0])
        seen = {}

        def make_run():
            seen["x"], seen["flags"] = _variants.stand_in(fake), _variants.stand_in(flags)
            seen["made"] = torch.zeros(2)
            seen["grad"] = torch.is_grad_enabled()
            return lambda variant: seen["x"].sum()

        def timer(call):
            assert not is_fake(call())
            return 1.0

        _variants.measured_choice("op", 0, ["a", "b"], make_run, measure=True, timer=timer)
    assert not _variants.is_traced([torch.ones(1), None])
    with FakeTensorMode() as mode, FunctionalTensorMode():  # what AOT autograd's tracing passes
        functional = FunctionalTensor.to_functional(mode.from_tensor(torch.ones(2, 5)))
        assert _variants.is_traced([functional])
        chosen = _variants.measured_choice(
            "op", 1, ["a", "b"], lambda: lambda v: _variants.stand_in(functional),
            measure=True, timer=lambda call: 1.0 + is_fake(call()),
        )  # fmt: skip
        assert chosen == "a" and _variants.chosen_variants("op")[("op", 1)] == "a"
    assert not any(is_fake(seen[name]) for name in ("x", "flags", "made"))
    assert seen["x"].shape == (4, 3) and seen["x"].stride() == (6, 2)
    assert seen["x"].dtype == torch.float32 and seen["x"].std() > 0
    assert seen["flags"].dtype == torch.bool and not seen["flags"].any()
    assert seen["grad"] is False


def test_static_shape_check():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert _variants.has_static_shape([torch.ones(2, 3), None, 1.5])
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        symbolic = torch.empty(mode.shape_env.create_unbacked_symint(), 3)
        assert not isinstance(symbolic.shape[0], int)
        assert not _variants.has_static_shape([torch.empty(2, 3), symbolic])
