"""Calls that reach every kernel and the options that change its code (targets, weights, label
smoothing, τ gradients, single-block rows, fp32 operands, biases, masked diagonals), for the
resource check: each launch is compiled for sm_90 and sm_80 exactly as it would run, and must spill
nothing and fit a block's shared memory.  The model's timed cases (run.py) are real shapes; these
are small ones (the kernels' blocks are the same), so they compile in seconds."""
import torch
import torch.nn.functional as F

import fused_tau

from .capture import ARCHS, capture, merge_arch


def _x(n, c, dtype, grad=True):
    return torch.randn(n, c).to(dtype).requires_grad_(grad)


def _tau(grad):
    return torch.tensor(0.5, requires_grad=grad)


def _rows(dtype, c):
    x = _x(8, c, dtype)
    g = torch.randn(8, c).to(dtype)
    return x, g


def _softmax_family(dtype, c, tau_grad):
    x, g = _rows(dtype, c)
    tau = _tau(tau_grad)
    fused_tau.softmax(x, -1, tau=tau).backward(g)
    fused_tau.log_softmax(x, -1, tau=tau).backward(g)
    fused_tau.logsumexp(x, -1, tau=tau).sum().backward()


def _cross_entropy(dtype, weighted, smoothing, prob, rows=8, grad=True):
    x = _x(rows, 32000, dtype)
    w = torch.rand(32000) if weighted else None
    y = torch.softmax(torch.randn(rows, 32000), -1).to(dtype) if prob else torch.randint(0, 32000, (rows,))
    if not grad:  # the forward alone, one program a row (row_engine.ROW_CONFIGS's "stream" block)
        with torch.no_grad():
            fused_tau.cross_entropy(x, y, w, label_smoothing=smoothing, tau=_tau(False))
        return
    fused_tau.cross_entropy(x, y, w, label_smoothing=smoothing, tau=_tau(True)).backward()


def _kd(dtype, target, reduction):
    s, t = _x(8, 32000, dtype), _x(8, 32000, dtype)
    y = torch.randint(0, 32000, (8,)) if target else None
    loss = fused_tau.kd_loss(s, t, tau=_tau(True), target=y, reduction=reduction)
    (loss if loss.ndim == 0 else loss.sum()).backward()


def _gumbel(dtype, c, hard):
    x, g = _rows(dtype, c)
    fused_tau.gumbel_softmax(x, 0.5, hard).backward(g)
    fused_tau.sample(x.detach(), tau=0.8)
    fused_tau.sample(x.detach(), tau=0.0)  # greedy


def _contrastive(dtype, d):
    q, k = F.normalize(torch.randn(2, 192, d), dim=-1).to(dtype)
    queue = F.normalize(torch.randn(1024, d), dim=-1).to(dtype).requires_grad_(True)  # the queue's gradient too
    q.requires_grad_(True)
    fused_tau.infonce(q, k, queue, tau=_tau(True)).backward()
    # in-batch, one loss a row (the incoming gradient per row), the key's gradient through the column tiles
    fused_tau.infonce(q.detach().requires_grad_(True), k.detach().requires_grad_(True), tau=_tau(True),
                      reduction="none").sum().backward()
    fused_tau.clip_loss(q.detach().requires_grad_(True), k.detach().requires_grad_(True), tau=_tau(True)).backward()
    fused_tau.nt_xent(q.detach().requires_grad_(True), k.detach().requires_grad_(True), tau=0.5).backward()
    for reduction in ("none", "sum"):  # the combine's loss per row, and its sum (the mean above)
        fused_tau.infonce(q.detach(), k, queue.detach(), tau=0.2, reduction=reduction)


def _linear(dtype, d):
    x = torch.randn(192, d).to(dtype).requires_grad_(True)
    W = (torch.randn(1000, d) / d ** 0.5).to(dtype).requires_grad_(True)
    b = torch.randn(1000).to(dtype).requires_grad_(True)
    y = torch.randint(0, 1000, (192,))
    fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, label_smoothing=0.1).backward()


def variants():
    """(name, zero-argument call) pairs; each runs forward and backward.  The model's cases already
    compile the defaults in bf16 (float τ, class targets, streamed rows, D = 128 and 512): these add
    what changes the code, the largest combinations of flags first (a τ gradient, weights with
    smoothing and probability targets), in bf16 and in fp32 (twice the registers a block)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    out = []
    for dtype, c in ((bf16, 32000), (bf16, 1024), (fp32, 32000), (fp32, 1024)):  # streamed and single-block rows
        dt = str(dtype).replace("torch.", "")
        out.append((f"softmax/log_softmax/logsumexp {dt} C={c} tau_grad",
                    lambda dtype=dtype, c=c: _softmax_family(dtype, c, True)))
        out.append((f"gumbel_softmax/sample {dt} C={c} hard", lambda dtype=dtype, c=c: _gumbel(dtype, c, True)))
    for dtype in (bf16, fp32):
        dt = str(dtype).replace("torch.", "")
        for weighted, smoothing, prob in ((True, 0.1, False), (True, 0.1, True)):
            out.append((f"cross_entropy {dt} weight={weighted} smoothing={smoothing} prob={prob}",
                        lambda dtype=dtype, w=weighted, s=smoothing, p=prob: _cross_entropy(dtype, w, s, p)))
            out.append((f"cross_entropy {dt} weight={weighted} smoothing={smoothing} prob={prob} forward",
                        lambda dtype=dtype, w=weighted, s=smoothing, p=prob: _cross_entropy(dtype, w, s, p, 512,
                                                                                           False)))
        for target, reduction in ((True, "batchmean"), (False, "none")):
            out.append((f"kd_loss {dt} target={target} reduction={reduction}",
                        lambda dtype=dtype, t=target, r=reduction: _kd(dtype, t, r)))
        out.append((f"infonce/clip_loss/nt_xent {dt} D=128", lambda dtype=dtype: _contrastive(dtype, 128)))
        out.append((f"linear_cross_entropy {dt} D=128 bias", lambda dtype=dtype: _linear(dtype, 128)))
    out.append(("linear_cross_entropy bfloat16 D=512 bias", lambda: _linear(bf16, 512)))
    out.append(("infonce/clip_loss/nt_xent bfloat16 D=512", lambda: _contrastive(bf16, 512)))
    return out


def launches_of_variants(names=None, progress=None):
    """Every launch the variants make, each run as sm_90 and as sm_80 and compiled for its own (not run)."""
    launches = []
    todo = [(name, call) for name, call in variants() if not names or any(n in name for n in names)]
    for i, (name, call) in enumerate(todo):
        if progress:
            progress(i, len(todo), name)
        runs = {}
        for arch in ARCHS:
            torch.manual_seed(0)
            with capture(arch) as (triton_rec, _):
                call()
            runs[arch] = triton_rec.launches
        for arch in ARCHS[1:]:
            merge_arch(runs[ARCHS[0]], runs[arch], arch)
        for lch in runs[ARCHS[0]]:
            lch.variant = name
        launches.extend(runs[ARCHS[0]])
    return launches
