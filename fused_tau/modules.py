"""nn.Modules with torch's names and arguments, plus τ."""
import torch
from torch import nn

from .cross_entropy import cross_entropy


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss(weight, ignore_index=..., reduction=..., label_smoothing=...)`` applied to
    ``input / tau``.  ``tau`` is a float, or a tensor (an ``nn.Parameter`` to learn it)."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, tau=1.0,
                 *, inplace_backward=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.tau = tau
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return cross_entropy(input, target, self.tau, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, inplace_backward=self.inplace_backward)

    def extra_repr(self):
        tau = self.tau if not isinstance(self.tau, torch.Tensor) else "tensor"
        return (f"tau={tau}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")
