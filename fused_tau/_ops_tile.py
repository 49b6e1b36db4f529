"""The tile engine's launchers as ``torch.library`` custom ops (``torch.ops.fused_tau.*``): the pattern and
its reasons are fused_tau/_ops.py's (an ``*_outputs`` function allocates, the op writes into its arguments,
one no-op fake), which registers the row engine's and imports these.  The engine is looked up through
_ops (``_ops.engine``), the one dispatch point that tests stand in for."""
from typing import Optional

from torch import Tensor

from . import _ops
from ._ops import _call, _op
from ._tau import compute_dtype
from .kernels import CLIP_STATS, TILE_STATS_LSE, TILE_STATS_POS


# ---------------------------------------------------------------------------- tile engine
# In dot units y = a·b + bias: tile_fwd gives per row the TILE_* statistics (kernels/__init__.py; m = max
# y, s = Σ exp((y - m)/τ), and with a positive, the target's y or a_i · key_i, the softmax over
# [positive, counted columns]: pos, nll, shift, e_pos, e_rest); tile_bwd takes per row a shift c, a
# scale u and a reference r (c, r in dot units) and gives Q = u exp((y - c)/τ) times b and a, and
# zp = Σ (y - r) Q (see kernels/tile_bwd.py).  tau_rows holds one τ for every row or one per row (the row
# engine's layout): never expanded by the callers.

def tile_fwd_outputs(a, positive, reduction=None, out_dtype=None):
    """(stats, loss): the (TILE_STATS_POS, N) statistics of rows with a positive, else (TILE_STATS_LSE, N), in
    the compute dtype (kernels/__init__.py TILE_*); the loss in ``out_dtype`` (what the loss function
    returns: no cast after the op), one per row for ``reduction`` 'none', one element for 'mean' and
    'sum', None without a reduction."""
    stats = a.new_empty((TILE_STATS_POS if positive else TILE_STATS_LSE, a.shape[0]), dtype=compute_dtype(a))
    if reduction is None:
        return stats, None
    return stats, a.new_empty((a.shape[0],) if reduction == "none" else (), dtype=out_dtype)


@_op("tile_fwd", mutates_args=("stats", "loss"))
def _tile_fwd(a: Tensor, b: Tensor, bias: Optional[Tensor], tau_rows: Tensor, target: Optional[Tensor],
              diag_offset: Optional[int], key: Optional[Tensor], reduction: str, backend: str, stats: Tensor,
              loss: Optional[Tensor]) -> None:
    _ops.engine(backend, "tile").tile_fwd(a, b, bias, tau_rows, target, diag_offset, key, reduction, stats, loss)


def tile_fwd(backend, a, b, bias, tau_rows, target, diag_offset, key=None, reduction=None, out_dtype=None):
    """(stats, loss) (tile_fwd_outputs); the positive is y at ``target``, or a_i · key_i; the loss (rows with
    a positive) the rows' nll for ``reduction`` 'none', their mean or sum for 'mean' or 'sum'."""
    stats, loss = tile_fwd_outputs(a, target is not None or key is not None, reduction, out_dtype)
    _call("tile_fwd")(a, b, bias, tau_rows, target, diag_offset, key, reduction or "none", backend, stats, loss)
    return stats, loss


def tile_bwd_outputs(a, b, has_bias, need_da, need_db, need_zp):
    """(da, db, dbias, zp), each None when not asked for (dbias with db and a bias only): da and db in
    their operands' dtypes and shapes, dbias one compute-dtype element per row of ``b``, zp one per row of ``a``."""
    cd = compute_dtype(a)
    return (a.new_empty(a.shape) if need_da else None, b.new_empty(b.shape) if need_db else None,
            a.new_empty(b.shape[0], dtype=cd) if need_db and has_bias else None,
            a.new_empty(a.shape[0], dtype=cd) if need_zp else None)


@_op("tile_bwd", mutates_args=("da", "db", "dbias", "zp"))
def _tile_bwd(a: Tensor, b: Tensor, bias: Optional[Tensor], tau_rows: Tensor, target: Optional[Tensor],
              diag_offset: Optional[int], shift: Tensor, scale: Tensor, ref: Tensor, backend: str,
              da: Optional[Tensor], db: Optional[Tensor], dbias: Optional[Tensor], zp: Optional[Tensor]) -> None:
    _ops.engine(backend, "tile").tile_bwd(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, da, db, dbias,
                                          zp)


def tile_bwd(backend, a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, need_da, need_db, need_zp):
    """(da, db, dbias, zp) (tile_bwd_outputs)."""
    outputs = tile_bwd_outputs(a, b, bias is not None, need_da, need_db, need_zp)
    _call("tile_bwd")(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, backend, *outputs)
    return outputs


def infonce_bwd_outputs(a, b, key, need_da, need_db, need_dkey, need_dtau):
    """(da, db, dkey, dtau), each None when not asked for: da, db and dkey in their operands' dtypes and
    shapes, dtau one compute-dtype element per row of ``a``."""
    return (a.new_empty(a.shape) if need_da else None, b.new_empty(b.shape) if need_db else None,
            key.new_empty(key.shape) if need_dkey else None,
            a.new_empty(a.shape[0], dtype=compute_dtype(a)) if need_dtau else None)


@_op("infonce_bwd", mutates_args=("da", "db", "dkey", "dtau"))
def _infonce_bwd(a: Tensor, b: Tensor, tau_rows: Tensor, target: Optional[Tensor], key: Optional[Tensor],
                 shift: Tensor, ref: Tensor, e_pos: Tensor, e_rest: Tensor, g: Tensor, g_div: float, label_offset: int,
                 backend: str, da: Optional[Tensor], db: Optional[Tensor], dkey: Optional[Tensor],
                 dtau: Optional[Tensor]) -> None:
    _ops.engine(backend, "tile").infonce_bwd(a, b, tau_rows, target, key, shift, ref, e_pos, e_rest, g, g_div,
                                             label_offset, da, db, dkey, dtau)


def infonce_bwd(backend, a, b, tau_rows, target, key, shift, ref, e_pos, e_rest, g, g_div, label_offset, need_da,
                need_db, need_dkey, need_dtau):
    """(da, db, dkey, dtau) of a softmax cross-entropy over [positive, counted columns of a @ b.T] from the
    forward's TILE_* statistics (shift, ref = pos, e_pos, e_rest) and the incoming gradient ``g`` (one
    element or one per row, divided by ``g_div``): the positive is a_i · key_i (``key``) or the column
    ``target`` = i + label_offset (in-batch)."""
    outputs = infonce_bwd_outputs(a, b, key, need_da, need_db, need_dkey and key is not None, need_dtau)
    _call("infonce_bwd")(a, b, tau_rows, target, key, shift, ref, e_pos, e_rest, g, float(g_div), int(label_offset),
                         backend, *outputs)
    return outputs


@_op("ntxent_bwd", mutates_args=("dz", "dtau"))
def _ntxent_bwd(z: Tensor, tau_rows: Tensor, target: Tensor, shift: Tensor, ref: Tensor, e_pos: Tensor, e_rest: Tensor,
                g: Tensor, g_div: float, backend: str, dz: Optional[Tensor], dtau: Optional[Tensor]) -> None:
    _ops.engine(backend, "tile").ntxent_bwd(z, tau_rows, target, shift, ref, e_pos, e_rest, g, g_div, dz, dtau)


def ntxent_bwd(backend, z, tau_rows, target, shift, ref, e_pos, e_rest, g, g_div, need_dz, need_dtau):
    """(dz, dtau) of NT-Xent's 2N softmaxes over [positive, the other views] from the forward's TILE_*
    statistics (shift, ref = pos, e_pos, e_rest) and the incoming gradient ``g`` divided by ``g_div``; each
    None when not asked for (dz in z's dtype, dtau one compute-dtype element per view)."""
    dz = z.new_empty(z.shape) if need_dz else None
    dtau = z.new_empty(z.shape[0], dtype=compute_dtype(z)) if need_dtau else None
    _call("ntxent_bwd")(z, tau_rows, target, shift, ref, e_pos, e_rest, g, float(g_div), backend, dz, dtau)
    return dz, dtau


# clip_loss in one pass: clip_fwd gives the (CLIP_STATS, N) per-index statistics (kernels/__init__.py CLIP_*: the
# loss per index first) and clip_loss itself, clip_bwd takes the statistics and the incoming gradient's
# factor g (one element) and gives da, db and zp (dL/dτ_k = -zp_k / τ_k).

def clip_fwd_outputs(a, out_dtype):
    """(stats, loss): the (CLIP_STATS, N) statistics in the compute dtype, clip_loss (one element) in
    ``out_dtype`` (what clip_loss returns: no cast after the op)."""
    return a.new_empty((CLIP_STATS, a.shape[0]), dtype=compute_dtype(a)), a.new_empty((), dtype=out_dtype)


@_op("clip_fwd", mutates_args=("stats", "loss"))
def _clip_fwd(a: Tensor, b: Tensor, tau_rows: Tensor, backend: str, stats: Tensor, loss: Tensor) -> None:
    _ops.engine(backend, "tile").clip_fwd(a, b, tau_rows, stats, loss)


def clip_fwd(backend, a, b, tau_rows, out_dtype):
    """(stats, loss) (clip_fwd_outputs)."""
    stats, loss = clip_fwd_outputs(a, out_dtype)
    _call("clip_fwd")(a, b, tau_rows, backend, stats, loss)
    return stats, loss


@_op("clip_bwd", mutates_args=("da", "db", "zp"))
def _clip_bwd(a: Tensor, b: Tensor, tau_rows: Tensor, stats: Tensor, g: Tensor, backend: str, da: Optional[Tensor],
              db: Optional[Tensor], zp: Optional[Tensor]) -> None:
    _ops.engine(backend, "tile").clip_bwd(a, b, tau_rows, stats, g, da, db, zp)


def clip_bwd(backend, a, b, tau_rows, stats, g, need_da, need_db, need_zp):
    """(da, db, zp), each None when not asked for (tile_bwd_outputs without a bias)."""
    da, db, _, zp = tile_bwd_outputs(a, b, False, need_da, need_db, need_zp)
    _call("clip_bwd")(a, b, tau_rows, stats, g, backend, da, db, zp)
    return da, db, zp
