"""linear_cross_entropy against F.cross_entropy(F.linear(x, W, b) / tau, ...) in float64, and the
memory bound of the tile engine's torch path (no N × K logits)."""
import pytest
import torch
import torch.nn.functional as F

import fused_tau
from fused_tau import reference

from .tolerances import assert_close_to_ref

N, V, D = 19, 45, 20


def _check(x, W, y, b, dtype, tau, **opts):
    xs = [t.to(dtype).detach().clone().requires_grad_() if t is not None else None for t in (x, W, b)]
    out = fused_tau.linear_cross_entropy(xs[0], xs[1], y, linear_bias=xs[2], tau=tau, **opts)
    g = torch.rand(out.shape, device=x.device) + 0.5
    (out.float() * g).sum().backward()
    x64 = [t.detach().double().requires_grad_() if t is not None else None for t in xs]
    tau64 = tau.detach().double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    opts64 = dict(opts, weight=opts["weight"].double() if opts.get("weight") is not None else None)
    ref = reference.linear_cross_entropy(x64[0], x64[1], y, linear_bias=x64[2], tau=tau64, **opts64)
    (ref * g.double()).sum().backward()
    torch_grads = [None] * 3
    torch_out = None
    if dtype == torch.float32:  # bound by torch's own fp32 error too (conditioning of x·W / τ)
        x32 = [t.detach().clone().requires_grad_() if t is not None else None for t in xs]
        torch_out = reference.linear_cross_entropy(x32[0], x32[1], y, linear_bias=x32[2],
                                                   tau=tau.detach() if isinstance(tau, torch.Tensor) else tau, **opts)
        (torch_out * g).sum().backward()
        torch_grads = [t.grad if t is not None else None for t in x32]
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_ref(out, ref, dtype, torch_same_dtype=torch_out, scale=4.0)
    for t, r, tg in zip(xs, x64, torch_grads):
        if t is not None:
            assert_close_to_ref(t.grad, r.grad, dtype, torch_same_dtype=tg, scale=4.0)
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        assert_close_to_ref(tau.grad, tau64.grad, torch.float32 if dtype == torch.float32 else dtype, scale=N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,weighted,smoothing", [(False, False, 0.0), (True, True, 0.0), (True, False, 0.1),
                                                     (False, True, 0.2)])
def test_linear_ce_matches_reference(backend, device, dtype, reduction, bias, weighted, smoothing):
    x, W = torch.randn(N, D, device=device), torch.randn(V, D, device=device) * 0.5
    b = torch.randn(V, device=device) if bias else None
    y = torch.randint(0, V, (N,), device=device)
    y[4] = -100
    w = torch.rand(V, device=device) + 0.2 if weighted else None
    tau = torch.tensor(0.7, device=device, requires_grad=True)
    _check(x, W, y, b, dtype, tau, weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("tau_kind", ["float", "per_row"])
def test_normface_and_leading_dims(backend, device, tau_kind):
    """normalize=True: cosine logits scaled by 1/τ (NormFace); (B, T, D) inputs are flattened to rows."""
    x, W = torch.randn(3, 5, D, device=device), torch.randn(V, D, device=device)
    y = torch.randint(0, V, (3, 5), device=device)
    tau = 0.05 if tau_kind == "float" else (torch.rand(15, device=device) * 0.1 + 0.02).requires_grad_()
    _check(x, W, y, None, torch.float32, tau, normalize=True, reduction="none")


def test_equals_torch_linear_cross_entropy(backend, device):
    """At τ = 1, the same numbers as torch's own F.linear_cross_entropy (recent torch)."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    x, W, b = torch.randn(N, D, device=device), torch.randn(V, D, device=device), torch.randn(V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[0] = -100
    ours = fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, label_smoothing=0.1)
    theirs = F.linear_cross_entropy(x, W, y, linear_bias=b, label_smoothing=0.1, ignore_index=-100)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(linear_weight=torch.randn(9, 7)), ValueError, "linear_weight must be \\(V, 8\\)"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape \\(4,\\)"),
    (dict(target=torch.tensor([0, 1, 2, 9])), IndexError, "target holds a class index outside \\[0, 9\\)"),
    (dict(linear_bias=torch.randn(8)), ValueError, "linear_bias must have shape \\(9,\\)"),
    (dict(weight=torch.randn(3)), ValueError, "weight must have shape \\(9,\\)"),
    (dict(tau=0.0), ValueError, "tau must be positive"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing must be a float in \\[0, 1\\]"),
    (dict(linear_weight=torch.randn(9, 8, device="meta")), ValueError, "linear_weight is on meta"),
])
def test_bad_linear_ce_input(backend, kwargs, exc, match):
    args = dict(input=torch.randn(4, 8), linear_weight=torch.randn(9, 8), target=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_tau.linear_cross_entropy(**args)


def _peak(fn):
    from bench.harness import peak_bytes

    return peak_bytes(fn, torch.device("cpu"))


def test_infonce_memory_is_a_tenth_of_the_composition(monkeypatch):
    """N = 256 queries against a 65,536-key MoCo queue, D = 128: the torch path never holds the
    256 × 65,537 logits (67 MB in fp32) nor their softmax and gradient."""
    monkeypatch.setenv("FUSED_TAU_BACKEND", "torch")
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(256, 128, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(256, 128, generator=g), dim=1)
    queue = F.normalize(torch.randn(65536, 128, generator=g), dim=1)

    def fused():
        q.grad = None
        fused_tau.infonce(q, k, queue, tau=0.07).backward()

    def composition():
        q.grad = None
        reference.infonce(q, k, queue, tau=0.07).backward()

    ours, theirs = _peak(fused), _peak(composition)
    assert ours <= theirs / 10, (ours, theirs)


_RSS_SCRIPT = """
import resource, sys, torch, torch.nn.functional as F
torch.manual_seed(0)
x = torch.randn(1024, 64).requires_grad_()
W = (torch.randn(32768, 64) * 0.1).requires_grad_()
y = torch.randint(0, 32768, (1024,))
kind = sys.argv[1]
if kind == "baseline":  # inputs and their gradients, nothing else
    x.grad, W.grad = torch.ones_like(x), torch.ones_like(W)
else:
    import fused_tau
    from fused_tau import reference
    fn = {"fused_tau": lambda: fused_tau.linear_cross_entropy(x, W, y),
          "composition": lambda: reference.linear_cross_entropy(x, W, y),
          "torch_chunked": lambda: F.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions())}[kind]
    fn().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _extra_rss_kib(kind):
    """Peak RSS (KiB) of a fresh process running one forward+backward, minus that of a process holding
    only the inputs and gradients: every thread's allocations count (torch's chunked op allocates in
    worker threads that the profiler does not see)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FUSED_TAU_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)

    def run(k):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, k], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    return run(kind) - run("baseline")


def test_linear_ce_memory():
    """An LLM-style head (V = 32,768 ≫ D = 64, the logits 128 MiB in fp32): fused_tau's extra memory
    beyond inputs and gradients is at most a tenth of the composition's, and no more than torch's own
    chunked F.linear_cross_entropy."""
    ours = _extra_rss_kib("fused_tau")
    assert ours <= _extra_rss_kib("composition") / 10
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert ours <= _extra_rss_kib("torch_chunked")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("route", ["fused", "materialized", "materialized-one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_backward_routes(backend, device, dtype, route, monkeypatch):
    """The Triton backward's two routes (kernels/tile.py): fused dA / dB kernels, or chunks of P / τ
    multiplied by GEMMs (auto for D > BLOCK_DO, the LLM head), with a bias, class weights, label
    smoothing, an ignored row and a learnable τ."""
    import fused_tau.kernels.tile as tile

    monkeypatch.setattr(tile, "MATERIALIZED_BWD", route.split("-")[0])
    if route.endswith("one-chunk"):
        monkeypatch.setattr(tile, "MATERIALIZED_CHUNK_ELEMENTS", 1 << 20)
    x, W, b = torch.randn(N, D, device=device), torch.randn(V, D, device=device) * 0.5, torch.randn(V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[4] = -100
    tau = torch.tensor(0.7, device=device, requires_grad=True)
    _check(x, W, y, b, dtype, tau, weight=torch.rand(V, device=device) + 0.2, label_smoothing=0.1)
