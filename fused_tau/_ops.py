"""Every launcher of both engines as a ``torch.library`` custom op (``torch.ops.fused_tau.*``): the row
engine's here, the tile engine's in fused_tau/_ops_tile.py (imported at the end, and reached as ``_ops.*``).

Why custom ops: ``torch.compile`` must trace a training step that calls a fused_tau loss
without a graph break, on the Triton path (CUDA) and on the torch path (CPU).  A launcher
is Python that picks a block size and launches a Triton kernel (or loops over row chunks
with torch ops); dynamo cannot trace the interpreter's launches nor would it gain anything
from unrolling the torch path's loops.  As a custom op the launcher is one opaque node that
Inductor calls at run time.  The autograd Functions (cross_entropy.py, softmax.py, ...) call
the wrappers below in their forward and backward, and dynamo traces the Functions themselves
(as flash-attn does), so the gradient formulas stay in one place for eager and compiled code.

One pattern for every op (quack's): a plain function allocates the op's outputs
(``*_outputs``: shapes and dtypes written once, for both engines, and traced as ordinary
torch code), the custom op takes them as arguments, declares them mutated and returns
nothing, and the engine's launcher writes into them.  So every op shares one no-op fake
(``_writes_only``: a fake has nothing to create), and an output an op leaves out is ``None``
(a ``Tensor?`` argument), with no stand-in.  ``backend`` ("triton" or "torch") is a string
argument, so one op serves both engines.

The wrappers take the launchers' arguments with ``backend`` first, allocate, call the op and
return its outputs.  Plain eager calls skip the op's dispatch and run its implementation
(``_call``); anything that traces goes through the op.
"""
from typing import List, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._dispatch import MODE_LSE, engine
from ._tau import compute_dtype, kept_tensor

_IMPLS = {}


def _writes_only(*args, **kwargs):
    """The fake (meta) implementation of every op that writes into outputs its caller allocated:
    under tracing the outputs already exist with their shapes and dtypes, so there is nothing to do."""
    return None


def _op(name, mutates_args):
    """Register ``fn`` as the custom op ``fused_tau::name`` that writes into its arguments named in
    ``mutates_args`` (with the shared no-op fake), and keep ``fn`` for eager calls."""
    def register(fn):
        _IMPLS[name] = fn
        op = torch.library.custom_op(f"fused_tau::{name}", fn, mutates_args=mutates_args)
        op.register_fake(_writes_only)
        return op
    return register


def _call(name):
    """The custom op while something traces (dynamo, or a Python dispatch mode such as AOTAutograd's
    fake tensors, which must see the op), else its implementation itself: in plain eager code the
    op's dispatch would only add tens of µs a call (measured on the CPU of CI: 285 -> 355 µs for a
    small cross_entropy forward + backward)."""
    return getattr(torch.ops.fused_tau, name) if _tracing() else _IMPLS[name]


def tracing():
    """Whether something traces the op calls (dynamo, or a dispatch mode such as fake tensors)."""
    return _tracing()


def _tracing():
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _rows(x3):
    return x3.shape[0] * x3.shape[2]


def _row_vector(x3, present=True):
    """One compute-dtype element per row of the (A, C, B) ``x3``, or None when not ``present``."""
    return x3.new_empty(_rows(x3), dtype=compute_dtype(x3)) if present else None


# ---------------------------------------------------------------------------- row engine

# softmax, log_softmax, logsumexp (softmax.py)

def softmax_fwd_outputs(x3, mode):
    """(out, M, S): τ·lse per row (MODE_LSE) or the (log-)softmax in x3's dtype and contiguous (A, C, B)
    layout; the row statistics in the compute dtype."""
    out = x3.new_empty(_rows(x3)) if mode == MODE_LSE else x3.new_empty(x3.shape)
    return out, _row_vector(x3), _row_vector(x3)


# (not "mode": torch's auto_functionalized, which runs a mutating op under torch.compile, passes the
# dispatch mode as ``mode`` next to the op's arguments)
@_op("softmax_fwd", mutates_args=("out", "m", "s"))
def _softmax_fwd(x3: Tensor, tau: Tensor, softmax_mode: int, backend: str, out: Tensor, m: Tensor, s: Tensor) -> None:
    engine(backend, "row").softmax_fwd(x3, tau, softmax_mode, out, m, s)


def softmax_fwd(backend, x3, tau, mode):
    outputs = softmax_fwd_outputs(x3, mode)
    _call("softmax_fwd")(x3, tau, mode, backend, *outputs)
    return outputs


def softmax_bwd_outputs(x3, tau_grad):
    """(dx, dτ per row or None): dx in x3's dtype and contiguous (A, C, B) layout (the gradient of
    softmax_fwd's out, and of lse's x3)."""
    return x3.new_empty(x3.shape), _row_vector(x3, tau_grad)


@_op("softmax_bwd", mutates_args=("dx", "dtau"))
def _softmax_bwd(y: Tensor, g: Tensor, x3: Tensor, m: Tensor, s: Tensor, tau: Tensor, log: bool, backend: str,
                 dx: Tensor, dtau: Optional[Tensor]) -> None:
    engine(backend, "row").softmax_bwd(y, g, x3, m, s, tau, log, dx, dtau)


def softmax_bwd(backend, y, g, x3, m, s, tau, log, tau_grad):
    outputs = softmax_bwd_outputs(x3, tau_grad)
    _call("softmax_bwd")(y, g, x3, m, s, tau, log, backend, *outputs)
    return outputs


@_op("lse_bwd", mutates_args=("dx", "dtau"))
def _lse_bwd(x3: Tensor, m: Tensor, s: Tensor, tau: Tensor, g: Tensor, backend: str, dx: Tensor,
             dtau: Optional[Tensor]) -> None:
    engine(backend, "row").lse_bwd(x3, m, s, tau, g, dx, dtau)


def lse_bwd(backend, x3, m, s, tau, g, tau_grad):
    outputs = softmax_bwd_outputs(x3, tau_grad)
    _call("lse_bwd")(x3, m, s, tau, g, backend, *outputs)
    return outputs


# cross_entropy (cross_entropy.py)

def ce_fwd_outputs(x3, smoothing, prob_target):
    """(loss, w_y, M, S, A), one compute-dtype element per row: w_y (the target's class weight) for class
    indices only, A (Σ_c a_c of the loss's Σ_c a_c (lse - z_c)) with label smoothing or probabilities only."""
    has_a = prob_target or smoothing > 0
    return _row_vector(x3), _row_vector(x3, not prob_target), _row_vector(x3), _row_vector(x3), _row_vector(x3, has_a)


@_op("ce_fwd", mutates_args=("loss", "wy", "m", "s", "a"))
def _ce_fwd(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, ignore_index: int, smoothing: float,
            prob_target: bool, backend: str, loss: Tensor, wy: Optional[Tensor], m: Tensor, s: Tensor,
            a: Optional[Tensor]) -> None:
    engine(backend, "row").ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target, loss, wy, m, s, a)


def ce_fwd(backend, x3, target, weight, tau, ignore_index, smoothing, prob_target):
    """(loss, w_y, M, S, A) (ce_fwd_outputs)."""
    outputs = ce_fwd_outputs(x3, smoothing, prob_target)
    _call("ce_fwd")(x3, target, weight, tau, ignore_index, smoothing, prob_target, backend, *outputs)
    return outputs


@_op("ce_bwd", mutates_args=("dx", "dtau"))
def _ce_bwd(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, m: Tensor, s: Tensor,
            a: Optional[Tensor], g: Tensor, ignore_index: int, smoothing: float, prob_target: bool, backend: str,
            dx: Tensor, dtau: Optional[Tensor]) -> None:
    engine(backend, "row").ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, dx, dtau)


def ce_bwd(backend, x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, tau_grad,
           inplace=False, den=None):
    """(dx, dτ per row or None).  ``inplace`` writes dx over x3 and returns x3 as dx: eager only, where the
    op's implementation runs without its dispatch (a traced graph plans its own memory, AOTAutograd's
    backward may not mutate a saved forward input, and an op's output may not alias its input).  ``den``
    (one element, the mean's denominator; cross_entropy's reductions on the device, Triton in eager code
    only): the kernel divides g by it, no launch for g / den."""
    if inplace and not _tracing():
        dx, dtau = x3, _row_vector(x3, tau_grad)
    else:
        dx, dtau = softmax_bwd_outputs(x3, tau_grad)
    if den is not None:
        engine(backend, "row").ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, dx,
                                      dtau, den=den)
    else:
        _call("ce_bwd")(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, backend, dx, dtau)
    return dx, dtau


@_op("ce_fwd_grad", mutates_args=("loss", "wy", "m", "s", "a", "dx", "dtau"))
def _ce_fwd_grad(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, ignore_index: int,
                 smoothing: float, prob_target: bool, g: Tensor, backend: str, loss: Tensor, wy: Optional[Tensor],
                 m: Tensor, s: Tensor, a: Optional[Tensor], dx: Tensor, dtau: Optional[Tensor]) -> None:
    engine(backend, "row").ce_fwd_grad(x3, target, weight, tau, ignore_index, smoothing, prob_target, g,
                                       loss, wy, m, s, a, dx, dtau)


def ce_fwd_grad(backend, x3, target, weight, tau, ignore_index, smoothing, prob_target, g, tau_grad):
    """ce_fwd and, in the same pass, ce_bwd for the incoming gradient ``g`` (one element for every row):
    (loss, w_y, M, S, A, dx, dτ per row or None)."""
    outputs = ce_fwd_outputs(x3, smoothing, prob_target) + softmax_bwd_outputs(x3, tau_grad)
    _call("ce_fwd_grad")(x3, target, weight, tau, ignore_index, smoothing, prob_target, g, backend, *outputs)
    return outputs


@_op("ce_grad_rescale", mutates_args=("dx",))
def _ce_grad_rescale(dx: Tensor, g: Tensor, backend: str) -> None:
    engine(backend, "row").ce_grad_rescale(dx, g)


def ce_grad_rescale(backend, dx, g):
    """dx · g: in place in eager code (nothing touched when g == 1, checked on the device); a new tensor
    while tracing (AOTAutograd's backward may not mutate a tensor saved by the forward)."""
    if _tracing():
        return (dx.to(g.dtype) * g.reshape(())).to(dx.dtype)
    _call("ce_grad_rescale")(dx, g, backend)
    return dx


# ---------------------------------------------------------------------------- distillation

def kd_fwd_outputs(s2, has_target, elementwise):
    """(kl, ce, stats, out) for the (R, C) student logits: per row the KL and, with a target, the hard-label
    cross-entropy (compute dtype); the (R, 8) row statistics kd_bwd takes, zero-filled (a launch leaves
    the columns it has no use for at 0); the elementwise loss in s2's dtype (reduction 'none') or None."""
    R, cd = s2.shape[0], compute_dtype(s2)
    return (s2.new_empty(R, dtype=cd), s2.new_empty(R, dtype=cd) if has_target else None,
            s2.new_zeros((R, 8), dtype=cd), s2.new_empty(s2.shape) if elementwise else None)


@_op("kd_fwd", mutates_args=("kl", "ce", "stats", "out"))
def _kd_fwd(s2: Tensor, t2: Tensor, target: Optional[Tensor], tau: Tensor, ignore_index: int, backend: str,
            kl: Tensor, ce: Optional[Tensor], stats: Tensor, out: Optional[Tensor]) -> None:
    engine(backend, "kd").kd_fwd(s2, t2, target, tau, ignore_index, kl, ce, stats, out)


def kd_fwd(backend, s2, t2, target, tau, ignore_index, elementwise):
    """(kl, ce, stats, out) (kd_fwd_outputs)."""
    outputs = kd_fwd_outputs(s2, target is not None, elementwise)
    _call("kd_fwd")(s2, t2, target, tau, ignore_index, backend, *outputs)
    return outputs


def kd_bwd_outputs(s2, t2, teacher_grad, tau_grad):
    """(d student, d teacher or None, dτ per row or None): the gradients in their logits' dtypes, (R, C)."""
    return (s2.new_empty(s2.shape), t2.new_empty(t2.shape) if teacher_grad else None,
            s2.new_empty(s2.shape[0], dtype=compute_dtype(s2)) if tau_grad else None)


@_op("kd_bwd", mutates_args=("ds", "dt", "dtau"))
def _kd_bwd(s2: Tensor, t2: Tensor, target: Optional[Tensor], tau: Tensor, stats: Tensor, g: Tensor,
            g_ce: Optional[Tensor], ignore_index: int, elementwise: bool, backend: str, ds: Tensor,
            dt: Optional[Tensor], dtau: Optional[Tensor]) -> None:
    engine(backend, "kd").kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, ds, dt, dtau)


def kd_bwd(backend, s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, teacher_grad, tau_grad):
    """(d student, d teacher or None, dτ per row or None) (kd_bwd_outputs)."""
    outputs = kd_bwd_outputs(s2, t2, teacher_grad, tau_grad)
    _call("kd_bwd")(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, backend, *outputs)
    return outputs


# ---------------------------------------------------------------------------- sampling

def draw_seed(device, generator):
    """A launch's random seed, drawn on ``device`` from ``generator`` (None: the device's default
    generator): a one-element int64 tensor, so drawing it costs no host sync; the kernels load it,
    the torch path seeds its own generator from it."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, generator=generator)


def gumbel_fwd_outputs(backend, x3, hard, need_grad):
    """(out, aux): the sample in x3's dtype and contiguous (A, C, B) layout, and what gumbel_bwd needs
    besides x3, out and the seed: the kernels' row statistics (M, S) (their backward regenerates the
    noise), the torch path's soft sample for a hard backward (nothing otherwise)."""
    if backend == "triton":
        aux = [x3.new_empty(_rows(x3), dtype=torch.float32) for _ in range(2)]
    else:
        aux = [x3.new_empty(x3.shape)] if hard and need_grad else []
    return x3.new_empty(x3.shape), aux


@_op("gumbel_fwd", mutates_args=("out", "aux"))
def _gumbel_fwd(x3: Tensor, tau: Tensor, seed: Tensor, hard: bool, backend: str, out: Tensor,
                aux: List[Tensor]) -> None:
    engine(backend, "sample").gumbel_fwd(x3, tau, seed, hard, out, aux)


def gumbel_fwd(backend, x3, tau, seed, hard, need_grad):
    """(out, aux) (gumbel_fwd_outputs)."""
    out, aux = gumbel_fwd_outputs(backend, x3, hard, need_grad)
    _call("gumbel_fwd")(x3, tau, seed, hard, backend, out, aux)
    return out, tuple(aux)


@_op("gumbel_bwd", mutates_args=("dx",))
def _gumbel_bwd(g: Tensor, tau: Tensor, hard: bool, src: Tensor, seed: Tensor, aux: List[Tensor], backend: str,
                dx: Tensor) -> None:
    engine(backend, "sample").gumbel_bwd(g, tau, hard, src, seed, aux, dx)


def gumbel_bwd(backend, g, tau, hard, src, seed, aux):
    """dx, contiguous (A, C, B) in the logits' dtype; ``src``: the logits x3 when ``hard``, else the soft sample."""
    dx = src.new_empty(src.shape)
    _call("gumbel_bwd")(g, tau, hard, src, seed, list(aux), backend, dx)
    return dx


@_op("sample", mutates_args=("idx", "ok"))
def _sample(x2: Tensor, tau: Tensor, seed: Tensor, greedy: bool, backend: str, idx: Tensor, ok: Tensor) -> None:
    engine(backend, "sample").sample_fwd(x2, tau, seed, greedy, idx, ok)


def _kept_verdict(device):
    """sample's verdict: a one-element int32 flag holding 1, kept per (device, stream) by _tau.kept_tensor (a
    fresh one while tracing or capturing a CUDA graph), to which the kernels store 0 when a row holds a NaN,
    so that the check costs no launch of its own.  The caller asserts it: torch._assert_async on CUDA, whose
    failure ends the CUDA context and the flag with it; elsewhere it sets the flag back before raising."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return kept_tensor(("sample verdict", device, stream), device,
                       lambda: torch.ones(1, device=device, dtype=torch.int32))


def sample(backend, x2, tau, seed, greedy):
    """(idx, ok): one int64 index per row of the (R, C) logits ``x2`` (-1 for a row holding a NaN) and a
    one-element int32 verdict, nonzero when no row held a NaN (the kernels' kept flag in eager code, a fresh
    one while something traces or on the torch path)."""
    idx = x2.new_empty(x2.shape[0], dtype=torch.int64)
    if backend == "triton" and not _tracing():
        ok = _kept_verdict(x2.device)
    else:
        ok = x2.new_ones(1, dtype=torch.int32)
    _call("sample")(x2, tau, seed, greedy, backend, idx, ok)
    return idx, ok


# the tile engine's ops (fused_tau/_ops_tile.py), registered when this module is imported and reached through it
from ._ops_tile import (clip_bwd, clip_fwd, clip_fwd_outputs, infonce_bwd, infonce_bwd_outputs,  # noqa: E402,F401
                        ntxent_bwd, tile_bwd, tile_bwd_outputs, tile_fwd, tile_fwd_outputs)
