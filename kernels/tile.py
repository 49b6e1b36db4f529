"""The tile engine's launchers, one namespace for fused_tau's dispatch (the torch path,
fused_tau/_torch_tile.py, offers the same names).  The engine core (tile table, split plan, the
jit helpers of a tile) is tile_engine.py; the kernels are tile_fwd.py (the forward and its
combine), tile_bwd.py (the backward, fused or through chunks of ds) and tile_clip.py (clip_loss in
one pass)."""
from .tile_bwd import infonce_bwd, ntxent_bwd, tile_bwd
from .tile_clip import clip_bwd, clip_fwd
from .tile_fwd import tile_fwd

__all__ = ["tile_fwd", "tile_bwd", "infonce_bwd", "ntxent_bwd", "clip_fwd", "clip_bwd"]
