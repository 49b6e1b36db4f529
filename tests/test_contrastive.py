"""infonce (MoCo queue, in-batch), clip_loss, nt_xent, and the modules, against the float64 reference."""
import math

import pytest
import torch

import fused_tau
from fused_tau import reference

from .compare import check_against_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, K, D = 19, 37, 20  # none divides the 16-wide test tiles


def _compare(fn, ref_fn, tensors, tau, dtype, tau_scale=1.0):
    """fn(*tensors, tau) against ref_fn in float64: value and the gradient of every input and of τ."""
    check_against_reference(fn, ref_fn, tensors, dtype=dtype, tau=tau, scale=4.0, tau_scale=tau_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau_kind", ["float", "learnable", "per_row"])
def test_infonce_moco_queue(backend, device, dtype, reduction, tau_kind):
    q, k, queue = (torch.randn(n, D, device=device) for n in (N, N, K))
    tau = {"float": 0.2, "learnable": torch.tensor(0.2, device=device, requires_grad=True),
           "per_row": (torch.rand(N, device=device) * 0.3 + 0.1).requires_grad_()}[tau_kind]
    _compare(lambda q, k, qu, tau: fused_tau.infonce(q, k, qu, tau=tau, reduction=reduction),
             lambda q, k, qu, tau: reference.infonce(q, k, qu, tau=tau, reduction=reduction), [q, k, queue], tau, dtype, tau_scale=N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_in_batch(backend, device, dtype, reduction):
    q, k = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    tau = torch.tensor(0.1, device=device, requires_grad=True)
    _compare(lambda q, k, tau: fused_tau.infonce(q, k, None, tau=tau, reduction=reduction),
             lambda q, k, tau: reference.infonce(q, k, None, tau=tau, reduction=reduction), [q, k], tau, dtype, tau_scale=N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_and_nt_xent(backend, device, dtype):
    a, b = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    tau = torch.tensor(0.07, device=device, requires_grad=True)
    _compare(fused_tau.clip_loss, reference.clip_loss, [a, b], tau, dtype, tau_scale=N)
    tau = torch.tensor(0.5, device=device, requires_grad=True)
    _compare(fused_tau.nt_xent, reference.nt_xent, [a, b], tau, dtype, tau_scale=N)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("tau_kind", ["float", "learnable", "per_row"])
def test_clip_one_pass_sizes(backend, device, n, tau_kind):
    """clip_loss's one pass (clip_fwd / clip_bwd) at sizes around the 16-wide test tiles, one pair (no
    negatives: loss 0) included; τ a float, learnable, or one per index (τ_i for row i of a -> b and of
    b -> a, as infonce(a, b) + infonce(b, a) takes it)."""
    a, b = torch.randn(n, D, device=device), torch.randn(n, D, device=device)
    tau = {"float": 0.2, "learnable": torch.tensor(0.2, device=device, requires_grad=True),
           "per_row": (torch.rand(n, device=device) * 0.3 + 0.1).requires_grad_()}[tau_kind]
    _compare(lambda a, b, tau: fused_tau.clip_loss(a, b, tau=tau), lambda a, b, tau: reference.clip_loss(a, b, tau=tau),
             [a, b], tau, torch.float32, tau_scale=n)


def test_clip_mixed_dtypes_promote_as_the_two_directions(backend, device):
    """a in bf16 and b in fp32: clip_loss is (infonce(a, b) + infonce(b, a)) / 2, whose dtype is the two
    losses' promotion (fp32), not a's (the one pass takes one dtype and leaves this case to the two calls)."""
    a, b = torch.randn(N, D, device=device).to(torch.bfloat16), torch.randn(N, D, device=device)
    ours = fused_tau.clip_loss(a, b, tau=0.2)
    two = (fused_tau.infonce(a, b, tau=0.2) + fused_tau.infonce(b, a, tau=0.2)) / 2
    assert ours.dtype == two.dtype == torch.float32
    torch.testing.assert_close(ours, two)


def test_seed_002_moco_example(backend, device):
    """K = 1024 keys, positive similarity 1, negatives -1: loss 4.94 at τ = 1; at τ = 0.07 'literally
    0.0' in the blog, exactly log1p(1023 e^{-2/0.07}) = 3.9e-10, which fused_tau keeps."""
    q = torch.ones(1, 1, device=device)
    k = torch.ones(1, 1, device=device)
    queue = -torch.ones(1023, 1, device=device)
    assert abs(fused_tau.infonce(q, k, queue, tau=1.0).item() - 4.94) < 5e-3
    exact = math.log1p(1023 * math.exp(-2 / 0.07))
    assert abs(fused_tau.infonce(q, k, queue, tau=0.07).item() - exact) <= 1e-5 * exact


def test_small_tau_keeps_precision(backend, device):
    """A well-separated positive at τ = 1/16: the loss is ~1e-12, and fused_tau returns it to fp32
    precision where F.cross_entropy on the fp32 logits returns 0."""
    base = torch.randn(1, 16, device=device)
    q = torch.nn.functional.normalize(base + 0.01 * torch.randn(4, 16, device=device), dim=1)
    queue = torch.nn.functional.normalize(-base + 0.05 * torch.randn(80, 16, device=device), dim=1)
    ours = fused_tau.infonce(q, q, queue, tau=0.0625, reduction="none")
    exact = reference.infonce(q.double(), q.double(), queue.double(), tau=0.0625, reduction="none")
    assert (exact < 1e-9).all() and (exact > 1e-30).all()
    # relative error of the fp32 logits (|q·k| / τ = 16 from 16-term dot products) times |z_neg - z_pos| = 32
    # bounds what any fp32 computation can do: ~1e-4; torch's composition loses everything
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)
    assert (reference.infonce(q, q, queue, tau=0.0625, reduction="none") == 0).all()  # what fp32 torch gives


def test_moco_queue_ring_buffer(device):
    mq = fused_tau.MoCoQueue(dim=4, size=10).to(device)
    keys = [torch.randn(4, 4, device=device) for _ in range(3)]
    for kk in keys:
        mq.enqueue(kk)
    # 12 keys into 10 slots: the first two keys were overwritten by the last two
    expected = torch.cat([keys[2][2:], keys[0][2:], keys[1], keys[2][:2]])
    expected = torch.cat([keys[2][2:4], keys[0][2:4], keys[1], keys[2][:2]])
    order = torch.cat([keys[0], keys[1], keys[2]])[2:]  # oldest..newest of the survivors
    assert int(mq.ptr) == 2
    torch.testing.assert_close(torch.cat([mq.queue[2:], mq.queue[:2]]), order)
    assert expected.shape == mq.queue.shape
    with pytest.raises(ValueError, match="keys must be"):
        mq.enqueue(torch.randn(3, 5, device=device))


def test_infonce_module_with_queue_and_learnable_tau(backend, device):
    mq = fused_tau.MoCoQueue(dim=D, size=K).to(device)
    loss_fn = fused_tau.InfoNCELoss(tau=0.2, learnable_tau=True).to(device)
    q, k = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    loss = loss_fn(q, k, mq)
    loss.backward()
    assert loss_fn.temperature.log_tau.grad is not None
    torch.testing.assert_close(loss, fused_tau.infonce(q, k, mq.queue, tau=0.2), rtol=1e-5, atol=1e-6)


def test_temperature_is_clamped_like_clip():
    t = fused_tau.Temperature(init=0.07)
    assert abs(t().item() - 0.07) < 1e-6
    with torch.no_grad():
        t.log_tau.fill_(math.log(1e-4))
    assert abs(t().item() - 0.01) < 1e-6  # CLIP's logit scale is clamped at 100
    t().backward()
    assert t.log_tau.grad.item() == 0.0  # no gradient beyond the clamp
    with pytest.raises(ValueError, match="tau_min <= init"):
        fused_tau.Temperature(init=0.0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(key=torch.randn(5, 7)), ValueError, "key must be \\(M, 8\\)"),
    (dict(queue=torch.randn(9, 7)), ValueError, "queue must be \\(K, 8\\)"),
    (dict(queue=torch.randn(9, 8), key=torch.randn(4, 8)), ValueError, "key must hold one positive per query"),
    (dict(key=torch.randn(4, 8)), ValueError, "in-batch key must hold one row per query"),
    (dict(tau=0.0), ValueError, "tau must be positive"),
    (dict(tau=-0.07), ValueError, "tau must be positive"),
    (dict(query=torch.randn(5)), ValueError, "query must be \\(N, D\\)"),
    (dict(queue=torch.randn(9, 8, device="meta")), ValueError, "queue is on meta"),
    (dict(queue=torch.randn(9, 8), gather=True), ValueError, "gather=True applies to in-batch"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
])
def test_bad_infonce_input(no_launch, kwargs, exc, match):
    args = dict(query=torch.randn(5, 8), key=torch.randn(5, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_tau.infonce(**args)


def test_bad_nt_xent_input(no_launch):
    with pytest.raises(ValueError, match="z2 must have z1's shape"):
        fused_tau.nt_xent(torch.randn(4, 8), torch.randn(3, 8))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("route", ["fused", "materialized", "materialized-one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_backward_routes(backend, device, dtype, route, monkeypatch):
    """The Triton backward's two routes (kernels/tile_bwd.py): the fused dA / dB kernels, and the chunks
    of P / τ multiplied by GEMMs (auto for D > BLOCK_DO): the queue, in-batch keys, the diagonal mask."""
    import fused_tau.kernels.tile_bwd as tile_bwd

    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route.split("-")[0])
    if route.endswith("one-chunk"):
        monkeypatch.setattr(tile_bwd, "MATERIALIZED_CHUNK_ELEMENTS", 1 << 20)
    q, k, queue = (torch.randn(n, D, device=device) for n in (N, N, K))
    tau = (torch.rand(N, device=device) * 0.3 + 0.1).requires_grad_()
    _compare(lambda q, k, qu, tau: fused_tau.infonce(q, k, qu, tau=tau, reduction="none"),
             lambda q, k, qu, tau: reference.infonce(q, k, qu, tau=tau, reduction="none"), [q, k, queue], tau, dtype, tau_scale=N)
    for fn, ref_fn in ((fused_tau.clip_loss, reference.clip_loss), (fused_tau.nt_xent, reference.nt_xent)):
        _compare(fn, ref_fn, [q, k], torch.tensor(0.1, device=device, requires_grad=True), dtype, tau_scale=N)
    _compare(lambda q, k, qu, tau: fused_tau.infonce(q, k, qu, tau=tau), lambda q, k, qu, tau: reference.infonce(q, k, qu, tau=tau),
             [q, k, queue[:0]], 0.2, dtype)  # an empty queue: the positive alone, loss 0
