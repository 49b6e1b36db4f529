"""Property-based: random shapes, τ and options against the float64 reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_tau
from fused_tau import reference

from .test_row_precision import _kd_reference
from .tolerances import assert_close_to_ref

pytestmark = pytest.mark.slow  # minutes, not seconds: `pytest -m "not slow"` leaves it out

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
    out = fused_tau.cross_entropy(xg, target, tau=tau, **opts)
    out.sum().backward()

    x64 = x.double().requires_grad_()
    tau64 = torch.tensor(case["tau"], dtype=torch.float64, requires_grad=True)
    opts64 = dict(opts, weight=w.double() if w is not None else None)
    ref = reference.cross_entropy(x64, target.double() if case["prob"] else target, tau=tau64, **opts64)
    ref.sum().backward()
    x32 = x.clone().requires_grad_()
    tau32 = tau.detach().clone().requires_grad_()
    ref32 = reference.cross_entropy(x32, target, tau=tau32, **opts)
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
        assert_close_to_ref(op(x, dim, tau=tau), ref(x.double(), dim, tau=tau), torch.float32,
                            torch_same_dtype=ref(x, dim, tau=tau))


# ---- the differential test over special values: ±inf, NaN, -inf rows, τ from 1e-4 to 1e4, unsigned and
# int32 targets, expanded (stride-0, overlapping) inputs.  Judged against float64: err <= err(torch, the
# same composition in fp32) + tol, and the composition's NaN / inf pattern exactly (NaN in, NaN out).

SPECIALS = {"none": None, "+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


@st.composite
def special_logits(draw, max_rows=5, max_cols=40):
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    x = torch.randn(n, c, generator=g) * scale
    if draw(st.booleans()):  # an expanded input: every row the same memory (stride 0)
        x = x[:1].expand(n, c)
    else:
        special = SPECIALS[draw(st.sampled_from(list(SPECIALS)))]
        if special is not None:
            x[draw(st.integers(0, n - 1)), draw(st.integers(0, c - 1))] = special
        if draw(st.integers(0, 4)) == 0:  # a fully masked row
            x[draw(st.integers(0, n - 1))] = float("-inf")
    log_tau = draw(st.floats(-4, 4))
    return x, 10.0 ** log_tau, g


def _leaf(x, dtype):
    """A leaf of ``dtype`` with x's values, keeping an expanded x expanded (its gradient sums the rows)."""
    if x.stride(0) == 0:
        base = x[:1].to(dtype).detach().requires_grad_()
        return base, base.expand_as(x)
    leaf = x.to(dtype).detach().requires_grad_()
    return leaf, leaf


def _finite_where_ref_is(torch32, ref):
    """torch's fp32 error bound only where torch itself is finite or agrees with the reference's pattern."""
    t = torch32.detach().double()
    return torch.where(torch.isfinite(t) | (torch.isnan(t) & torch.isnan(ref)) | (t == ref), t, ref)


def _euler_tau_grad(out, leaf, dx, tau, degree, extra=()):
    """dL/dτ of L = Σ out, for out = τ^degree F(x / τ): τ dL/dτ = degree L - Σ x dL/dx (Euler), with
    the masked classes' 0 · (-inf) terms 0.  (The composition's own dτ is NaN as soon as one logit is
    -inf: the division's backward forms 0 · (-inf).  NaN or +inf logits still give NaN.)  ``extra``:
    (tensor, its gradient) of the other inputs divided by τ (kd_loss's teacher)."""
    terms = torch.where(dx == 0, 0.0, leaf.detach() * dx).sum()
    for x, gx in extra:
        terms = terms + torch.where(gx == 0, 0.0, x.detach() * gx).sum()
    return ((degree * out.sum() if degree else 0.0) - terms) / tau


def _differential(run, x, tau, degree=0, scaled=(), **kw):
    """run(x, tau) with fused_tau (fp32), the reference (float64) and the reference (fp32): the loss and the
    gradients of x and τ compared (the float64 dτ by Euler's identity, see _euler_tau_grad)."""
    results = {}
    for name, dtype in (("ours", torch.float32), ("ref", torch.float64), ("torch32", torch.float32)):
        leaf, xin = _leaf(x, dtype)
        t = torch.tensor(tau, dtype=dtype, requires_grad=True)
        args = dict(kw)
        for k in scaled:  # the other inputs divided by τ: leaves in float64, for Euler's identity
            args[k] = kw[k].to(dtype).requires_grad_(name == "ref")
        out = run(xin, t, reference if name != "ours" else fused_tau, **args)
        wrt = (leaf, t) + (tuple(args[k] for k in scaled) if name == "ref" else ())
        grads = torch.autograd.grad(out.sum(), wrt, allow_unused=True)
        grads = [gr if gr is not None else torch.zeros_like(v) for gr, v in zip(grads, wrt)]
        results[name] = [out.detach()] + grads[:2]
        if name == "ref":
            extra = [(args[k], gk) for k, gk in zip(scaled, grads[2:])]
            results[name][2] = _euler_tau_grad(out.detach(), leaf, results[name][1], tau, degree, extra)
    if torch.isfinite(results["torch32"][0]).all() and not torch.isfinite(results["ref"][0]).all():
        # float64 sees what fp32 cannot: a probability below fp32's range (a teacher's exp(-500)) against a
        # -inf student is +inf in float64 and a masked 0 in fp32.  Then fp32 is the only meaningful judge
        # of the loss and dx, and dτ must be finite (the composition's own fp32 dτ is NaN: 0 · (-inf)).
        for i in range(2):
            assert_close_to_ref(results["ours"][i], results["torch32"][i], torch.float32)
        assert torch.isfinite(results["ours"][2]).all()
        return
    for i, what in enumerate(("loss", "dx", "dtau")):
        ref = results["ref"][i]
        bound = _finite_where_ref_is(results["torch32"][i], ref)
        scale = x.numel() if what == "dtau" else 1.0
        try:
            assert_close_to_ref(results["ours"][i], ref, torch.float32, torch_same_dtype=bound, scale=scale)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


def _ce(x, t, lib, target, reduction, label_smoothing):
    target = target if lib is fused_tau else target.long()
    return lib.cross_entropy(x, target, reduction=reduction, label_smoothing=label_smoothing, tau=t)


@SETTINGS
@given(case=special_logits(), data=st.data())
def test_cross_entropy_special_values(backend, case, data):
    x, tau, g = case
    n, c = x.shape
    tdtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
    target = torch.randint(0, min(c, 255), (n,), generator=g)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    smoothing = data.draw(st.sampled_from([0.0, 0.1]))
    _differential(_ce, x, tau, target=target.to(tdtype), reduction=reduction, label_smoothing=smoothing)


def _softmax_family(x, t, lib, op):
    out = getattr(lib, op)(x, -1, tau=t)
    return out * torch.linspace(0.5, 1.5, out.shape[-1], dtype=out.dtype) if op != "logsumexp" else out


@SETTINGS
@given(case=special_logits(), op=st.sampled_from(["softmax", "log_softmax", "logsumexp"]))
def test_softmax_family_special_values(backend, case, op):
    x, tau, _ = case
    _differential(_softmax_family, x, tau, degree=1 if op == "logsumexp" else 0, op=op)


def _kd(x, t, lib, teacher):
    if lib is reference:  # the composition, with classes of teacher probability 0 adding exactly 0
        return _kd_reference()(x, teacher, t)
    return lib.kd_loss(x, teacher, tau=t)


@SETTINGS
@given(case=special_logits(), data=st.data())
def test_kd_loss_special_values(backend, case, data):
    x, tau, g = case
    teacher = torch.randn(x.shape, generator=g) * data.draw(st.sampled_from([1.0, 30.0]))
    if data.draw(st.booleans()):
        teacher = teacher + data.draw(st.sampled_from([0.0, 1000.0]))  # a common offset
        x = x + 1000.0 if x.stride(0) else x
    special = SPECIALS[data.draw(st.sampled_from(list(SPECIALS)))]
    if special is not None:
        teacher[0, -1] = special
    _differential(_kd, x, tau, degree=2, scaled=("teacher",), teacher=teacher)


def _infonce(x, t, lib, key, queue):
    return lib.infonce(x, key.to(x.dtype), queue.to(x.dtype) if queue is not None else None, tau=t)


@SETTINGS
@given(case=special_logits(max_cols=12), data=st.data())
def test_infonce_special_values(backend, case, data):
    x, tau, g = case
    x = torch.where(torch.isfinite(x), x, x.nan_to_num(0.0)) / x.nan_to_num(0.0).abs().amax().clamp(min=1)
    if data.draw(st.booleans()):  # a non-finite query: NaN in, NaN out
        x[0, 0] = SPECIALS[data.draw(st.sampled_from(["+inf", "nan"]))]
    n, d = x.shape
    key = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(data.draw(st.integers(1, 20)), d, generator=g), dim=1) \
        if data.draw(st.booleans()) else None
    _differential(_infonce, x, tau, key=key, queue=queue)
