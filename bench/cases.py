"""Benchmark cases: what is timed, at which sizes, against which providers.

Bytes moved (the row engine is memory-bound; GB/s = bytes / time), R rows × C
classes of e bytes:
  cross_entropy   fwd R·C·e (read logits)          fwd+bwd 3·R·C·e (+ read logits, write gradient)
  kd_loss         fwd 2·R·C·e (read both)          fwd+bwd 5·R·C·e (+ read both, write the student's gradient)
  gumbel_softmax  fwd 2·R·C·e (read, write)        fwd+bwd 5·R·C·e (+ read logits and upstream, write gradient)
  sample          fwd R·C·e (read logits)
The same formula is applied to every provider, so GB/s compares like with like
("effective bandwidth": the least traffic the op needs, not what a provider moved).
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F

import fused_tau

CE_TAU, KD_TAU, GUMBEL_TAU, SAMPLE_TAU = 0.07, 4.0, 0.5, 0.8


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
        return self.n * self.c * e * OPS[self.op]["bytes"][self.mode]


# --------------------------------------------------------------------------- providers
# Each takes the inputs dict and returns the output to time (and, for fwd+bwd, to backpropagate).

def _kd_torch(inp):
    s, t = inp["student"], inp["teacher"]
    return KD_TAU ** 2 * F.kl_div(F.log_softmax(s / KD_TAU, -1), F.softmax(t / KD_TAU, -1), reduction="batchmean")


PROVIDERS = {
    "cross_entropy": {
        "fused_tau": lambda inp: fused_tau.cross_entropy(inp["x"], inp["y"], CE_TAU),
        "torch": lambda inp: F.cross_entropy(inp["x"] / CE_TAU, inp["y"]),
    },
    "kd_loss": {
        "fused_tau": lambda inp: fused_tau.kd_loss(inp["student"], inp["teacher"], KD_TAU),
        "torch": _kd_torch,
    },
    "gumbel_softmax": {
        "fused_tau": lambda inp: fused_tau.gumbel_softmax(inp["x"], GUMBEL_TAU),
        "torch": lambda inp: F.gumbel_softmax(inp["x"], GUMBEL_TAU),
    },
    "sample": {
        "fused_tau": lambda inp: fused_tau.sample(inp["x"], SAMPLE_TAU),
        "torch": lambda inp: torch.multinomial(torch.softmax(inp["x"].float() / SAMPLE_TAU, -1), 1),
    },
}


@functools.lru_cache(maxsize=None)
def _compiled(op):
    return torch.compile(PROVIDERS[op]["torch"], dynamic=False)


for _op in PROVIDERS:
    PROVIDERS[_op]["torch.compile"] = (lambda op: lambda inp: _compiled(op)(inp))(_op)


OPS = {
    "cross_entropy": dict(bytes={"fwd": 1, "fwd+bwd": 3}, modes=("fwd", "fwd+bwd"),
                          gpu_sizes=[(8192, 32000), (8192, 128256), (32768, 32000), (32768, 128256)],
                          cpu_sizes=[(256, 32000), (1024, 32000)]),
    "kd_loss": dict(bytes={"fwd": 2, "fwd+bwd": 5}, modes=("fwd", "fwd+bwd"),
                    gpu_sizes=[(8192, 32000), (8192, 128256)], cpu_sizes=[(256, 32000)]),
    "gumbel_softmax": dict(bytes={"fwd": 2, "fwd+bwd": 5}, modes=("fwd", "fwd+bwd"),
                           gpu_sizes=[(64, 256000), (8192, 32000)], cpu_sizes=[(64, 32000)]),
    "sample": dict(bytes={"fwd": 1}, modes=("fwd",),
                   gpu_sizes=[(64, 256000), (8192, 32000)], cpu_sizes=[(64, 32000)]),
}
GPU_DTYPES = [torch.bfloat16]
CPU_DTYPES = [torch.float32]


def make_inputs(case, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = case.mode == "fwd+bwd"

    def logits():
        return (torch.randn(case.n, case.c, generator=g) * 4).to(device=device, dtype=case.dtype)

    if case.op == "kd_loss":
        inp = dict(student=logits().requires_grad_(grad), teacher=logits())
        inp["leaf"] = inp["student"]
    else:
        inp = dict(x=logits().requires_grad_(grad))
        inp["leaf"] = inp["x"]
        if case.op == "cross_entropy":
            inp["y"] = torch.randint(0, case.c, (case.n,), generator=g).to(device)
        if case.op == "gumbel_softmax" and grad:
            inp["upstream"] = torch.randn(case.n, case.c, generator=g).to(device=device, dtype=case.dtype)
    return inp


def runner(case, provider, inp):
    """A zero-argument callable running one step of ``provider`` on the case."""
    fn = PROVIDERS[case.op][provider]
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(inp)
    else:
        def step():
            inp["leaf"].grad = None
            out = fn(inp)
            out.backward(inp.get("upstream"))
    return step


def cases(device_type, ops=None, sizes=None, dtypes=None, modes=None):
    out = []
    for op in ops or OPS:
        spec = OPS[op]
        for n, c in sizes or spec["gpu_sizes" if device_type == "cuda" else "cpu_sizes"]:
            for dt in dtypes or (GPU_DTYPES if device_type == "cuda" else CPU_DTYPES):
                for mode in spec["modes"]:
                    if modes is None or mode in modes:
                        out.append(Case(op, n, c, dt, mode))
    return out
