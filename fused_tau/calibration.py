"""Temperature scaling (Guo et al. 2017): fit the single τ of calibration, and measure it.

``fit_temperature`` minimises fused_tau's own cross-entropy with a learnable τ (its
gradient comes from the same fused backward as the logits').  Both functions are
offline tools, not training-step code: they return Python numbers / run an optimiser.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_tensor, data_check
from .cross_entropy import cross_entropy
from .softmax import softmax


def _check_logits_labels(logits, labels):
    check_tensor(logits, "logits")
    check_tensor(labels, "labels", floating=False)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold class indices (an integer dtype), got {labels.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one row")


def _labels_in_range(labels, n_classes):
    """A bool tensor: every label is a class index in [0, n_classes).  Neither tool has an
    ignore_index: a -100 label is refused, not skipped."""
    return ((labels >= 0) & (labels < n_classes)).all()


def _labels_message(n_classes):
    return f"labels must hold class indices in [0, {n_classes}) (no ignore_index: -100 is refused too)"


def _fp32_at_least(logits):
    """fp16 / bf16 logits upcast to fp32: the fit and the confidences are computed in fp32 (a bf16
    loss is too coarse for the line search: it stops one step from T = 1)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100, init: float = 1.0) -> float:
    """The T > 0 minimising ``F.cross_entropy(logits / T, labels)`` (Guo et al. 2017), as a float.

    LBFGS with a strong-Wolfe line search on log T (so T stays positive), each step one
    fused forward and backward of ``fused_tau.cross_entropy(logits, labels, tau=T)``, in fp32
    for fp16 / bf16 logits.  T > 1 softens an over-confident model; divide its logits by T at
    test time.  Labels are class indices in [0, C) (no ignore_index).  Raises ValueError when
    the logits hold NaN, or when the loss is not finite at ``init`` (a +inf logit, a row
    with no finite logit, a label whose logit is -inf): then no T has a finite loss.
    Offline: checks its inputs on the host and returns a Python float.
    """
    _check_logits_labels(logits, labels)
    if not (isinstance(init, (int, float)) and math.isfinite(init) and init > 0):
        raise ValueError(f"init must be a positive finite float, got {init!r}")
    if not bool(_labels_in_range(labels, logits.shape[1])):  # host-ok: offline tool
        raise ValueError(_labels_message(logits.shape[1]))
    logits = _fp32_at_least(logits.detach())
    if bool(torch.isnan(logits).any()):  # host-ok: offline tool
        raise ValueError("logits hold NaN: the cross-entropy is NaN at every temperature, there is none to fit")
    with torch.no_grad():
        loss0 = cross_entropy(logits, labels, tau=float(init))
    if not bool(torch.isfinite(loss0)):  # host-ok: offline tool
        raise ValueError(f"the cross-entropy of logits / {init} is {loss0.item()}, not finite (a +inf logit, "  # host-ok: offline tool
                         "a row with no finite logit, or a label whose logit is -inf): there is no "
                         "temperature to fit")
    log_t = torch.tensor(math.log(init), dtype=torch.float32, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cross_entropy(logits, labels, tau=log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return math.exp(log_t.item())  # host-ok: calibration is offline and returns a number


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15, *, tau: float | Tensor = 1.0) -> Tensor:
    """ECE of ``softmax(logits / tau)``: Σ_b (|B_b| / N) |accuracy(B_b) - confidence(B_b)| over
    ``n_bins`` equal-width confidence bins (i/n, (i+1)/n] (Guo et al. 2017), as a 0-dim tensor,
    computed in fp32 for fp16 / bf16 logits.  Labels are class indices in [0, C) (no
    ignore_index), checked without a host sync on CUDA."""
    _check_logits_labels(logits, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    data_check(_labels_in_range(labels, logits.shape[1]), _labels_message(logits.shape[1]))
    with torch.no_grad():
        conf, pred = softmax(_fp32_at_least(logits), tau=tau).float().max(-1)
        correct = (pred == labels).float()
        edges = torch.linspace(0, 1, n_bins + 1, device=logits.device)
        bins = torch.bucketize(conf, edges[1:-1], right=False)  # (i/n, (i+1)/n] -> i
        acc = torch.zeros(n_bins, device=logits.device).index_add_(0, bins, correct)
        cf = torch.zeros(n_bins, device=logits.device).index_add_(0, bins, conf)
        return ((acc - cf).abs().sum() / logits.shape[0]).to(torch.float32)
