"""Property-based: random shapes, τ and options against the float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_tau
from fused_tau import reference

from .tolerances import assert_close_to_ref

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def ce_cases(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 70))
    spatial = draw(st.sampled_from([(), (3,), (2, 2)]))
    log_tau = draw(st.floats(-3, 3))
    return dict(
        n=n, c=c, spatial=spatial, tau=10.0 ** log_tau,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5])),
        weighted=draw(st.booleans()),
        prob=draw(st.booleans()),
        ignore=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 10.0, 1e3])),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(case=ce_cases())
def test_cross_entropy_matches_reference(backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    n, c = case["n"], case["c"]
    x = torch.randn((n, c) + case["spatial"], generator=g) * case["scale"]
    if case["prob"]:
        target = torch.softmax(torch.randn(x.shape, generator=g), 1)
    else:
        target = torch.randint(0, c, (n,) + case["spatial"], generator=g)
        if case["ignore"]:
            target.view(-1)[0] = -100
    w = torch.rand(c, generator=g) + 0.1 if case["weighted"] else None
    opts = dict(weight=w, reduction=case["reduction"], label_smoothing=case["label_smoothing"])
    tau = torch.tensor(case["tau"], requires_grad=True)
    xg = x.clone().requires_grad_()
    out = fused_tau.cross_entropy(xg, target, tau, **opts)
    out.sum().backward()

    x64 = x.double().requires_grad_()
    tau64 = torch.tensor(case["tau"], dtype=torch.float64, requires_grad=True)
    opts64 = dict(opts, weight=w.double() if w is not None else None)
    ref = reference.cross_entropy(x64, target.double() if case["prob"] else target, tau64, **opts64)
    ref.sum().backward()
    x32 = x.clone().requires_grad_()
    tau32 = tau.detach().clone().requires_grad_()
    ref32 = reference.cross_entropy(x32, target, tau32, **opts)
    ref32.sum().backward()
    assert_close_to_ref(out, ref, torch.float32, torch_same_dtype=ref32)
    assert_close_to_ref(xg.grad, x64.grad, torch.float32, torch_same_dtype=x32.grad)
    # dL/dτ sums n*c terms: its error bound grows with them
    assert_close_to_ref(tau.grad, tau64.grad, torch.float32, torch_same_dtype=tau32.grad, scale=x.numel())


@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data())
def test_softmax_family_matches_reference(backend, shape, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    tau = 10.0 ** data.draw(st.floats(-3, 3))
    x = torch.randn(shape) * data.draw(st.sampled_from([1.0, 100.0]))
    for op, ref in ((fused_tau.softmax, reference.softmax), (fused_tau.log_softmax, reference.log_softmax),
                    (fused_tau.logsumexp, reference.logsumexp)):
        assert_close_to_ref(op(x, tau, dim), ref(x.double(), tau, dim), torch.float32,
                            torch_same_dtype=ref(x, tau, dim))
