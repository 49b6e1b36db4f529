"""The torch path of the sampling ops: the launchers of ``kernels/row_sample.py`` with the
same names, arguments and results, written with torch ops, for devices without Triton.

The noise is drawn with ``Tensor.exponential_`` (g = -log E, E ~ Exponential(1), as
``F.gumbel_softmax`` does) from a generator seeded with the launch's seed (drawn from the
caller's generator by fused_tau._ops.draw_seed), one chunk of rows at a time, so no fp32
temporary is larger than a chunk (``_torch_row.CHUNK_ELEMENTS``).  The draws have the
kernels' distribution, not their random stream.  Unlike the kernels, which regenerate
their noise from the seed, the hard backward here needs the soft sample: ``gumbel_fwd``
keeps it (in the logits' dtype, as ``F.gumbel_softmax``'s autograd does) when a gradient
is needed.
"""
import torch

from ._torch_row import _as_rows, _chunks, _compute_dtype, _from_rows, _tau_rows


def _gumbel(n_rows, C, dtype, device, generator):
    """(n_rows, C) Gumbel(0, 1) noise, finite: E is clamped to the dtype's smallest normal."""
    e = torch.empty((n_rows, C), dtype=dtype, device=device).exponential_(generator=generator)
    return e.clamp_(min=torch.finfo(dtype).tiny).log_().neg_()


def _seeded(seed):
    """A generator on the seed's device started from the launch's seed.  Reading the seed is a
    host read: free for CPU tensors, a sync for CUDA ones (this path serves CUDA only for fp64
    or when forced; the kernels read their seed on the device)."""
    return torch.Generator(device=seed.device).manual_seed(int(seed))  # host-ok: see above


def gumbel_fwd(x3, tau, seed, hard, need_grad):
    """Returns (out, aux): out = softmax((x + g) / τ), or the one-hot of its argmax when
    ``hard``, contiguous (A, C, B) in x3's dtype; aux = (the soft sample,) when ``hard`` and
    a gradient is needed, else ()."""
    generator = _seeded(seed)
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    out = torch.empty((R, C), device=x3.device, dtype=x3.dtype)
    soft = torch.empty_like(out) if hard and need_grad else None
    for sl in _chunks(R, C):
        xs = X[sl]
        z = xs.to(cd) if xs.dtype != cd else xs.clone()
        z.add_(_gumbel(z.shape[0], C, cd, x3.device, generator)).div_(tau_r[sl])
        p = torch.softmax(z, -1)
        if not hard:
            out[sl] = p
            continue
        if soft is not None:
            soft[sl] = p
        out[sl].zero_().scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    out = _from_rows(out, A, B).contiguous()
    return out, (() if soft is None else (_from_rows(soft, A, B).contiguous(),))


def gumbel_bwd(g, tau, hard, src, seed, aux):
    """dx = y (g - Σ g y) / τ with y the soft sample: ``src`` (the output) when not ``hard``,
    else the one gumbel_fwd kept; contiguous (A, C, B).  Out of place: y may be the caller's
    output."""
    y = aux[0] if hard else src
    A, C, B = y.shape
    cd = _compute_dtype(y)
    Y, G, tau_r = _as_rows(y), _as_rows(g), _tau_rows(tau, A, B, cd)
    dx = torch.empty((A * B, C), device=y.device, dtype=y.dtype)
    for sl in _chunks(A * B, C):
        yy, gg = Y[sl].to(cd), G[sl].to(cd)
        dx[sl] = (gg - (gg * yy).sum(-1, keepdim=True)).mul_(yy).div_(tau_r[sl])
    return _from_rows(dx, A, B).contiguous()


def sample_fwd(x2, tau, seed, greedy):
    """One index per row of the (R, C) logits: argmax_c (x_rc + τ g_rc), Gumbel-max, the
    first index on ties; ``greedy``: argmax x_r."""
    R, C = x2.shape
    idx = torch.empty(R, device=x2.device, dtype=torch.int64)
    if greedy:
        return torch.argmax(x2, -1, out=idx)
    cd = _compute_dtype(x2)
    generator = _seeded(seed)
    tau_r = tau.to(cd).reshape(-1, 1).expand(R, 1)
    for sl in _chunks(R, C):
        key = _gumbel(sl.stop - sl.start, C, cd, x2.device, generator).mul_(tau_r[sl]).add_(x2[sl])
        idx[sl] = key.argmax(-1)
    return idx
