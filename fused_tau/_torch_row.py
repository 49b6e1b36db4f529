"""The torch path of the row engine's launchers, one namespace for fused_tau's dispatch, as
kernels/row.py is the kernels' (the same names).  The engine core (layout, chunks of rows, the
statistics, the hard-label epilogue) is _torch_row_engine.py, its threads _torch_threads.py; the
launchers are _torch_softmax.py and _torch_ce.py."""
from ._torch_ce import ce_bwd, ce_fwd, ce_fwd_grad, ce_grad_rescale
from ._torch_softmax import lse_bwd, softmax_bwd, softmax_fwd

__all__ = ["softmax_fwd", "softmax_bwd", "lse_bwd", "ce_fwd", "ce_bwd", "ce_fwd_grad", "ce_grad_rescale"]
