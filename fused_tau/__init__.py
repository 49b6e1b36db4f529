"""fused_tau: Triton kernels for everything that divides logits by a temperature τ.

    import fused_tau
    loss = fused_tau.cross_entropy(logits, target, tau=0.07)   # == F.cross_entropy(logits / 0.07, target)

CUDA tensors run the Triton kernels; other devices run the torch path with the
same numerics (see ``fused_tau._dispatch``).
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # Where numpy is absent torch warns "Failed to initialize NumPy" as it imports, although
    # neither torch nor fused_tau needs numpy; importing fused_tau says nothing.
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch as _torch  # noqa: F401

from . import reference
from ._dispatch import backend_for, backend_info
from .calibration import expected_calibration_error, fit_temperature
from .contrastive import InfoNCEFunction, NTXentFunction, clip_loss, infonce, nt_xent
from .cross_entropy import CrossEntropyFunction, cross_entropy
from .distill import KDFunction, kd_loss
from .linear import LinearCrossEntropyFunction, linear_cross_entropy
from .modules import (CrossEntropyLoss, GumbelSoftmax, InfoNCELoss, KDLoss, LinearCrossEntropyLoss, MoCoQueue,
                      Temperature)
from .sampling import GumbelSoftmaxFunction, gumbel_softmax, gumbel_tau_schedule, sample
from .softmax import LogSumExpFunction, SoftmaxFunction, log_softmax, logsumexp, softmax
from .version import __version__

__all__ = [
    "softmax", "log_softmax", "logsumexp", "cross_entropy", "CrossEntropyLoss",
    "kd_loss", "KDLoss", "fit_temperature", "expected_calibration_error",
    "gumbel_softmax", "GumbelSoftmax", "gumbel_tau_schedule", "sample", "GumbelSoftmaxFunction",
    "infonce", "clip_loss", "nt_xent", "linear_cross_entropy", "InfoNCELoss", "LinearCrossEntropyLoss",
    "MoCoQueue", "Temperature", "InfoNCEFunction", "NTXentFunction", "LinearCrossEntropyFunction",
    "SoftmaxFunction", "LogSumExpFunction", "CrossEntropyFunction", "KDFunction", "reference", "backend_for", "backend_info",
    "__version__",
]
