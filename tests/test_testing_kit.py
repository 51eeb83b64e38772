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
    """The mean of the experts, written as base + mean task vector (it uses its required base)."""
    return base + torch.stack([e - base for e in experts]).mean(0)


def _strided_bug(base, experts, weights, params, ctx):
    """Reads the raw storage as if it were contiguous: right on contiguous inputs only."""
    e = experts[0]
    return torch.as_strided(e, e.shape, torch.empty(e.shape).stride()).clone()


def _skips_zero_weights(base, experts, weights, params, ctx):
    kept = [(float(w), e) for w, e in zip(weights, experts) if float(w) != 0]
    return base + sum(w * (e - base) for w, e in kept) / sum(w for w, _ in kept)


def _ignores_required_base(base, experts, weights, params, ctx):
    return torch.stack(list(experts)).mean(0)


def test_a_correct_method_passes():
    check_method(_spec(_mean, properties={"idempotent", "order_invariant"}))
    check_method(_spec(lambda b, e, w, p, c: e[0].clone(), contract=InputContract(base="unused")))


def test_raising_on_nonfinite_input_is_allowed():
    def strict(base, experts, weights, params, ctx):
        if not all(torch.isfinite(x).all() for x in (base, *experts)):
            raise ValueError(f"{ctx.name}: NaN/inf input")
        return _mean(base, experts, weights, params, ctx)

    check_method(_spec(strict, properties={"idempotent", "order_invariant"}))


def test_noncontiguous_inputs_really_are_strided():
    from mergebench.testing import _strided

    x = torch.randn(6, 4)
    for how in ("transposed", "sliced"):
        y = _strided(x, how)
        assert not y.is_contiguous() and torch.equal(y, x)
    v = torch.randn(5)
    assert not _strided(v, "sliced").is_contiguous() and torch.equal(_strided(v, "sliced"), v)


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
        # strided (non-contiguous) inputs: a crash, and a silently different result
        (lambda b, e, w, p, c: e[0].view(-1).clone().view(e[0].shape), {}, "noncontiguous[matrix/transposed]: raised"),
        (_strided_bug, {}, "(non-contiguous) inputs (matrix) changed the result"),
        (lambda b, e, w, p, c: e[0].clone() if e[0].is_contiguous() else 1.5 * e[0], {}, "noncontiguous[vector/sliced]"),
        # non-finite inputs must not vanish
        (lambda b, e, w, p, c: torch.nan_to_num(e[0], nan=0.0, posinf=0.0, neginf=0.0), {}, "a nan in expert 0"),
        (lambda b, e, w, p, c: torch.where(torch.isfinite(e[0]), e[0], b), {}, "a inf in expert 0"),
        (lambda b, e, w, p, c: torch.stack(list(e)).nanmedian(0).values, {}, "a nan in expert 0 (matrix) gave an all-finite"),
        (lambda b, e, w, p, c: torch.stack(list(e)).clamp(-10, 10).mean(0), {}, "a -inf in expert 0"),
        (_ignores_required_base, {}, "a nan in the base"),
        # the declared property is checked harder: every input, several positions, weight 0
        (_skips_zero_weights, {"properties": {"nonfinite_propagates"}}, "weight 0) gave an all-finite result"),
        (lambda b, e, w, p, c: _mean(b, [e[0], *[x.nan_to_num() for x in e[1:]]], w, p, c),
         {"properties": {"nonfinite_propagates"}}, "of expert 1"),
    ],
)
def test_kit_catches(kernel, kw, fragment):
    with pytest.raises(CheckFailure) as err:
        check_method(_spec(kernel, **kw))
    assert fragment in str(err.value)
