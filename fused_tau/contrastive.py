"""InfoNCE (MoCo queue, in-batch), CLIP and NT-Xent on the tile engine.

The logits matrix is never built: kernels/tile.py (or fused_tau/_torch_tile.py) streams
tiles of ``a @ b.T`` into an online log-sum-exp over the negatives, and recomputes them in
the backward, all in dot units (before 1/τ).  The positive of each row is handled apart from
the tiles, from its dot product ``pos`` and the negatives' ``(m, s)``, by the forward's combine
(tile_fwd's TILE_* statistics):
``nll = log(1 + Σ_neg exp((y_neg - pos)/τ)) = softplus(log s + (m - pos)/τ)`` keeps full
relative precision when it is tiny (small τ, a well-separated positive), and the positive's
gradient ``p_pos - 1 = -p_neg`` is formed from the negatives' share, never as 1 - p_pos.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import check_reduction, check_same_device, check_tensor
from ._dispatch import autocast_off, backend_for, loss_dtype, loss_under_autocast, once_differentiable
from ._tau import kept_tensor, reduce_tau_grad, tau_for_kernel, tau_over, tau_tensor
from .kernels import TILE_POS


def _offset_columns(n, offset, device):
    """The in-batch positives' columns i + offset, i < n (kept from call to call: no launches)."""
    return kept_tensor(("in-batch columns", n, offset, device), device,
                       lambda: torch.arange(offset, offset + n, device=device))


def row_grad(grad, n, reduction, dtype):
    g = grad.detach().to(dtype)
    if reduction == "none":
        return g.reshape(n)
    return (g / n if reduction == "mean" else g).reshape(1).expand(n)


def _saved(ctx):
    """ctx.saved_tensors, with the usual cause named when one was overwritten in place: a MoCo queue
    enqueued between the loss and its backward (the backward reads the queue the loss was given)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise RuntimeError(
            "a tensor that infonce's backward needs (query, key or queue) was modified in place after the loss "
            "was computed. With a MoCoQueue: call queue.enqueue(keys) after loss.backward(), or pass "
            "queue.queue.clone() to the loss to enqueue before it") from e


@dataclass(frozen=True)
class InfoNCEOptions:
    """infonce's options as ``InfoNCEFunction`` carries them: the reduction, in-batch the column of
    row 0's positive (this rank's offset among the gathered keys), and the dtype the loss is written
    in (``loss_dtype``: what infonce returns, so that no cast follows the kernel)."""
    reduction: str = "mean"
    label_offset: int = 0
    out_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class LossOptions:
    """What ``NTXentFunction`` and ``ClipFunction`` take beside their tensors: the backend, and the
    dtype the loss is written in (``loss_dtype``: what the loss function returns, so that no cast
    follows the kernel)."""
    backend: str
    out_dtype: torch.dtype = torch.float32


class InfoNCEFunction(torch.autograd.Function):
    """Rows of F.cross_entropy over [q·k_pos, q·negatives] / τ, the positive first.

    ``negatives`` is the MoCo queue (K, D), or None for in-batch negatives, where the keys
    are the negatives and row i's positive is key i (+ ``label_offset``, for keys gathered
    from several ranks)."""

    @staticmethod
    @autocast_off
    def forward(ctx, query, key, negatives, tau, options, backend):
        reduction, label_offset = options.reduction, options.label_offset
        N = query.shape[0]
        tau_rows = tau_for_kernel(tau, query)  # one τ or one per row: broadcasts
        in_batch = negatives is None
        b = key if in_batch else negatives
        target = _offset_columns(N, label_offset, query.device) if in_batch else None
        # the positive: the target column's y in-batch, q_i · k_i against the queue; the loss reduced by
        # the kernel, in the dtype infonce returns
        stats, loss = ops.tile_fwd(backend, query, b, None, tau_rows, target, None, None if in_batch else key,
                                   reduction, options.out_dtype)
        pos, nll, shift, e_pos, e_neg = stats[TILE_POS:]
        ctx.backend, ctx.options, ctx.in_batch = backend, options, in_batch
        ctx.save_for_backward(query, key, negatives, tau_rows, target, pos, shift, e_pos, e_neg, nll, tau)
        return loss

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        query, key, negatives, tau_rows, target, pos, shift, e_pos, e_neg, nll, tau = _saved(ctx)
        reduction, label_offset, in_batch = ctx.options.reduction, ctx.options.label_offset, ctx.in_batch
        N = query.shape[0]
        need_q, need_k, need_neg, need_tau = ctx.needs_input_grad[:4]
        b = key if in_batch else negatives
        # u, the positive's gradient, the splits' sums and the rank-one terms all on the device (ops.infonce_bwd)
        dq, db, dkey, dtau_rows = ops.infonce_bwd(
            ctx.backend, query, b, tau_rows, target, None if in_batch else key, shift, pos, e_pos, e_neg,
            grad.detach(), N if reduction == "mean" else 1, label_offset, need_q, need_k if in_batch else need_neg,
            need_k and not in_batch, need_tau)
        dtau = reduce_tau_grad(dtau_rows, tau, 1) if need_tau else None
        dk = db if in_batch else dkey
        dneg = db if not in_batch else None
        return dq, dk, dneg, dtau, None, None


class NTXentFunction(torch.autograd.Function):
    """SimCLR over the 2N (already normalised) views z: row i's positive is view (i + N) mod 2N,
    the other 2N - 2 views its negatives, itself excluded; mean over the 2N rows."""

    @staticmethod
    @autocast_off
    def forward(ctx, z, tau, options):
        if isinstance(options, str):  # the backend alone, as this exported Function took it before LossOptions
            options = LossOptions(options)
        n2 = z.shape[0]
        tau_rows = tau_for_kernel(tau, z)  # one τ or one per row: broadcasts
        target = kept_tensor(("nt_xent pairs", n2, z.device), z.device,
                             lambda: (torch.arange(n2, device=z.device) + n2 // 2) % n2)
        # the mean over the 2N rows by the kernel, in the dtype nt_xent returns
        stats, loss = ops.tile_fwd(options.backend, z, z, None, tau_rows, target, 0, None, "mean", options.out_dtype)
        pos, nll, shift, e_pos, e_neg = stats[TILE_POS:]
        ctx.backend = options.backend
        ctx.save_for_backward(z, tau_rows, target, pos, shift, e_pos, e_neg, nll, tau)
        return loss

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        z, tau_rows, target, pos, shift, e_pos, e_neg, nll, tau = ctx.saved_tensors
        n2 = z.shape[0]
        need_z, need_tau = ctx.needs_input_grad[:2]
        # u, the positives' terms (both ends of each pair) and da + db on the device (ops.ntxent_bwd)
        dz, dtau_rows = ops.ntxent_bwd(ctx.backend, z, tau_rows, target, shift, pos, e_pos, e_neg, grad.detach(), n2,
                                       need_z, need_tau)
        dtau = reduce_tau_grad(dtau_rows, tau, 1) if need_tau else None
        return dz, dtau, None


class ClipFunction(torch.autograd.Function):
    """CLIP's symmetric loss ``(infonce(a, b) + infonce(b, a)) / 2`` from one pass of the tile engine
    over y = a @ b.T (ops.clip_fwd: rows for a -> b, columns for b -> a) and one recomputation in the
    backward (ops.clip_bwd: both directions' gradients from each tile).  τ: one element or one per
    index (τ_i for row i of a -> b and for row i of b -> a)."""

    @staticmethod
    @autocast_off
    def forward(ctx, a, b, tau, options):
        tau_rows = tau_for_kernel(tau, a)  # one τ or one per index
        # the mean over the N indices by the kernel, in the dtype clip_loss returns
        stats, loss = ops.clip_fwd(options.backend, a, b, tau_rows, options.out_dtype)
        ctx.backend = options.backend
        ctx.save_for_backward(a, b, tau_rows, stats, tau)
        return loss

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        a, b, tau_rows, stats, tau = ctx.saved_tensors
        need_a, need_b, need_tau = ctx.needs_input_grad[:3]
        # the statistics' w carry the mean's 1/(2N); the kernels read g in its own dtype (no cast launched)
        g = grad.detach().reshape(1)
        da, db, zp = ops.clip_bwd(ctx.backend, a, b, tau_rows, stats, g, need_a, need_b, need_tau)
        dtau = None
        if need_tau:
            # dL/dτ_k = -(1/τ_k) (Σ_j (y_kj - y_kk) dL/dy_kj + Σ_i (y_ik - y_kk) dL/dy_ik); + 0 · dpos: an
            # index whose statistics are NaN (NaN or +inf logits) gives NaN, as its other gradients
            dtau = reduce_tau_grad(-zp / tau_rows + 0.0 * stats[5], tau, 1)
        return da, db, dtau, None


def _check_embeddings(query, key, queue):
    check_tensor(query, "query")
    check_tensor(key, "key")
    if query.ndim != 2:
        raise ValueError(f"query must be (N, D), got shape {tuple(query.shape)}")
    if key.ndim != 2 or key.shape[1] != query.shape[1]:
        raise ValueError(f"key must be (M, {query.shape[1]}) like query's D, got shape {tuple(key.shape)}")
    check_same_device(key, "key", query, "query")
    if queue is not None:
        check_tensor(queue, "queue")
        if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
            raise ValueError(f"queue must be (K, {query.shape[1]}) like query's D, got shape {tuple(queue.shape)}")
        check_same_device(queue, "queue", query, "query")
        if key.shape[0] != query.shape[0]:
            raise ValueError(f"key must hold one positive per query ({query.shape[0]}), got {key.shape[0]}")


def _distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gathered(key):
    """Every rank's keys, concatenated in rank order, with gradient flowing back to this rank's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return key, 0
    import warnings

    import torch.distributed.nn.functional as dist_fn

    # torch.distributed.nn's all_gather: its backward reduce-scatters the gradient, so each rank's
    # keys get the sum of every rank's loss gradient.  (The functional collective torch now points
    # to returns an async tensor whose storage a Triton launch cannot read before a wait.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        keys = torch.cat(dist_fn.all_gather(key.contiguous()), 0)
    return keys, dist.get_rank() * key.shape[0]


def infonce(query: Tensor, key: Tensor, queue: Tensor | torch.nn.Module | None = None, *, tau: float | Tensor = 0.07,
            reduction: str = "mean", gather: bool = False) -> Tensor:
    """MoCo InfoNCE in one fused pass (the N × K logits never exist).

    queue given (MoCo v1/v2): ``F.cross_entropy(cat([(q*k).sum(-1, keepdim=True), q @ queue.T], 1) / tau, 0)``;
    queue None (in-batch, MoCo v3, one direction of CLIP): ``F.cross_entropy(q @ k.T / tau, arange(N))``.
    ``gather=True`` (in-batch, under torch.distributed) uses every rank's keys as negatives, the
    labels offset by this rank's position.  τ (keyword-only, as every option): a positive float, a
    one-element tensor (learnable) or one τ per query.  ``queue`` may be a tensor or a
    :class:`fused_tau.MoCoQueue`.  Gradients for query, key, queue (when it requires one) and τ.
    """
    from .modules import MoCoQueue  # modules imports this module

    if isinstance(queue, MoCoQueue):
        queue = queue.queue
    _check_embeddings(query, key, queue)
    if gather and queue is not None:
        raise ValueError("gather=True applies to in-batch negatives (queue=None); a MoCoQueue gathers on enqueue")
    check_reduction(reduction)
    tau_t = tau_tensor(tau, query, (query.shape[0],))
    if queue is None and not gather and key.shape[0] != query.shape[0]:
        raise ValueError(f"in-batch key must hold one row per query ({query.shape[0]}), got {key.shape[0]}")
    offset = 0
    if gather:
        key, offset = _gathered(key)
    backend = backend_for(query)
    if backend == "reference" or query.shape[0] == 0:
        if offset or key.shape[0] != query.shape[0] and queue is None:
            logits = query @ key.T / tau_over(tau_t, query, 1)
            return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device) + offset,
                                   reduction=reduction)
        return reference.infonce(query, key, queue, tau=tau_t, reduction=reduction)
    options = InfoNCEOptions(reduction, offset, loss_dtype(query))
    return loss_under_autocast(InfoNCEFunction.apply(query, key, queue, tau_t, options, backend), query)


def clip_loss(a: Tensor, b: Tensor, *, tau: float | Tensor = 0.07, gather: bool = False) -> Tensor:
    """CLIP's symmetric loss ``(infonce(a, b, tau=tau) + infonce(b, a, tau=tau)) / 2`` (in-batch;
    ``gather=True`` uses every rank's pairs), from one pass of the tile engine over a @ b.T forward
    and one backward (ClipFunction).  τ may be a learnable one-element tensor, or one per pair (τ_i
    for row i of both directions)."""
    _check_embeddings(a, b, None)
    backend = backend_for(a)
    # the one pass needs one N × N matrix of one dtype: pairs gathered across ranks, unequal counts (an
    # error, raised by infonce) and mixed dtypes (the two losses' dtypes promote) keep the two calls
    if (gather and _distributed()) or b.shape[0] != a.shape[0] or a.dtype != b.dtype or backend == "reference" \
            or a.shape[0] == 0:
        return (infonce(a, b, tau=tau, gather=gather) + infonce(b, a, tau=tau, gather=gather)) / 2
    tau_t = tau_tensor(tau, a, (a.shape[0],))
    return loss_under_autocast(ClipFunction.apply(a, b, tau_t, LossOptions(backend, loss_dtype(a))), a)


def nt_xent(z1: Tensor, z2: Tensor, *, tau: float | Tensor = 0.5) -> Tensor:
    """SimCLR's NT-Xent over the 2N views of N pairs: rows L2-normalised, each view's positive is
    its pair, the other 2N - 2 views its negatives, self-similarity excluded; mean over 2N views."""
    _check_embeddings(z1, z2, None)
    if z1.shape != z2.shape:
        raise ValueError(f"z2 must have z1's shape {tuple(z1.shape)}, got {tuple(z2.shape)}")
    tau_t = tau_tensor(tau, z1, ())
    backend = backend_for(z1)
    if backend == "reference" or z1.shape[0] == 0:
        return reference.nt_xent(z1, z2, tau=tau_t)
    z = F.normalize(torch.cat([z1, z2], 0), dim=-1)
    return loss_under_autocast(NTXentFunction.apply(z, tau_t, LossOptions(backend, loss_dtype(z1))), z1)
