"""Every launcher of both engines as a ``torch.library`` custom op (``torch.ops.fused_tau.*``).

Why custom ops: ``torch.compile`` must trace a training step that calls a fused_tau loss
without a graph break, on the Triton path (CUDA) and on the torch path (CPU).  A launcher
is Python that picks a block size, allocates, and launches a Triton kernel (or loops over
row chunks with torch ops); dynamo cannot trace the interpreter's launches nor would it
gain anything from unrolling the torch path's loops.  As a custom op with a fake (meta)
implementation the launcher is one opaque node: dynamo and AOTAutograd see its output
shapes and dtypes, and Inductor calls the real launcher at run time.  The autograd
Functions (cross_entropy.py, softmax.py, ...) call these ops in their forward and
backward, and dynamo traces the Functions themselves (as flash-attn does), so the
gradient formulas stay in one place for eager and compiled code.

Conventions: ``backend`` ("triton" or "torch") is a string argument, so one op serves both
engines; an output a launcher leaves out (``None``) is an empty tensor in the op's schema,
and the Python wrappers below turn it back into ``None`` (the flags that decide it are
Python constants under tracing).  Op outputs never alias inputs: the in-place backward of
cross_entropy is its own op that declares the mutation.

The wrappers take the launchers' arguments with ``backend`` first and return what the
launchers return.  Plain eager calls skip the op's dispatch and run its implementation
(``_call``); anything that traces goes through the op.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._dispatch import MODE_LSE, engine
from .kernels import CLIP_STATS, TILE_STATS_LSE, TILE_STATS_POS
from ._tau import compute_dtype

_IMPLS = {}


def _op(name, mutates_args=()):
    """Register ``fn`` as the custom op ``fused_tau::name`` and keep it for eager calls."""
    def register(fn):
        _IMPLS[name] = fn
        return torch.library.custom_op(f"fused_tau::{name}", fn, mutates_args=mutates_args)
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


def _empty(like):
    """The stand-in of a left-out output."""
    return like.new_empty(0)


def _or_empty(t, like):
    return _empty(like) if t is None else t


def _or_none(t, present):
    return t if present else None


def _rows(x3):
    return x3.shape[0] * x3.shape[2]


# ---------------------------------------------------------------------------- row engine

@_op("softmax_fwd")
def _softmax_fwd(x3: Tensor, tau: Tensor, mode: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return engine(backend, "row").softmax_fwd(x3, tau, mode)


@_softmax_fwd.register_fake
def _(x3, tau, mode, backend):
    R = _rows(x3)
    out = x3.new_empty(R) if mode == MODE_LSE else x3.new_empty(x3.shape)
    return out, x3.new_empty(R, dtype=compute_dtype(x3)), x3.new_empty(R, dtype=compute_dtype(x3))


@_op("softmax_bwd")
def _softmax_bwd(y: Tensor, g: Tensor, x3: Tensor, m: Tensor, s: Tensor, tau: Tensor, log: bool,
                 tau_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    dx, dtau = engine(backend, "row").softmax_bwd(y, g, x3, m, s, tau, log, tau_grad)
    return dx, _or_empty(dtau, m)


@_softmax_bwd.register_fake
def _(y, g, x3, m, s, tau, log, tau_grad, backend):
    return y.new_empty(y.shape), m.new_empty(_rows(x3) if tau_grad else 0)


@_op("lse_bwd")
def _lse_bwd(x3: Tensor, m: Tensor, s: Tensor, tau: Tensor, g: Tensor, tau_grad: bool,
             backend: str) -> Tuple[Tensor, Tensor]:
    dx, dtau = engine(backend, "row").lse_bwd(x3, m, s, tau, g, tau_grad)
    return dx, _or_empty(dtau, m)


@_lse_bwd.register_fake
def _(x3, m, s, tau, g, tau_grad, backend):
    return x3.new_empty(x3.shape), m.new_empty(_rows(x3) if tau_grad else 0)


@_op("ce_fwd")
def _ce_fwd(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, ignore_index: int,
            smoothing: float, prob_target: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, wy, m, s, a = engine(backend, "row").ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target)
    return loss, _or_empty(wy, m), m, s, _or_empty(a, m)


@_ce_fwd.register_fake
def _ce_fwd_fake(x3, target, weight, tau, ignore_index, smoothing, prob_target, backend):
    R, cd = _rows(x3), compute_dtype(x3)
    has_a = prob_target or smoothing > 0
    return (x3.new_empty(R, dtype=cd), x3.new_empty(0 if prob_target else R, dtype=cd), x3.new_empty(R, dtype=cd),
            x3.new_empty(R, dtype=cd), x3.new_empty(R if has_a else 0, dtype=cd))


@_op("ce_bwd")
def _ce_bwd(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, m: Tensor, s: Tensor,
            a: Optional[Tensor], g: Tensor, ignore_index: int, smoothing: float, prob_target: bool,
            tau_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    dx, dtau = engine(backend, "row").ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing,
                                             prob_target, tau_grad)
    return dx, _or_empty(dtau, m)


@_ce_bwd.register_fake
def _(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, tau_grad, backend):
    return x3.new_empty(x3.shape), m.new_empty(_rows(x3) if tau_grad else 0)


@_op("ce_fwd_grad")
def _ce_fwd_grad(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, ignore_index: int,
                 smoothing: float, prob_target: bool, g: Tensor, tau_grad: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, wy, m, s, a, dx, dtau = engine(backend, "row").ce_fwd_grad(x3, target, weight, tau, ignore_index, smoothing,
                                                                     prob_target, g, tau_grad)
    return loss, _or_empty(wy, m), m, s, _or_empty(a, m), dx, _or_empty(dtau, m)


@_ce_fwd_grad.register_fake
def _(x3, target, weight, tau, ignore_index, smoothing, prob_target, g, tau_grad, backend):
    loss, wy, m, s, a = _ce_fwd_fake(x3, target, weight, tau, ignore_index, smoothing, prob_target, backend)
    return loss, wy, m, s, a, x3.new_empty(x3.shape), m.new_empty(_rows(x3) if tau_grad else 0)


@_op("ce_grad_rescale", mutates_args=("dx",))
def _ce_grad_rescale(dx: Tensor, g: Tensor, backend: str) -> None:
    engine(backend, "row").ce_grad_rescale(dx, g)


@_ce_grad_rescale.register_fake
def _(dx, g, backend):
    return None


@_op("ce_bwd_inplace", mutates_args=("x3",))
def _ce_bwd_inplace(x3: Tensor, target: Tensor, weight: Optional[Tensor], tau: Tensor, m: Tensor, s: Tensor,
                    a: Optional[Tensor], g: Tensor, ignore_index: int, smoothing: float, prob_target: bool,
                    tau_grad: bool, backend: str) -> Tensor:
    _, dtau = engine(backend, "row").ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing,
                                            prob_target, tau_grad, inplace=True)
    return _or_empty(dtau, m)


@_ce_bwd_inplace.register_fake
def _(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, tau_grad, backend):
    return m.new_empty(_rows(x3) if tau_grad else 0)


def softmax_fwd(backend, x3, tau, mode):
    return _call("softmax_fwd")(x3, tau, mode, backend)


def softmax_bwd(backend, y, g, x3, m, s, tau, log, tau_grad):
    dx, dtau = _call("softmax_bwd")(y, g, x3, m, s, tau, log, tau_grad, backend)
    return dx, _or_none(dtau, tau_grad)


def lse_bwd(backend, x3, m, s, tau, g, tau_grad):
    dx, dtau = _call("lse_bwd")(x3, m, s, tau, g, tau_grad, backend)
    return dx, _or_none(dtau, tau_grad)


def ce_fwd(backend, x3, target, weight, tau, ignore_index, smoothing, prob_target):
    loss, wy, m, s, a = _call("ce_fwd")(x3, target, weight, tau, ignore_index, smoothing, prob_target,
                                                   backend)
    return loss, _or_none(wy, not prob_target), m, s, _or_none(a, prob_target or smoothing > 0)


def ce_fwd_grad(backend, x3, target, weight, tau, ignore_index, smoothing, prob_target, g, tau_grad):
    loss, wy, m, s, a, dx, dtau = _call("ce_fwd_grad")(x3, target, weight, tau, ignore_index, smoothing, prob_target,
                                                        g, tau_grad, backend)
    return (loss, _or_none(wy, not prob_target), m, s, _or_none(a, prob_target or smoothing > 0), dx,
            _or_none(dtau, tau_grad))


def ce_grad_rescale(backend, dx, g):
    """dx · g: in place in eager code (nothing touched when g == 1, checked on the device); a new tensor
    while tracing (AOTAutograd's backward may not mutate a tensor saved by the forward)."""
    if _tracing():
        return (dx.to(g.dtype) * g.reshape(())).to(dx.dtype)
    _call("ce_grad_rescale")(dx, g, backend)
    return dx


def ce_bwd(backend, x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, tau_grad,
           inplace=False):
    """``inplace`` writes dx over x3 and returns x3 as dx (eager only: a traced graph plans its own
    memory, and AOTAutograd's backward may not mutate a saved forward input)."""
    if inplace and not _tracing():
        dtau = _call("ce_bwd_inplace")(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing,
                                                  prob_target, tau_grad, backend)
        return x3, _or_none(dtau, tau_grad)
    dx, dtau = _call("ce_bwd")(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing,
                                          prob_target, tau_grad, backend)
    return dx, _or_none(dtau, tau_grad)


# ---------------------------------------------------------------------------- distillation

@_op("kd_fwd")
def _kd_fwd(s2: Tensor, t2: Tensor, target: Optional[Tensor], tau: Tensor, ignore_index: int,
            elementwise: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    kl, ce, stats, out = engine(backend, "kd").kd_fwd(s2, t2, target, tau, ignore_index, elementwise)
    return kl, _or_empty(ce, kl), stats, _or_empty(out, s2)


@_kd_fwd.register_fake
def _(s2, t2, target, tau, ignore_index, elementwise, backend):
    R, C = s2.shape
    cd = compute_dtype(s2)
    return (s2.new_empty(R, dtype=cd), s2.new_empty(R if target is not None else 0, dtype=cd),
            s2.new_empty((R, 8), dtype=cd), s2.new_empty((R, C) if elementwise else (0,)))


@_op("kd_bwd")
def _kd_bwd(s2: Tensor, t2: Tensor, target: Optional[Tensor], tau: Tensor, stats: Tensor, g: Tensor,
            g_ce: Optional[Tensor], ignore_index: int, elementwise: bool, teacher_grad: bool,
            tau_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    ds, dt, dtau = engine(backend, "kd").kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise,
                                                teacher_grad, tau_grad)
    return ds, _or_empty(dt, t2), _or_empty(dtau, stats)


@_kd_bwd.register_fake
def _(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, teacher_grad, tau_grad, backend):
    return (s2.new_empty(s2.shape), t2.new_empty(t2.shape if teacher_grad else (0,)),
            stats.new_empty(s2.shape[0] if tau_grad else 0))


def kd_fwd(backend, s2, t2, target, tau, ignore_index, elementwise):
    kl, ce, stats, out = _call("kd_fwd")(s2, t2, target, tau, ignore_index, elementwise, backend)
    return kl, _or_none(ce, target is not None), stats, _or_none(out, elementwise)


def kd_bwd(backend, s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, teacher_grad, tau_grad):
    ds, dt, dtau = _call("kd_bwd")(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise,
                                              teacher_grad, tau_grad, backend)
    return ds, _or_none(dt, teacher_grad), _or_none(dtau, tau_grad)


# ---------------------------------------------------------------------------- sampling

def draw_seed(device, generator):
    """A launch's random seed, drawn on ``device`` from ``generator`` (None: the device's default
    generator): a one-element int64 tensor, so drawing it costs no host sync; the kernels load it,
    the torch path seeds its own generator from it."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, generator=generator)


@_op("gumbel_fwd")
def _gumbel_fwd(x3: Tensor, tau: Tensor, seed: Tensor, hard: bool, need_grad: bool,
                backend: str) -> List[Tensor]:
    out, aux = engine(backend, "sample").gumbel_fwd(x3, tau, seed, hard, need_grad)
    return [out, *aux]


@_gumbel_fwd.register_fake
def _(x3, tau, seed, hard, need_grad, backend):
    return [x3.new_empty(x3.shape), *_gumbel_aux_fake(x3, hard, need_grad, backend)]


def _gumbel_aux_fake(x3, hard, need_grad, backend):
    if backend == "triton":  # the row statistics (M, S): the backward regenerates the noise
        return [x3.new_empty(_rows(x3), dtype=torch.float32) for _ in range(2)]
    return [x3.new_empty(x3.shape)] if hard and need_grad else []  # the torch path keeps the soft sample


@_op("gumbel_bwd")
def _gumbel_bwd(g: Tensor, tau: Tensor, hard: bool, src: Tensor, seed: Tensor, aux: List[Tensor],
                backend: str) -> Tensor:
    return engine(backend, "sample").gumbel_bwd(g, tau, hard, src, seed, tuple(aux))


@_gumbel_bwd.register_fake
def _(g, tau, hard, src, seed, aux, backend):
    return src.new_empty(src.shape)


@_op("sample")
def _sample(x2: Tensor, tau: Tensor, seed: Tensor, greedy: bool, backend: str) -> Tensor:
    return engine(backend, "sample").sample_fwd(x2, tau, seed, greedy)


@_sample.register_fake
def _(x2, tau, seed, greedy, backend):
    return x2.new_empty(x2.shape[0], dtype=torch.int64)


def gumbel_fwd(backend, x3, tau, seed, hard, need_grad):
    """(out, aux): ``aux`` is what gumbel_bwd needs besides x3, out and the seed."""
    out, *aux = _call("gumbel_fwd")(x3, tau, seed, hard, need_grad, backend)
    return out, tuple(aux)


def gumbel_bwd(backend, g, tau, hard, src, seed, aux):
    """``src``: the logits x3 when ``hard``, else the soft sample."""
    return _call("gumbel_bwd")(g, tau, hard, src, seed, list(aux), backend)


def sample(backend, x2, tau, seed, greedy):
    return _call("sample")(x2, tau, seed, greedy, backend)


# ---------------------------------------------------------------------------- tile engine
# In dot units y = a·b + bias: tile_fwd gives per row the TILE_* statistics (kernels/__init__.py; m = max
# y, s = Σ exp((y - m)/τ), and with a positive, the target's y or a_i · key_i, the softmax over
# [positive, counted columns]: pos, nll, shift, e_pos, e_rest); tile_bwd takes per row a shift c, a
# scale u and a reference r (c, r in dot units) and gives Q = u exp((y - c)/τ) times b and a, and
# zp = Σ (y - r) Q (see kernels/tile.py).  tau_rows holds one τ for every row or one per row (the row
# engine's layout): never expanded by the callers.

@_op("tile_fwd")
def _tile_fwd(a: Tensor, b: Tensor, bias: Optional[Tensor], tau_rows: Tensor, target: Optional[Tensor],
              diag_offset: Optional[int], key: Optional[Tensor], backend: str) -> Tensor:
    return engine(backend, "tile").tile_fwd(a, b, bias, tau_rows, target, diag_offset, key)


@_tile_fwd.register_fake
def _(a, b, bias, tau_rows, target, diag_offset, key, backend):
    rows = TILE_STATS_POS if target is not None or key is not None else TILE_STATS_LSE
    return a.new_empty((rows, a.shape[0]), dtype=compute_dtype(a))


@_op("tile_bwd")
def _tile_bwd(a: Tensor, b: Tensor, bias: Optional[Tensor], tau_rows: Tensor, target: Optional[Tensor],
              diag_offset: Optional[int], shift: Tensor, scale: Tensor, ref: Tensor, need_da: bool, need_db: bool,
              need_zp: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    da, db, dbias, zp = engine(backend, "tile").tile_bwd(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref,
                                                         need_da, need_db, need_zp)
    return _or_empty(da, a), _or_empty(db, b), _or_empty(dbias, shift), _or_empty(zp, shift)


@_tile_bwd.register_fake
def _(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, need_da, need_db, need_zp, backend):
    cd = compute_dtype(a)
    return (a.new_empty(a.shape if need_da else (0,)), b.new_empty(b.shape if need_db else (0,)),
            a.new_empty(b.shape[0] if need_db and bias is not None else 0, dtype=cd),
            a.new_empty(a.shape[0] if need_zp else 0, dtype=cd))


def tile_fwd(backend, a, b, bias, tau_rows, target, diag_offset, key=None):
    return _call("tile_fwd")(a, b, bias, tau_rows, target, diag_offset, key, backend)


def tile_bwd(backend, a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, need_da, need_db, need_zp):
    da, db, dbias, zp = _call("tile_bwd")(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref,
                                                     need_da, need_db, need_zp, backend)
    return (_or_none(da, need_da), _or_none(db, need_db), _or_none(dbias, need_db and bias is not None),
            _or_none(zp, need_zp))


# clip_loss in one pass: clip_fwd gives the (7, N) per-index statistics (kernels/tile.py CLIP_*: the
# loss per index first), clip_bwd takes them and the incoming gradient's factor g (one element) and
# gives da, db and zp (dL/dτ_k = -zp_k / τ_k).

@_op("clip_fwd")
def _clip_fwd(a: Tensor, b: Tensor, tau_rows: Tensor, backend: str) -> Tensor:
    return engine(backend, "tile").clip_fwd(a, b, tau_rows)


@_clip_fwd.register_fake
def _(a, b, tau_rows, backend):
    return a.new_empty((CLIP_STATS, a.shape[0]), dtype=compute_dtype(a))


@_op("clip_bwd")
def _clip_bwd(a: Tensor, b: Tensor, tau_rows: Tensor, stats: Tensor, g: Tensor, need_da: bool, need_db: bool,
              need_zp: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    da, db, zp = engine(backend, "tile").clip_bwd(a, b, tau_rows, stats, g, need_da, need_db, need_zp)
    return _or_empty(da, a), _or_empty(db, b), _or_empty(zp, stats)


@_clip_bwd.register_fake
def _(a, b, tau_rows, stats, g, need_da, need_db, need_zp, backend):
    return (a.new_empty(a.shape if need_da else (0,)), b.new_empty(b.shape if need_db else (0,)),
            stats.new_empty(a.shape[0] if need_zp else 0))


def clip_fwd(backend, a, b, tau_rows):
    return _call("clip_fwd")(a, b, tau_rows, backend)


def clip_bwd(backend, a, b, tau_rows, stats, g, need_da, need_db, need_zp):
    da, db, zp = _call("clip_bwd")(a, b, tau_rows, stats, g, need_da, need_db, need_zp, backend)
    return _or_none(da, need_da), _or_none(db, need_db), _or_none(zp, need_zp)
