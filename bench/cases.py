"""Benchmark cases: what is timed, at which sizes, against which providers.

Bytes moved (the row engine is memory-bound; GB/s = bytes / time):
  cross_entropy forward:           R·C·e   (read the logits once)
  cross_entropy forward+backward:  3·R·C·e (forward read; backward read + gradient write)
with R rows, C classes, e bytes per element.  The same formula is applied to
every provider, so GB/s compares like with like ("effective bandwidth").
"""
import dataclasses

import torch
import torch.nn.functional as F

import fused_tau

TAU = 0.07

GPU_SIZES = [(8192, 32000), (8192, 128256), (32768, 32000), (32768, 128256)]
GPU_DTYPES = [torch.bfloat16]
CPU_SIZES = [(256, 32000), (1024, 32000)]
CPU_DTYPES = [torch.float32]
TINY_SIZES = [(16, 1000)]


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    n: int
    c: int
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"

    @property
    def name(self):
        return f"{self.op}-{self.mode}-{self.n}x{self.c}-{str(self.dtype).replace('torch.', '')}"

    def bytes_moved(self):
        e = torch.tensor([], dtype=self.dtype).element_size()
        return self.n * self.c * e * (1 if self.mode == "fwd" else 3)


def _ce_fused(x, y):
    return fused_tau.cross_entropy(x, y, TAU)


def _ce_eager(x, y):
    return F.cross_entropy(x / TAU, y)


_compiled = {}


def _ce_compiled(x, y):
    fn = _compiled.get("ce")
    if fn is None:
        fn = _compiled["ce"] = torch.compile(_ce_eager, dynamic=False)
    return fn(x, y)


PROVIDERS = {
    "cross_entropy": {
        "fused_tau": _ce_fused,
        "torch": _ce_eager,
        "torch.compile": _ce_compiled,
    },
}


def make_inputs(case, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(case.n, case.c, generator=g) * 4).to(device=device, dtype=case.dtype)
    y = torch.randint(0, case.c, (case.n,), generator=g).to(device)
    if case.mode == "fwd+bwd":
        x.requires_grad_()
    return x, y


def runner(case, provider, x, y):
    """A zero-argument callable running one step of ``provider`` on the case."""
    fn = PROVIDERS[case.op][provider]
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, y)
    else:
        def step():
            x.grad = None
            fn(x, y).backward()
    return step


def cases(sizes, dtypes, ops=("cross_entropy",), modes=("fwd", "fwd+bwd")):
    return [Case(op, n, c, dt, mode) for op in ops for (n, c) in sizes for dt in dtypes for mode in modes]
