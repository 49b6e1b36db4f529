"""The tile engine's launchers, one namespace for fused_tau's dispatch (the torch path,
fused_tau/_torch_tile_losses.py, offers the same names).  The engine core (tile table, split plan, the
jit helpers of a tile) is tile_engine.py; the kernels are tile_fwd.py (the forward and its
combine), tile_bwd.py (the backward, fused or through chunks of ds), tile_softmax_bwd.py (infonce's
and NT-Xent's backward: the splits' sums and the positive's terms on the device) and tile_clip.py
(clip_loss in one pass)."""
from .tile_bwd import tile_bwd
from .tile_clip import clip_bwd, clip_fwd
from .tile_fwd import tile_fwd
from .tile_softmax_bwd import infonce_bwd, ntxent_bwd

__all__ = ["tile_fwd", "tile_bwd", "infonce_bwd", "ntxent_bwd", "clip_fwd", "clip_bwd"]
