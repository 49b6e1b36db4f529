"""Benchmark cases: what is timed, at which sizes, against which providers.

Bytes moved (the row engine is memory-bound; GB/s = bytes / time), R rows × C
classes of e bytes:
  cross_entropy   fwd R·C·e (read logits)          fwd+bwd 2·R·C·e (read logits, write gradient: the least;
                                                   a backward of its own reads them again, 3·R·C·e)
  kd_loss         fwd 2·R·C·e (read both)          fwd+bwd 5·R·C·e (+ read both, write the student's gradient)
  gumbel_softmax  fwd 2·R·C·e (read, write)        fwd+bwd 5·R·C·e (+ read logits and upstream, write gradient)
  sample          fwd R·C·e (read logits)
  softmax         fwd 2·R·C·e (read, write)        fwd+bwd 5·R·C·e (+ read output and upstream, write gradient)
The same formula is applied to every provider, so GB/s compares like with like
("effective bandwidth": the least traffic the op needs, not what a provider moved).

FLOPs (the tile engine is compute-bound; TFLOP/s = FLOPs / time), N rows, K keys or
V classes, D features:
  infonce (MoCo queue, no queue gradient)  fwd 2·N·K·D      fwd+bwd 4·N·K·D (+ dq)
  linear_cross_entropy                     fwd 2·N·V·D      fwd+bwd 6·N·V·D (+ dx, dW)
  clip_loss (N pairs: sizes N × N × D)     fwd 2·N·N·D      fwd+bwd 6·N·N·D (one logits matrix serves both
                                                                           directions; + da, db)
  nt_xent (N pairs, 2N views: N × 2N × D)  fwd 2·2N·2N·D    fwd+bwd 6·2N·2N·D (+ the two products of dz)
counted as the matmuls the op must do (a provider's recomputation is its own cost).
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F

import fused_tau

CE_TAU, KD_TAU, GUMBEL_TAU, SAMPLE_TAU, MOCO_TAU, SOFTMAX_TAU, CLIP_TAU, SIMCLR_TAU = 0.07, 4.0, 0.5, 0.8, 0.2, 0.5, 0.07, 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    n: int
    c: int
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"
    d: int = 0  # feature dimension of the tile-engine ops

    @property
    def name(self):
        shape = f"{self.n}x{self.c}" + (f"x{self.d}" if self.d else "")
        return f"{self.op}-{self.mode}-{shape}-{str(self.dtype).replace('torch.', '')}"

    def bytes_moved(self):
        """Bytes the op must move (row engine), or None for a compute-bound op."""
        if "bytes" not in OPS[self.op]:
            return None
        e = torch.tensor([], dtype=self.dtype).element_size()
        return self.n * self.c * e * OPS[self.op]["bytes"][self.mode]

    def flops(self):
        """Matmul FLOPs the op must do (tile engine), or None for a memory-bound op."""
        if "flops" not in OPS[self.op]:
            return None
        return 2 * self.n * self.c * self.d * OPS[self.op]["flops"][self.mode]


# --------------------------------------------------------------------------- providers
# Each takes the inputs dict and returns the output to time (and, for fwd+bwd, to backpropagate).

def _kd_torch(inp):
    s, t = inp["student"], inp["teacher"]
    return KD_TAU ** 2 * F.kl_div(F.log_softmax(s / KD_TAU, -1), F.softmax(t / KD_TAU, -1), reduction="batchmean")


def _linear_ce_chunked(inp):
    return F.linear_cross_entropy(inp["x"], inp["W"], inp["y"], options=torch.nn.LinearCrossEntropyOptions())


def _liger_flce(inp):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(inp["x"], inp["W"], inp["y"])


def _cce(inp):
    from cut_cross_entropy import linear_cross_entropy as cce

    return cce(inp["x"], inp["W"], inp["y"])


PROVIDERS = {
    "infonce": {
        "fused_tau": lambda inp: fused_tau.infonce(inp["q"], inp["k"], inp["queue"], tau=MOCO_TAU),
        "torch": lambda inp: fused_tau.reference.infonce(inp["q"], inp["k"], inp["queue"], tau=MOCO_TAU),
    },
    "linear_cross_entropy": {  # τ = 1 so that every peer computes the same loss
        "fused_tau": lambda inp: fused_tau.linear_cross_entropy(inp["x"], inp["W"], inp["y"]),
        "torch": lambda inp: F.cross_entropy(F.linear(inp["x"], inp["W"]), inp["y"]),
        "torch chunked": _linear_ce_chunked,
        "liger": _liger_flce,
        "cut-cross-entropy": _cce,
    },
    "clip_loss": {
        "fused_tau": lambda inp: fused_tau.clip_loss(inp["a"], inp["b"], tau=CLIP_TAU),
        "torch": lambda inp: fused_tau.reference.clip_loss(inp["a"], inp["b"], tau=CLIP_TAU),
    },
    "nt_xent": {
        "fused_tau": lambda inp: fused_tau.nt_xent(inp["z1"], inp["z2"], tau=SIMCLR_TAU),
        "torch": lambda inp: fused_tau.reference.nt_xent(inp["z1"], inp["z2"], tau=SIMCLR_TAU),
    },
    "softmax": {
        "fused_tau": lambda inp: fused_tau.softmax(inp["x"], -1, tau=SOFTMAX_TAU),
        "torch": lambda inp: torch.softmax(inp["x"] / SOFTMAX_TAU, -1),
    },
    "cross_entropy": {
        "fused_tau": lambda inp: fused_tau.cross_entropy(inp["x"], inp["y"], tau=CE_TAU),
        "torch": lambda inp: F.cross_entropy(inp["x"] / CE_TAU, inp["y"]),
    },
    "kd_loss": {
        "fused_tau": lambda inp: fused_tau.kd_loss(inp["student"], inp["teacher"], tau=KD_TAU),
        "torch": _kd_torch,
    },
    "gumbel_softmax": {
        "fused_tau": lambda inp: fused_tau.gumbel_softmax(inp["x"], GUMBEL_TAU),
        "torch": lambda inp: F.gumbel_softmax(inp["x"], GUMBEL_TAU),
    },
    "sample": {
        "fused_tau": lambda inp: fused_tau.sample(inp["x"], tau=SAMPLE_TAU),
        "torch": lambda inp: torch.multinomial(torch.softmax(inp["x"].float() / SAMPLE_TAU, -1), 1),
    },
}


@functools.lru_cache(maxsize=None)
def _compiled(op, dynamic):
    return torch.compile(PROVIDERS[op]["torch"], dynamic=dynamic)


def _compiled_for(op, inp):
    """torch.compile of the composition: static shapes on a CPU (each size its own graph, as before); dynamic
    shapes on a GPU, whose runs cover more sizes per op than torch.compile's recompile limit (8) allows."""
    return _compiled(op, inp["leaf"].device.type == "cuda")(inp)


for _op in PROVIDERS:
    PROVIDERS[_op]["torch.compile"] = (lambda op: lambda inp: _compiled_for(op, inp))(_op)


OPS = {
    "infonce": dict(flops={"fwd": 1, "fwd+bwd": 2}, modes=("fwd", "fwd+bwd"),
                    gpu_sizes=[(256, 65536, 128), (4096, 65536, 128), (256, 65536, 256), (4096, 65536, 256)],
                    cpu_sizes=[(256, 65536, 128)], cpu_full_sizes=[(64, 65536, 128), (1024, 65536, 128)],
                    gpu_dtypes=[torch.float32, torch.bfloat16]),
    "linear_cross_entropy": dict(flops={"fwd": 1, "fwd+bwd": 3}, modes=("fwd", "fwd+bwd"),
                                 gpu_sizes=[(8192, 128256, 4096)], cpu_sizes=[(512, 32768, 128)],
                                 cpu_full_sizes=[(128, 32768, 128), (2048, 32768, 128)]),
    # softmax, clip_loss and nt_xent: GPU sizes only (a default CPU run keeps its cases; --full or --sizes adds them)
    "clip_loss": dict(flops={"fwd": 1, "fwd+bwd": 3}, modes=("fwd", "fwd+bwd"), gpu_sizes=[(4096, 4096, 512)],
                      cpu_sizes=[], cpu_full_sizes=[(256, 256, 128)]),
    # SimCLR: N pairs of views (sizes N × 2N × D: the 2N × 2N similarities are 2 · N · 2N)
    "nt_xent": dict(flops={"fwd": 2, "fwd+bwd": 6}, modes=("fwd", "fwd+bwd"), gpu_sizes=[(4096, 8192, 128)],
                    cpu_sizes=[], cpu_full_sizes=[(256, 512, 128)]),
    "softmax": dict(bytes={"fwd": 2, "fwd+bwd": 5}, modes=("fwd", "fwd+bwd"), gpu_sizes=[(8192, 32000)],
                    cpu_sizes=[], cpu_full_sizes=[(256, 32000)]),
    "cross_entropy": dict(bytes={"fwd": 1, "fwd+bwd": 2}, modes=("fwd", "fwd+bwd"),
                          gpu_sizes=[(8192, 32000), (8192, 128256), (32768, 32000), (32768, 128256)],
                          cpu_sizes=[(256, 32000), (1024, 32000)], cpu_full_sizes=[(64, 32000), (4096, 32000)]),
    "kd_loss": dict(bytes={"fwd": 2, "fwd+bwd": 5}, modes=("fwd", "fwd+bwd"),
                    gpu_sizes=[(8192, 32000), (8192, 128256)], cpu_sizes=[(256, 32000)],
                    cpu_full_sizes=[(64, 32000), (1024, 32000)]),
    "gumbel_softmax": dict(bytes={"fwd": 2, "fwd+bwd": 5}, modes=("fwd", "fwd+bwd"),
                           gpu_sizes=[(64, 256000), (8192, 32000)], cpu_sizes=[(64, 32000)],
                           cpu_full_sizes=[(16, 32000), (256, 32000), (64, 256000)]),
    "sample": dict(bytes={"fwd": 1}, modes=("fwd",),
                   gpu_sizes=[(64, 256000), (8192, 32000)], cpu_sizes=[(64, 32000)],
                   cpu_full_sizes=[(16, 32000), (256, 32000), (64, 256000)]),
}
GPU_DTYPES = [torch.bfloat16]
CPU_DTYPES = [torch.float32]


def make_inputs(case, device, values=True):
    """The inputs of ``case`` on ``device``.  ``values=False`` leaves every floating-point tensor
    uninitialised (``torch.empty``; the performance model runs no kernel on them, and a large CPU
    allocation that is never written costs neither time nor memory); class indices stay valid."""
    device = torch.device(device)
    # drawn where they are used: on a GPU, 8192 x 128256 logits take seconds on a CPU and a copy over
    g = torch.Generator(device="cuda" if device.type == "cuda" else "cpu").manual_seed(0)
    on = dict(device=device) if device.type == "cuda" else {}
    grad = case.mode == "fwd+bwd"

    def draw(*shape, scale=1.0, unit_rows=False):
        if not values:
            return torch.empty(*shape, device=device, dtype=case.dtype)
        t = torch.randn(*shape, generator=g, **on) * scale
        if unit_rows:
            t = F.normalize(t, dim=-1)
        return t.to(device=device, dtype=case.dtype)

    def logits():
        return draw(case.n, case.c, scale=4.0)

    if case.op == "infonce":
        q, k = draw(2, case.n, case.d, unit_rows=True)
        queue = draw(case.c, case.d, unit_rows=True)
        return dict(q=q.requires_grad_(grad), k=k, queue=queue, leaf=q)
    if case.op == "clip_loss":
        a, b = draw(2, case.n, case.d, unit_rows=True)
        return dict(a=a.requires_grad_(grad), b=b.requires_grad_(grad), leaf=a, leaves=(a, b))
    if case.op == "nt_xent":
        z1, z2 = draw(2, case.n, case.d, unit_rows=True)
        return dict(z1=z1.requires_grad_(grad), z2=z2.requires_grad_(grad), leaf=z1, leaves=(z1, z2))
    if case.op == "linear_cross_entropy":
        x = draw(case.n, case.d).requires_grad_(grad)
        W = draw(case.c, case.d, scale=case.d ** -0.5)
        y = torch.randint(0, case.c, (case.n,), generator=g, **on).to(device)
        return dict(x=x, W=W.requires_grad_(grad), y=y, leaf=x, leaves=(x, W))
    if case.op == "kd_loss":
        inp = dict(student=logits().requires_grad_(grad), teacher=logits())
        inp["leaf"] = inp["student"]
    else:
        inp = dict(x=logits().requires_grad_(grad))
        inp["leaf"] = inp["x"]
        if case.op == "cross_entropy":
            inp["y"] = torch.randint(0, case.c, (case.n,), generator=g, **on).to(device)
        if case.op in ("gumbel_softmax", "softmax") and grad:
            inp["upstream"] = draw(case.n, case.c)
    return inp


def runner(case, provider, inp):
    """A zero-argument callable running one step of ``provider`` on the case; its ``reset()``
    drops the gradients of the last step (the step does so itself first)."""
    fn = PROVIDERS[case.op][provider]

    def reset():
        for leaf in inp.get("leaves", (inp["leaf"],)):
            leaf.grad = None

    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(inp)
    else:
        def step():
            reset()
            out = fn(inp)
            out.backward(inp.get("upstream"))
    step.reset = reset
    return step


# Peers left out of a run unless named with --providers: (reason, device types they are left out on,
# whether --full brings them back).
SKIPPED = {
    "liger": ("GPU-only (Triton kernels that need CUDA)", ("cpu",), False),
    "cut-cross-entropy": ("GPU-only (Triton kernels that need CUDA)", ("cpu",), False),
    "torch chunked": ("16-48 s per case on a CPU; --full runs it", ("cpu",), True),
}


def providers(op, device_type, full=False):
    """The peers a default run times for ``op``, and {peer: reason} for those it leaves out."""
    run, skipped = [], {}
    for p in PROVIDERS[op]:
        reason, devices, with_full = SKIPPED.get(p, (None, (), False))
        if device_type in devices and not (full and with_full):
            skipped[p] = reason
        else:
            run.append(p)
    return run, skipped


def sizes_for(op, device_type, full=False):
    spec = OPS[op]
    if device_type == "cuda":
        return list(spec["gpu_sizes"])
    extra = spec.get("cpu_full_sizes", []) if full else []
    return sorted(set(spec["cpu_sizes"]) | set(extra))


def cases(device_type, ops=None, sizes=None, dtypes=None, modes=None, full=False):
    out = []
    for op in ops or OPS:
        spec = OPS[op]
        for size in sizes or sizes_for(op, device_type, full):
            if len(size) != (3 if "flops" in spec else 2):
                continue  # an N x C size for a row op, or N x K x D for a tile op
            default = spec.get("gpu_dtypes", GPU_DTYPES) if device_type == "cuda" else CPU_DTYPES
            if op == "clip_loss":  # N pairs: the keys are the N other views
                size = (size[0], size[0], *size[2:])
            if op == "nt_xent":  # N pairs: 2N views, each against the 2N
                size = (size[0], 2 * size[0], *size[2:])
            for dt in dtypes or default:
                for mode in spec["modes"]:
                    if modes is None or mode in modes:
                        out.append(Case(op, *size[:2], dt, mode, *size[2:]))
    return out
