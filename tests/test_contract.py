"""The drop-in contract: torch's parameters in torch's positional slots, ``tau`` keyword-only.

A call written for torch (as torch's own documentation writes it) must mean the same here: these
tests call every function and module with a torch counterpart positionally and compare with torch,
and check that a τ passed positionally is refused rather than read as something else.
"""
import inspect
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_tau

from .tolerances import tol

def _documented_softmax(input, dim, *, dtype=None):
    """torch.softmax / torch.log_softmax as documented (their builtins carry no signature)."""


def _documented_logsumexp(input, dim, keepdim=False):
    """torch.logsumexp as documented, less its ``out=``."""


# (fused_tau callable, its torch counterpart)
COUNTERPARTS = [
    (fused_tau.cross_entropy, F.cross_entropy),
    (fused_tau.gumbel_softmax, F.gumbel_softmax),
    (fused_tau.CrossEntropyLoss.__init__, torch.nn.CrossEntropyLoss.__init__),
    (fused_tau.linear_cross_entropy, F.linear_cross_entropy),
    (fused_tau.LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__),
    (fused_tau.softmax, _documented_softmax),
    (fused_tau.log_softmax, _documented_softmax),
    (fused_tau.logsumexp, _documented_logsumexp),
]
NO_COUNTERPART = [fused_tau.infonce, fused_tau.clip_loss, fused_tau.nt_xent, fused_tau.kd_loss, fused_tau.sample,
                  fused_tau.softmax, fused_tau.log_softmax, fused_tau.logsumexp, fused_tau.cross_entropy,
                  fused_tau.linear_cross_entropy, fused_tau.expected_calibration_error,
                  fused_tau.CrossEntropyLoss.__init__, fused_tau.LinearCrossEntropyLoss.__init__,
                  fused_tau.KDLoss.__init__, fused_tau.InfoNCELoss.__init__]


def _split(fn):
    params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return positional, keyword


@pytest.mark.parametrize("ours,theirs", COUNTERPARTS, ids=lambda v: getattr(v, "__qualname__", ""))
def test_torch_parameters_in_torch_order(ours, theirs):
    """Exactly torch's positional parameters, same names in the same slots; torch's keyword-only
    parameters keyword-only here too (fused_tau adds only keyword-only ones: tau, ...)."""
    ours_pos, ours_kw = _split(ours)
    theirs_pos, theirs_kw = _split(theirs)
    assert ours_pos == theirs_pos
    assert theirs_kw <= ours_kw


@pytest.mark.parametrize("fn", NO_COUNTERPART, ids=lambda v: v.__qualname__)
def test_tau_is_keyword_only(fn):
    assert inspect.signature(fn).parameters["tau"].kind is inspect.Parameter.KEYWORD_ONLY


def test_gumbel_softmax_tau_is_second_as_in_torch():
    names = list(inspect.signature(fused_tau.gumbel_softmax).parameters)
    assert names[:5] == ["logits", "tau", "hard", "eps", "dim"]


def _close(ours, theirs, dtype=torch.float32):
    torch.testing.assert_close(ours, theirs, **tol(dtype))


def test_cross_entropy_third_slot_is_the_class_weight(backend, device):
    """The reported defect: with N == C == 5, cross_entropy(x, y, w) read w as τ (28.92 vs 2.69)."""
    x = torch.randn(5, 5, device=device) * 3
    y = torch.tensor([0, 1, 2, 3, 4], device=device)
    w = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], device=device)
    _close(fused_tau.cross_entropy(x, y, w), F.cross_entropy(x, y, w))
    # N != C: no error about a τ the user never passed
    x7 = torch.randn(3, 5, device=device)
    _close(fused_tau.cross_entropy(x7, y[:3], w), F.cross_entropy(x7, y[:3], w))


def test_cross_entropy_every_positional_slot(backend, device):
    x = torch.randn(6, 9, device=device)
    y = torch.tensor([0, 8, -1, 3, 3, 2], device=device)
    w = torch.rand(9, device=device) + 0.1
    args = (w, None, -1, None, "sum", 0.1)
    _close(fused_tau.cross_entropy(x, y, *args), F.cross_entropy(x, y, *args))
    _close(fused_tau.cross_entropy(x, y, *args, tau=0.5), F.cross_entropy(x / 0.5, y, *args))


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, True)])
def test_cross_entropy_legacy_size_average_reduce(backend, device, size_average, reduce):
    """torch's deprecated pair keeps torch's meaning (and torch's deprecation warning)."""
    x = torch.randn(4, 7, device=device)
    y = torch.tensor([1, 6, 0, 2], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = fused_tau.cross_entropy(x, y, None, size_average, -100, reduce)
        theirs = F.cross_entropy(x, y, None, size_average, -100, reduce)
    assert ours.shape == theirs.shape
    _close(ours, theirs)


def test_cross_entropy_loss_module_positional(backend, device):
    x = torch.randn(6, 9, device=device)
    y = torch.tensor([0, 8, 1, 3, 3, 2], device=device)
    w = torch.rand(9, device=device) + 0.1
    args = (w, None, 3, None, "sum", 0.2)
    _close(fused_tau.CrossEntropyLoss(*args)(x, y), torch.nn.CrossEntropyLoss(*args)(x, y))
    _close(fused_tau.CrossEntropyLoss(*args, tau=2.0)(x, y), torch.nn.CrossEntropyLoss(*args)(x / 2.0, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        legacy = fused_tau.CrossEntropyLoss(None, None, -100, False)
        assert legacy.reduction == torch.nn.CrossEntropyLoss(None, None, -100, False).reduction == "none"


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_dim_in_second_slot(backend, device, name):
    """softmax(x, 1) / log_softmax(x, 0): the second slot is dim, as torch's (it was read as τ)."""
    x = torch.randn(3, 4, 5, device=device)
    for dim in (0, 1, -1):
        _close(getattr(fused_tau, name)(x, dim), getattr(torch, name)(x, dim))
        _close(getattr(fused_tau, name)(x, dim, tau=0.3), getattr(torch, name)(x / 0.3, dim))
    got = getattr(fused_tau, name)(x, 1, dtype=torch.float64)
    assert got.dtype == torch.float64
    _close(got, getattr(torch, name)(x, 1, dtype=torch.float64), torch.float64)


def test_logsumexp_dim_keepdim_slots(backend, device):
    x = torch.randn(3, 4, 5, device=device)
    _close(fused_tau.logsumexp(x, 1, True), torch.logsumexp(x, 1, True))
    _close(fused_tau.logsumexp(x, 0), torch.logsumexp(x, 0))
    _close(fused_tau.logsumexp(x, 2, True, tau=4.0), 4.0 * torch.logsumexp(x / 4.0, 2, True))


def test_gumbel_softmax_positional_eps_and_dim(backend, device):
    """F.gumbel_softmax(logits, tau, hard, eps, dim): the fifth slot is dim (it was the fourth)."""
    x = torch.randn(6, 3, device=device)
    y = fused_tau.gumbel_softmax(x, 0.5, True, 1e-10, 0)
    assert ((y == 0) | (y == 1)).all()
    assert (y.sum(0) == 1).all()  # one-hot along dim 0, as F.gumbel_softmax(x, 0.5, True, 1e-10, 0)
    assert F.gumbel_softmax(x, 0.5, True, 1e-10, 0).sum(0).eq(1).all()
    with pytest.warns(UserWarning, match="eps"):
        fused_tau.gumbel_softmax(x, 0.5, False, 1e-3)


@pytest.mark.parametrize("call", [
    lambda x, y: fused_tau.softmax(x, -1, 0.5),
    lambda x, y: fused_tau.log_softmax(x, -1, 0.5),
    lambda x, y: fused_tau.logsumexp(x, -1, False, 0.5),
    lambda x, y: fused_tau.cross_entropy(x, y, None, None, -100, None, "mean", 0.0, 0.5),
    lambda x, y: fused_tau.kd_loss(x, x, 2.0),
    lambda x, y: fused_tau.sample(x, 0.5),
    lambda x, y: fused_tau.infonce(x, x, None, 0.1),
    lambda x, y: fused_tau.clip_loss(x, x, 0.1),
    lambda x, y: fused_tau.nt_xent(x, x, 0.5),
    lambda x, y: fused_tau.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, 0.5),
    lambda x, y: fused_tau.KDLoss(2.0),
    lambda x, y: fused_tau.InfoNCELoss(0.1),
], ids=["softmax", "log_softmax", "logsumexp", "cross_entropy", "kd_loss", "sample", "infonce", "clip_loss",
        "nt_xent", "CrossEntropyLoss", "KDLoss", "InfoNCELoss"])
def test_positional_tau_is_refused(call):
    """A τ in a positional slot is a TypeError from Python, never read as another argument."""
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="positional argument"):
        call(x, y)


def test_infonce_takes_a_moco_queue_module(backend, device):
    q, k = F.normalize(torch.randn(4, 8, device=device), dim=1), F.normalize(torch.randn(4, 8, device=device), dim=1)
    queue = fused_tau.MoCoQueue(8, 16, generator=torch.Generator().manual_seed(0)).to(device)
    _close(fused_tau.infonce(q, k, queue, tau=0.2), fused_tau.infonce(q, k, queue.queue, tau=0.2))
    _close(fused_tau.InfoNCELoss(tau=0.2)(q, k, queue), fused_tau.infonce(q, k, queue.queue, tau=0.2))


def test_moco_queue_takes_a_generator_and_leaves_the_global_state():
    state = torch.get_rng_state()
    a = fused_tau.MoCoQueue(8, 16, generator=torch.Generator().manual_seed(1))
    b = fused_tau.MoCoQueue(8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.queue, b.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(16))
    keys = torch.randn(3, 8) * 5
    a.enqueue(keys)
    assert torch.equal(a.queue[:3], keys)  # stored as given: MoCo normalises keys in the model


def test_enqueue_before_backward_names_the_fix(backend, device):
    q = torch.randn(4, 8, device=device, requires_grad=True)
    k = torch.randn(4, 8, device=device)
    queue = fused_tau.MoCoQueue(8, 16, generator=torch.Generator().manual_seed(0)).to(device)
    loss = fused_tau.infonce(q, k, queue, tau=0.2)
    queue.enqueue(k)
    with pytest.raises(RuntimeError, match="enqueue"):
        loss.backward()


@pytest.mark.parametrize("loss_fn", [
    lambda x: fused_tau.cross_entropy(x, torch.tensor([0, 1, 2]), tau=0.5),
    lambda x: fused_tau.softmax(x, tau=0.5).pow(2).sum(),
    lambda x: fused_tau.kd_loss(x, x.detach().flip(0), tau=2.0),
    lambda x: fused_tau.infonce(x, x.detach().flip(0), tau=0.5),
], ids=["cross_entropy", "softmax", "kd_loss", "infonce"])
def test_double_backward_says_once_differentiable(backend, loss_fn):
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("fn", ["cross_entropy", "kd_loss"])
def test_unsigned_targets_compare_in_int64(backend, device, fn):
    """uint8 156 is class 156 (out of range for 9 classes), not ignore_index -100 wrapped to 156."""
    x = torch.randn(2, 9, device=device)
    bad = torch.tensor([156, 3], dtype=torch.uint8, device=device)
    good = torch.tensor([8, 3], dtype=torch.uint8, device=device)
    call = {"cross_entropy": lambda t: fused_tau.cross_entropy(x, t),
            "kd_loss": lambda t: fused_tau.kd_loss(x, x.flip(0), target=t, tau=2.0)}[fn]
    with pytest.raises(IndexError, match="target"):
        call(bad)
    expected = {"cross_entropy": lambda: F.cross_entropy(x, good.long()),
                "kd_loss": lambda: fused_tau.kd_loss(x, x.flip(0), target=good.long(), tau=2.0)}[fn]()
    _close(call(good), expected)


def test_inplace_backward_refuses_overlapping_input(backend, device):
    """An expanded input: one gradient write would land on several elements (a wrong gradient)."""
    row = torch.randn(1, 7, device=device)
    x = row.expand(4, 7)
    with pytest.raises(ValueError, match="inplace_backward=True needs input whose elements do not overlap"):
        fused_tau.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device), inplace_backward=True)


def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend, device):
    x = torch.randn(4, 7, device=device, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(ValueError, match="leaf"):
        fused_tau.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device), inplace_backward=True)
    assert torch.equal(x.detach(), before)
    # a non-leaf (the usual case: logits computed by a model) is allowed and gives torch's gradient
    w = torch.randn(7, 7, device=device, requires_grad=True)
    logits = x @ w
    fused_tau.cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=device), inplace_backward=True).backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(x2 @ w2, torch.tensor([0, 1, 2, 3], device=device)).backward()
    _close(w.grad, w2.grad)


@pytest.mark.parametrize("name", ["cross_entropy", "kd_loss", "infonce", "linear_cross_entropy"])
def test_autocast_loss_is_fp32_unrounded(backend, device, name):
    """Under bf16 autocast torch's losses run in fp32 on the bf16 values: fused_tau returns that fp32
    value, not a bf16-rounded one (7.09375 where torch gives 7.106065).  (The fp32 computation on the
    bf16 values is the reference: torch's own composition also rounds a matmul's logits to bf16.)
    128 classes: a loss near 5, where a bf16 rounding (steps of 1/32) is 100x the fp32 tolerance."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 128, generator=g) * 3).to(device, torch.bfloat16)
    y = torch.randint(0, 128, (8,), generator=g).to(device)
    W = torch.randn(128, 16, generator=g).to(device, torch.bfloat16)
    h = torch.randn(8, 16, generator=g).to(device, torch.bfloat16)
    ours = {
        "cross_entropy": lambda: fused_tau.cross_entropy(x, y, tau=0.7),
        "kd_loss": lambda: fused_tau.kd_loss(x, x.flip(0), tau=2.0),
        "infonce": lambda: fused_tau.infonce(h, h.flip(0), tau=0.7),
        "linear_cross_entropy": lambda: fused_tau.linear_cross_entropy(h, W, y, tau=0.7),
    }[name]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = ours()
        if name == "cross_entropy":
            assert F.cross_entropy(x / 0.7, y).dtype == torch.float32  # what torch's autocast returns
    theirs = {
        "cross_entropy": lambda: F.cross_entropy(x.float() / 0.7, y),
        "kd_loss": lambda: 4.0 * F.kl_div(F.log_softmax(x.float() / 2, -1), F.softmax(x.flip(0).float() / 2, -1),
                                          reduction="batchmean"),
        "infonce": lambda: F.cross_entropy(h.float() @ h.flip(0).float().T / 0.7, torch.arange(8, device=device)),
        "linear_cross_entropy": lambda: F.cross_entropy(h.float() @ W.float().T / 0.7, y),
    }[name]()
    assert got.dtype == torch.float32
    _close(got, theirs)


PUBLIC_FUNCTIONS = [n for n in fused_tau.__all__ if callable(getattr(fused_tau, n)) and not isinstance(getattr(fused_tau, n), type)]
PUBLIC_MODULES = [n for n in fused_tau.__all__ if isinstance(getattr(fused_tau, n), type)
                  and issubclass(getattr(fused_tau, n), torch.nn.Module)]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_are_typed(name):
    """py.typed ships: every parameter and the return of a public function carries a type that resolves."""
    fn = getattr(fused_tau, name)
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert [p.name for p in params if p.name not in hints] == [] and "return" in hints


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_are_typed(name):
    cls = getattr(fused_tau, name)
    for method in (cls.__init__, cls.forward):
        hints = typing.get_type_hints(method)
        params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
        assert [p.name for p in params if p.name not in hints] == [], method.__qualname__
    assert "return" in typing.get_type_hints(cls.forward)
