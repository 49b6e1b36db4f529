"""The torch path of the sampling ops: the launchers of ``kernels/row_sample.py`` with the
same names, arguments and results, written with torch ops, for devices without Triton.

The noise is drawn with ``Tensor.exponential_`` (g = -log E, E ~ Exponential(1), as
``F.gumbel_softmax`` does) one chunk of rows at a time, so no fp32 temporary is larger than a
chunk (``_torch_row_engine.CHUNK_ELEMENTS``), each chunk from its own generator seeded from the launch's
seed (drawn from the caller's generator by fused_tau._ops.draw_seed), so that chunks drawn on
several threads (``_torch_threads.for_each``) give the same noise in any order.  The draws have the
kernels' distribution, not their random stream.  Unlike the kernels, which regenerate
their noise from the seed, the hard backward here needs the soft sample: ``gumbel_fwd``
keeps it (in the logits' dtype, as ``F.gumbel_softmax``'s autograd does) when a gradient
is needed.
"""
import torch

from ._tau import compute_dtype
from ._torch_row_engine import _as_rows, _chunks, _max_argmax, _rows_of, _store_rows, _tau_rows
from ._torch_softmax import softmax_bwd
from ._torch_threads import for_each


def _log_exponential(n_rows, C, dtype, device, generator):
    """(n_rows, C) log E, E ~ Exponential(1) clamped to the dtype's smallest normal: minus finite
    Gumbel(0, 1) noise g = -log E (the callers subtract it: a + g and a - log E are the same sum)."""
    e = torch.empty((n_rows, C), dtype=dtype, device=device).exponential_(generator=generator)
    return e.clamp_(min=torch.finfo(dtype).tiny).log_()


def _chunk_generators(seed, chunks):
    """One generator per chunk of rows (on the seed's device), each started from a seed that a
    generator started from the launch's seed draws in chunk order: the chunks may be drawn in any
    order, by any thread, and give the same noise.  The chunks are ``_chunks(R, C)``, which do not
    depend on the number of threads.  Reading the seed is a host read: free for CPU tensors, a
    sync for CUDA ones (this path serves CUDA only for fp64 or when forced; the kernels read
    their seed on the device)."""
    draws = torch.randint(0, 2 ** 62, (len(chunks),), generator=torch.Generator().manual_seed(int(seed)))  # host-ok
    seeds = draws.tolist()  # host-ok: a CPU tensor
    return {sl.start: torch.Generator(device=seed.device).manual_seed(s) for sl, s in zip(chunks, seeds)}


def gumbel_fwd(x3, tau, seed, hard, out3, aux):
    """Writes out = softmax((x + g) / τ), or the one-hot of its argmax when ``hard``, contiguous
    (A, C, B) in x3's dtype, and into aux = (the soft sample,) when given (``hard`` with a gradient
    to come; fused_tau._ops.gumbel_fwd_outputs)."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    chunks = _chunks(R, C)
    generators = _chunk_generators(seed, chunks)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    out = _rows_of(out3)
    soft = _rows_of(aux[0]) if aux else None

    def work(sl):
        # z = (x + g) / τ = (x - log E) / τ in the noise's own buffer
        log_e = _log_exponential(sl.stop - sl.start, C, cd, x3.device, generators[sl.start])
        z = torch.sub(X[sl], log_e, out=log_e).div_(tau_r[sl])
        if not hard and out.dtype == cd:
            torch.softmax(z, -1, out=out[sl])  # rows of out: contiguous
            return
        p = torch.softmax(z, -1)
        if not hard:
            out[sl] = p
            return
        if soft is not None:
            soft[sl] = p
        out[sl].zero_().scatter_(-1, _max_argmax(z)[1].unsqueeze(-1), 1.0)

    for_each(chunks, work, x3.device, R * C)
    _store_rows(out, out3)
    if soft is not None:
        _store_rows(soft, aux[0])


def gumbel_bwd(g, tau, hard, src, seed, aux, dx):
    """Writes dx = y (g - Σ g y) / τ with y the soft sample: ``src`` (the output) when not ``hard``,
    else the one gumbel_fwd kept; contiguous (A, C, B).  The softmax backward (_torch_softmax.py),
    out of place: y may be the caller's output."""
    y = aux[0] if hard else src
    softmax_bwd(y, g, y, None, None, tau, False, dx, None)


def sample_fwd(x2, tau, seed, greedy, idx, ok):
    """Writes into ``idx`` one index per row of the (R, C) logits: argmax_c ((x_rc - m_r) / τ + g_rc), Gumbel-max
    in z units relative to the row max m_r (x / τ + g, or x + τ g, would round the noise away
    at |x| / τ ≳ 1e6), the first index on ties; ``greedy``, a row whose τ is 0 and a row whose
    max is infinite: argmax x_r (the first +inf; 0 for a row with no finite logit, as
    torch.argmax).  A row that holds a NaN gets -1, and ``ok`` (one int32) 0 then, 1 otherwise (the caller
    raises)."""
    R, C = x2.shape
    cd = compute_dtype(x2)
    chunks = _chunks(R, C)
    generators = None if greedy else _chunk_generators(seed, chunks)
    tau_r = tau.to(cd).reshape(-1, 1).expand(R, 1)

    def work(sl):
        # (_max_argmax: torch's argmax, and its max, in about one pass; a NaN in a row is its max)
        x = x2[sl]
        m, top = _max_argmax(x) if x.is_contiguous() else x.max(-1)
        if not greedy:
            x = x.to(cd)
            m = m.to(cd).unsqueeze(-1)
            t = tau_r[sl]
            noisy = ((t > 0) & torch.isfinite(m)).squeeze(-1)
            key = (x - m).div_(t).sub_(_log_exponential(x.shape[0], C, cd, x2.device, generators[sl.start]))
            top = torch.where(noisy, _max_argmax(key)[1], top)
            m = m.squeeze(-1)
        idx[sl] = top.masked_fill_(torch.isnan(m), -1)

    for_each(chunks, work, x2.device, R * C)
    ok.copy_((idx >= 0).all())
