"""Argument checks: raised before any launch, naming the argument.

Data-dependent checks (target values, τ tensor values) cost no host sync on
CUDA: they go through ``torch._assert_async``, as torch's own cross-entropy
does; on CPU tensors they raise at once.
"""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_same_device(t, name, ref, ref_name):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def data_check(ok, message, exc=ValueError):
    """Raise ``exc(message)`` if the bool tensor ``ok`` is False, without a host sync on CUDA."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():  # traced code cannot branch on data
        torch._assert_async(ok, message)
    elif not bool(ok):  # host-ok: a CPU tensor, nothing to wait for
        raise exc(message)


def check_dim(dim, ndim, name="dim"):
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise IndexError(f"{name}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def tau_tensor(tau, x, outer_shape, name="tau"):
    """τ as a tensor the autograd Function can take as an input.

    A float must be positive and finite; it becomes a 0-dim constant on x's
    device.  A tensor is either one element or one τ per row group, of shape
    ``outer_shape``; its values are checked without a host sync.
    """
    if isinstance(tau, torch.Tensor):
        check_tensor(tau, name)
        check_same_device(tau, name, x, "input")
        if tau.numel() != 1 and tuple(tau.shape) != tuple(outer_shape):
            raise ValueError(
                f"{name} must be a float, a one-element tensor or a tensor of shape "
                f"{tuple(outer_shape)} (one τ per row), got shape {tuple(tau.shape)}"
            )
        if tau.numel() > 0:
            t = tau.detach()
            data_check((t > 0).all() & torch.isfinite(t).all(),
                       f"{name} must be positive and finite")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(tau).__name__}")
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name} must be positive and finite, got {tau}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((), tau, dtype=dtype, device=x.device)


def tau_for_kernel(tau, x):
    """The values of τ flattened, in the compute dtype (fp32, fp64 for fp64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return tau.detach().to(dtype).reshape(-1).contiguous()


def reduce_tau_grad(dtau_rows, tau, B):
    """Rows' dL/dτ -> the gradient of τ (its shape and dtype)."""
    if tau.numel() == 1:
        g = dtau_rows.sum()
    else:
        g = dtau_rows.view(-1, B).sum(1)
    return g.reshape(tau.shape).to(tau.dtype)


def check_vector(t, name, size, ref, ref_name="input"):
    """An optional per-class vector (class weights, a bias): a float tensor of shape (size,) on ref's device."""
    if t is None:
        return
    check_tensor(t, name)
    check_same_device(t, name, ref, ref_name)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), one per class, got {tuple(t.shape)}")


def check_ce_options(reduction, reductions, ignore_index, label_smoothing):
    """The options every cross-entropy shares with F.cross_entropy."""
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not (isinstance(label_smoothing, (int, float))
                                                 and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")


def check_class_targets(target, n_classes, ignore_index, name="target"):
    """Class indices in [0, n_classes) or ignore_index, checked without a host sync on CUDA."""
    if target.numel():
        ok = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
        data_check(ok.all(), f"{name} holds a class index outside [0, {n_classes}) that is not "
                             f"ignore_index={ignore_index}", IndexError)
