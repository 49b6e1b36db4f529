"""``linear_cross_entropy`` on the tile engine: an LLM head or a NormFace classifier and its
cross-entropy without the N × V logits (the signature of torch's ``F.linear_cross_entropy``
plus ``tau`` and ``normalize``).

The tiles give, per row, the log-sum-exp over the non-target classes and the target's
logit; class weights and label smoothing only need Σ_j w_j z_ij, which is closed-form:
``(x_i · Σ_j w_j W_j + Σ_j w_j b_j) / τ``.  Their gradient is a rank-one update, the
target's a sparse one, and the rest comes from the recomputed tiles.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _ops as ops
from . import reference
from ._checks import (check_ce_options, check_class_targets, check_same_device, check_tensor, check_vector,
                      reduce_tau_grad, tau_for_kernel, tau_tensor)
from ._dispatch import autocast_off, backend_for, loss_under_autocast
from .contrastive import nll_from_stats, row_grad, softmax_stats

REDUCTIONS = ("none", "mean", "sum")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Rows of ``F.cross_entropy((x @ W.T + b) / τ, y, w, ignore_index, label_smoothing)``."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, W, b, target, weight, tau, reduction, ignore_index, smoothing, backend):
        N, V = x.shape[0], W.shape[0]
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        tau_rows = tau_for_kernel(tau, x).expand(N).contiguous()
        valid = target != ignore_index
        y = torch.where(valid, target, 0)
        w = weight.to(cd) if weight is not None else None
        w_y = torch.where(valid, w[y] if w is not None else torch.ones(N, device=x.device, dtype=cd), 0.0)
        # dot units (before 1/τ): m, s over the non-target classes, y_t the target's logit
        m, s, y_t = ops.tile_fwd(backend, x, W, b, tau_rows, y, None)
        nll = nll_from_stats(m, s, y_t, tau_rows)
        shift, e_t, e_rest = softmax_stats(m, s, y_t, tau_rows)
        loss = (1.0 - smoothing) * w_y * nll
        wy = None
        if smoothing > 0:
            # Σ_j w_j (lse - z_j) = W_sum log(e_t + e_rest) + (W_sum shift - Σ_j w_j y_j) / τ, the last sum
            # closed-form (x · Σ_j w_j W_j + Σ_j w_j b_j), in dot units
            w_all = w if w is not None else torch.ones(V, device=x.device, dtype=cd)
            wW = w_all @ W.to(cd)
            wy = x.to(cd) @ wW + ((w_all * b.to(cd)).sum() if b is not None else 0.0)
            w_sum = w_all.sum()
            spread = w_sum * torch.log(e_t + e_rest) + (w_sum * shift - wy) / tau_rows
            loss = loss + torch.where(valid, smoothing / V * spread, 0.0)
        denom = w_y.sum() if reduction == "mean" else None
        out = loss if reduction == "none" else (loss.sum() / denom if reduction == "mean" else loss.sum())
        ctx.backend, ctx.options = backend, (reduction, smoothing)
        ctx.save_for_backward(x, W, b, y, valid, w, w_y, tau_rows, y_t, shift, e_t, e_rest, nll, wy, denom, tau)
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        x, W, b, y, valid, w, w_y, tau_rows, y_t, shift, e_t, e_rest, nll, wy, denom, tau = ctx.saved_tensors
        reduction, smoothing = ctx.options
        N, V = x.shape[0], W.shape[0]
        cd = nll.dtype
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_tau = ctx.needs_input_grad[5]
        g = row_grad(grad, N, "sum" if reduction == "mean" else reduction, cd)
        if reduction == "mean":
            g = g / denom
        g = torch.where(valid, g, 0.0)
        w_all = w if w is not None else torch.ones(V, device=x.device, dtype=cd)
        h = (1.0 - smoothing) * w_y  # dz_ij = g_i [h (p_ij - δ) + (ε/V)(W_sum p_ij - w_j)]
        u0 = g / (tau_rows * (e_t + e_rest))  # g p_ij / τ = u0 exp((y_ij - shift) / τ)
        scale = u0 * (h + smoothing / V * w_all.sum())
        da, db, dbias, zp = ops.tile_bwd(ctx.backend, x, W, b, tau_rows, y, None, shift, scale, y_t, need_x,
                                         need_W or need_b, need_tau)
        # the target's own column, dz_y / τ, with p_y - 1 = -e_rest / (e_t + e_rest) (exact when tiny)
        dy_t = u0 * (smoothing / V * w_all.sum()) * e_t - (u0 * h) * e_rest
        sparse = dy_t.unsqueeze(-1)
        dx = dW = dB = None
        if need_x:
            dx = da.to(cd) + sparse * W[y].to(cd)
            if smoothing > 0:
                dx -= (smoothing / V * g / tau_rows).unsqueeze(-1) * (w_all @ W.to(cd))
            dx = dx.to(x.dtype)
        if need_W or need_b:
            gx = (smoothing / V * g / tau_rows)  # rank one: -(ε/V) w_j Σ_i (g_i / τ_i) x_i
            if need_W:
                dW = db.to(cd).index_add_(0, y, sparse * x.to(cd))
                if smoothing > 0:
                    dW -= w_all.unsqueeze(-1) * (gx @ x.to(cd)).unsqueeze(0)
                dW = dW.to(W.dtype)
            if need_b:
                dB = dbias.index_add_(0, y, sparse.squeeze(-1))
                if smoothing > 0:
                    dB -= w_all * gx.sum()
                dB = dB.to(b.dtype)
        dtau = None
        if need_tau:
            # dL/dτ_i = -(1/τ_i) Σ_j (y_ij - y_t) dz_ij / τ_i (Σ_j dz_ij = 0: the target's own term is 0)
            terms = zp
            if smoothing > 0:
                terms = terms - smoothing / V * g / tau_rows * (wy - w_all.sum() * y_t)
            dtau = reduce_tau_grad(-terms / tau_rows, tau, 1)
        return dx, dW, dB, None, None, dtau, None, None, None, None


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, tau=1.0, normalize=False):
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias) / tau, target, weight, ...)`` without
    the logits: extra memory O(N + V) beyond inputs and gradients.

    ``input`` (..., D) and ``target`` (...) are flattened to rows; ``weight`` is the class weight
    (as in torch's ``F.linear_cross_entropy``); ``normalize=True`` L2-normalises the rows of input
    and linear_weight first (NormFace: cosine logits with scale s = 1/τ).  τ: a positive float, a
    one-element tensor (learnable) or one τ per row.
    """
    check_tensor(input, "input")
    check_tensor(linear_weight, "linear_weight")
    check_tensor(target, "target", floating=False)
    if input.ndim < 1 or linear_weight.ndim != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight must be (V, {input.shape[-1] if input.ndim else '?'}) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    check_same_device(linear_weight, "linear_weight", input, "input")
    check_same_device(target, "target", input, "input")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    V = linear_weight.shape[0]
    check_vector(linear_bias, "linear_bias", V, input)
    check_vector(weight, "weight", V, input)
    check_ce_options(reduction, REDUCTIONS, ignore_index, label_smoothing)
    check_class_targets(target, V, ignore_index)
    x = input.reshape(-1, input.shape[-1])
    tau_t = tau_tensor(tau, input, (x.shape[0],) if input.ndim > 1 else ())
    backend = backend_for(input)
    if backend == "reference" or x.shape[0] == 0:
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                              reduction=reduction, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, tau=tau_t, normalize=normalize)
    W = linear_weight
    if normalize:
        x, W = F.normalize(x, dim=-1), F.normalize(W, dim=-1)
    out = LinearCrossEntropyFunction.apply(x, W, linear_bias, target.reshape(-1).to(torch.int64), weight, tau_t,
                                           reduction, ignore_index, float(label_smoothing), backend)
    return loss_under_autocast(out.reshape(target.shape) if reduction == "none" else out, input)
