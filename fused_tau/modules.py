"""nn.Modules with torch's names and arguments, plus τ."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn
from torch.nn.modules.loss import _WeightedLoss

from ._checks import legacy_reduction
from .contrastive import infonce
from .cross_entropy import cross_entropy
from .distill import kd_loss
from .linear import linear_cross_entropy
from .sampling import gumbel_softmax


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss(weight, size_average, ignore_index, reduce, reduction, label_smoothing)``
    applied to ``input / tau``: torch's parameters in torch's positional slots, ``tau`` keyword-only
    (a float, or a tensor: an ``nn.Parameter`` to learn it)."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 tau: float | Tensor = 1.0, inplace_backward: bool = False):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.tau = tau
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, tau=self.tau,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self):
        tau = self.tau if not isinstance(self.tau, torch.Tensor) else "tensor"
        return (f"tau={tau}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")


class Temperature(nn.Module):
    """A learnable τ, stored as log τ (so it stays positive) and clamped to [tau_min, tau_max].

    CLIP learns its logit scale 1/τ the same way and clamps it at 100 (τ ≥ 0.01, the default
    ``tau_min``).  Beyond the bounds the clamp passes no gradient, as CLIP's clamp does.
    ``forward()`` returns the 0-dim tensor τ to pass as ``tau=`` to any fused_tau loss.
    """

    def __init__(self, init: float = 0.07, tau_min: float = 0.01, tau_max: float = 100.0):
        super().__init__()
        if not (0 < tau_min <= init <= tau_max):
            raise ValueError(f"need 0 < tau_min <= init <= tau_max, got {tau_min}, {init}, {tau_max}")
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))
        self.log_min, self.log_max = math.log(tau_min), math.log(tau_max)

    def forward(self) -> Tensor:
        return self.log_tau.clamp(self.log_min, self.log_max).exp()

    def extra_repr(self):
        return f"tau={self.forward().item():.4g}"  # host-ok: printing only


class MoCoQueue(nn.Module):
    """MoCo's queue of negative keys: a ring buffer of ``size`` detached keys of ``dim``.

    It starts as ``size`` random unit vectors (drawn from ``generator``, or torch's default
    generator when None) and ``enqueue(keys)`` stores the keys as given: MoCo L2-normalises
    its keys in the model, before the loss, and the queue does not normalise them again.
    ``enqueue`` writes the newest keys over the oldest (MoCo's dequeue-and-enqueue), after
    gathering the keys of every rank when torch.distributed is initialised (MoCo's
    concat_all_gather), so every rank holds the same queue.  ``queue`` is the (size, dim) buffer
    to pass as ``infonce(..., queue=...)`` (the module itself is accepted too); it is saved with
    the module's state_dict.

    The enqueue is in place (no copy of the queue per step), and the loss's backward reads the
    queue it was given, as ``query @ queue.T`` does in the plain composition: call ``enqueue``
    after ``loss.backward()``, or pass ``queue.queue.clone()`` to the loss (what MoCo's reference
    code does) to enqueue before it.  The backward raises, naming this fix, if the order is wrong.
    """

    def __init__(self, dim: int, size: int = 65536, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(dim, bool) or isinstance(size, bool) or not isinstance(dim, int) or not isinstance(size, int) \
                or dim < 1 or size < 1:
            raise ValueError(f"dim and size must be positive ints, got dim={dim!r}, size={size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        keys = torch.randn(size, dim, generator=generator, device=generator.device if generator is not None else None)
        self.register_buffer("queue", F.normalize(keys, dim=1).to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))

    @torch.no_grad()
    def enqueue(self, keys):
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be (B, {self.queue.shape[1]}), got shape {tuple(keys.shape)}")
        if not getattr(self, "_synced", False):
            _broadcast_from_rank0(self.queue)  # every rank starts from rank 0's random keys, as under DDP
            self._synced = True
        keys = _all_gather_detached(keys.detach()).to(self.queue.dtype)
        size = self.queue.shape[0]
        keys = keys[-size:]  # a batch larger than the queue keeps its newest keys
        idx = (self.ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue.index_copy_(0, idx, keys)  # no host sync: the pointer stays on the device
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)

    def forward(self) -> Tensor:
        return self.queue

    def extra_repr(self):
        return f"dim={self.queue.shape[1]}, size={self.queue.shape[0]}"


def _distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(t):
    if _distributed():
        import torch.distributed as dist

        dist.broadcast(t, 0)


def _all_gather_detached(x):
    import torch.distributed as dist

    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


class InfoNCELoss(nn.Module):
    """``infonce`` as a module: ``InfoNCELoss(tau=0.07)(query, key, queue=None)`` (every argument
    keyword-only, as infonce's options).

    ``queue`` may be a tensor or a :class:`MoCoQueue`; ``learnable_tau=True`` learns τ through a
    :class:`Temperature` (initialised at ``tau``); ``gather=True`` uses every rank's keys as
    in-batch negatives.
    """

    def __init__(self, *, tau: float | Tensor = 0.07, learnable_tau: bool = False, reduction: str = "mean",
                 gather: bool = False):
        super().__init__()
        self.temperature = Temperature(tau) if learnable_tau else None
        self.tau, self.reduction, self.gather = tau, reduction, gather

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | MoCoQueue | None = None) -> Tensor:
        if isinstance(queue, MoCoQueue):
            queue = queue.queue
        tau = self.temperature() if self.temperature is not None else self.tau
        return infonce(query, key, queue, tau=tau, reduction=self.reduction, gather=self.gather)


class LinearCrossEntropyLoss(_WeightedLoss):
    """torch 2.13's ``nn.LinearCrossEntropyLoss`` with a temperature: it owns ``self.linear =
    nn.Linear(in_features, num_classes * prod(out_features), bias=bias)`` and ``loss(input, target)`` is
    ``linear_cross_entropy(input, W, target, linear_bias=b, weight=self.weight, ...)`` with the Linear's
    weight and bias reshaped to (num_classes, *out_features, in_features) and (num_classes, *out_features),
    as torch's module does (so a torch module's state_dict loads into it).

    Arguments as torch's (``ignore_index=None`` means -100 for class targets; ``options`` is accepted
    and has no effect, see :func:`fused_tau.linear_cross_entropy`), plus keyword-only ``tau`` (a positive
    float, or a tensor; an ``nn.Parameter`` registers as the parameter ``tau`` and is learned) and
    ``normalize`` (NormFace: L2-normalised rows of input and of the weight, cosine logits scaled by 1/τ).
    """

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None, label_smoothing: float = 0.0,
                 options: dict | None = None, tau: float | Tensor = 1.0, normalize: bool = False):
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape {(num_classes,)}, one per class, got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # nn.Linear holds a 2-D weight: the K-dimensional one is a reshape of it in forward (as torch's)
        self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias, device=device,
                                dtype=dtype)
        self.options = options
        self.tau = tau
        self.normalize = normalize

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, options=self.options, tau=self.tau,
                                    normalize=self.normalize)

    def extra_repr(self):
        tau = self.tau if not isinstance(self.tau, torch.Tensor) else "tensor"
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}, tau={tau}, "
                f"normalize={self.normalize}")


class KDLoss(nn.Module):
    """``kd_loss`` as a module: ``KDLoss(tau=4.0, alpha=0.9, reduction="batchmean")(student, teacher, target=None)``
    (keyword-only options, as kd_loss's)."""

    def __init__(self, *, tau: float | Tensor = 4.0, alpha: float = 0.9, reduction: str = "batchmean"):
        super().__init__()
        self.tau, self.alpha, self.reduction = tau, alpha, reduction

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, tau=self.tau, target=target, alpha=self.alpha, reduction=self.reduction)

    def extra_repr(self):
        return f"tau={self.tau if not isinstance(self.tau, torch.Tensor) else 'tensor'}, alpha={self.alpha}, " \
               f"reduction={self.reduction!r}"


class GumbelSoftmax(nn.Module):
    """``gumbel_softmax(logits, tau, hard, eps, dim)`` as a module (the function's positional
    order); ``tau`` a float or a tensor (update it, e.g. from ``gumbel_tau_schedule``, as
    training goes).  ``forward(logits, *, generator=None)``."""

    def __init__(self, tau: float | Tensor = 1.0, hard: bool = False, eps: float = 1e-10, dim: int = -1):
        super().__init__()
        if eps != 1e-10:
            warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
        self.tau = tau
        self.hard = hard
        self.dim = dim

    def forward(self, logits: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return gumbel_softmax(logits, self.tau, self.hard, dim=self.dim, generator=generator)

    def extra_repr(self):
        tau = self.tau if not isinstance(self.tau, torch.Tensor) else "tensor"
        return f"tau={tau}, hard={self.hard}, dim={self.dim}"
