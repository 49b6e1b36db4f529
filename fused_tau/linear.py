"""``linear_cross_entropy`` on the tile engine: an LLM head or a NormFace classifier and its
cross-entropy without the N × C logits (torch 2.13's ``F.linear_cross_entropy`` plus ``tau`` and
``normalize``).

Per row i, with z_ic = (x_i · W_c + b_c) / τ_i and lse_i = log Σ_c exp(z_ic), every loss here is
``Σ_c a_ic (lse_i - z_ic)`` for some coefficients a:
  class targets        a_ic = w_c [(1 - ε) δ_{c,y_i} + ε / C]   (0 on ignored rows)
  probability targets  a_ic = w_c [(1 - ε) t_ic + ε / C]
The tiles give the row statistics in dot units (x·W + b, before 1/τ); the dense part Σ_c a_ic z_ic is closed-form,
``(x_i · (a_i @ W) + a_i · b) / τ_i``, a GEMM with the coefficients the caller already holds.
Its gradient, dz_ic = g_i (A_i p_ic - a_ic) with A_i = Σ_c a_ic, is the tiles' recomputed
p-part (coefficient g·A) minus two GEMMs with a; a class target's own column is a sparse update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import check_ce_options, check_class_targets, check_same_device, check_tensor, check_vector
from ._dispatch import autocast_off, backend_for, loss_under_autocast, once_differentiable
from ._tau import compute_dtype, reduce_tau_grad, tau_for_kernel, tau_tensor
from .contrastive import row_grad
from .kernels import TILE_E_POS, TILE_E_REST, TILE_M, TILE_NLL, TILE_POS, TILE_S, TILE_SHIFT


class _DefaultIgnoreIndex(int):
    """The default ``ignore_index`` (-100): an int, told apart from an explicit -100 so that, as in
    torch, probability targets refuse an ``ignore_index`` the caller gave."""

    def __repr__(self):
        return "-100"


IGNORE_INDEX_DEFAULT = _DefaultIgnoreIndex(-100)


def _tile_stats(backend, x, W, b, tau_rows, y):
    """One forward pass of the tile engine, in dot units y_ic = x_i · W_c + b_c (before 1/τ):
    class targets ``y``: (shift, e_t, e_rest, y_t, nll) with shift = the row's largest dot product,
    e_t = exp((y_t - shift)/τ), e_rest = Σ_{c ≠ y} exp((y_c - shift)/τ) and nll = lse - z_y exact
    when tiny; ``y`` None: (m, s) over every column, lse = m/τ + log s."""
    stats, _ = ops.tile_fwd(backend, x, W, b, tau_rows, y, None)
    if y is None:
        return stats[TILE_M], stats[TILE_S]
    return stats[TILE_SHIFT], stats[TILE_E_POS], stats[TILE_E_REST], stats[TILE_POS], stats[TILE_NLL]


def _tile_grads(backend, x, W, b, tau_rows, y, shift, scale, ref, need_x, need_W, need_b, need_zp):
    """The tiles' recomputed p-part Q_ic = scale_i exp((y_ic - shift_i)/τ_i) (= dz_ic / τ_i) over the
    columns c ≠ y_i, as (dx = Q @ W, dW = Qᵀ @ x, dbias = Σ_i Q, zp_i = Σ_c (y_ic - ref_i) Q_ic), each
    None when not asked for."""
    return ops.tile_bwd(backend, x, W, b, tau_rows, y, None, shift, scale, ref, need_x, need_W or need_b, need_zp)


def _weighted_dot_sum(x, a, W, b, cd):
    """Σ_c a_ic y_ic = x_i · (a_i @ W) + a_i · b in dot units (τ z = y), for a (C,) shared by every
    row or (N, C)."""
    aW = a @ W.to(cd)
    ab = (a * b.to(cd)).sum(-1) if b is not None else 0.0
    xa = x.to(cd) @ aW if a.ndim == 1 else (x.to(cd) * aW).sum(-1)
    return xa + ab


def _dense_grads(g_tau, a, x, W, cd, need_x, need_W, need_b):
    """The gradients of Σ_i g_i Σ_c a_ic z_ic (g_tau = g / τ): what the -a part of dz contributes,
    negated; a is (C,) shared by every row or (N, C)."""
    dx = dW = db = None
    if a.ndim == 1:
        if need_x:
            dx = g_tau.unsqueeze(-1) * (a @ W.to(cd)).unsqueeze(0)
        if need_W:
            dW = a.unsqueeze(-1) * (g_tau @ x.to(cd)).unsqueeze(0)
        if need_b:
            db = a * g_tau.sum()
    else:
        ga = g_tau.unsqueeze(-1) * a
        if need_x:
            dx = ga @ W.to(cd)
        if need_W:
            dW = ga.T @ x.to(cd)
        if need_b:
            db = ga.sum(0)
    return dx, dW, db


def _prob_coefficients(target, w, smoothing, cd):
    """a_ic = w_c ((1 - ε) t_ic + ε / C): the smoothed probability targets times the class weights."""
    t = target.to(cd)
    if smoothing > 0:
        t = (1.0 - smoothing) * t + smoothing / t.shape[-1]
    return t * w if w is not None else t


@dataclass(frozen=True)
class LinearCEOptions:
    """linear_cross_entropy's options as ``LinearCrossEntropyFunction`` carries them."""
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Rows of ``F.cross_entropy((x @ W.T + b) / τ, target, w, ignore_index=..., label_smoothing=...)`` for
    x (N, D), W (C, D): ``target`` holds class indices (N,) (int64) or probabilities (N, C) (float).
    reduction 'none' gives the rows, 'sum' their sum, 'mean' their sum divided by ``denom`` (the
    caller's: Σ of the target weights for class targets, the number of rows for probabilities; one
    denominator may span several calls, as for K-dimensional losses).  The result is in the compute
    dtype (fp32, fp64 for fp64 inputs); the caller casts it."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, W, b, target, weight, tau, denom, options, backend):
        N, C = x.shape[0], W.shape[0]
        reduction, ignore_index, smoothing = options.reduction, options.ignore_index, options.label_smoothing
        cd = compute_dtype(x)
        tau_rows = tau_for_kernel(tau, x)  # one τ or one per row: broadcasts
        w = weight.to(cd) if weight is not None else None
        if target.is_floating_point():
            m, s = _tile_stats(backend, x, W, b, tau_rows, None)
            a = _prob_coefficients(target, w, smoothing, cd)
            A, ya = a.sum(-1), _weighted_dot_sum(x, a, W, b, cd)
            # Σ_c a_c (lse - z_c) = A log s + (A m - Σ_c a_c y_c) / τ: the large parts cancel in dot units
            loss = A * torch.log(s) + (A * m - ya) / tau_rows
            saved = (target, m, s, ya, None, None, None, None)
        else:
            valid = target != ignore_index
            y = torch.where(valid, target, 0)
            w_y = torch.where(valid, w[y] if w is not None else torch.ones(N, device=x.device, dtype=cd), 0.0)
            shift, e_t, e_rest, y_t, nll = _tile_stats(backend, x, W, b, tau_rows, y)
            loss = (1.0 - smoothing) * w_y * nll
            wy = None
            if smoothing > 0:
                # Σ_c w_c (lse - z_c) = W_sum log(e_t + e_rest) + (W_sum shift - Σ_c w_c y_c) / τ, the last
                # sum closed-form, in dot units
                w_all = w if w is not None else torch.ones(C, device=x.device, dtype=cd)
                wy, w_sum = _weighted_dot_sum(x, w_all, W, b, cd), w_all.sum()
                spread = w_sum * torch.log(e_t + e_rest) + (w_sum * shift - wy) / tau_rows
                loss = loss + torch.where(valid, smoothing / C * spread, 0.0)
            saved = (y, shift, e_t, e_rest, y_t, valid, w_y, wy)
        out = loss if reduction == "none" else (loss.sum() / denom if reduction == "mean" else loss.sum())
        ctx.backend, ctx.options = backend, options
        ctx.save_for_backward(x, W, b, w, tau_rows, denom, tau, *saved)
        return out

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        x, W, b, w, tau_rows, denom, tau, target, *stats = ctx.saved_tensors
        reduction, smoothing = ctx.options.reduction, ctx.options.label_smoothing
        N, C = x.shape[0], W.shape[0]
        cd = tau_rows.dtype
        need_x, need_W, need_b, need_t = ctx.needs_input_grad[:4]
        need_tau = ctx.needs_input_grad[5]
        g = row_grad(grad, N, "sum" if reduction == "mean" else reduction, cd)
        if reduction == "mean":
            g = g / denom
        if target.is_floating_point():
            m, s, ya = stats[:3]
            return LinearCrossEntropyFunction._backward_probs(ctx, g, x, W, b, w, tau_rows, tau, target, m, s, ya,
                                                              smoothing, need_x, need_W, need_b, need_t, need_tau)
        y, (shift, e_t, e_rest, y_t, valid, w_y, wy) = target, stats
        g = torch.where(valid, g, 0.0)
        w_all = w if w is not None else torch.ones(C, device=x.device, dtype=cd)
        h = (1.0 - smoothing) * w_y  # dz_ic = g_i [h (p_ic - δ_{c,y}) + (ε/C)(W_sum p_ic - w_c)]
        u0 = g / (tau_rows * (e_t + e_rest))  # g p_ic / τ = u0 exp((y_ic - shift) / τ)
        dx, dW, dB, zp = _tile_grads(ctx.backend, x, W, b, tau_rows, y, shift, u0 * (h + smoothing / C * w_all.sum()),
                                     y_t, need_x, need_W, need_b and b is not None, need_tau)
        dW = dW if need_W else None
        # the target's own column dz_y / τ, with p_y - 1 = -e_rest / (e_t + e_rest) (exact when tiny)
        sparse = (u0 * (smoothing / C * w_all.sum()) * e_t - (u0 * h) * e_rest).unsqueeze(-1)
        dense = (_dense_grads(smoothing / C * g / tau_rows, w_all, x, W, cd, need_x, need_W,
                              need_b and b is not None) if smoothing > 0 else (None, None, None))
        if smoothing > 0:
            if need_x:
                dx = dx.to(cd) + sparse * W[y].to(cd)
            if need_W:
                dW = dW.to(cd).index_add_(0, y, sparse * x.to(cd))
        else:  # in place, D-slices at a time: no fp32 copy of dW (K × D, 2.1 GB for an LLM head)
            if need_x:
                _add_scaled_rows_(dx, None, sparse.squeeze(-1), W, y)
            if need_W:
                _add_scaled_rows_(dW, y, sparse.squeeze(-1), x, None)
        if need_b and b is not None:
            dB = dB.index_add_(0, y, sparse.squeeze(-1))
        dx, dW, dB = _finish(dx, dW, dB, dense, x, W, b)
        dtau = None
        if need_tau:
            # dL/dτ_i = -(1/τ_i²) Σ_c (y_ic - y_t) dz_ic (Σ_c dz_ic = 0: the target's own term is 0)
            terms = zp
            if smoothing > 0:
                terms = terms - smoothing / C * g / tau_rows * (wy - w_all.sum() * y_t)
            dtau = reduce_tau_grad(-terms / tau_rows, tau, 1)
        return dx, dW, dB, None, None, dtau, None, None, None

    @staticmethod
    def _backward_probs(ctx, g, x, W, b, w, tau_rows, tau, target, m, s, ya, smoothing, need_x, need_W, need_b,
                        need_t, need_tau):
        cd = m.dtype
        has_b = need_b and b is not None
        a = _prob_coefficients(target, w, smoothing, cd)
        A = a.sum(-1)
        # dz_ic = g_i (A_i p_ic - a_ic): the p-part from the tiles (p_ic = exp((y_ic - m_i)/τ_i) / s_i),
        # the a-part from two GEMMs
        dx, dW, dB, zp = _tile_grads(ctx.backend, x, W, b, tau_rows, None, m, g * A / (tau_rows * s), m, need_x,
                                     need_W, has_b, need_tau)
        dW = dW if need_W else None
        dense = _dense_grads(g / tau_rows, a, x, W, cd, need_x, need_W, has_b)
        dx, dW, dB = _finish(dx, dW, dB, dense, x, W, b)
        dt = None
        if need_t:
            # dL/dt_ic = g_i (1 - ε) w_c (lse_i - z_ic): as large as the target itself
            z = x.to(cd) @ W.to(cd).T
            if b is not None:
                z = z + b.to(cd)
            lse_minus_z = torch.log(s).unsqueeze(-1) + (m.unsqueeze(-1) - z) / tau_rows.unsqueeze(-1)
            dt = lse_minus_z * ((1.0 - smoothing) * g).unsqueeze(-1)
            dt = (dt * w if w is not None else dt).to(target.dtype)
        dtau = None
        if need_tau:
            # dL/dτ_i = -(1/τ_i²) Σ_c (y_ic - m_i) dz_ic (Σ_c dz_ic = 0): the tiles' zp minus the a-part
            dtau = reduce_tau_grad(-(zp - g / tau_rows * (ya - m * A)) / tau_rows, tau, 1)
        return dx, dW, dB, dt, None, dtau, None, None, None


CORRECTION_ELEMENTS = 1 << 22  # fp32 elements of _add_scaled_rows_'s temporaries per D-slice (16 MiB)


def _add_scaled_rows_(dst, index, coef, src, src_rows):
    """dst[index[i]] += coef[i] · src[src_rows[i]] for every i (``index`` None: row i; ``src_rows``
    None: row i), several i possibly sharing a row of dst: each touched row summed in fp32 (fp64 for
    fp64 operands) and rounded once into dst's dtype.  Only the touched rows are read and written, a
    D-slice at a time, so the temporaries stay within about CORRECTION_ELEMENTS elements whatever
    dst's size (no host sync: the rows' runs come from a sort)."""
    n, D = coef.shape[0], dst.shape[1]
    step = max(1, CORRECTION_ELEMENTS // max(n, 1))
    f32 = torch.promote_types(dst.dtype, coef.dtype)  # fp32, or fp64 for fp64 operands
    if index is None:
        for d0 in range(0, D, step):
            part = dst[:, d0:d0 + step]
            rows = src[src_rows, d0:d0 + step] if src_rows is not None else src[:, d0:d0 + step]
            part.copy_(part.to(f32).addcmul_(coef.unsqueeze(-1), rows.to(f32)))
        return dst
    idx, order = torch.sort(index, stable=True)
    head = torch.searchsorted(idx, idx)  # each position's first position among equal rows
    pick = order if src_rows is None else src_rows[order]
    for d0 in range(0, D, step):
        rows = dst[idx, d0:d0 + step].to(f32)  # equal rows hold the same start
        rows.index_add_(0, head, src[pick, d0:d0 + step].to(f32).mul_(coef[order].unsqueeze(-1)))
        dst[:, d0:d0 + step].index_put_((idx,), rows[head].to(dst.dtype))  # equal rows: the same total
    return dst


def _finish(dx, dW, dB, dense, x, W, b):
    """The tiles' gradients (plus any sparse part) minus the dense part, each in its input's dtype."""
    ddx, ddW, ddB = dense
    if dx is not None:
        dx = (dx.to(ddx.dtype) - ddx if ddx is not None else dx).to(x.dtype)
    if dW is not None:
        dW = (dW.to(ddW.dtype) - ddW if ddW is not None else dW).to(W.dtype)
    if dB is not None:
        dB = (dB.to(ddB.dtype) - ddB if ddB is not None else dB).to(b.dtype)
    return dx, dW, dB


def _check_options(options):
    if options is None:
        return
    opts_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if opts_type is None or not isinstance(options, opts_type):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got "
                        f"{type(options).__name__}")


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = None,
                         weight: Tensor | None = None, reduction: str = "mean",
                         ignore_index: int | None = IGNORE_INDEX_DEFAULT, label_smoothing: float = 0.0,
                         options: dict | None = None, tau: float | Tensor = 1.0, normalize: bool = False) -> Tensor:
    """torch 2.13's ``F.linear_cross_entropy`` with a temperature: ``F.cross_entropy(logits / tau, target,
    weight, ...)`` with ``logits = F.linear(input, linear_weight, linear_bias)`` reshaped to
    ``(N, C, d1, ..., dK)``, computed without the logits: extra memory O(N + C) beyond inputs and
    gradients (probability targets are themselves N × C; their own gradient is too).

    Shapes, as torch: ``input`` (N, D) or (D,); ``linear_weight`` (C, D), or (C, d1, ..., dK, D) for a
    K-dimensional loss (then input must be (N, D)); ``linear_bias`` (C, d1, ..., dK); ``weight`` (C,)
    class weights.  ``target`` holds class indices, shape (N, d1, ..., dK) (() for 1-D input), or class
    probabilities, shape (N, C, d1, ..., dK) ((C,) for 1-D input): probabilities exactly when the shape
    equals the logits', as in torch.  ``reduction='none'`` returns the target's batch shape; 'mean'
    divides by the summed weights of the non-ignored class targets, or by the number of positions
    for probabilities.

    Differences from torch:
    - ``ignore_index`` defaults to -100 (torch's default None means -100 for class targets);
      ``ignore_index=None`` is accepted with torch's meaning, and with probability targets an
      ``ignore_index`` the caller gives (-100 included) raises, as in torch.
    - ``options`` (torch's chunking options) is accepted and has no effect: fused_tau never builds the
      logits, so there is nothing to chunk.  Anything other than None or a
      ``torch.nn.LinearCrossEntropyOptions`` raises TypeError.
    - Accepted beyond torch: class targets of any integer dtype (int32, uint8, ...; compared in int64),
      and for K = 0 an input (..., D) with leading dims flattened to rows (target (...) or (..., C)).

    ``tau``: a positive float, a one-element tensor (learnable) or one τ per row (shape (N,), the rows
    after flattening).  ``normalize=True`` L2-normalises the rows of input and of linear_weight (over
    D) first (NormFace: cosine logits with scale s = 1/τ).  Once differentiable.
    """
    check_tensor(input, "input")
    check_tensor(linear_weight, "linear_weight")
    check_tensor(target, "target", floating=False)
    if linear_weight.ndim < 2 or input.ndim < 1 or linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(f"linear_weight must be (C, {input.shape[-1] if input.ndim else 'D'}) or (C, d1, ..., dK, "
                         f"{input.shape[-1] if input.ndim else 'D'}) for input of shape {tuple(input.shape)}, got "
                         f"{tuple(linear_weight.shape)}")
    check_same_device(linear_weight, "linear_weight", input, "input")
    check_same_device(target, "target", input, "input")
    C, out_features, D = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    if out_features and input.ndim != 2:
        raise ValueError(f"a K-dimensional linear_weight {tuple(linear_weight.shape)} needs input of shape (N, {D}), "
                         f"got {tuple(input.shape)}")
    batch = tuple(input.shape[:-1])
    logits_shape = (*batch, C, *out_features)
    class_shape = (*batch, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities:
        if not target.is_floating_point():
            raise TypeError(f"target of shape {logits_shape} (the logits') holds class probabilities and must be a "
                            f"float tensor, got {target.dtype}")
        check_tensor(target, "target")
        if ignore_index is not None and ignore_index is not IGNORE_INDEX_DEFAULT:
            raise ValueError("ignore_index cannot be specified when target contains probabilities")
        ignore_index = -100
    else:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold class indices (an integer dtype) of shape {class_shape}, or class "
                            f"probabilities (a float dtype) of shape {logits_shape}; got {target.dtype}")
        if tuple(target.shape) != class_shape:
            raise ValueError(f"target must have shape {class_shape} (class indices) or {logits_shape} (class "
                             f"probabilities), got {tuple(target.shape)}")
        ignore_index = -100 if ignore_index is None else ignore_index
    check_ce_options(reduction, ignore_index, label_smoothing)
    ignore_index = int(ignore_index)
    check_vector(weight, "weight", C, input)
    if linear_bias is not None:
        check_tensor(linear_bias, "linear_bias")
        check_same_device(linear_bias, "linear_bias", input, "input")
        if tuple(linear_bias.shape) != (C, *out_features):
            raise ValueError(f"linear_bias must have shape {(C, *out_features)}, got {tuple(linear_bias.shape)}")
    _check_options(options)
    P = math.prod(out_features)
    x = input.reshape(-1, D)
    N = x.shape[0]
    if not probabilities:
        # in int64: a uint8 target would wrap ignore_index -100 to 156, a valid-looking class
        target = target.to(torch.int64)
        check_class_targets(target, C, ignore_index)
    tau_t = tau_tensor(tau, input, (N,) if input.ndim > 1 else ())
    backend = backend_for(input)
    if backend == "reference" or N == 0 or C == 0 or P == 0:
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                              reduction=reduction, ignore_index=None if probabilities else ignore_index,
                                              label_smoothing=label_smoothing, tau=tau_t, normalize=normalize)
    if normalize:
        x, linear_weight = F.normalize(x, dim=-1), F.normalize(linear_weight, dim=-1)
    W3 = linear_weight.reshape(C, P, D)
    b2 = linear_bias.reshape(C, P) if linear_bias is not None else None
    t = target.reshape(N, C, P) if probabilities else target.reshape(N, P)
    cd = compute_dtype(input)
    denom = None
    if reduction == "mean":
        if probabilities:
            denom = torch.full((), N * P, device=input.device, dtype=cd)
        else:
            valid = t != ignore_index
            w_y = weight.to(cd)[torch.where(valid, t, 0)] if weight is not None else torch.ones_like(t, dtype=cd)
            denom = torch.where(valid, w_y, 0.0).sum()
    # one fused linear cross-entropy per position of a K-dimensional loss (P = 1 otherwise)
    Ws = linear_weight.reshape(C, D) if P == 1 else W3.unbind(1)
    bs = (b2.reshape(C) if P == 1 else b2.unbind(1)) if b2 is not None else None
    ts = t.reshape(t.shape[:-1]) if P == 1 else t.unbind(-1)
    options = LinearCEOptions(reduction, ignore_index, float(label_smoothing))
    rows = []
    for p in range(P):
        W_p = Ws if P == 1 else Ws[p]
        b_p = (bs if P == 1 else bs[p].contiguous()) if bs is not None else None
        t_p = ts if P == 1 else ts[p].contiguous()
        rows.append(LinearCrossEntropyFunction.apply(x, W_p, b_p, t_p, weight, tau_t, denom, options, backend))
    if reduction == "none":
        out = (rows[0] if P == 1 else torch.stack(rows, 1)).reshape(class_shape)
    else:
        out = rows[0] if P == 1 else torch.stack(rows).sum()
    return loss_under_autocast(out, input)
