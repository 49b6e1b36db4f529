"""The row engine's launchers, one namespace for fused_tau's dispatch (the torch path,
fused_tau/_torch_row.py, offers the same names).  The engine core (layout, block
choice, z = x / τ) is row_engine.py; the kernels are row_softmax.py, row_ce.py and row_ce_reduce.py."""
from .row_ce import ce_bwd, ce_fwd, ce_fwd_grad, ce_fwd_reduced, ce_grad_rescale, ce_rows_split
from .row_ce_reduce import DENOM_GIVEN, DENOM_NONE, DENOM_ROWS, DENOM_TARGETS, ce_reduce
from .row_softmax import MODE_LOG_SOFTMAX, MODE_LSE, MODE_SOFTMAX, lse_bwd, softmax_bwd, softmax_fwd

__all__ = ["softmax_fwd", "softmax_bwd", "lse_bwd", "ce_fwd", "ce_bwd", "ce_fwd_grad", "ce_fwd_reduced", "ce_rows_split",
           "ce_grad_rescale", "ce_reduce",
           "DENOM_NONE", "DENOM_ROWS", "DENOM_TARGETS", "DENOM_GIVEN",
           "MODE_LSE", "MODE_SOFTMAX", "MODE_LOG_SOFTMAX"]
