"""Which implementation serves a call: ``triton`` (kernels/), ``torch`` (the
fallback in fused_tau/) or ``reference`` (fused_tau/reference.py).

CUDA tensors take the Triton kernels when Triton imports; everything else the
torch path.  ``FUSED_TAU_BACKEND=triton|torch|reference`` forces one; forcing
``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how CI runs kernels).
float64 inputs always take the torch path: the kernels accumulate in fp32,
the torch path computes float64 inputs in float64.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "torch", "reference")

# the row engine's softmax modes (kernels/__init__.py: importing it does not import Triton)
from .kernels import MODE_LOG_SOFTMAX, MODE_LSE, MODE_SOFTMAX  # noqa: E402,F401


@functools.lru_cache(maxsize=None)
def triton_available():
    """True when Triton imports (it is installed on Linux only)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend():
    forced = os.environ.get("FUSED_TAU_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FUSED_TAU_BACKEND must be one of {BACKENDS}, got {forced!r}")
    return forced or None


def backend_for(x: torch.Tensor) -> str:
    """The backend that serves an op whose main input is the tensor ``x``."""
    return _backend_choice(x.device.type, x.dtype in _kernel_dtypes())


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without its import of torch._dynamo (about as
    long as ``import torch`` itself, and it imports Triton): the decorator only sets this attribute,
    which dynamo reads when it traces a call (tests/test_ecosystem.py checks that both agree)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _backend_choice(device_type, kernel_dtype):
    """Under torch.compile the choice is made once, while tracing, and is a constant of the graph
    (the environment and Triton's presence are not tensors dynamo could guard on; changing
    FUSED_TAU_BACKEND after compiling needs ``torch._dynamo.reset()``)."""
    forced = forced_backend()
    if forced in ("reference", "torch"):
        return forced
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("FUSED_TAU_BACKEND=triton but Triton does not import")
        if device_type != "cuda" and not interpreter_on():
            raise RuntimeError(
                "FUSED_TAU_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton" if kernel_dtype else "torch"
    # Triton is imported (a few hundred ms) only for an input the kernels could serve
    return "triton" if device_type == "cuda" and kernel_dtype and triton_available() else "torch"


def _kernel_dtypes():
    import torch

    return (torch.float32, torch.float16, torch.bfloat16)


def engine(backend, family):
    """The module holding the launchers of ``family`` ("row", "kd", "sample", "tile") for ``backend``: the
    Triton kernels (kernels/) or the torch path (fused_tau/_torch_*.py), with the same names.  Imported
    on first use (Triton's import costs about as much as torch's), statically so that readers and tools
    can follow a call to its launcher."""
    if backend == "triton":
        from .kernels import row, row_kd, row_sample, tile
        return {"row": row, "kd": row_kd, "sample": row_sample, "tile": tile}[family]
    from . import _torch_kd, _torch_row, _torch_sample, _torch_tile_losses
    return {"row": _torch_row, "kd": _torch_kd, "sample": _torch_sample, "tile": _torch_tile_losses}[family]


# each public op and the argument whose device and dtype pick its backend
PUBLIC_OPS = (("softmax", "x"), ("log_softmax", "x"), ("logsumexp", "x"), ("cross_entropy", "input"),
              ("linear_cross_entropy", "input"), ("infonce", "query"), ("clip_loss", "a (via infonce)"),
              ("nt_xent", "z1"), ("kd_loss", "student"), ("gumbel_softmax", "logits"), ("sample", "logits"),
              ("fit_temperature", "logits (via cross_entropy)"),
              ("expected_calibration_error", "logits (via softmax)"))


def explain_backend(x):
    """(the backend ``backend_for(x)`` picks, why) for the tensor ``x``; ("error", message) when a forced
    backend cannot serve it."""
    try:
        backend = backend_for(x)
    except (RuntimeError, ValueError) as e:
        return "error", str(e)
    forced = forced_backend()
    if forced in ("reference", "torch"):
        return backend, f"FUSED_TAU_BACKEND={forced}"
    if not triton_available():
        return backend, "Triton does not import"
    if backend == "torch":
        if x.device.type == "cuda" or forced == "triton":
            return backend, f"{x.dtype} runs on the torch path (the kernels take fp32/fp16/bf16)"
        return backend, "not a CUDA tensor"
    if forced == "triton":
        return backend, "FUSED_TAU_BACKEND=triton" + (" under TRITON_INTERPRET=1" if x.device.type != "cuda" else "")
    return backend, "a CUDA tensor and Triton imports"


def backend_info(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Which backend each public op uses for inputs on ``device`` (float32 unless ``dtype``), and why:
    ``{op: {"backend": ..., "why": ..., "dispatches_on": argument}}``."""
    import torch

    x = torch.zeros(1, device=device, dtype=dtype or torch.float32)
    backend, why = explain_backend(x)
    return {op: dict(backend=backend, why=why, dispatches_on=arg) for op, arg in PUBLIC_OPS}


def autocast_off(fn):
    """Run an autograd Function's forward or backward with autocast disabled on its tensors' device:
    the kernels and the torch path choose their own precision (fp32 accumulation), and a matmul of the
    torch path must not be silently done in bf16."""
    import functools

    import torch

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(ctx, *args)

    return wrapper


def loss_dtype(like):
    """The dtype ``loss_under_autocast`` returns a loss of input ``like`` in (a kernel that writes the loss
    in it spares the cast's launch)."""
    import torch

    if like.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(like.device.type):
        return torch.float32
    return like.dtype


def loss_under_autocast(out, like):
    """The loss an autograd Function computed in fp32 (fp64 for fp64 inputs), in torch's dtype: under
    autocast fp32 and unrounded, as torch's own losses (cross_entropy, kl_div) run in fp32 on the
    half-precision values; otherwise the input's dtype.  The gradients still come back in the
    inputs' dtypes."""
    import torch

    if like.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(like.device.type):
        return out.float()
    return out.to(like.dtype)


ONCE_DIFFERENTIABLE_MESSAGE = (
    b"fused_tau's losses and ops are once-differentiable: their backward is fused and has no "
    b"backward of its own, so a second derivative (create_graph=True, torch.autograd.grad of a "
    b"gradient, a Hessian) is not available; use fused_tau.reference for higher-order derivatives")


def once_differentiable(fn):
    """torch's ``once_differentiable`` for an autograd Function's backward, with an error that
    names fused_tau: under ``create_graph=True`` every gradient it returns carries a node that
    raises ONCE_DIFFERENTIABLE_MESSAGE when differentiated (torch's own decorator does so only
    when the incoming gradient requires grad, and otherwise leaves torch's generic "element 0 of
    tensors does not require grad")."""
    import functools

    import torch
    from torch._C import _functions

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        with torch.no_grad():
            outputs = fn(ctx, *args)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        if not any(isinstance(o, torch.Tensor) for o in outs):
            return outputs
        err_fn = _functions.DelayedError(ONCE_DIFFERENTIABLE_MESSAGE, len(outs))

        def fake_requires_grad(v):
            if isinstance(v, torch.Tensor):
                v = v.detach()
                v.requires_grad = True
            return v

        wrapped = err_fn(*[fake_requires_grad(o) for o in outs])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        # DelayedError passes None through; keep the Nones the backward returned
        result = tuple(w if o is not None else None for w, o in zip(wrapped, outs))
        return result if isinstance(outputs, tuple) else result[0]

    return wrapper
