"""Drive code on CPU tensors at real shapes and record what a GPU would run, without running it.

Two recorders work together while a case runs:

* every Triton launch goes through ``JITFunction.run``; :func:`capture` replaces it (for every
  kernel, whatever its name) with one that binds the arguments through Triton's own runtime
  binder for a CUDA backend, so the kernel is specialised exactly as a GPU run at that shape
  would specialise it (constexprs, ``num_warps`` / ``num_stages``, 16-byte pointer alignment and
  divisibility by 16 of integer arguments), compiles it for the architecture the code runs as
  (``capture(arch)``: the tile table's choices follow it) with ``triton.compile`` and records the launch
  (grid, arguments) instead of launching it; a case is run once as sm_90 (timed) and once as sm_80
  (its resources), and :func:`merge_arch` pairs the two runs' launches;
* every torch operator goes through :class:`TorchCost` (a ``TorchDispatchMode``): small ones run,
  heavy ones (a GEMM, a pass over a large tensor) are counted (FLOPs, bytes) and not run, their
  outputs allocated uninitialised with the shapes the op's meta kernel gives.  Large CPU
  allocations are lazy, so an 8192 × 128256 logits tensor costs no time and no resident memory.

Inputs are made with ``torch.empty`` for the same reason (:func:`lazy`): their values never
matter, since no kernel and no heavy op reads them.  The code under test must not read a large
tensor's values on the host; it does not (DESIGN.md, "Bad input, without host syncs").
"""
import contextlib
import dataclasses
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ARCHS = (90, 80)  # sm_90 (H100 / H200) is what is timed; sm_80 is compiled for the resource checks
# each architecture's launches come from running the code as that architecture (tile_engine.ARCH_OFF_GPU):
# the tile table gives sm_90 and sm_80 their own tiles, and each is compiled for its own target
HEAVY_BYTES = 1 << 20  # torch ops moving more than this are counted, not run
HEAVY_FLOPS = 1 << 26


# ----------------------------------------------------------------------------- tensors

def unique_bytes(t):
    """Bytes of the distinct elements a tensor view addresses (broadcast dimensions count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def lazy(shape, dtype, fill=None):
    """A CPU tensor whose memory is never touched (its values are irrelevant to the model)."""
    t = torch.empty(shape, dtype=dtype)
    if fill is not None:
        t.fill_(fill)
    return t


# ----------------------------------------------------------------------------- torch ops

# Operators that launch no kernel on a GPU: allocations, metadata, host scalars.
_FREE = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
    "_local_scalar_dense", "resize_", "set_", "is_nonzero", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "_to_copy_meta", "record_stream", "_nested_tensor_from_mask",
}
# Operators that only write their output (their tensor inputs, if any, are not read).
_WRITE_ONLY = {
    "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones",
    "new_full", "scalar_tensor", "arange", "exponential_", "uniform_", "normal_", "bernoulli_", "random_",
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like",
}
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "_scaled_mm", "linear", "addmv", "mv", "dot"}


def _flops(name, args, outs):
    """FLOPs of a GEMM-like operator (2·M·N·K), 0 for the rest."""
    if name not in _GEMMS:
        return 0
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out = next((o for o in outs if isinstance(o, torch.Tensor)), None)
    if out is None or not tensors:
        return 0
    if name in ("mm", "addmm", "matmul", "linear", "_scaled_mm"):
        a, b = (tensors[-2], tensors[-1]) if name in ("addmm",) else (tensors[0], tensors[1])
        k = a.shape[-1]
    elif name in ("bmm", "baddbmm", "addbmm"):
        a = tensors[-2]
        k = a.shape[-1]
    else:  # mv, addmv, dot
        k = tensors[-1].shape[-1] if tensors[-1].ndim else 1
    return 2 * out.numel() * k


_GATHERS = {"index", "index_select", "gather", "embedding", "take", "take_along_dim"}
_SCATTERS = {"index_add_", "index_add", "index_put_", "index_put", "index_copy_", "scatter_", "scatter",
             "scatter_add_", "scatter_add", "scatter_reduce_", "index_reduce_", "_index_put_impl_"}


def op_bytes(name, inputs, outputs):
    """Bytes a GPU kernel of this operator moves: its inputs read and its outputs written, except where
    the operator touches only part of a tensor (a gather reads the rows it gathers, a scatter reads and
    writes the rows it updates, nll_loss reads one logit per row) or reads nothing (fills, random draws)."""
    out_bytes = sum(unique_bytes(o) for o in outputs)
    if name in _WRITE_ONLY:
        return out_bytes
    if name in ("nll_loss_forward", "nll_loss2d_forward"):
        return sum(unique_bytes(t) for t in inputs[1:]) + inputs[0].element_size() * inputs[1].numel() + out_bytes
    if name in ("nll_loss_backward", "nll_loss2d_backward"):  # writes the whole gradient; reads no logits
        return sum(unique_bytes(t) for i, t in enumerate(inputs) if i != 1) + out_bytes
    index = [t for t in inputs if not t.is_floating_point()]
    if name in _GATHERS:
        return 2 * out_bytes + sum(unique_bytes(t) for t in index)
    if name in _SCATTERS:  # the updated rows of the destination (inputs[0]) are read and written
        values = [t for t in inputs[1:] if t.is_floating_point()]
        return sum(3 * unique_bytes(t) for t in values) + sum(unique_bytes(t) for t in index)
    return sum(unique_bytes(t) for t in inputs) + out_bytes


@dataclasses.dataclass
class TorchOp:
    """One torch operator as a GPU would run it: a kernel moving ``bytes`` and doing ``flops``."""
    name: str
    bytes: int
    flops: int
    shapes: str
    phase: str
    ran: bool

    def key(self):
        return (self.name, self.shapes, self.phase)


def _schema_aliases(func, args, kwargs):
    """The mutated argument of each alias set (``Tensor(a!)``) of ``func``'s schema."""
    written = {}
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for alias in arg.alias_info.before_set:
            written[alias] = value
    return written


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, torch.device) or (isinstance(x, str) and x in ("cpu", "cuda")):
        return torch.device("meta")
    return x


class TorchCost(TorchDispatchMode):
    """Counts every torch operator (bytes, FLOPs) into ``ops``; runs only the small ones."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.phase = "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace != "aten":
            raise RuntimeError(f"{func} reached the cost mode: its implementation must run eagerly under capture()")
        if name in _FREE or func.is_view:
            return func(*args, **kwargs)
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        try:
            meta_out = func(*torch.utils._pytree.tree_map(_to_meta, args),
                            **torch.utils._pytree.tree_map(_to_meta, kwargs))
        except Exception:  # no meta kernel: run it for real (it must then be small)
            meta_out = None
        outs = [o for o in torch.utils._pytree.tree_leaves(meta_out) if isinstance(o, torch.Tensor)] \
            if meta_out is not None else []
        written = _schema_aliases(func, args, kwargs)
        nbytes = op_bytes(name, flat_in, outs)
        # a GEMM's operands are its positional tensors (an out= tensor is not one of them)
        flops = _flops(name, [a for a in args if isinstance(a, torch.Tensor)] or flat_in, outs)
        heavy = meta_out is not None and (nbytes > HEAVY_BYTES or flops > HEAVY_FLOPS)
        shapes = ",".join("x".join(map(str, t.shape)) + f":{str(t.dtype).replace('torch.', '')}" for t in flat_in)
        self.ops.append(TorchOp(name, int(nbytes), int(flops), shapes, self.phase, not heavy))
        if not heavy:
            return func(*args, **kwargs)
        return self._fake_outputs(func, meta_out, written)

    @staticmethod
    def _fake_outputs(func, meta_out, written):
        """Real (uninitialised) CPU outputs with the meta outputs' shapes; a mutated argument is returned
        as itself, as the op would have returned it."""
        returns = func._schema.returns
        multi = isinstance(meta_out, (tuple, list))
        outs = list(meta_out) if multi else [meta_out]
        real = []
        for i, o in enumerate(outs):
            ret = returns[i] if i < len(returns) else None
            alias = ret.alias_info if ret is not None else None
            if alias is not None and alias.is_write:
                real.append(next(written[a] for a in alias.before_set))
            elif isinstance(o, torch.Tensor):
                real.append(torch.empty_strided(o.shape, o.stride(), dtype=o.dtype))
            else:
                real.append(o)
        if not multi:
            return real[0]
        return type(meta_out)(real) if isinstance(meta_out, tuple) else real


# ----------------------------------------------------------------------------- Triton launches

@dataclasses.dataclass
class Launch:
    """One intercepted Triton launch: the kernel, its grid and arguments, and a compiled kernel per arch
    (the first arch's own; another's from the same place in a run as that arch: :func:`merge_arch`)."""
    name: str
    fn: object  # the JITFunction
    grid: tuple
    args: dict  # bound arguments: tensors, ints, floats and constexpr values
    key: str  # the runtime specialisation (what Triton keys its kernel cache with)
    compiled: dict  # arch -> triton CompiledKernel
    phase: str
    grids: dict = dataclasses.field(default_factory=dict)  # arch -> its launch's grid, where not ``grid``

    def programs(self, arch):
        g = self.grids.get(arch, self.grid)
        return g[0] * g[1] * g[2]


def merge_arch(launches, others, arch):
    """Each of ``launches`` (a run as sm_90) takes the ``arch`` kernel and grid of the launch in the same
    place of ``others`` (the same code run as ``arch``, which may pick other tiles); the two runs must
    launch the same kernels in the same order."""
    names, other_names = [lch.name for lch in launches], [lch.name for lch in others]
    if names != other_names:
        raise RuntimeError(f"the run as sm_{arch} launches {other_names}, the run as sm_90 {names}: the model "
                           f"pairs each launch with its sm_{arch} twin by position")
    for lch, twin in zip(launches, others):
        lch.compiled[arch] = twin.compiled[arch]
        if twin.grid != lch.grid:
            lch.grids[arch] = twin.grid
    return launches


def _grid3(grid, bound_args):
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


class TritonCapture:
    """Replaces ``JITFunction.run`` while active: launches are compiled for ``archs`` and recorded."""

    def __init__(self, archs=ARCHS):
        self.archs = archs
        self.launches = []
        self.phase = "fwd"
        self._compiled = {}  # (fn id, arch, key) -> CompiledKernel, shared by every launch of a run
        self.compile_seconds = 0.0

    def _specialise(self, fn, arch, args, kwargs):
        """Triton's own runtime path up to (not including) the launch, for a CUDA target of ``arch``."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        key = f"{specialization}{sorted(options.items())}"
        cache_key = (id(fn), arch, key)
        if cache_key not in self._compiled:
            import time

            import triton

            opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
            t0 = time.perf_counter()
            self._compiled[cache_key] = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                                       options=opts.__dict__)
            self.compile_seconds += time.perf_counter() - t0
        return bound_args, key, self._compiled[cache_key]

    def run(self, fn, args, grid, kwargs):
        compiled, key, bound = {}, None, None
        for arch in self.archs:
            bound, k, kernel = self._specialise(fn, arch, args, kwargs)
            compiled[arch] = kernel
            key = key or k
        self.launches.append(Launch(fn.fn.__name__, fn, _grid3(grid, bound), dict(bound), key, compiled, self.phase))
        _zero_small_outputs(compiled[self.archs[0]], bound, BENIGN_OUTPUTS.get(fn.fn.__name__, {}))


# Outputs whose benign value (the one valid inputs give) is not 0: a kernel's verdict on its inputs, read
# by a bad-input check (kernels/row_ce_reduce.py ce_reduce, kernels/row_ce.py ce_fwd_reduced: ok = 1 when every target is in range).
BENIGN_OUTPUTS = {"_ce_reduce_kernel": {"ok_ptr": 1}, "_ce_fwd_kernel": {"ok_ptr": 1}, "_sample_kernel": {"ok_ptr": 1},
                  "_argmax_kernel": {"ok_ptr": 1}}


def _zero_small_outputs(kernel, bound, benign=None):
    """The kernel did not run: its small outputs (per-row statistics, sampled indices) are zeroed (or set
    to ``benign[name]``), so that code reading them on the host (a CPU tensor's bad-input check) sees
    benign values, not garbage.  Large outputs stay untouched (and unallocated)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from .sass import pointer_access

    _, writes = pointer_access(kernel.asm["ttir"])
    with _disable_current_modes():
        for name in writes:
            t = bound.get(name)
            if isinstance(t, torch.Tensor) and unique_bytes(t) <= HEAVY_BYTES:
                t.fill_((benign or {}).get(name, 0))


@contextlib.contextmanager
def capture(arch=ARCHS[0]):
    """Within the block, fused_tau serves CPU tensors with its Triton kernels as on a GPU of compute
    capability ``arch``, each launch compiled for it and recorded (not run), and torch operators are
    counted (heavy ones not run).  Yields ``(TritonCapture, TorchCost)``; their ``phase`` attribute labels
    what is recorded next."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the model compiles kernels: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default, without 3.9's warning
    from triton.runtime.jit import JITFunction

    from fused_tau import _dispatch, _ops
    from fused_tau.kernels import tile_engine

    from .roofline import H100, H200

    triton_rec = TritonCapture((arch,))
    # the tile engine sizes its grid from the SM count and picks its tiles by architecture, both read
    # from the device on CUDA: the model's CPU tensors must get the modelled GPU's grid (both devices
    # have the same count; an A100's 108 SMs are not modelled: sm_80 is compiled for its resources) and
    # ``arch``'s tiles
    assert H100.sms == H200.sms
    saved_sms, saved_arch = tile_engine.SM_COUNT_OFF_GPU, tile_engine.ARCH_OFF_GPU
    tile_engine.SM_COUNT_OFF_GPU = H200.sms
    tile_engine.ARCH_OFF_GPU = arch
    saved_run, saved_interp, saved_tracing = JITFunction.run, _dispatch.interpreter_on, _ops._tracing
    saved_backend = os.environ.get("FUSED_TAU_BACKEND")

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        triton_rec.run(self, args, grid, kwargs)
        return None

    JITFunction.run = run
    _dispatch.interpreter_on = lambda: True  # lets FUSED_TAU_BACKEND=triton serve CPU tensors
    # fused_tau's custom ops go through torch's dispatcher whenever a dispatch mode is active; the cost
    # mode must see the launchers' own torch operators instead, as in plain eager code
    _ops._tracing = lambda: False
    os.environ["FUSED_TAU_BACKEND"] = "triton"
    torch_rec = TorchCost()
    try:
        with torch_rec:
            yield triton_rec, torch_rec
    finally:
        JITFunction.run = saved_run
        tile_engine.SM_COUNT_OFF_GPU, tile_engine.ARCH_OFF_GPU = saved_sms, saved_arch
        _dispatch.interpreter_on = saved_interp
        _ops._tracing = saved_tracing
        if saved_backend is None:
            os.environ.pop("FUSED_TAU_BACKEND", None)
        else:
            os.environ["FUSED_TAU_BACKEND"] = saved_backend


@contextlib.contextmanager
def count_torch():
    """Count the torch operators of plain PyTorch code (the eager composition) without running heavy ones."""
    rec = TorchCost()
    with rec:
        yield rec
