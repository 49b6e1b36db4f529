"""The torch path of the tile engine: its launchers tile_fwd and tile_bwd, as ``kernels/tile.py``'s, with
the same arguments and results, written with torch matmuls over chunks of columns, so the N × K
logits matrix never exists (a chunk holds about ``CHUNK_ELEMENTS`` logits).

τ is one element (every row) or one per row, as the kernels take it.
The engine works in dot units y_ij = a_i · b_j + bias_j (before 1/τ_i) over the columns j
that count (j < K, j ≠ t_i the row's target, j ≠ i + diag_offset when self-similarity is
excluded); exp only ever sees a difference of dot products divided by τ (kernels/tile_engine.py):
  forward   m_i = max_j y_ij,  s_i = Σ_j exp((y_ij - m_i) / τ_i),  and y_{i,t_i} (from the same tiles)
  backward  Q_ij = u_i exp((y_ij - c_i) / τ_i) over the same columns, for the caller's per-row
            shift c (dot units) and scale u, and from it
            da = Q @ b,  db = Qᵀ @ a,  dbias = Σ_i Q_ij,  and for dL/dτ zp_i = Σ_j (y_ij - r_i) Q_ij
            with the caller's reference r (dot units).
The target column and any rank-one terms are the caller's (fused_tau/contrastive.py); the contrastive
losses' backwards and clip_loss, written on tile_fwd / tile_bwd, are _torch_tile_losses.py, which is also the
namespace fused_tau's dispatch takes (kernels/tile.py's names).
"""
import threading

import torch

from . import _torch_row_engine as torch_row_engine
from . import _torch_threads as torch_threads
from ._tau import compute_dtype
from .kernels import TILE_E_POS, TILE_E_REST, TILE_M, TILE_NLL, TILE_POS, TILE_S, TILE_SHIFT

CHUNK_ELEMENTS = 1 << 20
# On CPU, where the work is shared out among threads (_torch_threads.for_each), the logits are cut into
# tiles of ROW_BLOCK rows by at most 1/COL_PARTS of the columns; elsewhere into chunks of columns of
# all the rows.  The cut depends on the shapes only, not on the number of threads, and the forward
# and the backward cut alike, so that both compute each logit with the same matmul, to the last bit.
ROW_BLOCK = 64
COL_PARTS = 8


def _tiles(N, K, device):
    """(row blocks as slices, column chunks as (lo, hi)): see ROW_BLOCK."""
    shared = device.type == "cpu" and N * K >= torch_threads.PARALLEL_MIN_ELEMENTS and N > ROW_BLOCK
    rb = ROW_BLOCK if shared else max(N, 1)
    cb = max(1, CHUNK_ELEMENTS // rb)
    if shared:
        cb = min(cb, max(1, -(-K // COL_PARTS)))
    return ([slice(lo, min(N, lo + rb)) for lo in range(0, N, rb)],
            [(lo, min(K, lo + cb)) for lo in range(0, K, cb)])


def _dots(a_c, b, bias, lo, hi, cd):
    """y = a @ b[lo:hi].T + bias[lo:hi]: products of half-precision inputs accumulate and stay in
    fp32, as the kernels' tl.dot does."""
    y = a_c @ b[lo:hi].to(cd).T
    if bias is not None:
        y += bias[lo:hi].to(cd)
    return y


def _dots_into(a_rows, b, bias, lo, hi, cd, buffer):
    """_dots into the first rows × (hi - lo) elements of a flat buffer (CPU: no fresh tile per chunk)."""
    y = torch.mm(a_rows, b[lo:hi].to(cd).T, out=buffer[:a_rows.shape[0] * (hi - lo)].view(a_rows.shape[0], hi - lo))
    if bias is not None:
        y += bias[lo:hi].to(cd)
    return y


def _tile_buffer(row_blocks, col_chunks, cd, device):
    """for_each's scratch on CPU: a function making one flat buffer of the largest tile's size."""
    if device.type != "cpu":
        return None
    rows = max((r.stop - r.start for r in row_blocks), default=0)
    cols = max((hi - lo for lo, hi in col_chunks), default=0)
    return lambda: torch.empty(rows * cols, device=device, dtype=cd)


def _excluded_columns(rows, lo, hi, target, diag_offset, device):
    """Per excluded kind (target, self), the chunk-local column of each of the ``rows`` (a slice) and
    whether it is in the chunk."""
    out = []
    if target is not None:
        out.append(target[rows])
    if diag_offset is not None:
        out.append(torch.arange(rows.start, rows.stop, device=device) + diag_offset)
    return [((c - lo).clamp(0, hi - lo - 1).unsqueeze(-1), ((c >= lo) & (c < hi)).unsqueeze(-1)) for c in out]


def _excluded_entries(row_blocks, col_chunks, target, diag_offset):
    """CPU: the excluded entries of each tile, {(row block, column chunk): {kind: (rows in the block,
    columns in the chunk)}} with kind 0 the target, 1 the row itself, from a few ops over all the
    rows at once, so that a tile holding none (most of them) costs nothing and the others one indexed
    write per kind."""
    if not row_blocks or not col_chunks:
        return {}
    N = row_blocks[-1].stop
    rb = row_blocks[0].stop - row_blocks[0].start
    K = col_chunks[-1][1]
    starts = torch.tensor([lo for lo, _ in col_chunks])
    kinds = ([(0, target)] if target is not None else []) + \
        ([(1, torch.arange(N, device=target.device if target is not None else None) + diag_offset)]
         if diag_offset is not None else [])
    out = {}
    for kind, c in kinds:
        rows = ((c >= 0) & (c < K)).nonzero().squeeze(1)  # host-ok: the torch path (CUDA only for fp64 or forced)
        cols = c[rows]
        chunk = torch.searchsorted(starts, cols, right=True) - 1
        key = (rows // rb) * len(col_chunks) + chunk  # rows ascending: key sorted within a block
        order = torch.argsort(key, stable=True)
        rows, cols, chunk, key = rows[order], cols[order], chunk[order], key[order]
        groups, counts = torch.unique_consecutive(key, return_counts=True)
        at = 0
        for g, n in zip(groups.tolist(), counts.tolist()):  # host-ok: CPU only
            block, k = divmod(g, len(col_chunks))
            sel = slice(at, at + n)
            out.setdefault((block, k), {})[kind] = (rows[sel] - block * rb, cols[sel] - starts[k])
            at += n
    return out


def _exclude_(z, excluded, fill):
    """Set the excluded (row, column) entries of the chunk to ``fill``: an O(N) scatter, no N × chunk mask."""
    for col, hit in excluded:
        z.scatter_(1, col, torch.where(hit, torch.full_like(col, 0, dtype=z.dtype) + fill, z.gather(1, col)))
    return z


# how many elements of finished column chunks' contributions may wait for their turn (see _InChunkOrder)
PENDING_ELEMENTS = 1 << 24


class _InChunkOrder:
    """Applies each column chunk's update of the shared accumulators in chunk order, whichever thread
    computed it, so that the sums are those of one pass over the chunks.  A thread whose chunk is not
    next leaves its update waiting and goes on with another chunk (a thread that had to wait for a
    slower one, on a busy core, would leave its own core idle); the thread that finds nobody applying
    applies every waiting update that is next.  At most ``backlog`` updates wait (their buffers are
    the memory this costs): a thread further ahead than that waits for its turn."""

    def __init__(self, backlog):
        self.next, self.failed, self.turn = 0, False, threading.Condition()
        self.backlog, self.waiting, self.applying = max(1, backlog), {}, False

    def run(self, i, update):
        with self.turn:
            self.turn.wait_for(lambda: self.failed or i < self.next + self.backlog)
            if self.failed:
                raise RuntimeError("another chunk failed")
            self.waiting[i] = update
            if self.applying:
                return
            self.applying = True
        while True:
            with self.turn:
                update = self.waiting.pop(self.next, None)
                if update is None or self.failed:
                    self.applying = False
                    return
            try:
                update()
            except BaseException:
                self.fail()
                raise
            with self.turn:
                self.next += 1
                self.turn.notify_all()

    def fail(self):
        with self.turn:
            self.failed = True
            self.waiting.clear()
            self.turn.notify_all()


def tile_fwd(a, b, bias, tau, target, diag_offset, key, reduction, stats, loss):
    """kernels/tile.py's tile_fwd: writes the TILE_* rows of ``stats``, (TILE_STATS_POS, N) when the rows have
    a positive (the target's y, or a_i · key_i), else (TILE_STATS_LSE, N), in the compute dtype, and
    ``loss`` (None: not written) in its own dtype: the rows' nll for ``reduction`` 'none', their mean
    or sum for 'mean' or 'sum' (_write_loss)."""
    positive = target is not None or key is not None
    _tile_lse(a, b, bias, tau, target, diag_offset, stats[TILE_M], stats[TILE_S],
              stats[TILE_POS] if target is not None else None)
    if not positive:
        return
    m, s, pos = stats[TILE_M], stats[TILE_S], stats[TILE_POS]
    if target is None:
        torch.sum(a.to(m.dtype) * key.to(m.dtype), -1, out=pos)
    for row, value in zip((TILE_NLL, TILE_SHIFT, TILE_E_POS, TILE_E_REST),
                          _infonce_rows(m, s, pos, tau.to(m.dtype).expand(a.shape[0]))):
        stats[row].copy_(value)
    _write_loss(loss, stats[TILE_NLL], reduction)


def _infonce_rows(m, s, pos, tau):
    """(nll, shift, e_pos, e_neg) of the softmax over [positive, negatives] (tile_engine._infonce_row)."""
    nll = torch.nn.functional.softplus(torch.log(s) + (m - pos) / tau)
    shift = torch.maximum(m, pos)
    nll = torch.where(torch.isposinf(shift), float("nan"), nll)
    return nll, shift, torch.exp((pos - shift) / tau), s * torch.exp((m - shift) / tau)


def _write_loss(loss, rows, reduction):
    """``loss`` (None: nothing) = the compute-dtype ``rows`` ('none'), their mean or their sum, rounded
    once to loss's dtype."""
    if loss is not None:
        loss.copy_(rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean())


def _tile_lse(a, b, bias, tau, target, diag_offset, m_out, s_out, zy_out):
    """Writes (m, s, y_target; None without a target) in dot units, fp32 (fp64 for fp64 inputs), one per
    row of ``a``.  Each block of rows goes through the column chunks in order (the blocks are shared out)."""
    N, K = a.shape[0], b.shape[0]
    cd = compute_dtype(a)
    a_c = a.to(cd)
    tau_c = tau.to(cd).expand(N)  # one τ or one per row: a view, never materialised
    row_blocks, col_chunks = _tiles(N, K, a.device)
    cpu = a.device.type == "cpu"
    entries = _excluded_entries(row_blocks, col_chunks, target, diag_offset) if cpu else None

    def block(rows, scratch=None):
        n = rows.stop - rows.start
        tau_r = tau_c[rows]
        tau_col = tau_r.unsqueeze(-1)
        m = torch.full((n,), float("-inf"), device=a.device, dtype=cd)
        s = torch.zeros(n, device=a.device, dtype=cd)
        zy = torch.zeros(n, device=a.device, dtype=cd) if target is not None else None
        for k, (lo, hi) in enumerate(col_chunks):
            if cpu:  # the tile in the thread's buffer; its excluded entries, if any, by index
                y = _dots_into(a_c[rows], b, bias, lo, hi, cd, scratch)
                here = entries.get((rows.start // row_blocks[0].stop, k), {})
                if 0 in here:
                    r, c = here[0]
                    zy[r] = y[r, c]
                for r, c in here.values():
                    y[r, c] = float("-inf")
            else:
                y = _dots(a_c[rows], b, bias, lo, hi, cd)
                excluded = _excluded_columns(rows, lo, hi, target, diag_offset, a.device)
                if target is not None:
                    col, hit = excluded[0]
                    zy = torch.where(hit.squeeze(-1), y.gather(1, col).squeeze(-1), zy)
                _exclude_(y, excluded, float("-inf"))
            m_new = torch.maximum(m, y.amax(1))
            safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no -inf - -inf
            d = y.sub_(safe.unsqueeze(-1)).div_(tau_col)
            if cpu:
                # the excluded entries' exp(-inf) = 0 set after the exp (an argument of -inf takes
                # _exp_'s underflow passes)
                for r, c in here.values():
                    d[r, c] = 0.0
                e = torch_row_engine._exp_(d)
                for r, c in here.values():
                    e[r, c] = 0.0
            else:
                e = d.exp_()
            s = s * torch.exp((m - safe) / tau_r) + e.sum(1)
            m = m_new
        m_out[rows], s_out[rows] = m, s
        if target is not None:
            zy_out[rows] = zy

    torch_threads.for_each(row_blocks, block, a.device, N * K, scratch=_tile_buffer(row_blocks, col_chunks, cd, a.device))


def tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da_out, db, dbias, zp):
    """Writes da, db, dbias and zp (each None when not wanted; dbias only with db and a bias), for
    Q_ij = scale_i exp((y_ij - shift_i) / τ_i) over the counted columns and zp_i = Σ_j (y_ij - ref_i) Q_ij.

    Without db the blocks of rows are shared out (each block's da and zp summed over the column
    chunks in order); with db, the column chunks (db's rows are the chunk's columns), each summing
    db over the row blocks in order, their contributions to da and zp added in chunk order."""
    N, K = a.shape[0], b.shape[0]
    cd = compute_dtype(a)
    a_c = a.to(cd)
    tau_col = tau.to(cd).expand(N).unsqueeze(-1)
    need_da, need_db, need_zp = da_out is not None, db is not None, zp is not None
    # da and zp are sums over the column chunks, in the compute dtype (in da_out itself when it has it)
    da = None if not need_da else da_out.zero_() if da_out.dtype == cd else torch.zeros(a.shape, device=a.device,
                                                                                         dtype=cd)
    if need_zp:
        zp.zero_()
    shift_col = shift.to(cd).unsqueeze(-1)
    scale_col = scale.to(cd).unsqueeze(-1)
    ref_col = ref.to(cd).unsqueeze(-1)
    row_blocks, col_chunks = _tiles(N, K, a.device)
    cpu = a.device.type == "cpu"
    entries = _excluded_entries(row_blocks, col_chunks, target, diag_offset) if cpu else None
    buffer = _tile_buffer(row_blocks, col_chunks, cd, a.device)

    def tile_q(rows, k, scratch):
        """(y - ref or None, Q) on the rows' k-th chunk of columns; y - ref only for zp.  On CPU Q is
        in ``scratch`` (the thread's buffer), valid until the thread's next tile."""
        lo, hi = col_chunks[k]
        y = _dots_into(a_c[rows], b, bias, lo, hi, cd, scratch) if cpu else _dots(a_c[rows], b, bias, lo, hi, cd)
        d = (y - shift_col[rows]) if need_zp else y.sub_(shift_col[rows])  # y itself is spent without zp
        Q = torch_row_engine._exp_(d.div_(tau_col[rows])).mul_(scale_col[rows])
        if cpu:
            for r, c in entries.get((rows.start // row_blocks[0].stop, k), {}).values():
                Q[r, c] = 0.0
        else:
            _exclude_(Q, _excluded_columns(rows, lo, hi, target, diag_offset, a.device), 0.0)
        # y is finite here (no column was set to -inf): 0 · y = 0
        return (y.sub_(ref_col[rows]) if need_zp else None), Q

    if not need_db:
        def block(rows, scratch=None):
            for k, (lo, hi) in enumerate(col_chunks):
                y_ref, Q = tile_q(rows, k, scratch)
                if need_zp:
                    zp[rows] += (y_ref * Q).sum(1)
                if need_da:
                    da[rows] += Q @ b[lo:hi].to(cd)

        torch_threads.for_each(row_blocks, block, a.device, N * K, scratch=buffer)
    else:
        update_elements = (N * a.shape[1] if need_da else 0) + (N if need_zp else 0)
        order = _InChunkOrder(min(2 * torch_threads.threads_for(a.device, N * K),
                                  PENDING_ELEMENTS // max(update_elements, 1)))

        def chunk(task, scratch=None):
            i, (lo, hi) = task
            try:
                zp_i = torch.empty_like(zp) if need_zp else None
                da_i = torch.empty_like(da) if need_da else None
                db_i = dbias_i = None
                b_chunk = b[lo:hi].to(cd)
                for rows in row_blocks:
                    y_ref, Q = tile_q(rows, i, scratch)
                    if need_zp:
                        zp_i[rows] = (y_ref * Q).sum(1)
                    if need_da:
                        torch.mm(Q, b_chunk, out=da_i[rows])
                    # summed into the chunk's db in place: no product matrix made and added
                    db_i = Q.T @ a_c[rows] if db_i is None else db_i.addmm_(Q.T, a_c[rows])
                    if dbias is not None:
                        dbias_i = Q.sum(0) if dbias_i is None else dbias_i.add_(Q.sum(0))
                db[lo:hi] = db_i.to(b.dtype)
                if dbias is not None:
                    dbias[lo:hi] = dbias_i
                order.run(i, lambda: (zp.add_(zp_i) if need_zp else None, da.add_(da_i) if need_da else None))
            except BaseException:
                order.fail()
                raise

        torch_threads.for_each(list(enumerate(col_chunks)), chunk, a.device, N * K, scratch=buffer)
    if need_da and da is not da_out:
        da_out.copy_(da)
