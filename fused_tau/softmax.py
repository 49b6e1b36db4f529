"""softmax, log_softmax and logsumexp with a temperature, on the row engine.

Layers: kernels/row_softmax.py (or the torch path, fused_tau/_torch_softmax.py) -> custom ops (_ops.py)
-> ``SoftmaxFunction`` / ``LogSumExpFunction`` -> the public functions below.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import check_dim, check_tensor
from ._dispatch import MODE_LOG_SOFTMAX, MODE_LSE, MODE_SOFTMAX, autocast_off, backend_for, once_differentiable
from ._tau import reduce_tau_grad, tau_for_kernel, tau_tensor


def view3(x, dim):
    """x as (A, C, B) around ``dim`` (a view whenever one exists), and (A, C, B)."""
    shape = tuple(x.shape) if x.ndim else (1,)
    A = math.prod(shape[:dim])
    C = shape[dim]
    B = math.prod(shape[dim + 1:])
    return x.reshape(A, C, B), A, C, B


class SoftmaxFunction(torch.autograd.Function):
    """softmax(x / τ) or log_softmax(x / τ) along ``dim``; τ may require grad."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, tau, dim, log, backend):
        x3, A, C, B = view3(x, dim)
        tau_k = tau_for_kernel(tau, x)
        out, m, s = ops.softmax_fwd(backend, x3, tau_k, MODE_LOG_SOFTMAX if log else MODE_SOFTMAX)
        ctx.backend, ctx.log, ctx.shape3 = backend, log, (A, C, B)
        tau_grad = ctx.needs_input_grad[1]
        ctx.save_for_backward(out, x3 if tau_grad else None, m, s, tau_k, tau)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        out, x3, m, s, tau_k, tau = ctx.saved_tensors
        tau_grad = ctx.needs_input_grad[1]
        g = grad.reshape(out.shape).contiguous()
        dx, dtau = ops.softmax_bwd(ctx.backend, out, g, x3 if tau_grad else out, m, s, tau_k, ctx.log, tau_grad)
        dtau = reduce_tau_grad(dtau, tau, ctx.shape3[2]) if tau_grad else None
        return dx.view(grad.shape), dtau, None, None, None


class LogSumExpFunction(torch.autograd.Function):
    """τ · logsumexp(x / τ) along ``dim``; τ may require grad."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, tau, dim, backend):
        x3, A, C, B = view3(x, dim)
        tau_k = tau_for_kernel(tau, x)
        out, m, s = ops.softmax_fwd(backend, x3, tau_k, MODE_LSE)
        ctx.backend, ctx.x_shape, ctx.B = backend, x.shape, B
        ctx.save_for_backward(x3, m, s, tau_k, tau)
        return out.view(tuple(x.shape[:dim]) + tuple(x.shape[dim + 1:]))

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        x3, m, s, tau_k, tau = ctx.saved_tensors
        tau_grad = ctx.needs_input_grad[1]
        dx, dtau = ops.lse_bwd(ctx.backend, x3, m, s, tau_k, grad.reshape(-1).contiguous(), tau_grad)
        dtau = reduce_tau_grad(dtau, tau, ctx.B) if tau_grad else None
        return dx.view(ctx.x_shape), dtau, None, None


def _prepare(x, tau, dim):
    check_tensor(x, "input")
    dim = check_dim(dim, x.ndim)
    tau_t = tau_tensor(tau, x, tuple(x.shape[:dim]))
    return dim, tau_t, backend_for(x)


def _cast(input, dtype):
    """torch.softmax's ``dtype=``: the input is cast to it before the operation (as torch does)."""
    check_tensor(input, "input")
    if dtype is None:
        return input
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    return input.to(dtype)


def softmax(input: Tensor, dim: int = -1, *, tau: float | Tensor = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.softmax(input / tau, dim)`` in one fused pass.

    Positional order as ``torch.softmax(input, dim)``; ``tau`` is keyword-only; ``dtype`` casts
    the input first, as torch's.  ``dim`` defaults to the last dimension (torch requires it).
    τ: a positive float, a one-element tensor, or one τ per row (shape
    ``input.shape[:dim]``); a tensor τ that requires grad gets its gradient.
    """
    x = _cast(input, dtype)
    dim, tau_t, backend = _prepare(x, tau, dim)
    if backend == "reference" or x.numel() == 0:
        return reference.softmax(x, tau=tau_t, dim=dim)
    return SoftmaxFunction.apply(x, tau_t, dim, False, backend)


def log_softmax(input: Tensor, dim: int = -1, *, tau: float | Tensor = 1.0,
                dtype: torch.dtype | None = None) -> Tensor:
    """``torch.log_softmax(input / tau, dim)``; the argmax's value is -log1p(Σ others), exact at small τ.
    Positional order as torch's; ``tau`` is keyword-only."""
    x = _cast(input, dtype)
    dim, tau_t, backend = _prepare(x, tau, dim)
    if backend == "reference" or x.numel() == 0:
        return reference.log_softmax(x, tau=tau_t, dim=dim)
    return SoftmaxFunction.apply(x, tau_t, dim, True, backend)


def logsumexp(input: Tensor, dim: int = -1, keepdim: bool = False, *, tau: float | Tensor = 1.0) -> Tensor:
    """``tau * torch.logsumexp(input / tau, dim, keepdim)``: the smooth max, → max(input) as τ → 0.
    Positional order as ``torch.logsumexp(input, dim, keepdim)``; ``tau`` is keyword-only."""
    x = input
    dim, tau_t, backend = _prepare(x, tau, dim)
    if backend == "reference" or x.numel() == 0:
        return reference.logsumexp(x, tau=tau_t, dim=dim, keepdim=keepdim)
    out = LogSumExpFunction.apply(x, tau_t, dim, backend)
    return out.unsqueeze(dim) if keepdim and x.ndim else out
