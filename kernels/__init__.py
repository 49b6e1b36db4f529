"""Triton kernels of fused_tau (installed as ``fused_tau.kernels``).

Row engine (one program streams one row, or a split of one): ``row_engine`` (layout, block choice,
the row prologue), ``row_softmax`` (softmax, log_softmax, logsumexp, Gumbel-softmax), ``row_ce``
(cross_entropy), ``row_ce_reduce`` (its mean / sum, denominator and target check), ``row_kd`` (kd_loss's
launchers; its kernels: ``row_kd_fwd``, ``row_kd_bwd``), ``row_sample`` (sample); ``row`` gathers the launchers of
row_softmax, row_ce and row_ce_reduce for fused_tau's dispatch.  Tile engine (query tiles × key or class tiles on the
tensor cores: infonce, clip_loss, nt_xent, linear_cross_entropy): ``tile_engine`` (the tile table, the
split of the long dimension, the jit helpers of a tile, the merge of split partials), ``tile_fwd`` (the
forward and its combine), ``tile_bwd`` (the backward: fused, or chunks of ds and two GEMMs),
``tile_clip`` (clip_loss in one pass); ``tile`` gathers their launchers for fused_tau's dispatch.
``tl_math``: jit math shared by the kernels.
"""

# The row engine's softmax modes, defined here (no Triton import) so that fused_tau's dispatch and the
# torch path share the kernels' numbering without importing Triton.
MODE_LSE, MODE_SOFTMAX, MODE_LOG_SOFTMAX = 0, 1, 2

# The tile engine's per-row statistics, laid out as rows of one fp32 tensor by both engines' tile_fwd
# (kernels/tile_fwd.py _tile_combine_kernel): (TILE_STATS_POS, N) for rows with a positive, else
# (TILE_STATS_LSE, N) (m and s only); and clip_fwd's (CLIP_STATS, N) (kernels/tile_clip.py
# _clip_combine_kernel).
TILE_M, TILE_S, TILE_POS, TILE_NLL, TILE_SHIFT, TILE_E_POS, TILE_E_REST = range(7)
TILE_STATS_LSE, TILE_STATS_POS = 2, 7
CLIP_LOSS, CLIP_SHIFT_R, CLIP_W_R, CLIP_SHIFT_C, CLIP_W_C, CLIP_DPOS, CLIP_POS = range(7)
CLIP_STATS = 7
