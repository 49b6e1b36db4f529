"""The suite's one comparison of an op against its float64 reference, value and gradients."""
import torch

from .tolerances import assert_close_to_ref


class Fixed:
    """An argument passed unchanged to the op under test (and in float64 to the reference): a class
    weight, a probability target that is not differentiated, an option tensor."""

    def __init__(self, value):
        self.value = value


def _as(arg, dtype, grad):
    if isinstance(arg, Fixed):
        v = arg.value
        return v.double() if dtype == torch.float64 and v.is_floating_point() else v
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.detach().to(dtype).clone().requires_grad_(grad)
    return arg


def check_against_reference(fn, ref_fn, args, *, dtype, tau=None, grads=None, scale=1.0, tau_scale=1.0):
    """``fn(*args, tau=tau)`` against ``ref_fn`` on the same values in float64.

    Floating tensors in ``args`` are cast to ``dtype`` and differentiated (``grads``, a bool per
    argument, turns that off); other values (class indices, None, ``Fixed``) pass unchanged.  The
    output, the gradient of every differentiated argument and of τ (a tensor that requires grad) must
    be within the tolerance of ``dtype`` (tests/tolerances.py, ``scale`` for the output and the input
    gradients, ``tau_scale`` for τ's, a sum over many elements).  In fp32 the bound is also torch's own
    error: ``ref_fn`` run on the fp32 values, as tolerances.py explains.  Returns the op's output."""
    grads = [True] * len(args) if grads is None else list(grads)
    xs = [_as(a, dtype, g) for a, g in zip(args, grads)]
    out = fn(*xs, tau=tau)
    assert out.dtype == dtype, (out.dtype, dtype)
    g_out = torch.rand(out.shape, device=out.device) + 0.5
    (out.float() * g_out).sum().backward()

    x64 = [_as(a if isinstance(a, Fixed) else x, torch.float64, g) for x, a, g in zip(xs, args, grads)]
    tau64 = tau.detach().double().requires_grad_(tau.requires_grad) if isinstance(tau, torch.Tensor) else tau
    ref = ref_fn(*x64, tau=tau64)
    (ref * g_out.double()).sum().backward()

    torch_out, torch_grads = None, [None] * len(xs)
    if dtype == torch.float32:
        x32 = [_as(a if isinstance(a, Fixed) else x, torch.float32, g) for x, a, g in zip(xs, args, grads)]
        torch_out = ref_fn(*x32, tau=tau.detach() if isinstance(tau, torch.Tensor) else tau)
        (torch_out * g_out).sum().backward()
        torch_grads = [x.grad if isinstance(x, torch.Tensor) else None for x in x32]

    assert_close_to_ref(out, ref, dtype, torch_same_dtype=torch_out, scale=scale)
    for a, x, r, tg, g in zip(args, xs, x64, torch_grads, grads):
        if isinstance(a, Fixed) or not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            continue
        if not g:
            assert x.grad is None, "an argument that is not differentiated got a gradient"
            continue
        assert x.grad is not None and x.grad.dtype == dtype
        assert_close_to_ref(x.grad, r.grad, dtype, torch_same_dtype=tg, scale=scale)
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        assert tau.grad.shape == tau.shape
        assert_close_to_ref(tau.grad, tau64.grad, dtype, scale=tau_scale)
    return out
