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
    import fused_tau.kernels.tile as tile
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
        tile.MATERIALIZED_BWD = route
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
