"""τ in one place: how a temperature is checked, laid out for the engines, and given its gradient.

A caller's τ is a float, a one-element tensor, or one τ per row group (a tensor of the leading
dims' shape, ``outer_shape``).  The autograd Functions take it as a tensor (``tau_tensor``); the
engines take its values flattened in the compute dtype (``tau_for_kernel``): one element serves
every row, or one per row group, which the row kernels read with stride 0 or 1.  Each row's
dL/dτ comes back from the engine and ``reduce_tau_grad`` sums it onto τ's shape.
"""
import collections
import math
import numbers

import torch

from ._checks import check_same_device, check_tensor, data_check


def compute_dtype(x):
    """The engines' compute dtype for input ``x``: fp32, fp64 for fp64 inputs (only the torch path
    takes those)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _checked(tau, x, outer_shape, name, allow_zero, x_name="input"):
    """τ checked: a tensor of one element or of ``outer_shape`` on x's device with values > 0 (>= 0
    when ``allow_zero``) and finite, checked without a host sync; or the float it holds."""
    bound = "non-negative" if allow_zero else "positive"
    if isinstance(tau, torch.Tensor):
        check_tensor(tau, name)
        check_same_device(tau, name, x, x_name)
        if tau.numel() != 1 and tuple(tau.shape) != tuple(outer_shape):
            raise ValueError(
                f"{name} must be a float, a one-element tensor or a tensor of shape "
                f"{tuple(outer_shape)} (one τ per row), got shape {tuple(tau.shape)}"
            )
        if tau.numel() > 0:
            t = tau.detach()
            data_check(((t >= 0) if allow_zero else (t > 0)).all() & torch.isfinite(t).all(),
                       f"{name} must be {bound} and finite")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(tau).__name__}")
    tau = float(tau)
    if not (math.isfinite(tau) and (tau >= 0 if allow_zero else tau > 0)):
        raise ValueError(f"{name} must be {bound} and finite, got {tau}")
    return tau


def tau_tensor(tau, x, outer_shape, name="tau"):
    """τ > 0 as a tensor the autograd Function can take as an input: the caller's tensor (one
    element or ``outer_shape``), or a float as a 0-dim constant in the compute dtype on x's device."""
    tau = _checked(tau, x, outer_shape, name, allow_zero=False)
    if isinstance(tau, torch.Tensor):
        return tau
    return _constant(tau, (), compute_dtype(x), x.device)


# A float τ as a tensor, kept per (value, shape, dtype, device) for the next call with the same τ: a fill
# on the device is a launch of its own (the usual fixed τ pays it once); likewise the contrastive losses'
# target columns (kept_tensor).  Never written to: the kernels and the autograd Functions only read them.
# Not kept while something traces the calls (torch.compile, fake tensors), a CUDA graph is captured (the
# graph's pool owns what is made then) or inference mode is on (an inference tensor cannot be saved for a
# later backward).
_CONSTANTS = collections.OrderedDict()
_CONSTANTS_KEPT = 16


def kept_tensor(key, device, make):
    """``make()``, made once per ``key`` (which names ``device`` too) and kept for the next call (the
    _CONSTANTS_KEPT most recent), except while tracing, capturing a CUDA graph or in inference mode."""
    from ._ops import tracing

    if (tracing() or torch.is_inference_mode_enabled()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return make()
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = make()
        if len(_CONSTANTS) > _CONSTANTS_KEPT:
            _CONSTANTS.popitem(last=False)
    else:
        _CONSTANTS.move_to_end(key)
    return t


def _constant(value, shape, dtype, device):
    return kept_tensor(("full", value, shape, dtype, device), device,
                       lambda: torch.full(shape, value, dtype=dtype, device=device))


def sample_tau(tau, logits):
    """τ >= 0 for ``sample`` (τ = 0 is argmax), one per row of ``logits.shape[:-1]`` or one for all:
    (its float32 values flattened, greedy), greedy when τ is the float 0."""
    tau = _checked(tau, logits, tuple(logits.shape[:-1]), "tau", allow_zero=True, x_name="logits")
    if isinstance(tau, torch.Tensor):
        return tau.detach().to(torch.float32).reshape(-1).contiguous(), False
    return _constant(tau, (1,), torch.float32, logits.device), tau == 0.0


def tau_for_kernel(tau, x):
    """The values of τ flattened, in the compute dtype: one element, or one per row group."""
    return tau.detach().to(compute_dtype(x)).reshape(-1).contiguous()


def reduce_tau_grad(dtau_rows, tau, B):
    """Rows' dL/dτ -> the gradient of τ (its shape and dtype); ``B`` rows share one τ of a row group."""
    if tau.numel() == 1:
        g = dtau_rows.sum()
    else:
        g = dtau_rows.view(-1, B).sum(1)
    return g.reshape(tau.shape).to(tau.dtype)


def tau_over(tau, x, lead):
    """τ broadcast against ``x`` whose first ``lead`` dims are the τ-per-row dims (the reference's
    ``x / τ``)."""
    if isinstance(tau, torch.Tensor) and tau.numel() != 1:
        return tau.reshape(tuple(tau.shape) + (1,) * (x.ndim - lead))
    if isinstance(tau, torch.Tensor):
        return tau.reshape(())
    return tau
