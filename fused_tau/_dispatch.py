"""Which implementation serves a call: ``triton`` (kernels/), ``torch`` (the
fallback in fused_tau/) or ``reference`` (fused_tau/reference.py).

CUDA tensors take the Triton kernels when Triton imports; everything else the
torch path.  ``FUSED_TAU_BACKEND=triton|torch|reference`` forces one; forcing
``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (how CI runs kernels).
float64 inputs always take the torch path: the kernels accumulate in fp32,
the torch path computes float64 inputs in float64.
"""
import functools
import importlib
import os

BACKENDS = ("triton", "torch", "reference")

# Row-engine modes, numbered as in kernels/row_softmax.py (tests/test_dispatch.py checks).
MODE_LSE, MODE_SOFTMAX, MODE_LOG_SOFTMAX = 0, 1, 2


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


def backend_for(x):
    """The backend that serves an op whose main input is the tensor ``x``."""
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    if forced == "torch" or not triton_available():
        if forced == "triton":
            raise RuntimeError("FUSED_TAU_BACKEND=triton but Triton does not import")
        return "torch"
    kernel_dtype = x.dtype in _kernel_dtypes()
    if forced == "triton":
        if x.device.type != "cuda" and not interpreter_on():
            raise RuntimeError(
                "FUSED_TAU_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton" if kernel_dtype else "torch"
    return "triton" if x.device.type == "cuda" and kernel_dtype else "torch"


def _kernel_dtypes():
    import torch

    return (torch.float32, torch.float16, torch.bfloat16)


# launcher modules of each kernel family: (Triton kernels, torch path) with the same names
ENGINES = {
    "row": ("fused_tau.kernels.row", "fused_tau._torch_row"),
    "kd": ("fused_tau.kernels.row_kd", "fused_tau._torch_kd"),
    "sample": ("fused_tau.kernels.row_sample", "fused_tau._torch_sample"),
    "tile": ("fused_tau.kernels.tile", "fused_tau._torch_tile"),
}


def engine(backend, family):
    """The module holding the launchers of ``family`` for ``backend``."""
    triton_mod, torch_mod = ENGINES[family]
    return importlib.import_module(triton_mod if backend == "triton" else torch_mod)


def row_engine(backend):
    """The row-engine launchers (softmax family, cross-entropy) for ``backend``."""
    return engine(backend, "row")
