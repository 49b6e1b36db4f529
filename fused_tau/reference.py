"""The definition of every fused_tau op: the plain PyTorch composition it equals.

Readable, differentiable, and float64-capable: tests compare every backend
against these functions run in float64.  Nothing here is fused or chunked;
that is the point.  τ may be a float, a one-element tensor, or one τ per row
(for the row ops, a tensor of shape ``x.shape[:dim]``; for cross-entropy and
the contrastive losses, shape ``(N,)``).
"""
import math

import torch
import torch.nn.functional as F

from ._tau import tau_over


def softmax(x, dim=-1, *, tau=1.0):
    """torch.softmax(x / tau, dim)."""
    dim = dim % max(x.ndim, 1)
    return torch.softmax(x / tau_over(tau, x, dim), dim)


def log_softmax(x, dim=-1, *, tau=1.0):
    """torch.log_softmax(x / tau, dim)."""
    dim = dim % max(x.ndim, 1)
    return torch.log_softmax(x / tau_over(tau, x, dim), dim)


def logsumexp(x, dim=-1, keepdim=False, *, tau=1.0):
    """tau * torch.logsumexp(x / tau, dim, keepdim): a smooth max, → max(x) as τ → 0."""
    dim = dim % max(x.ndim, 1)
    out = torch.logsumexp(x / tau_over(tau, x, dim), dim, keepdim=keepdim)
    return tau_over(tau, out, dim) * out


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, tau=1.0):
    """F.cross_entropy(input / tau, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)."""
    return F.cross_entropy(input / tau_over(tau, input, 1), target, weight, size_average, ignore_index, reduce,
                           reduction, label_smoothing)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, options=None, tau=1.0, normalize=False):
    """F.cross_entropy(F.linear(input, linear_weight, linear_bias) / tau, target, weight, ...), the logits
    shaped as torch 2.13's F.linear_cross_entropy shapes them: (N, C, d1, ..., dK) for a linear_weight
    (C, d1, ..., dK, D).  Probability targets have the logits' shape; ``ignore_index=None`` means -100
    for class targets; ``options`` has no effect.  ``normalize=True`` L2-normalises the rows of input and
    linear_weight (over D) first (NormFace: cosine logits scaled by s = 1/τ).  Leading dims of an input
    (..., D) are flattened to rows (K = 0); class targets of any integer dtype are read as int64.
    """
    if normalize:
        input = F.normalize(input, dim=-1)
        linear_weight = F.normalize(linear_weight, dim=-1)
    C, out_features, D = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    batch = tuple(input.shape[:-1])
    logits = F.linear(input, linear_weight.reshape(-1, D), linear_bias.reshape(-1) if linear_bias is not None else None)
    logits = logits.reshape(*batch, C, *out_features)
    probabilities = tuple(target.shape) == tuple(logits.shape)
    if probabilities and ignore_index is not None and ignore_index != -100:
        raise ValueError("ignore_index cannot be specified when target contains probabilities")
    if not probabilities:
        target = target.to(torch.int64)
    if len(batch) > 1:  # rows of an input (..., D)
        logits = logits.reshape(-1, C)
        target = target.reshape(-1, C) if probabilities else target.reshape(-1)
    loss = F.cross_entropy(logits / tau_over(tau, logits, 1 if logits.ndim > 1 else 0), target, weight,
                           ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss.reshape((*batch, *out_features)) if reduction == "none" else loss


def infonce(query, key, queue=None, *, tau=0.07, reduction="mean"):
    """MoCo InfoNCE.

    queue given (MoCo v1/v2): F.cross_entropy(cat([(q*k).sum(-1, keepdim=True), q @ queue.T], 1) / tau, zeros);
    queue None (in-batch, MoCo v3, one CLIP direction): F.cross_entropy(q @ k.T / tau, arange(N)).
    """
    n = query.shape[0]
    if queue is None:
        logits = query @ key.T
    else:
        logits = torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], 1)
    labels = torch.zeros(n, dtype=torch.long, device=query.device) if queue is not None else \
        torch.arange(n, device=query.device)
    return F.cross_entropy(logits / tau_over(tau, logits, 1), labels, reduction=reduction)


def clip_loss(a, b, *, tau=0.07):
    """(infonce(a, b, tau=tau) + infonce(b, a, tau=tau)) / 2: the symmetric CLIP loss."""
    return (infonce(a, b, tau=tau) + infonce(b, a, tau=tau)) / 2


def nt_xent(z1, z2, *, tau=0.5):
    """SimCLR's NT-Xent over 2N views: rows L2-normalised, view i's positive is its pair,
    the other 2N-2 views its negatives, self-similarity excluded; mean over the 2N views."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], 0), dim=-1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, labels)


def kd_loss(student, teacher, *, tau=4.0, target=None, alpha=0.9, reduction="batchmean"):
    """tau**2 * F.kl_div(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction);
    with target: alpha * that + (1 - alpha) * F.cross_entropy(student, target) (rows flattened;
    summed for reduction='sum', else averaged).  τ per row has shape student.shape[:-1]."""
    t = tau_over(tau, student, student.ndim - 1)
    kd = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="none") * t ** 2
    if reduction == "batchmean":
        kd = kd.sum() / student.shape[0]
    elif reduction == "sum":
        kd = kd.sum()
    elif reduction == "mean":
        kd = kd.sum() / kd.numel()
    if target is None:
        return kd
    C = student.shape[-1]
    ce = F.cross_entropy(student.reshape(-1, C), target.reshape(-1), reduction="sum" if reduction == "sum" else "mean")
    return alpha * kd + (1 - alpha) * ce


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1, *, generator=None):
    """F.gumbel_softmax(logits, tau, hard, eps, dim)'s distribution and straight-through semantics,
    with a generator (``eps`` is deprecated in torch and has no effect)."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def sample(logits, *, tau=1.0, generator=None):
    """One index per row drawn from softmax(logits / tau); tau = 0 is argmax."""
    if float(tau) == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / tau, -1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def fit_temperature(logits, labels, max_iter=100):
    """The T minimising F.cross_entropy(logits / T, labels) (Guo et al. 2017), by LBFGS on log T."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return math.exp(log_t.item())
