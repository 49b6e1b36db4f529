"""Temperature cross-entropy on the row engine: a drop-in for
``F.cross_entropy(input / tau, target, ...)``.

The forward reads the logits once and keeps two fp32 numbers per row; the
backward recomputes the probabilities and writes the gradient once.  No
N × C temporary exists besides the gradient, and no fp32 copy of bf16 logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import (check_ce_options, check_class_targets, check_inplace_target, check_same_device, check_tensor,
                      check_vector, class_targets_message, data_check, legacy_reduction)
from ._dispatch import autocast_off, backend_for, engine, loss_dtype, loss_under_autocast, once_differentiable
from ._tau import compute_dtype, reduce_tau_grad, tau_for_kernel, tau_tensor
from .softmax import view3


# ce_reduce (kernels/row_ce_reduce.py) is one program: past this many rows torch's reductions, which fill the GPU,
# take over (a dozen small launches, about 30 µs, against one program reading 12 bytes a row)
REDUCE_ON_DEVICE_MAX_ROWS = 1 << 16


@dataclass(frozen=True)
class CEOptions:
    """cross_entropy's options as ``CrossEntropyFunction`` carries them from forward to backward."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    inplace_backward: bool = False
    # the forward also writes the gradient for an incoming gradient of 1 (cross_entropy sets it when a
    # backward will follow: see its docstring); reductions 'mean' and 'sum' only
    grad_in_forward: bool = False
    # reductions 'mean' and 'sum' on the Triton backend (eager): the reduction, the mean's denominator
    # and the class-index targets' range check run in the forward's launch (kernels/row_ce.py
    # ce_fwd_reduced), which writes the loss in out_dtype (what cross_entropy returns: no cast after it)
    reduce_on_device: bool = False
    out_dtype: torch.dtype = torch.float32


class CrossEntropyFunction(torch.autograd.Function):
    """F.cross_entropy(input / τ, target, weight, ...) with gradients for input and τ:
    ``apply(input, target, weight, tau, options: CEOptions, backend)``."""

    @staticmethod
    @autocast_off
    def forward(ctx, input, target, weight, tau, options, backend):
        ignore_index, reduction, label_smoothing = options.ignore_index, options.reduction, options.label_smoothing
        x3, A, C, B = view3(input, 1 if input.ndim > 1 else 0)
        prob_target = target.is_floating_point()
        tgt = target.reshape(A, C, B) if prob_target else class_indices(target)
        cdtype = compute_dtype(input)
        w = weight.detach().to(cdtype).contiguous() if weight is not None else None
        tau_k = tau_for_kernel(tau, input)
        two_pass = options.grad_in_forward and reduction != "none"
        denom = dx = dtau = None
        if options.reduce_on_device:
            out, denom, dx, dtau, loss, wy, m, s, a = _forward_reduced_on_device(
                ctx, x3, tgt, w, tau_k, options, prob_target, C, backend)
        else:
            if reduction == "mean" and two_pass:
                denom = mean_denominator(tgt, w, ignore_index, prob_target, A * B, cdtype)
            if two_pass:
                # the gradient of the reduction for an incoming gradient of 1: 1/denominator or 1
                g = (1.0 / denom if denom is not None
                     else torch.ones((), dtype=cdtype, device=input.device)).reshape(1)
                loss, wy, m, s, a, dx, dtau = ops.ce_fwd_grad(backend, x3, tgt, w, tau_k, ignore_index,
                                                              label_smoothing, prob_target, g, ctx.needs_input_grad[3])
            else:
                loss, wy, m, s, a = ops.ce_fwd(backend, x3, tgt, w, tau_k, ignore_index, label_smoothing, prob_target)
            if reduction == "none":
                out = loss.view(tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.ndim > 1 else ())
            else:
                out = loss.sum()
                if reduction == "mean":
                    if denom is None:
                        denom = _nan_if_zero(torch.full((), float(A * B), dtype=cdtype, device=input.device)
                                             if prob_target else wy.sum())
                    out = out / denom
        ctx.backend, ctx.input_shape, ctx.B = backend, input.shape, B
        ctx.options, ctx.prob_target = options, prob_target
        # dx and dτ wait until the first backward takes them (not saved tensors: it scales dx in place)
        ctx.grads_of_forward = (dx, dtau) if two_pass and dx is not None else None
        ctx.save_for_backward(x3, tgt, w, tau_k, m, s, a, denom, tau)
        return out  # the compute dtype (reduced on the device: options.out_dtype): the caller rounds it or not

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        x3, tgt, w, tau_k, m, s, a, denom, tau = ctx.saved_tensors
        opts = ctx.options
        tau_grad = ctx.needs_input_grad[3]
        # the reduced loss's gradient in its own dtype: the kernels read it as fp32 (no cast launched)
        g = grad.detach() if opts.reduce_on_device else grad.detach().to(m.dtype)
        den = None
        if ctx.grads_of_forward is not None:
            # written by the forward for an incoming gradient of 1; a second backward (retain_graph) must
            # not scale the gradient handed out by the first, so it recomputes
            (dx, dtau), ctx.grads_of_forward = ctx.grads_of_forward, None
            g = g.reshape(1)
            dx = ops.ce_grad_rescale(ctx.backend, dx, g) if ctx.needs_input_grad[0] else None
            dtau = reduce_tau_grad(dtau * g, tau, ctx.B) if tau_grad else None
        else:
            if opts.reduction == "none":
                g = g.reshape(-1).contiguous()
            elif opts.reduction == "mean" and opts.reduce_on_device:
                g, den = g.reshape(1), denom.reshape(1)  # the kernel divides: no launch for g / denom
            elif opts.reduction == "mean":
                g = (g / denom).reshape(1)
            else:
                g = g.reshape(1)
            dx, dtau = ops.ce_bwd(ctx.backend, x3, tgt, w, tau_k, m, s, a, g, opts.ignore_index,
                                  opts.label_smoothing, ctx.prob_target, tau_grad, inplace=opts.inplace_backward,
                                  den=den)
            dtau = reduce_tau_grad(dtau, tau, ctx.B) if tau_grad else None
        dx = dx.reshape(ctx.input_shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, dtau, None, None


def _forward_reduced_on_device(ctx, x3, tgt, w, tau_k, options, prob_target, C, backend):
    """CrossEntropyFunction.forward's reductions 'mean' and 'sum' on the Triton backend: the forward's
    launch also reduces the rows' losses, forms the mean's denominator and checks the class-index
    targets (kernels/row_ce.py ce_fwd_reduced; the check raises IndexError after it on the CPU,
    asynchronously on CUDA; the kernel never reads out of bounds).  When the forward writes the
    gradient, a pass over the targets (ce_reduce) first gives the denominator, the gradient's scale, and
    checks them.  Few long rows (split across programs) write no gradient in the forward: their
    backward reads the logits again either way.  Returns (out, denom or None, dx, dτ, loss, w_y, M, S, A);
    dx is None where the backward computes the gradient."""
    row = engine("triton", "row")
    R = x3.shape[0] * x3.shape[2]
    mean = options.reduction == "mean"
    ignore_index, smoothing = options.ignore_index, options.label_smoothing
    den_mode = (row.DENOM_ROWS if prob_target else row.DENOM_TARGETS) if mean else row.DENOM_NONE
    message = class_targets_message(C, ignore_index)
    stats = ops.ce_fwd_outputs(x3, smoothing, prob_target)
    dx = dtau = None
    if options.grad_in_forward and not row.ce_rows_split(x3, prob_target, smoothing, write_grad=True):
        _, den, g, ok = row.ce_reduce(x3.device, None, None if prob_target else tgt, w, None, R, C, ignore_index,
                                      den_mode, not prob_target)
        if ok is not None:
            data_check(ok, message, IndexError)
        dx, dtau = ops.softmax_bwd_outputs(x3, ctx.needs_input_grad[3])
        out, _, _, _ = row.ce_fwd_reduced(
            x3, tgt, w, tau_k, ignore_index, smoothing, prob_target, row.DENOM_GIVEN if mean else row.DENOM_NONE,
            False, options.out_dtype, stats, g=g, dx=dx, dtau=dtau, den_in=den)
    else:
        out, den, _, ok = row.ce_fwd_reduced(x3, tgt, w, tau_k, ignore_index, smoothing, prob_target, den_mode,
                                             not prob_target, options.out_dtype, stats)
        if ok is not None:
            data_check(ok, message, IndexError)
    loss, wy, m, s, a = stats
    return out, (den if mean else None), dx, dtau, loss, wy, m, s, a


def _nan_if_zero(denom):
    """Σ w_y = 0: torch's hard-label part is 0/0 = NaN, whatever the smoothing part's x/0 (+inf)."""
    return torch.where(denom == 0, float("nan"), denom)


def class_indices(target):
    """Class-index targets as the row kernels read them (cross_entropy's, kd_loss's): one per row, flat,
    contiguous int64 (a uint8 target would wrap ignore_index -100 to a real class 156)."""
    return target.reshape(-1).to(torch.int64).contiguous()


def mean_denominator(tgt, w, ignore_index, prob_target, n_rows, cdtype):
    """'mean''s denominator from the targets alone (a pass over N targets, on the device): the row count
    for probabilities, else Σ w_y over the rows whose y is not ignore_index (their count without weights)."""
    if prob_target:
        return _nan_if_zero(torch.full((), float(n_rows), dtype=cdtype, device=tgt.device))
    valid = tgt != ignore_index
    if w is None:
        return _nan_if_zero(valid.sum(dtype=cdtype))
    return _nan_if_zero(torch.where(valid, w[torch.where(valid, tgt, 0)], 0.0).sum())


def _check(input, target, weight, ignore_index, reduction, label_smoothing):
    check_tensor(input, "input")
    check_tensor(target, "target", floating=False)
    if input.ndim == 0:
        raise ValueError("input must have at least one dimension (the classes), got a 0-dim tensor")
    check_same_device(target, "target", input, "input")
    class_dim = 1 if input.ndim > 1 else 0
    C = input.shape[class_dim]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"probability target must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
    else:
        if target.dtype in (torch.bool, torch.complex64, torch.complex128) or target.is_complex():
            raise TypeError(f"target must hold class indices (an integer dtype) or probabilities, got {target.dtype}")
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.ndim > 1 else ()
        if tuple(target.shape) != expected:
            raise ValueError(f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
    check_vector(weight, "weight", C, input)
    check_ce_options(reduction, ignore_index, label_smoothing)
    return class_dim


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                  ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, tau: float | Tensor = 1.0, inplace_backward: bool = False) -> Tensor:
    """``F.cross_entropy(input / tau, target, weight, size_average, ignore_index, reduce, reduction,
    label_smoothing)``: torch's parameters in torch's positional slots; ``tau`` is keyword-only.

    Per row, with z = input / τ and lse = logsumexp(z):
    class index y: ``(1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c)``, 0 where y == ignore_index;
    probabilities t: ``Σ_c w_c ((1-ε) t_c + ε/C) (lse - z_c)``.
    ``mean`` divides by Σ w_y over non-ignored rows (class indices) or by the row count
    (probabilities), as torch does.  Inputs (C,), (N, C) and (N, C, d1, ...).
    ``size_average`` / ``reduce`` are torch's deprecated pair, with torch's meaning (and warning).
    Accepted beyond torch: class indices of any integer dtype (compared as int64), float64
    class weights with float32 input.

    τ: a positive float, a one-element tensor, or one τ per sample (shape (N,)); a
    tensor τ that requires grad gets dL/dτ = Σ_rows (z_y - Σ p z) / τ (hard labels).
    ``inplace_backward=True`` writes the gradient into ``input``'s memory (saves one
    N × C buffer; only when nothing else reads ``input`` after the loss).  It is refused for
    an input whose elements overlap (an expanded tensor) and for a leaf that requires grad.

    Passes over the logits: without a gradient (``torch.no_grad()`` or an input that does not require
    grad) the forward reads them once.  When a backward will follow (grad mode on, ``input`` requires
    grad) and ``reduction`` is 'mean' or 'sum', the forward also writes the gradient for an incoming
    gradient of 1 (and τ's), reading each row a second time while it is in L2: forward + backward read
    the logits from memory once and write the gradient once, where a separate backward reads them
    again.  The gradient buffer (input's size) then lives from the forward to the backward, which only
    scales it by the real incoming gradient, in place and on the device (it is not touched when that
    gradient is 1, the usual ``loss.backward()``; a scaled loss such as AMP's costs one read and write
    of it).  A forward under grad mode whose backward never runs (validation without ``no_grad``)
    pays the write.  Few long rows (split across programs to fill the GPU; Triton backend, eager) do not
    write it in the forward: the gradient pass would be a second launch reading the logits again either
    way, so the backward makes it, with the real incoming gradient (no gradient buffer in between).
    ``reduction='none'`` (a gradient per row, known only in the backward) and
    ``inplace_backward=True`` keep the separate backward: read in the forward, read and write in
    the backward.
    """
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    _check(input, target, weight, ignore_index, reduction, label_smoothing)
    if inplace_backward:
        check_inplace_target(input, "input")
    outer = tuple(input.shape[:1]) if input.ndim > 1 else ()
    tau_t = tau_tensor(tau, input, outer)
    backend = backend_for(input)
    n_classes = input.shape[1 if input.ndim > 1 else 0]
    reduce_on_device = (backend == "triton" and reduction != "none" and input.numel() > 0
                        and input.numel() // n_classes <= REDUCE_ON_DEVICE_MAX_ROWS
                        and not torch.compiler.is_compiling() and not ops.tracing())
    if not target.is_floating_point() and not reduce_on_device:
        check_class_targets(target, n_classes, ignore_index)
    if backend == "reference" or input.numel() == 0:
        return reference.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                       label_smoothing=label_smoothing, tau=tau_t)
    grad_in_forward = (torch.is_grad_enabled() and input.requires_grad and reduction != "none"
                       and not inplace_backward)
    options = CEOptions(ignore_index, reduction, float(label_smoothing), bool(inplace_backward), grad_in_forward,
                        reduce_on_device, loss_dtype(input))
    out = CrossEntropyFunction.apply(input, target, weight, tau_t, options, backend)
    return loss_under_autocast(out, input)
