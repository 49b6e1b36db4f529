"""Gumbel-softmax and temperature sampling on the row engine.

Layers: kernels/row_sample.py (or the torch path, fused_tau/_torch_sample.py) ->
``GumbelSoftmaxFunction`` -> ``gumbel_softmax`` / ``sample`` -> ``GumbelSoftmax`` (fused_tau/modules.py).

The kernels draw their Gumbel noise inside the kernel (Philox, one seed per call drawn
from the caller's ``torch.Generator`` on the logits' device, without a host sync); the
noise is never stored, and the hard backward regenerates it.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import check_dim, check_tensor, data_check
from ._dispatch import autocast_off, backend_for, once_differentiable
from ._tau import sample_tau, tau_for_kernel, tau_over, tau_tensor
from .softmax import view3


class GumbelSoftmaxFunction(torch.autograd.Function):
    """y = softmax((x + g) / τ) along ``dim``, g ~ Gumbel(0, 1); ``hard``: the one-hot of argmax y
    in the forward and y's gradient in the backward (straight-through).  τ gets no gradient."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, tau, dim, hard, generator, backend):
        x3, _, _, _ = view3(x, dim)
        tau_k = tau_for_kernel(tau, x)
        seed = ops.draw_seed(x.device, generator)
        out, aux = ops.gumbel_fwd(backend, x3, tau_k, seed, hard, ctx.needs_input_grad[0])
        ctx.backend, ctx.hard, ctx.shape3 = backend, hard, x3.shape
        # the backward regenerates the noise from the logits (hard) or works from the soft sample
        ctx.save_for_backward(x3 if hard else out, tau_k, seed, *aux)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        src, tau_k, seed, *aux = ctx.saved_tensors
        g = grad.reshape(ctx.shape3).contiguous()
        dx = ops.gumbel_bwd(ctx.backend, g, tau_k, ctx.hard, src, seed, aux)
        return dx.view(grad.shape), None, None, None, None, None


def _check_generator(generator, x):
    if generator is None:
        return
    if torch.compiler.is_compiling():
        raise TypeError("generator must be None under torch.compile: dynamo cannot trace a torch.Generator "
                        "(seed the default generator with torch.manual_seed instead)")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but logits is on {x.device}")


def gumbel_softmax(logits: Tensor, tau: float | Tensor = 1.0, hard: bool = False, eps: float = 1e-10, dim: int = -1, *,
                   generator: torch.Generator | None = None) -> Tensor:
    """A Gumbel-softmax sample: ``softmax((logits + g) / tau, dim)`` with g = -log(E),
    E ~ Exponential(1) i.i.d. per element, the distribution of ``F.gumbel_softmax``.  Its
    argmax is a draw from ``softmax(logits, dim)`` whatever τ (τ only sharpens the sample).

    ``hard=True`` returns the one-hot of its argmax (exactly 0.0 / 1.0) whose gradient is
    the soft sample's, ``y_hard - y_soft.detach() + y_soft`` as in ``F.gumbel_softmax``.
    ``generator`` (a ``torch.Generator`` on the logits' device; None: the device's default)
    makes the draws reproducible.  τ: a positive float, a one-element tensor, or one τ per
    row (shape ``logits.shape[:dim]``); τ gets no gradient (a τ that requires grad is
    treated as a constant).  Computed in fp32 for fp16 / bf16 / fp32 logits.

    Positional order as ``F.gumbel_softmax(logits, tau, hard, eps, dim)`` (the one function where
    τ is positional: torch's own signature puts it second); ``eps`` is deprecated there and has
    no effect here either (torch's warning included); ``generator`` is keyword-only.
    """
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
    check_tensor(logits, "logits")
    dim = check_dim(dim, logits.ndim)
    tau_t = tau_tensor(tau, logits, tuple(logits.shape[:dim]))
    _check_generator(generator, logits)
    backend = backend_for(logits)
    if backend == "reference" or logits.numel() == 0:
        return reference.gumbel_softmax(logits, tau_over(tau_t, logits, dim), bool(hard), dim=dim,
                                        generator=generator)
    return GumbelSoftmaxFunction.apply(logits, tau_t, dim, bool(hard), generator, backend)


def _reference_sample(logits, tau, generator):
    _check_no_nan(torch.isnan(logits).any().logical_not())
    if not isinstance(tau, torch.Tensor) or tau.numel() == 1:
        return reference.sample(logits, tau=float(tau), generator=generator)
    # reference.sample takes one τ: draw row by row
    flat, taus = logits.reshape(-1, logits.shape[-1]), tau.reshape(-1)
    out = [reference.sample(flat[i], tau=float(taus[i]), generator=generator) for i in range(flat.shape[0])]
    return torch.stack(out).reshape(logits.shape[:-1]) if out else \
        torch.empty(logits.shape[:-1], dtype=torch.int64, device=logits.device)


_NAN_MESSAGE = ("logits holds NaN: sample draws from softmax(logits / tau), which a row with a NaN logit does "
                "not define")


def _check_no_nan(ok):
    """A row with a NaN logit has no softmax to draw from (``torch.multinomial`` raises on its NaN
    probabilities, ``torch.argmax`` would return the NaN's index): refuse it, greedy rows included.
    ``ok``: a one-element verdict, zero when a row held a NaN.  No host sync on CUDA (a device-side
    assert); elsewhere the verdict is set back to 1 before raising (the kernels' is a kept flag,
    fused_tau._ops.sample)."""
    if ok.device.type != "cuda" and not torch.compiler.is_compiling() and not bool(ok):  # host-ok: not CUDA
        ok.fill_(1)
        raise ValueError(_NAN_MESSAGE)
    data_check(ok, _NAN_MESSAGE)


@torch.no_grad()
def sample(logits: Tensor, *, tau: float | Tensor = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One index per row (the last dim) drawn from ``softmax(logits / tau)``: int64 of shape
    ``logits.shape[:-1]``.  The kernels invert the row's distribution function with one uniform a
    row (one pass over the row for its groups' masses, then one group of it read again); the torch
    path draws by the Gumbel-max trick ``argmax(logits / tau + g)``, g ~ Gumbel(0, 1).  The same
    distribution, not the same stream: a seed draws different indices on the two.

    ``tau = 0`` is greedy, ``argmax(logits)`` (the first index on ties, no noise drawn).
    τ: a non-negative float, a one-element tensor, or one τ per row (shape
    ``logits.shape[:-1]``, 0 entries are greedy rows).  -inf logits (masked classes) are
    never drawn; a row with no finite logit gives 0; a row with +inf logits gives the first
    of them.  Logits holding NaN raise a ValueError (on CUDA, a device-side assert: no host
    sync), as ``torch.multinomial`` refuses NaN probabilities.  ``generator`` as in
    gumbel_softmax.

    The draw keeps full precision at any |logits| / τ: every probability is formed relative to the
    row's top logit, exp((x - max) / τ), and the torch path's noise is compared in those units,
    never added to logits / τ (at |logits| / τ ≳ 1e6 that sum rounds the noise away).  The kernels'
    uniform has 24 bits and their cumulative sums are fp32, as torch.multinomial's: a class is drawn
    with its probability to within about 1e-6 (absolute).
    """
    check_tensor(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes), got a 0-dim tensor")
    C = logits.shape[-1]
    R = logits.numel() // C if C else math.prod(logits.shape[:-1])
    if C == 0 and R > 0:
        raise ValueError("logits must have at least one class (its last dimension is 0)")
    tau_k, greedy = sample_tau(tau, logits)
    _check_generator(generator, logits)
    backend = backend_for(logits)
    if backend == "reference":
        return _reference_sample(logits, tau, generator)
    if R == 0:
        return torch.empty(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    x2 = logits.detach().reshape(R, C)
    seed = x2.new_empty(0, dtype=torch.int64) if greedy else ops.draw_seed(x2.device, generator)
    idx, ok = ops.sample(backend, x2, tau_k, seed, greedy)
    _check_no_nan(ok)  # both engines' verdict: 0 when a row held a NaN (no launch of its own on the kernels)
    return idx.view(logits.shape[:-1])


def gumbel_tau_schedule(step: int, tau0: float = 1.0, rate: float = 1e-4, tau_min: float = 0.5) -> float:
    """τ at training step ``step``: ``max(tau_min, tau0 * exp(-rate * step))``, the annealing
    of Jang et al. 2017 (Categorical Reparameterization with Gumbel-Softmax)."""
    return max(tau_min, tau0 * math.exp(-rate * step))

