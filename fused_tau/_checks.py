"""Argument checks: raised before any launch, naming the argument.

Data-dependent checks (target values, τ tensor values) cost no host sync on
CUDA: they go through ``torch._assert_async``, as torch's own cross-entropy
does; on CPU tensors they raise at once.
"""
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")


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
    """Raise ``exc(message)`` if the bool tensor ``ok`` is False, without a host sync on CUDA (a device-side
    assert: one launch).  Elsewhere the check is a host read, and the passing value then goes through the
    same assert, so that every device runs CUDA's operators (the performance model, bench/model, counts them
    on CPU tensors)."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():  # traced code cannot branch on data
        torch._assert_async(ok, message)
        return
    if not bool(ok):  # host-ok: a CPU tensor, nothing to wait for
        raise exc(message)
    torch._assert_async(ok, message)


def check_dim(dim, ndim, name="dim"):
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise IndexError(f"{name}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def check_vector(t, name, size, ref, ref_name="input"):
    """An optional per-class vector (class weights, a bias): a float tensor of shape (size,) on ref's device."""
    if t is None:
        return
    check_tensor(t, name)
    check_same_device(t, name, ref, ref_name)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), one per class, got {tuple(t.shape)}")


def check_reduction(reduction, allowed=REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_ce_options(reduction, ignore_index, label_smoothing):
    """The options every cross-entropy shares with F.cross_entropy."""
    check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not (isinstance(label_smoothing, (int, float))
                                                 and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")


def check_class_targets(target, n_classes, ignore_index, name="target"):
    """Class indices in [0, n_classes) or ignore_index, checked without a host sync on CUDA.

    Compared in int64: in uint8, ignore_index=-100 would wrap to 156 and pass a real class 156
    as ignored (and int8 would wrap large indices the other way)."""
    if target.numel():
        t = target.to(torch.int64)
        ok = ((t >= 0) & (t < n_classes)) | (t == ignore_index)
        data_check(ok.all(), class_targets_message(n_classes, ignore_index, name), IndexError)


def class_targets_message(n_classes, ignore_index, name="target"):
    """check_class_targets' error (also raised from a kernel's verdict: kernels/row_ce_reduce.py ce_reduce)."""
    return f"{name} holds a class index outside [0, {n_classes}) that is not ignore_index={ignore_index}"


def legacy_reduction(size_average, reduce):
    """torch's deprecated ``size_average`` / ``reduce`` pair -> a reduction string, with torch's
    meaning and its deprecation warning (``torch.nn._reduction.legacy_get_string``)."""
    for value, name in ((size_average, "size_average"), (reduce, "reduce")):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None (deprecated: use reduction), got {type(value).__name__}")
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


def check_inplace_target(t, name):
    """A tensor the backward may overwrite with its gradient: every element its own memory (no
    expanded / overlapping view, where one write would land on several elements), and not a leaf
    that requires grad (torch refuses in-place writes to those: it would overwrite the caller's
    parameter)."""
    if _may_overlap(t):
        raise ValueError(f"inplace_backward=True needs {name} whose elements do not overlap (it is expanded "
                         f"or otherwise self-overlapping); pass {name}.contiguous() or inplace_backward=False")
    if t.is_leaf and t.requires_grad:
        raise ValueError(f"inplace_backward=True would overwrite {name}, a leaf tensor that requires grad "
                         f"(the caller's data); use inplace_backward=False")


def _may_overlap(t):
    """True unless every element provably has its own memory: torch's own check, and where it
    cannot tell, the strides: dims of size > 1 sorted by stride, each stride at least the extent
    of the dims below it (conservative: an interleaved layout is refused, never miswritten)."""
    if not torch.compiler.is_compiling():  # dynamo cannot trace an op that returns an int
        verdict = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 too hard to tell
        if verdict != 2:
            return verdict == 1
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    extent = 1
    for st, sz in dims:
        if st < extent:
            return True
        extent = st * sz
    return False
