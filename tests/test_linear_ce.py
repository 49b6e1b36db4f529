"""linear_cross_entropy against F.cross_entropy(F.linear(x, W, b) / tau, ...) in float64 and against
torch 2.13's own F.linear_cross_entropy / nn.LinearCrossEntropyLoss (PyTorch's OpInfo samples), and the
memory bound of the tile engine's torch path (no N × K logits)."""

import pytest
import torch
import torch.nn.functional as F

import fused_tau
from fused_tau import reference

from .compare import Fixed, check_against_reference
from .tolerances import assert_close_to_ref, tol

N, V, D = 19, 45, 20


def _check(x, W, y, b, dtype, tau, **opts):
    """Loss and the gradients of input, weight, bias, τ and (probability) target against the float64
    reference; bounded by torch's own fp32 error too."""
    weight = opts.pop("weight", None)
    check_against_reference(
        lambda x, W, y, b, w, tau: fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, tau=tau, **opts),
        lambda x, W, y, b, w, tau: reference.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, tau=tau, **opts),
        [x, W, y, b, None if weight is None else Fixed(weight)], dtype=dtype, tau=tau, scale=4.0, tau_scale=N)


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
@pytest.mark.parametrize("targets", ["classes", "probabilities"])
def test_normface_and_leading_dims(backend, device, tau_kind, targets):
    """normalize=True: cosine logits scaled by 1/τ (NormFace); (B, T, D) inputs are flattened to rows
    (beyond torch, which takes (N, D) or (D,)), with targets (B, T) or (B, T, C)."""
    x, W = torch.randn(3, 5, D, device=device), torch.randn(V, D, device=device)
    y = torch.randint(0, V, (3, 5), device=device) if targets == "classes" else \
        torch.softmax(torch.randn(3, 5, V, device=device), -1)
    tau = 0.05 if tau_kind == "float" else (torch.rand(15, device=device) * 0.1 + 0.02).requires_grad_()
    _check(x, W, y, None, torch.float32, tau, normalize=True, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_normface_k_dimensional(backend, device, reduction):
    """normalize=True with a K-dimensional weight normalises each W[c, k, :] over D."""
    x, W = torch.randn(N, D, device=device), torch.randn(5, 3, D, device=device)
    y = torch.randint(0, 5, (N, 3), device=device)
    _check(x, W, y, None, torch.float32, 0.1, normalize=True, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,weighted,smoothing", [(False, False, 0.0), (True, True, 0.0), (True, False, 0.1),
                                                     (False, True, 0.2)])
def test_probability_targets(backend, device, dtype, reduction, bias, weighted, smoothing):
    """Float targets of the logits' shape are class probabilities, as in torch: loss and the gradients
    of input, weight, bias, τ and the target itself."""
    x, W = torch.randn(N, D, device=device), torch.randn(V, D, device=device) * 0.5
    b = torch.randn(V, device=device) if bias else None
    probs = torch.softmax(torch.randn(N, V, device=device) * 2, -1)
    w = torch.rand(V, device=device) + 0.2 if weighted else None
    tau = torch.tensor(0.7, device=device, requires_grad=True)
    _check(x, W, probs, b, dtype, tau, weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("targets", ["classes", "probabilities"])
def test_k_dimensional_weight(backend, device, reduction, targets):
    """linear_weight (C, d1, d2, D): logits (N, C, d1, d2), target (N, d1, d2) or (N, C, d1, d2), as in
    torch; with a bias (C, d1, d2), class weights, label smoothing, an ignored position and one τ per row."""
    C, out = 7, (2, 3)
    x, W = torch.randn(N, D, device=device), torch.randn(C, *out, D, device=device) * 0.5
    b = torch.randn(C, *out, device=device)
    if targets == "classes":
        y = torch.randint(0, C, (N, *out), device=device)
        y[3, 1, 2] = -100
    else:
        y = torch.softmax(torch.randn(N, C, *out, device=device), 1)
    tau = (torch.rand(N, device=device) + 0.3).requires_grad_()
    _check(x, W, y, b, torch.float32, tau, weight=torch.rand(C, device=device) + 0.2, reduction=reduction,
           label_smoothing=0.1)


@pytest.mark.parametrize("targets", ["classes", "probabilities"])
def test_unbatched_input(backend, device, targets):
    """input (D,): target () (a class) or (C,) (probabilities); reduction 'none' gives a 0-dim loss."""
    x, W, b = torch.randn(D, device=device), torch.randn(V, D, device=device), torch.randn(V, device=device)
    y = torch.tensor(5, device=device) if targets == "classes" else torch.softmax(torch.randn(V, device=device), 0)
    tau = torch.tensor(0.5, device=device, requires_grad=True)
    _check(x, W, y, b, torch.float32, tau, reduction="none", label_smoothing=0.1)


def _opinfo_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [op for op in op_db if op.name == "nn.functional.linear_cross_entropy"]
    assert ops, "torch has no OpInfo for nn.functional.linear_cross_entropy"
    for op in ops:
        for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
            yield op.variant_test_name, sample


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="this torch has no F.linear_cross_entropy")
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")  # torch's own, on its chunked variant
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_opinfo_samples(backend, dtype):
    """Every sample of PyTorch's own OpInfo for F.linear_cross_entropy (every variant: the plain one and
    the chunked ones, whose ``options`` fused_tau accepts and ignores): class and probability targets,
    K-dimensional weights, unbatched input, biases, class weights, ignore_index, every reduction.  Loss
    and every gradient (the probability target's included) equal torch's, judged against torch's own
    function in float64."""
    count = 0
    for variant, sample in _opinfo_samples(dtype):
        args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
        inputs = [t for t in (*args, kwargs.get("linear_bias")) if isinstance(t, torch.Tensor) and t.requires_grad]
        ours = fused_tau.linear_cross_entropy(*args, **kwargs)
        theirs = F.linear_cross_entropy(*args, **kwargs)
        g = torch.rand(ours.shape, dtype=dtype) + 0.5
        ours_grads = torch.autograd.grad((ours * g).sum(), inputs)
        theirs_grads = torch.autograd.grad((theirs * g).sum(), inputs)

        def to64(t):
            return t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t

        args64 = [to64(t) for t in args]
        kwargs64 = {k: to64(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items() if k != "options"}
        inputs64 = [t for t in (*args64, kwargs64.get("linear_bias")) if isinstance(t, torch.Tensor) and t.requires_grad]
        ref = F.linear_cross_entropy(*args64, **kwargs64)
        ref_grads = torch.autograd.grad((ref * g.double()).sum(), inputs64)
        where = f"{variant!r} sample {[tuple(t.shape) for t in args]} {sorted(kwargs)}"
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
        try:
            assert_close_to_ref(ours, ref, dtype, torch_same_dtype=theirs)
            for o, r, t in zip(ours_grads, ref_grads, theirs_grads):
                assert_close_to_ref(o, r, dtype, torch_same_dtype=t)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
        count += 1
    assert count > 100, count


def test_ignore_index_none_and_probabilities(backend):
    """ignore_index=None means -100 for class targets (torch's default); with probability targets an
    ignore_index the caller gives raises, as torch's F.linear_cross_entropy does, while the default
    does not."""
    x, W = torch.randn(4, 8), torch.randn(9, 8)
    y = torch.tensor([0, -100, 2, 3])
    torch.testing.assert_close(fused_tau.linear_cross_entropy(x, W, y, ignore_index=None),
                               fused_tau.linear_cross_entropy(x, W, y))
    probs = torch.softmax(torch.randn(4, 9), -1)
    torch.testing.assert_close(fused_tau.linear_cross_entropy(x, W, probs),
                               F.linear_cross_entropy(x, W, probs), **tol(torch.float32))
    torch.testing.assert_close(fused_tau.linear_cross_entropy(x, W, probs, ignore_index=None),
                               F.linear_cross_entropy(x, W, probs, ignore_index=None), **tol(torch.float32))
    for given in (-100, 1):
        with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
            F.linear_cross_entropy(x, W, probs, ignore_index=given)
        with pytest.raises(ValueError, match="ignore_index cannot be specified when target contains probabilities"):
            fused_tau.linear_cross_entropy(x, W, probs, ignore_index=given)


def test_options_are_accepted_and_change_nothing(backend):
    """torch's chunking options: accepted, no effect (fused_tau never builds the logits); anything else
    in their place is refused."""
    x, W, y = torch.randn(6, 8), torch.randn(9, 8), torch.randint(0, 9, (6,))
    plain = fused_tau.linear_cross_entropy(x, W, y)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
        torch.testing.assert_close(fused_tau.linear_cross_entropy(x, W, y, options=options), plain, rtol=0, atol=0)
    with pytest.raises(TypeError, match="options must be None or a torch.nn.LinearCrossEntropyOptions, got dict"):
        fused_tau.linear_cross_entropy(x, W, y, options={"batch_chunk_size": 2})


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_narrow_integer_targets(backend, dtype):
    """Class targets of any integer dtype (more than torch, which wants int64) mean the same classes."""
    x, W = torch.randn(5, 8), torch.randn(9, 8)
    y = torch.tensor([0, 3, 8, 2, 5])
    torch.testing.assert_close(fused_tau.linear_cross_entropy(x, W, y.to(dtype), reduction="none"),
                               fused_tau.linear_cross_entropy(x, W, y, reduction="none"), rtol=0, atol=0)


def test_uint8_target_does_not_wrap_ignore_index(backend):
    """uint8 156 is the class 156, out of range for C = 9, not ignore_index -100 wrapped to uint8: an
    IndexError on both backends, as torch's cross-entropy gives for class 156 (the comparison is in int64)."""
    x, W = torch.randn(2, 8), torch.randn(9, 8)
    y = torch.tensor([156, 3], dtype=torch.uint8)
    with pytest.raises(IndexError):
        F.cross_entropy(F.linear(x, W), y.long())
    with pytest.raises(IndexError, match="target holds a class index outside \\[0, 9\\)"):
        fused_tau.linear_cross_entropy(x, W, y)


def test_nan_propagates_with_probability_targets(backend):
    """NaN in one row's input or target: the loss and the gradients of input, weight and τ are NaN,
    as in the composition."""
    for poisoned in ("input", "target"):
        x, W = torch.randn(4, 8), torch.randn(9, 8).requires_grad_()
        probs = torch.softmax(torch.randn(4, 9), -1)
        (x if poisoned == "input" else probs)[1, 2] = float("nan")
        x.requires_grad_()
        tau = torch.tensor(0.5, requires_grad=True)
        loss = fused_tau.linear_cross_entropy(x, W, probs, tau=tau)
        loss.backward()
        assert loss.isnan()
        assert x.grad[1].isnan().any() and W.grad.isnan().any() and tau.grad.isnan()


def test_autocast_loss_is_fp32_unrounded(backend):
    """Under autocast a bf16 input gives an fp32 loss, as torch's losses do, without rounding it to bf16."""
    x, W = torch.randn(16, 32).bfloat16(), torch.randn(50, 32).bfloat16()
    y = torch.randint(0, 50, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_tau.linear_cross_entropy(x, W, y, tau=0.3)
    ref = reference.linear_cross_entropy(x.double(), W.double(), y, tau=0.3)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, ref, torch.float32)


def test_module_loads_torch_state_dict(backend):
    """fused_tau.LinearCrossEntropyLoss mirrors torch 2.13's nn.LinearCrossEntropyLoss (owns its Linear,
    K-dimensional out_features, a bias, class weights as a buffer): a torch module's state_dict loads into
    it and gives torch's loss and gradients; at τ = 1 nothing else differs."""
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("this torch has no nn.LinearCrossEntropyLoss")
    w = torch.rand(5) + 0.5
    kwargs = dict(out_features=(2, 3), bias=True, weight=w, reduction="sum", ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 5, **kwargs)
    ours = fused_tau.LinearCrossEntropyLoss(8, 5, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert ours.extra_repr() == theirs.extra_repr() + ", tau=1.0, normalize=False"
    for name in ("num_classes", "out_features", "reduction", "ignore_index", "label_smoothing", "options"):
        assert getattr(ours, name) == getattr(theirs, name), name
    x = torch.randn(6, 8)
    for y in (torch.randint(0, 5, (6, 2, 3)), torch.softmax(torch.randn(6, 5, 2, 3), 1)):
        if y.is_floating_point():  # torch refuses an ignore_index with probabilities: so do we
            theirs.ignore_index = ours.ignore_index = None
        lt, lo = theirs(x, y), ours(x, y)
        torch.testing.assert_close(lo, lt, **tol(torch.float32))
        gt = torch.autograd.grad(lt, list(theirs.parameters()))
        go = torch.autograd.grad(lo, list(ours.parameters()))
        for a, b in zip(go, gt):
            torch.testing.assert_close(a, b, **tol(torch.float32))


def test_module_tau_and_normalize(backend):
    """``tau`` (a float or a learnable nn.Parameter) and ``normalize`` are keyword-only; the module equals
    the function on its reshaped weight and bias."""
    loss = fused_tau.LinearCrossEntropyLoss(8, 4, out_features=(3,), bias=True,
                                            tau=torch.nn.Parameter(torch.tensor(0.2)), normalize=True)
    assert {n for n, _ in loss.named_parameters()} == {"tau", "linear.weight", "linear.bias"}
    with pytest.raises(TypeError):
        fused_tau.LinearCrossEntropyLoss(8, 4, (3,))
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5, 3))
    out = loss(x, y)
    out.backward()
    assert loss.tau.grad is not None and loss.tau.grad.isfinite()
    expected = fused_tau.linear_cross_entropy(x, loss.linear.weight.reshape(4, 3, 8), y,
                                              linear_bias=loss.linear.bias.reshape(4, 3), tau=0.2, normalize=True)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="weight must have shape \\(4,\\)"):
        fused_tau.LinearCrossEntropyLoss(8, 4, weight=torch.ones(5))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(linear_weight=torch.randn(9, 7)), ValueError, "linear_weight must be \\(C, 8\\) or \\(C, d1, ..., dK, 8\\)"),
    (dict(linear_weight=torch.randn(9, 2, 8), input=torch.randn(2, 2, 8)), ValueError,
     "a K-dimensional linear_weight \\(9, 2, 8\\) needs input of shape \\(N, 8\\)"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape \\(4,\\) \\(class indices\\) or "
                                                       "\\(4, 9\\) \\(class probabilities\\)"),
    (dict(target=torch.rand(4)), TypeError, "target must hold class indices"),
    (dict(target=torch.ones(4, 9, dtype=torch.int64)), TypeError, "holds class probabilities and must be a float"),
    (dict(target=torch.tensor([0, 1, 2, 9])), IndexError, "target holds a class index outside \\[0, 9\\)"),
    (dict(linear_bias=torch.randn(8)), ValueError, "linear_bias must have shape \\(9,\\)"),
    (dict(weight=torch.randn(3)), ValueError, "weight must have shape \\(9,\\)"),
    (dict(tau=0.0), ValueError, "tau must be positive"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing must be a float in \\[0, 1\\]"),
    (dict(linear_weight=torch.randn(9, 8, device="meta")), ValueError, "linear_weight is on meta"),
])
def test_bad_linear_ce_input(no_launch, kwargs, exc, match):
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
    """The Triton backward's two routes (kernels/tile_bwd.py): fused dA / dB kernels, or chunks of P / τ
    multiplied by GEMMs (auto for D > BLOCK_DO, the LLM head), with a bias, class weights, label
    smoothing, an ignored row and a learnable τ."""
    import fused_tau.kernels.tile_bwd as tile_bwd

    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route.split("-")[0])
    if route.endswith("one-chunk"):
        monkeypatch.setattr(tile_bwd, "MATERIALIZED_CHUNK_ELEMENTS", 1 << 20)
    x, W, b = torch.randn(N, D, device=device), torch.randn(V, D, device=device) * 0.5, torch.randn(V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[4] = -100
    tau = torch.tensor(0.7, device=device, requires_grad=True)
    _check(x, W, y, b, dtype, tau, weight=torch.rand(V, device=device) + 0.2, label_smoothing=0.1)


def test_llm_head_backward_memory_within_a_tenth_of_inputs_and_gradients(backend):
    """An LLM-style head (V·D ≫ N·D), bf16: the backward's extra memory beyond inputs and gradients
    (x, W and their gradients) stays within 10% of them, on the torch path and on the Triton kernels'
    materialized route (D > BLOCK_DO: chunks of ds, da's fp32 sum).  It held a full fp32 copy of dW
    (K × D, 2.1 GB at V = 128256, D = 4096) to add the target column's term, twice W's own bf16
    gradient."""
    g = torch.Generator().manual_seed(0)
    N, D, V = (16, 128, 16384) if backend == "torch" else (16, 64, 4096)
    x = torch.randn(N, D, generator=g).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = y[5]  # a row of W that two targets share
    loss = fused_tau.linear_cross_entropy(x, W, y)
    held = 2 * (x.numel() * x.element_size() + W.numel() * W.element_size())

    def backward():
        loss.backward()

    extra = _peak(backward) - (held - x.numel() * x.element_size() - W.numel() * W.element_size())
    assert extra <= held / 10, (extra, held)


def test_fp32_accumulated_gemm_is_not_rounded_to_bf16():
    """accumulate_mm (the LLM-head backward's da += ds @ W[chunk], kernels/tile_bwd.py) adds the product in
    fp32: it was rounded to bf16 first (2^-9 relative), now as exact as an fp32 sum."""
    import fused_tau.kernels.tile_bwd as tile_bwd

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 256, generator=g).to(torch.bfloat16)
    w = torch.rand(256, 96, generator=g).to(torch.bfloat16)
    acc = torch.rand(64, 96, generator=g)
    exact = acc.double() + x.double() @ w.double()
    tile_bwd.accumulate_mm(acc, x, w)
    assert ((acc.double() - exact).abs() / exact.abs()).max() < 1e-5
