"""cross_entropy against F.cross_entropy(input / tau, ...) in float64, on every backend."""
import pytest
import torch
import torch.nn.functional as F

import fused_tau
from fused_tau import reference

from .compare import Fixed, check_against_reference
from .tolerances import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(shape, C, device, ignore=True):
    y = torch.randint(0, C, shape, device=device)
    if ignore and y.numel() > 2:
        y.view(-1)[1] = -100
    return y


def _check(input, target, tau, dtype, tau_tol_scale=1.0, **opts):
    """Loss and gradients (input, and τ when it is a tensor) against the float64 reference."""
    weight = opts.pop("weight", None)
    check_against_reference(lambda x, t, w, tau: fused_tau.cross_entropy(x, t, w, tau=tau, **opts),
                            lambda x, t, w, tau: reference.cross_entropy(x, t, w, tau=tau, **opts),
                            [input, Fixed(target), None if weight is None else Fixed(weight)],
                            dtype=dtype, tau=tau, tau_scale=tau_tol_scale)


CE_TAUS = [0.05, 1.0, 20.0]
CE_FORMS = [(r, w, ls) for r in ("mean", "sum", "none") for w in (False, True) for ls in (0.0, 0.15)]
# fp32: every form at every τ; fp16 / bf16: every form, τ in turn (every pair of parameter values still
# meets in some case)
CE_CASES = [(DTYPES[0], *form, tau) for form in CE_FORMS for tau in CE_TAUS] + \
    [(dtype, *form, CE_TAUS[(i + j) % len(CE_TAUS)]) for j, dtype in enumerate(DTYPES[1:]) for i, form in enumerate(CE_FORMS)]


@pytest.mark.parametrize("dtype, reduction, weighted, label_smoothing, tau", CE_CASES)
def test_class_index_targets(backend, device, dtype, reduction, weighted, label_smoothing, tau):
    N, C = 7, 37
    x = torch.randn(N, C, device=device) * 3
    w = torch.rand(C, device=device) + 0.1 if weighted else None
    _check(x, _targets((N,), C, device), tau, dtype, weight=w, reduction=reduction,
           label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_spatial_inputs(backend, device, dtype, reduction, label_smoothing):
    """(N, C, d1, d2) inputs, class dim 1, read in place (no transposed copy)."""
    N, C = 3, 19
    x = torch.randn(N, C, 4, 5, device=device) * 2
    w = torch.rand(C, device=device) + 0.1
    _check(x, _targets((N, 4, 5), C, device), 0.3, dtype, weight=w, reduction=reduction,
           label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_probability_targets(backend, device, dtype, reduction, weighted, label_smoothing):
    N, C = 6, 29
    x = torch.randn(N, C, device=device) * 3
    t = torch.softmax(torch.randn(N, C, device=device) * 2, -1).to(dtype)
    w = torch.rand(C, device=device) + 0.1 if weighted else None
    _check(x, t, 0.5, dtype, weight=w, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["index", "index_smooth_weight", "prob", "spatial"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_learnable_tau_gradient(backend, device, dtype, kind, per_sample):
    """τ as a tensor that requires grad (CLIP's learnable temperature); per sample too."""
    N, C = 5, 23
    shape = (N, C, 3) if kind == "spatial" else (N, C)
    x = torch.randn(shape, device=device) * 2
    if per_sample:
        tau = (torch.rand(N, device=device) * 0.5 + 0.1).requires_grad_()
    else:
        tau = torch.tensor(0.2, device=device, requires_grad=True)
    opts = {}
    if kind == "prob":
        target = torch.softmax(torch.randn(shape, device=device), 1)
    else:
        target = _targets((N, 3) if kind == "spatial" else (N,), C, device)
    if kind == "index_smooth_weight":
        opts = dict(weight=torch.rand(C, device=device) + 0.5, label_smoothing=0.1)
    _check(x, target, tau, dtype, tau_tol_scale=10.0, **opts)


@pytest.mark.parametrize("tau", [1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("magnitude", [1.0, 1e4])
def test_tau_and_logit_range(backend, device, tau, magnitude):
    """τ from 1e-3 to 1e3 and logits up to ±1e4: finite, and as exact as fp32 allows."""
    x = (torch.rand(6, 45, device=device) * 2 - 1) * magnitude
    y = torch.randint(0, 45, (6,), device=device)
    y[0] = x[0].argmax()
    _check(x, y, torch.tensor(tau, device=device, requires_grad=True), torch.float32,
           tau_tol_scale=50.0, reduction="none")


def test_small_tau_precision_promise(backend, device):
    """DESIGN.md: F.cross_entropy in fp32 returns 0.0 at τ = 0.05 on [1, 2, 3] where the exact
    loss is 2.06e-9, and gives the target a gradient of 0 instead of -4.1e-8."""
    x = torch.tensor([[1.0, 2.0, 3.0]], device=device, requires_grad=True)
    y = torch.tensor([2], device=device)
    loss = fused_tau.cross_entropy(x, y, tau=0.05)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    exact = F.cross_entropy(x64 / 0.05, y)
    exact.backward()
    assert F.cross_entropy(x.detach() / 0.05, y).item() == 0.0  # torch's fp32 loses it all
    assert abs(loss.item() - 2.0611536e-9) < 1e-15
    assert abs(loss.item() - exact.item()) <= 1e-6 * exact.item()
    assert abs(x.grad[0, 2].item() - (-4.1223e-8)) < 1e-11
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=0)
    # the row's gradient sums to zero (to the rounding of its largest term)
    assert abs(x.grad.double().sum().item()) <= 1e-6 * x.grad.abs().max().item()
    # τ = 0.1: torch's fp32 is 3.7e-4 off relatively; ours keeps full precision
    l01 = fused_tau.cross_entropy(x.detach(), y, tau=0.1).item()
    e01 = F.cross_entropy(x64.detach() / 0.1, y).item()
    assert abs(l01 - e01) <= 1e-6 * e01


def test_masked_classes_and_all_ignored(backend, device):
    x = torch.randn(5, 21, device=device)
    x[:, 3] = float("-inf")  # masked classes behave as in the reference: no NaN
    y = torch.randint(4, 21, (5,), device=device)
    _check(x, y, 0.3, torch.float32, label_smoothing=0.0)
    ignored = torch.full((5,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        xi = torch.randn(5, 21, device=device, requires_grad=True)
        out = fused_tau.cross_entropy(xi, ignored, tau=0.3, reduction=reduction)
        ref = F.cross_entropy(xi.detach() / 0.3, ignored, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)  # mean of nothing is NaN, as in torch
        if reduction != "mean":
            out.sum().backward()
            assert torch.equal(xi.grad, torch.zeros_like(xi))


def test_inplace_backward_is_opt_in(backend, device):
    x = torch.randn(6, 33, device=device)
    y = torch.randint(0, 33, (6,), device=device)
    a = x.clone().requires_grad_()
    fused_tau.cross_entropy(a, y, tau=0.5).backward()
    assert torch.equal(a.detach(), x)  # the default never writes into the caller's logits
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0  # a buffer the caller no longer needs
    fused_tau.cross_entropy(z, y, tau=0.5, inplace_backward=True).backward()
    torch.testing.assert_close(leaf.grad, a.grad)


def test_one_dim_input_and_int32_targets(backend, device):
    x = torch.randn(17, device=device, requires_grad=True)
    y = torch.tensor(4, device=device)
    out = fused_tau.cross_entropy(x, y, tau=0.5, reduction="none")
    ref = F.cross_entropy(x.detach().double() / 0.5, y, reduction="none")
    assert out.shape == ref.shape == ()
    assert_close_to_ref(out, ref, torch.float32)
    x2 = torch.randn(4, 17, device=device)
    y32 = torch.randint(0, 17, (4,), device=device, dtype=torch.int32)
    assert_close_to_ref(fused_tau.cross_entropy(x2, y32, tau=0.5), F.cross_entropy(x2.double() / 0.5, y32.long()),
                        torch.float32)


def test_non_contiguous_logits(backend, device):
    base = torch.randn(40, 30, device=device)
    x = base.t()[:, 5:]  # (30, 35), class stride 30
    y = torch.randint(0, 35, (30,), device=device)
    _check(x, y, 0.4, torch.float32, label_smoothing=0.1)


def test_module_matches_functional(backend, device):
    w = torch.rand(11, device=device) + 0.5
    mod = fused_tau.CrossEntropyLoss(weight=w, label_smoothing=0.1, tau=0.2, reduction="sum")
    x = torch.randn(4, 11, device=device)
    y = torch.randint(0, 11, (4,), device=device)
    torch.testing.assert_close(mod(x, y), fused_tau.cross_entropy(x, y, tau=0.2, weight=w, reduction="sum",
                                                                  label_smoothing=0.1))
    learn = fused_tau.CrossEntropyLoss(tau=torch.nn.Parameter(torch.tensor(0.5, device=device)))
    learn(x, y).backward()
    assert learn.tau.grad is not None and torch.isfinite(learn.tau.grad)


def test_offsets_are_int64(backend, device):
    """A row starting past 2^31 elements: its offset must not wrap in int32.  The storage is
    4 GiB of bf16 but only the three rows' pages are ever touched."""
    if device != "cpu":
        pytest.skip("the strided-storage trick is for the interpreter on CPU")
    C, stride = 16, (1 << 30) + 16
    storage = torch.empty(2 * stride + C, dtype=torch.bfloat16)
    x = storage.as_strided((3, C), (stride, 1))
    for i in range(3):
        x[i] = torch.randn(C).to(torch.bfloat16)
    y = torch.tensor([1, 2, 3])
    out = fused_tau.cross_entropy(x, y, tau=0.5, reduction="none")
    ref = F.cross_entropy(x.double() / 0.5, y, reduction="none")
    assert_close_to_ref(out, ref, torch.bfloat16)


def _launches(monkeypatch):
    """Counts the calls of the cross-entropy ops (fused_tau/_ops.py) by name, and those the Triton
    backend's reductions 'mean' and 'sum' make of the row engine itself (kernels/row_ce.py
    ce_fwd_reduced: "ce_fwd_grad" when it writes the gradient, else "ce_fwd")."""
    from fused_tau import _ops
    from fused_tau.kernels import row

    seen = []
    for name in ("ce_fwd", "ce_fwd_grad", "ce_bwd", "ce_grad_rescale"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))

    def fwd_reduced(*a, _real=row.ce_fwd_reduced, **k):
        seen.append("ce_fwd" if k.get("g") is None else "ce_fwd_grad")
        return _real(*a, **k)

    monkeypatch.setattr(row, "ce_fwd_reduced", fwd_reduced)
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_which_passes_run(backend, device, monkeypatch, reduction):
    """The forward writes the gradient when a backward will follow and the reduction is a scalar; it reads
    only under no_grad or for an input that needs no gradient; 'none' and inplace_backward keep the
    separate backward."""
    seen = _launches(monkeypatch)
    x = torch.randn(5, 13, device=device)
    y = _targets((5,), 13, device)
    with torch.no_grad():
        fused_tau.cross_entropy(x.requires_grad_(), y, tau=0.5, reduction=reduction)
    fused_tau.cross_entropy(x.detach(), y, tau=0.5, reduction=reduction)
    assert seen == ["ce_fwd", "ce_fwd"]
    seen.clear()
    fused_tau.cross_entropy(x, y, tau=0.5, reduction=reduction).sum().backward()
    assert seen == (["ce_fwd", "ce_bwd"] if reduction == "none" else ["ce_fwd_grad", "ce_grad_rescale"])
    seen.clear()
    fused_tau.cross_entropy(x * 1, y, tau=0.5, reduction=reduction, inplace_backward=True).sum().backward()
    assert seen == ["ce_fwd", "ce_bwd"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_gradient_from_the_forward_under_any_incoming_gradient(backend, device, reduction, target_kind):
    """The gradient written by the forward, scaled in the backward: incoming gradients of 1, 0.37, 0 and
    -2 (x and τ), against the float64 composition; with ignore_index, class weights and smoothing."""
    x = torch.randn(7, 19, device=device) * 3
    y = _targets((7,), 19, device) if target_kind == "index" else torch.softmax(torch.randn(7, 19, device=device), 1)
    w = torch.rand(19, device=device) + 0.5
    for g in (1.0, 0.37, 0.0, -2.0):
        xi = x.clone().requires_grad_()
        tau = torch.tensor(0.4, device=device, requires_grad=True)
        out = fused_tau.cross_entropy(xi, y, w, tau=tau, reduction=reduction, label_smoothing=0.1)
        (out * g).backward()
        x64, t64 = x.double().requires_grad_(), tau.detach().double().requires_grad_()
        ref = reference.cross_entropy(x64, y if target_kind == "index" else y.double(), w.double(), tau=t64,
                                      reduction=reduction, label_smoothing=0.1)
        (ref * g).backward()
        assert_close_to_ref(out, ref, torch.float32)
        assert_close_to_ref(xi.grad, x64.grad, torch.float32)
        assert_close_to_ref(tau.grad, t64.grad, torch.float32)


def test_second_backward_with_retain_graph(backend, device):
    """retain_graph=True: the first backward hands out the forward's gradient (scaled in place); a
    second recomputes it and leaves the first's untouched."""
    x = torch.randn(6, 23, device=device, requires_grad=True)
    y = _targets((6,), 23, device)
    tau = torch.tensor(0.3, device=device, requires_grad=True)
    out = fused_tau.cross_entropy(x, y, tau=tau, label_smoothing=0.05)
    (dx1, dt1) = torch.autograd.grad(out * 3.0, (x, tau), retain_graph=True)
    first = dx1.clone()
    (dx2, dt2) = torch.autograd.grad(out * 0.5, (x, tau))
    assert torch.equal(dx1, first)
    torch.testing.assert_close(dx2, first / 6.0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dt2, dt1 / 6.0, rtol=1e-5, atol=1e-8)


def test_long_rows_keep_the_second_read_in_l2(backend, device, monkeypatch):
    """The forward that writes the gradient reads each row twice: rows too long for four an SM in L2 take
    one 32-warp program an SM (kernels/row_engine.py ROW_CONFIGS's "reread"); the gradient is the same."""
    from fused_tau.kernels import row_engine, tile_engine

    def reread(C, col_bytes):
        cfg = row_engine.row_launch("reread", C, cpu, col_bytes)
        return cfg.block, cfg.num_warps

    monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 132)
    monkeypatch.setattr(row_engine, "MAX_BLOCK", 4096)
    cpu = torch.device("cpu")
    assert reread(32000, 2) == (4096, 8)  # 528 rows of 64 kB: 34 MB
    assert reread(128256, 2) == (8192, 32)  # 528 rows of 256 kB would be 135 MB
    assert reread(128256, 4) == (8192, 32)
    monkeypatch.setattr(row_engine, "MAX_BLOCK", 16)
    monkeypatch.setattr(row_engine, "L2_BYTES_OFF_GPU", 0)
    assert reread(100, 4) == (32, 32)
    _check(torch.randn(5, 100, device=device) * 4, _targets((5,), 100, device), torch.tensor(0.3), torch.float32,
           label_smoothing=0.1)


def test_float_tau_is_one_kept_tensor_outside_inference_mode(backend, device):
    """A float τ becomes one kept tensor (no fill launched a call on a GPU); one made under inference mode
    is not kept: an inference tensor could not be saved for a later call's backward."""
    from fused_tau._tau import tau_tensor

    x = torch.randn(4, 9, device=device)
    y = _targets((4,), 9, device)
    with torch.inference_mode():
        fused_tau.cross_entropy(x, y, tau=0.123)
    xs = x.clone().requires_grad_()
    fused_tau.cross_entropy(xs, y, tau=0.123).backward()
    assert xs.grad is not None
    assert tau_tensor(0.5, x, (4,)) is tau_tensor(0.5, x, (4,))
