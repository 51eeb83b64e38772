"""The conformance kit itself must catch broken methods (a kit that passes everything is useless)."""

import pytest
import torch

from mergebench.methods import InputContract, MethodSpec
from mergebench.testing import CheckFailure, check_method


def _spec(kernel, **kw):
    kw.setdefault("citation", "test")
    kw.setdefault("contract", InputContract(base="required"))
    return MethodSpec(name="broken", kernel=kernel, **kw)


def _mean(base, experts, weights, params, ctx):
    return torch.stack(list(experts)).mean(0)


def test_a_correct_method_passes():
    check_method(_spec(_mean, properties={"idempotent", "order_invariant"}))


@pytest.mark.parametrize(
    "kernel, kw, fragment",
    [
        (lambda b, e, w, p, c: e[0].float(), {}, "shape_dtype"),
        (lambda b, e, w, p, c: e[0].add_(1), {}, "no_input_mutation"),
        (lambda b, e, w, p, c: e[0] + torch.randn(e[0].shape, dtype=e[0].dtype), {}, "deterministic"),
        (lambda b, e, w, p, c: e[0] + torch.randn(e[0].shape, dtype=e[0].dtype), {"stochastic": True}, "global RNG"),
        (lambda b, e, w, p, c: e[0] / e[0].norm(), {}, "NaN or inf"),
        (lambda b, e, w, p, c: e[0].clone(), {"properties": {"order_invariant"}}, "order"),
        (lambda b, e, w, p, c: 2 * e[0], {"properties": {"idempotent"}}, "identical experts"),
        (lambda b, e, w, p, c: e[0] + 1, {"properties": {"identity_on_base"}}, "identical to the base"),
        (_mean, {"citation": ""}, "citation is empty"),
    ],
)
def test_kit_catches(kernel, kw, fragment):
    with pytest.raises(CheckFailure) as err:
        check_method(_spec(kernel, **kw))
    assert fragment in str(err.value)
