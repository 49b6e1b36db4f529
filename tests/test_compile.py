"""torch.compile over fused_tau: a training step per loss traced with ``fullgraph=True`` (a graph
break is an error) on both backends, matching eager; ``torch.library.opcheck`` on every custom op
with the arguments the public functions really pass; dynamic batch sizes; bad input and
generators under compile.

CI has no GPU: the ``triton`` backend runs its kernels under the interpreter inside the custom
ops, which is exactly what a compiled graph calls on CUDA (the op is opaque to Inductor).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fused_tau as ft
from .conftest import DEVICE
from .tolerances import tol

pytestmark = pytest.mark.slow  # minutes, not seconds: `pytest -m "not slow"` leaves it out

D_IN, D, C, N, K = 12, 8, 11, 6, 20


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """The backend choice is a constant of a compiled graph: every test compiles afresh."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """An embedding body, a classifier head, a frozen teacher and a learnable temperature."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D_IN, D)
        self.head = nn.Linear(D, C)
        self.teacher = nn.Linear(D_IN, C).requires_grad_(False)
        self.temperature = ft.Temperature(0.5)
        self.normface = ft.LinearCrossEntropyLoss(D, C, tau=0.1, normalize=True)  # a cosine classifier head


def _batch():
    y = torch.randint(0, C, (N,))
    y[2] = -100
    batch = dict(x=torch.randn(N, D_IN), x2=torch.randn(N, D_IN), y=y, w=torch.rand(C) + 0.5,
                 probs=torch.softmax(torch.randn(N, C), -1), queue=F.normalize(torch.randn(K, D), dim=1))
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _emb(net, x):
    return F.normalize(net.body(x), dim=1)


def _logits(net, b):
    return net.head(torch.relu(net.body(b["x"])))


# Each loss as a training step's forward: (net, batch) -> a scalar whose backward trains net.
STEPS = {
    "softmax": lambda net, b: (ft.softmax(_logits(net, b), tau=net.temperature()) * b["probs"]).sum(),
    "log_softmax": lambda net, b: -(ft.log_softmax(_logits(net, b), tau=0.7) * b["probs"]).sum(1).mean(),
    "logsumexp": lambda net, b: ft.logsumexp(_logits(net, b), tau=net.temperature()).mean(),
    "cross_entropy": lambda net, b: ft.cross_entropy(_logits(net, b), b["y"], tau=net.temperature(), weight=b["w"],
                                                     label_smoothing=0.1),
    "cross_entropy_probs": lambda net, b: ft.cross_entropy(_logits(net, b), b["probs"], tau=0.3),
    "cross_entropy_inplace_backward": lambda net, b: ft.cross_entropy(_logits(net, b), b["y"], tau=0.3,
                                                                      inplace_backward=True),
    "CrossEntropyLoss": lambda net, b: ft.CrossEntropyLoss(tau=0.2, reduction="sum")(_logits(net, b), b["y"]),
    "kd_loss": lambda net, b: ft.kd_loss(_logits(net, b), net.teacher(b["x"]), tau=2.0, target=b["y"].clamp(min=0)),
    "kd_loss_none": lambda net, b: ft.kd_loss(_logits(net, b), net.teacher(b["x"]), tau=net.temperature(),
                                              reduction="none").sum(),
    "infonce_queue": lambda net, b: ft.InfoNCELoss(tau=0.2)(_emb(net, b["x"]), _emb(net, b["x2"]).detach(), b["queue"]),
    "infonce_in_batch": lambda net, b: ft.infonce(_emb(net, b["x"]), _emb(net, b["x2"]), tau=net.temperature()),
    "clip_loss": lambda net, b: ft.clip_loss(_emb(net, b["x"]), _emb(net, b["x2"]), tau=net.temperature()),
    "nt_xent": lambda net, b: ft.nt_xent(_emb(net, b["x"]), _emb(net, b["x2"]), tau=0.5),
    "linear_cross_entropy": lambda net, b: ft.linear_cross_entropy(
        torch.relu(net.body(b["x"])), net.head.weight, b["y"], linear_bias=net.head.bias, weight=b["w"],
        label_smoothing=0.1, tau=net.temperature()),
    "linear_cross_entropy_normface": lambda net, b: net.normface(net.body(b["x"]), b["y"]),
    "gumbel_softmax": lambda net, b: (ft.gumbel_softmax(_logits(net, b), 0.5) * b["probs"]).sum(),
    "gumbel_softmax_hard": lambda net, b: (ft.gumbel_softmax(_logits(net, b), 0.5, hard=True) * b["probs"]).sum(),
}


def _run(step, net, batch, seed=1):
    torch.manual_seed(seed)  # the Gumbel steps draw their seed from the default generator
    net.zero_grad(set_to_none=True)
    loss = step(net, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def _assert_same(compiled, eager):
    t = tol(torch.float32)
    torch.testing.assert_close(compiled[0], eager[0], **t)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], **t, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", sorted(STEPS))
def test_compiled_training_step_matches_eager(backend, name):
    """fullgraph=True through Inductor: dynamo traces the public function and its autograd Function,
    the launchers are custom ops, and loss and every parameter's gradient equal eager's."""
    torch._inductor.config.fallback_random = True  # Inductor draws the Gumbel seed as eager does
    net, batch = Net().to(DEVICE), _batch()
    eager = _run(STEPS[name], copy.deepcopy(net), batch)
    compiled_step = torch.compile(STEPS[name], fullgraph=True, backend="inductor")
    _assert_same(_run(compiled_step, net, batch), eager)
    assert net.body.weight.grad.abs().sum() > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs are a CUDA notion")
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("name", sorted(STEPS))
def test_no_host_sync_on_cuda(backend, name):
    """torch.cuda.set_sync_debug_mode("error"): on the Triton path a training step's forward and
    backward never wait for the GPU (a warm-up step first: Triton's first launch compiles)."""
    net, batch = Net().to(DEVICE), _batch()
    _run(STEPS[name], net, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = STEPS[name](net, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_moco_step_with_queue(backend):
    """A MoCo step compiled whole (query encoder, momentum keys, learnable τ, the loss against the
    queue), then the queue's enqueue compiled too, after the backward (MoCoQueue's docstring)."""
    net, batch = Net().to(DEVICE), _batch()
    key_net = copy.deepcopy(net).requires_grad_(False)
    criterion = ft.InfoNCELoss(tau=0.2, learnable_tau=True)

    def step(net, queue, criterion, b):
        q = _emb(net, b["x"])
        with torch.no_grad():
            k = _emb(key_net, b["x2"])
        return criterion(q, k, queue), k

    def enqueue(queue, k):
        queue.enqueue(k)

    results = []
    for compile_ in (lambda f: f, lambda f: torch.compile(f, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(3)
        queue, net_i, crit = ft.MoCoQueue(D, K).to(DEVICE), copy.deepcopy(net), copy.deepcopy(criterion)
        step_i, enqueue_i = compile_(step), compile_(enqueue)
        first, k = step_i(net_i, queue, crit, batch)
        first.backward()
        enqueue_i(queue, k)
        second, _ = step_i(net_i, queue, crit, batch)  # against a queue that now holds this batch's keys
        results.append((first.detach(), second.detach(), net_i.body.weight.grad, crit.temperature.log_tau.grad,
                        queue.queue.clone(), queue.ptr.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol(torch.float32))
    assert int(results[1][5]) == N and not torch.equal(results[1][0], results[1][1])


def test_compiled_step_under_autocast(backend):
    """bf16 autocast inside the compiled step: the losses come back fp32 (as torch's do), the
    gradients in the parameters' dtype, and both equal eager autocast's."""
    net, batch = Net().to(DEVICE), _batch()

    def step(net, b):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            ce = ft.cross_entropy(_logits(net, b), b["y"], tau=0.5)
            nce = ft.infonce(_emb(net, b["x"]), _emb(net, b["x2"]), b["queue"], tau=0.2)
        assert ce.dtype == nce.dtype == torch.float32
        return ce + nce

    eager = _run(step, copy.deepcopy(net), batch)
    compiled = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), net, batch)
    assert compiled[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in compiled[1].values())
    for got, want in zip((compiled[0], *compiled[1].values()), (eager[0], *eager[1].values())):
        torch.testing.assert_close(got, want, **tol(torch.bfloat16))


def test_dynamic_batch_size(backend):
    """dynamic=True: the fake implementations take symbolic sizes; two batch sizes, one graph."""
    torch.manual_seed(0)
    W = torch.randn(C, D, device=DEVICE, requires_grad=True)

    def step(h, y):
        return ft.cross_entropy(h @ W.T, y, tau=0.5) + ft.linear_cross_entropy(h, W, y, tau=0.5)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 9):
        h, y = torch.randn(n, D, device=DEVICE), torch.randint(0, C, (n,), device=DEVICE)
        torch.testing.assert_close(compiled(h, y), step(h, y), **tol(torch.float32))


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA: tests/test_bad_input.py, in a child process")
def test_bad_target_raises_under_compile(backend):
    """The data check goes through torch._assert_async in a compiled graph: still an error, no sync."""
    f = torch.compile(lambda x, y: ft.cross_entropy(x, y), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="class index outside"):
        f(torch.randn(2, 3), torch.tensor([0, 5]))


def test_generator_under_fullgraph_is_a_clear_error(backend):
    """Dynamo cannot trace a torch.Generator: fullgraph says so by name; without fullgraph the call
    falls back to eager and draws the same sample as eager."""
    x = torch.randn(4, 5, device=DEVICE)
    f = torch.compile(lambda x, g: ft.gumbel_softmax(x, 0.5, generator=g), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="generator must be None under torch.compile"):
        f(x, torch.Generator(DEVICE).manual_seed(3))
    lenient = torch.compile(lambda x, g: ft.gumbel_softmax(x, 0.5, generator=g), backend="aot_eager")
    torch.testing.assert_close(lenient(x, torch.Generator(DEVICE).manual_seed(3)),
                               ft.gumbel_softmax(x, 0.5, generator=torch.Generator(DEVICE).manual_seed(3)))


def test_sample_compiles(backend):
    torch._inductor.config.fallback_random = True
    x = torch.randn(N, C, device=DEVICE)
    f = torch.compile(lambda x: ft.sample(x, tau=0.7), fullgraph=True, backend="inductor")
    torch.manual_seed(5)
    got = f(x)
    torch.manual_seed(5)
    assert torch.equal(got, ft.sample(x, tau=0.7))


# ---------------------------------------------------------------------------- opcheck

class _RecordOps(TorchDispatchMode):
    """Records each fused_tau custom op call (arguments cloned before the op runs)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_tau":
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else (  # noqa: E731
                [clone(t) for t in v] if isinstance(v, list) else v)
            self.calls.append((func, [clone(a) for a in args], dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def _recorded_calls():
    """Every public op with the options that change a custom op's outputs, run once in eager."""
    torch.manual_seed(0)
    x, y, probs = torch.randn(5, 7), torch.tensor([0, 6, -100, 3, 3]), torch.softmax(torch.randn(5, 7), -1)
    tau = torch.tensor(0.6)
    q, k, queue = torch.randn(5, 4), torch.randn(5, 4), torch.randn(9, 4)
    W, bias, w = torch.randn(7, 4), torch.randn(7), torch.rand(7)
    x, y, probs, tau, q, k, queue, W, bias, w = (t.to(DEVICE) for t in (x, y, probs, tau, q, k, queue, W, bias, w))

    def grad_of(fn, *inputs):
        inputs = [t.clone().requires_grad_() for t in inputs]
        fn(*inputs).sum().backward()

    recorder = _RecordOps()
    with recorder:
        for log in (False, True):
            grad_of(lambda x, t: (ft.log_softmax if log else ft.softmax)(x, tau=t).pow(2), x, tau)
        grad_of(lambda x: ft.softmax(x.view(5, 7, 1), tau=0.5, dim=1).pow(2), x)
        grad_of(lambda x, t: ft.logsumexp(x, tau=t), x, tau)
        grad_of(lambda x: ft.cross_entropy(x, y, tau=0.4, weight=w, label_smoothing=0.1), x)
        grad_of(lambda x, t: ft.cross_entropy(x, probs, tau=t), x, tau)
        grad_of(lambda x: ft.cross_entropy(x * 1, y, tau=0.4, inplace_backward=True), x)
        grad_of(lambda s, t, tt: ft.kd_loss(s, t, tau=tt, target=y.clamp(min=0)), x, x.flip(0), tau)
        grad_of(lambda s: ft.kd_loss(s, x.flip(0), tau=2.0, reduction="none"), x)
        for hard in (False, True):
            grad_of(lambda x: ft.gumbel_softmax(x, 0.5, hard=hard) * probs, x)
        ft.sample(x, tau=0.7)
        ft.sample(x, tau=0.0)
        grad_of(lambda q, k, qu, t: ft.infonce(q, k, qu, tau=t), q, k, queue, tau)
        grad_of(lambda q, k: ft.infonce(q, k, tau=0.2), q, k)
        grad_of(lambda q, k, qu: ft.infonce(q, k, qu, tau=0.2, reduction="none").pow(2), q, k, queue)
        grad_of(lambda q, k: ft.infonce(q.bfloat16(), k.bfloat16(), tau=0.2, reduction="sum").float(), q, k)
        grad_of(lambda a, b: ft.nt_xent(a, b, tau=0.5), q, k)
        grad_of(lambda a, b, t: ft.clip_loss(a, b, tau=t), q, k, tau)
        grad_of(lambda a, b: ft.clip_loss(a, b, tau=0.1), q, k)
        grad_of(lambda h, w, b_, t: ft.linear_cross_entropy(h, w, y, linear_bias=b_, label_smoothing=0.1, tau=t),
                q, W, bias, tau)
        # float64 runs the torch path on either backend
        grad_of(lambda x, t: ft.cross_entropy(x, y, tau=t, label_smoothing=0.1), x.double(), tau.double())
        grad_of(lambda s: ft.kd_loss(s, x.double().flip(0), tau=2.0, target=y.clamp(min=0)), x.double())
        grad_of(lambda q, k: ft.infonce(q, k, queue.double(), tau=0.2), q.double(), k.double())
    return recorder.calls


def test_opcheck_every_custom_op(backend):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch with dynamic
    shapes) on every custom op, each with the arguments the public functions pass it."""
    calls = _recorded_calls()
    # (eager inplace_backward=True runs ce_bwd's implementation with x3 as its dx, without the dispatch:
    # traced code takes the out-of-place backward, recorded above)
    # likewise the eager backward's in-place scaling of the gradient the forward wrote (g = 1: untouched)
    calls += [(torch.ops.fused_tau.ce_grad_rescale.default, [args[0].clone(), torch.full((1,), g, device=DEVICE),
                                                            next(a for a in args if isinstance(a, str))], {})
              for func, args, kwargs in calls if func._name == "fused_tau::ce_fwd_grad" for g in (1.0, 2.5)]
    names = {func._name for func, _, _ in calls}
    registered = {name for name in dir(torch.ops.fused_tau) if not name.startswith("_")} - {"name"}
    ours = {"fused_tau::" + n for n in registered if isinstance(getattr(torch.ops.fused_tau, n),
                                                                 torch._ops.OpOverloadPacket)}
    assert names == ours, f"ops never exercised: {ours - names}"
    checked = set()
    for func, args, kwargs in calls:
        key = (func._name, tuple(a.dtype if isinstance(a, torch.Tensor) else None if a is None else
                                 a if isinstance(a, (bool, int, float, str)) else type(a) for a in args))
        if key in checked:
            continue
        checked.add(key)
        torch.library.opcheck(func, args, kwargs)


def test_no_host_reads_on_the_path():
    """No .item() / .tolist() / .cpu() / .numpy() / synchronize() in the package outside lines marked
    ``host-ok`` (a host read is a stall on CUDA and a graph break under torch.compile).  The reference
    is the plain composition, not a path fused_tau serves."""
    import pathlib
    import re

    import fused_tau.kernels

    roots = {pathlib.Path(ft.__file__).parent, pathlib.Path(fused_tau.kernels.__file__).parent}
    files = sorted({p for root in roots for p in root.rglob("*.py") if p.name != "reference.py"})
    assert any(p.name == "tile.py" for p in files) and any(p.name == "_ops.py" for p in files)
    pattern = re.compile(r"\.(item|tolist|cpu|numpy)\(\)|synchronize\(")
    offenders = [f"{path}:{i}: {line.strip()}" for path in files
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) and "host-ok" not in line]
    assert not offenders, "\n".join(offenders)


def test_double_backward_is_refused(backend):
    """The backward formulas are not differentiable again: create_graph=True followed by a second
    backward raises (once_differentiable) instead of silently dropping second-order terms."""
    x = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    (g,) = torch.autograd.grad(ft.cross_entropy(x, y, tau=0.5), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        g.pow(2).sum().backward()
