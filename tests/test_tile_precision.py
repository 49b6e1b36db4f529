"""The tile engine's (kernels/tile.py, fused_tau/_torch_tile.py) offsets and precision: operands
whose strides reach past 2^31 elements, small τ (down to 1e-3 and below), large τ (up to 1e4) for
the loss and every gradient (τ's included), judged against the float64 reference and torch's own
fp32 composition."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_tau
from fused_tau import reference

from .tolerances import assert_close_to_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------- int64 offsets

_HUGE_STRIDE_SCRIPT = textwrap.dedent("""
    import torch
    import fused_tau
    import fused_tau.kernels.tile_bwd as tile_bwd
    from fused_tau import reference
    from tests.tolerances import assert_close_to_ref

    S = 1 << 30  # a column stride: element d of a row sits d * S elements in, past 2^31 for d >= 2
    N, K, D = 3, 4, 3
    # one 4 GiB fp16 buffer (untouched pages cost nothing); only the elements the views reach are written
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    buf = torch.empty((D - 1) * S + 64, dtype=torch.float16, device=dev)
    gen = torch.Generator().manual_seed(0)

    def strided(rows, offset):
        view = torch.as_strided(buf, (rows, D), (1, S), offset)
        view.copy_(torch.randn(rows, D, generator=gen).to(torch.float16))
        return view

    def check(fn, ref_fn, tensors):
        xs = [t.detach().requires_grad_() for t in tensors]
        out = fn(*xs)
        out.backward()
        x64 = [t.detach().double().requires_grad_() for t in tensors]
        ref = ref_fn(*x64)
        ref.backward()
        assert_close_to_ref(out, ref, torch.float16, scale=4.0)
        for x, r in zip(xs, x64):
            assert_close_to_ref(x.grad, r.grad, torch.float16, scale=4.0)

    q, queue, x, W = strided(N, 0), strided(K, 8), strided(N, 16), strided(K, 24)
    assert q.stride() == (1, S) and q.storage_offset() + (N - 1) + (D - 1) * S >= 2 ** 31
    k = torch.randn(N, D, generator=gen).to(dev, torch.float16)
    bias = torch.randn(K, generator=gen).to(dev, torch.float16)
    y = torch.tensor([0, 3, 1], device=dev)
    for route in ("fused", "materialized"):
        tile_bwd.MATERIALIZED_BWD = route
        check(lambda q, k, qu: fused_tau.infonce(q, k, qu, tau=0.5),
              lambda q, k, qu: reference.infonce(q, k, qu, tau=0.5), [q, k, queue])
        check(lambda q, k: fused_tau.infonce(q, k, None, tau=0.5),
              lambda q, k: reference.infonce(q, k, None, tau=0.5), [q, x])
        check(lambda x, W, b: fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, tau=0.7),
              lambda x, W, b: reference.linear_cross_entropy(x, W, y, linear_bias=b, tau=0.7), [x, W, bias])
    print("OK")
""")


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_operands_strided_past_2_31_elements(backend_name):
    """Item 3 of issue 12: an operand that is not row-major and spans more than 2^31 elements (a
    strided view into a 4 GiB fp16 buffer, as a transposed LLM head with V·D >= 2^31 is): every
    offset of every tile kernel is int64 (int32 products wrapped and the kernel read outside the
    buffer: a segfault).  In a child process, so that a crash fails the test instead of the run."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FUSED_TAU_BACKEND=backend_name)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    if backend_name == "triton":
        pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", _HUGE_STRIDE_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), \
        f"exit status {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


# ---------------------------------------------------------------------------- small and large τ

def _judge(ours, ref, torch32, what):
    """``ours`` against the float64 ``ref`` with fp32's tolerance and torch's fp32 error, in units of
    the reference's largest element: a dτ of 1e-11 (τ = 1e4) or a gradient of 1e3 (τ = 1e-3) is judged
    as strictly as one of 1 (in absolute units the table's atol would pass either unexamined)."""
    unit = ref.detach().double().abs().max().item()
    unit = unit if unit > 0 and unit < float("inf") else 1.0
    try:
        assert_close_to_ref(ours / unit, ref / unit, torch.float32, torch_same_dtype=torch32 / unit)
    except AssertionError as e:
        raise AssertionError(f"{what} (unit {unit:.3g}): {e}") from None


def _check_all(fn, ref_fn, tensors, tau):
    """Loss and the gradient of every input and of a learnable τ: fp32 fused_tau against the float64
    composition, bounded by the fp32 composition's own error."""
    results = []
    for dtype, f in ((torch.float32, fn), (torch.float64, ref_fn), (torch.float32, ref_fn)):
        xs = [t.detach().to(dtype).requires_grad_() for t in tensors]
        t = torch.tensor(tau, dtype=dtype, requires_grad=True)
        out = f(*xs, t)
        out.backward()
        results.append([out] + [x.grad for x in xs] + [t.grad])
    ours, ref, torch32 = results
    names = ["loss"] + [f"grad of input {i}" for i in range(len(tensors))] + ["grad of tau"]
    for o, r, t, name in zip(ours, ref, torch32, names):
        _judge(o, r, t, name)


TAUS = [1e-3, 1e-2, 0.3, 100.0, 1e4]
DIMS = [3, 5, 8, 40]


def _unit_rows(n, d, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", DIMS)
def test_infonce_queue_precision(backend, device, tau, d):
    """Item 8 / 9 of issue 12: MoCo InfoNCE (17 queries, a 33-key queue) from τ = 1e-3 to 1e4, at small D
    where the old backward's exp(z - lse) (z and lse both ~ 1/τ) lost digits (2.5-9.5x torch's error at
    τ = 0.01) and dτ summed (z - lse) P against the positive (3% off at τ = 1e4)."""
    gen = torch.Generator().manual_seed(d)
    q, k, queue = (_unit_rows(n, d, gen).to(device) for n in (17, 17, 33))
    queue[5] = k[2]  # an exact tie between a positive and a negative
    _check_all(lambda q, k, qu, t: fused_tau.infonce(q, k, qu, tau=t),
               lambda q, k, qu, t: reference.infonce(q, k, qu, tau=t), [q, k, queue], tau)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", DIMS)
def test_in_batch_infonce_and_clip_precision(backend, device, tau, d):
    gen = torch.Generator().manual_seed(100 + d)
    a, b = (_unit_rows(19, d, gen).to(device) for _ in range(2))
    b[7] = b[3]  # two equal keys
    _check_all(lambda a, b, t: fused_tau.infonce(a, b, tau=t),
               lambda a, b, t: reference.infonce(a, b, tau=t), [a, b], tau)
    _check_all(lambda a, b, t: fused_tau.clip_loss(a, b, tau=t),
               lambda a, b, t: reference.clip_loss(a, b, tau=t), [a, b], tau)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", [3, 40])
@pytest.mark.parametrize("n", [16, 33])
@pytest.mark.parametrize("route", ["fused", "materialized"])
def test_clip_one_pass_precision_across_splits(backend, device, monkeypatch, tau, d, n, route):
    """clip_loss in one pass (kernels/tile_clip.py clip_fwd / clip_bwd, both backward routes) at sizes around
    its 16-row blocks and 1-tile splits (each row's (m, s) merged over every split, each column's over
    every row block), from τ = 1e-3 to 1e4: loss and every gradient against float64, within torch's
    fp32 error."""
    if backend == "triton":
        import fused_tau.kernels.tile_bwd as tile_bwd
        import fused_tau.kernels.tile_engine as tile_engine

        monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route)

        monkeypatch.setattr(tile_engine, "split_plan", lambda programs, tiles, sms, max_splits=None: (max(tiles, 1),
                                                                                                       min(tiles, 1)))
    gen = torch.Generator().manual_seed(300 + d + n)
    a, b = (_unit_rows(n, d, gen).to(device) for _ in range(2))
    b[7] = b[3]  # two equal keys: a tie in rows 3 and 7, and between columns 3 and 7
    _check_all(lambda a, b, t: fused_tau.clip_loss(a, b, tau=t),
               lambda a, b, t: reference.clip_loss(a, b, tau=t), [a, b], tau)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", DIMS)
def test_nt_xent_precision(backend, device, tau, d):
    gen = torch.Generator().manual_seed(200 + d)
    z1, z2 = (torch.randn(11, d, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    _check_all(lambda a, b, t: fused_tau.nt_xent(a, b, tau=t),
               lambda a, b, t: reference.nt_xent(a, b, tau=t), [z1, z2], tau)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("options", ["plain", "bias_weight_smoothing"])
def test_linear_cross_entropy_precision(backend, device, tau, d, options):
    gen = torch.Generator().manual_seed(300 + d)
    N, V = 17, 29
    x = torch.randn(N, d, generator=gen, dtype=torch.float64).to(device)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64).to(device) / d ** 0.5
    W[4] = W[9]  # two equal classes
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    y[3] = -100
    if options == "plain":
        _check_all(lambda x, W, t: fused_tau.linear_cross_entropy(x, W, y, tau=t),
                   lambda x, W, t: reference.linear_cross_entropy(x, W, y, tau=t), [x, W], tau)
    else:
        b = torch.randn(V, generator=gen, dtype=torch.float64).to(device)
        w = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.5).to(device)
        _check_all(lambda x, W, b, t: fused_tau.linear_cross_entropy(
                       x, W, y, linear_bias=b, weight=w.to(x.dtype), label_smoothing=0.1, tau=t),
                   lambda x, W, b, t: reference.linear_cross_entropy(
                       x, W, y, linear_bias=b, weight=w.to(x.dtype), label_smoothing=0.1, tau=t),
                   [x, W, b], tau)


@pytest.mark.parametrize("tau", [1e-4, 1e-3])
def test_infonce_exact_tie_has_zero_query_gradient(backend, device, tau):
    """Issue 12's reproducer: q = k = queue = [[1]], so the positive and the negative tie: the loss is
    log 2 and dq = (1/2 - 1/2)/τ = 0 exactly (torch: 0); the old backward gave dq = -1.06 at τ = 1e-4."""
    q, k, queue = (torch.ones(1, 1, device=device, requires_grad=True) for _ in range(3))
    loss = fused_tau.infonce(q, k, queue, tau=tau)
    loss.backward()
    assert abs(loss.item() - 0.6931471805599453) <= 1e-7
    assert q.grad.item() == 0.0
    assert k.grad.item() == pytest.approx(-0.5 / tau, rel=1e-6)
    assert queue.grad.item() == pytest.approx(0.5 / tau, rel=1e-6)
