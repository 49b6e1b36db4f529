"""The contrastive losses' work on the device (issue 14): infonce's and NT-Xent's backward are launches only
(no torch operator computes on the N × K logits or their statistics), and the losses' reductions are formed
by the tile forward's combine, deterministically.  The grid and its splits: test_tile_splits.py."""
import pytest
import torch

import fused_tau
from fused_tau import reference

from .compare import check_against_reference
from .test_row_splits import _recorded_launches
from .tolerances import assert_close_to_ref

pytest.importorskip("triton")


# ---------------------------------------------------------------------------- infonce's backward on the device

_ALLOCATION_OR_VIEW = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::detach", "aten::view",
                       "aten::reshape", "aten::_unsafe_view", "aten::expand", "aten::alias", "aten::t"}


def _computed_ops(call):
    """The operators (schema names) ``call()`` dispatches, allocations and views left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        call()
    return [name for name in rec.names if name not in _ALLOCATION_OR_VIEW]


@pytest.mark.parametrize("kind", ["queue", "in_batch", "in_batch_none", "queue_learnable_tau"])
@pytest.mark.parametrize("route", ["fused", "materialized"])
def test_infonce_backward_is_launches_only(backend, device, monkeypatch, kind, route):
    """Issue 14: infonce's backward was twelve torch operators around the tiles' kernel (u from the
    statistics, the splits' sum and its cast, the positive's rank-one terms and their casts); now the
    tiles' kernels form u from the incoming gradient (SCALE_FROM_G) and one rows kernel a gradient adds
    the splits and the positive's terms (_tile_bwd_rows_kernel): the backward is the custom op alone (and
    τ's own reduction when τ learns), against the float64 reference."""
    import fused_tau.kernels.tile_bwd as tile_bwd
    import fused_tau.kernels.tile_softmax_bwd as tile_softmax_bwd


    if backend != "triton":
        pytest.skip("the kernels' launches")
    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route)
    launched = _recorded_launches(monkeypatch, tile_bwd,
                                  ("_tile_bwd_da_kernel", "_tile_bwd_db_kernel", "_tile_bwd_probs_kernel"))
    _recorded_launches(monkeypatch, tile_softmax_bwd, ("_tile_bwd_rows_kernel",), launched)
    N, K, D = 19, 37, 20
    q, k = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    queue = torch.randn(K, D, device=device) if kind.startswith("queue") else None
    tau = torch.tensor(0.2, device=device, requires_grad=True) if kind.endswith("learnable_tau") else 0.2
    reduction = "none" if kind.endswith("none") else "mean"
    args = [q, k] + ([queue] if queue is not None else [])

    def fn(*xs, tau):
        return fused_tau.infonce(*xs[:2], xs[2] if len(xs) > 2 else None, tau=tau, reduction=reduction)

    def ref_fn(*xs, tau):
        return reference.infonce(*xs[:2], xs[2] if len(xs) > 2 else None, tau=tau, reduction=reduction)

    check_against_reference(fn, ref_fn, args, dtype=torch.float32, tau=tau)

    xs = [t.clone().requires_grad_(i < 2) for i, t in enumerate(args)]  # MoCo's queue takes no gradient
    if isinstance(tau, torch.Tensor):
        tau.grad = None  # no accumulation into the check's gradient
    loss = fn(*xs, tau=tau)
    g = torch.rand(loss.shape, device=device) + 0.5
    launched.clear()
    computed = _computed_ops(lambda: loss.backward(g))
    # a learnable τ: the rows' dL/dτ_i summed into τ's one element (reduce_tau_grad)
    assert computed == ["fused_tau::infonce_bwd"] + (["aten::sum"] if kind.endswith("learnable_tau") else []), computed
    rows = [name for name, _ in launched if name == "_tile_bwd_rows_kernel"]
    assert len(rows) == (2 if kind.startswith("in_batch") else 1), launched


@pytest.mark.parametrize("learn_tau", [False, True])
@pytest.mark.parametrize("route", ["fused", "materialized"])
def test_nt_xent_backward_is_launches_only(backend, device, monkeypatch, route, learn_tau):
    """NT-Xent's backward was about fifteen torch operators around the tiles' two kernels (u, the splits' sums,
    da + db, the positive's terms at both ends of each pair by gather and index_add); now ntxent_bwd: the
    tiles' kernels and two rows launches (da's rows, then db's with da added, rounded once), against the
    float64 reference."""
    import fused_tau.kernels.tile_bwd as tile_bwd
    import fused_tau.kernels.tile_softmax_bwd as tile_softmax_bwd
    from fused_tau.contrastive import LossOptions, NTXentFunction


    if backend != "triton":
        pytest.skip("the kernels' launches")
    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route)
    launched = _recorded_launches(monkeypatch, tile_softmax_bwd, ("_tile_bwd_rows_kernel",))
    N, D = 9, 20
    z1, z2 = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    tau = torch.tensor(0.3, device=device, requires_grad=learn_tau)
    check_against_reference(fused_tau.nt_xent, reference.nt_xent, [z1, z2], dtype=torch.float32,
                            tau=tau if learn_tau else 0.3)

    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1).requires_grad_()
    tau.grad = None
    loss = NTXentFunction.apply(z, tau, LossOptions("triton"))
    # the backend alone, as the exported Function took it before LossOptions: the same loss
    assert torch.equal(NTXentFunction.apply(z.detach(), tau.detach(), "triton"), loss.detach())
    g = torch.tensor(1.5, device=device)
    launched.clear()
    computed = _computed_ops(lambda: loss.backward(g))
    assert computed == ["fused_tau::ntxent_bwd"] + (["aten::sum"] if learn_tau else []), computed
    assert [name for name, _ in launched] == ["_tile_bwd_rows_kernel"] * 2


# ---------------------------------------------------------------------------- the loss on the device

def _losses(device, dtype, reduction, n=37):
    """(name, fused_tau's loss, the float64 reference's) of every tile-engine loss at ``reduction``
    (clip_loss and nt_xent: 'mean' only), on n rows of odd size."""
    q, k, queue = (torch.randn(rows, 6, device=device) for rows in (n, n, 2 * n + 3))
    tau_rows = torch.rand(n, device=device) * 0.3 + 0.1
    x = [t.to(dtype) for t in (q, k, queue)]
    x64 = [t.double() for t in x]
    out = [("moco", fused_tau.infonce(*x, tau=tau_rows, reduction=reduction),
            reference.infonce(*x64, tau=tau_rows.double(), reduction=reduction)),
           ("in-batch", fused_tau.infonce(x[0], x[1], tau=0.2, reduction=reduction),
            reference.infonce(x64[0], x64[1], tau=0.2, reduction=reduction))]
    if reduction == "mean":
        out += [("clip", fused_tau.clip_loss(x[0], x[1], tau=tau_rows),
                 reference.clip_loss(x64[0], x64[1], tau=tau_rows.double())),
                ("nt_xent", fused_tau.nt_xent(x[0], x[1], tau=0.5), reference.nt_xent(x64[0], x64[1], tau=0.5))]
    return out


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_reduced_by_the_combine(backend, device, monkeypatch, dtype, reduction):
    """Issue 14: infonce (MoCo, in-batch), clip_loss and nt_xent write their loss in the combine, in the
    dtype they return (the input's; fp32 under autocast): per row for 'none', the rows' mean or sum by
    the combine's last program (5 programs of 8 rows here, the sum 8 rows a step, the last partial),
    against the float64 reference; rounded once (the bf16 loss is the autocast fp32 one rounded to
    nearest even, not a truncation)."""
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "COMBINE_REDUCE_BLOCK", 8)
    for name, ours, ref in _losses(device, dtype, reduction):
        assert ours.dtype == dtype and ours.shape == ref.shape, (name, ours.dtype, ours.shape)
        assert_close_to_ref(ours, ref, dtype, scale=4.0 if reduction == "sum" else 1.0)
    if dtype == torch.bfloat16:
        torch.manual_seed(1)
        plain = _losses(device, dtype, reduction)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            torch.manual_seed(1)
            autocast = _losses(device, dtype, reduction)
        for (name, rounded, _), (_, fp32, _) in zip(plain, autocast):
            assert fp32.dtype == torch.float32, name
            assert torch.equal(rounded, fp32.to(torch.bfloat16)), name


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_loss_reduction_is_deterministic(backend, device, monkeypatch):
    """The combine's reduction sums the rows in row order whichever program arrives last: two runs give
    the same bits, so do 8- and 32-row combine programs (another count of tickets, another last
    arriver), and every ticket is back at 0 after the launches."""
    import fused_tau.kernels.row_engine as row_engine
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "COMBINE_REDUCE_BLOCK", 8)

    def run():
        torch.manual_seed(3)
        return [ours for reduction in ("mean", "sum") for _, ours, _ in _losses(device, torch.float32, reduction)]

    first, second = run(), run()
    monkeypatch.setattr(tile_engine, "COMBINE_BLOCK", 32)
    wide = run()
    for a, b, c in zip(first, second, wide):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(int(t.abs().sum()) == 0 for t in row_engine._TICKETS.values())  # host-ok: CPU test


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contrastive_forward_ends_with_the_combine(backend, device, monkeypatch, dtype):
    """infonce's (reductions 'mean' and 'sum'), nt_xent's and clip_loss's forwards are the tile launch
    and the combine, and no torch operator computes after the combine (was a mean / sum and a cast
    to the input's dtype: two launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fused_tau.kernels.tile_clip as tile_clip
    import fused_tau.kernels.tile_fwd as tile_fwd

    events = []
    _recorded_launches(monkeypatch, tile_fwd, ("_tile_fwd_kernel", "_tile_combine_kernel"), events)
    _recorded_launches(monkeypatch, tile_clip, ("_clip_combine_kernel",), events)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            events.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    # views of the statistics saved for the backward; nothing that launches
    views = {"slice", "select", "unbind", "alias", "detach", "view", "_unsafe_view", "as_strided"}
    q, k, queue = (torch.randn(n, 6, device=device).to(dtype) for n in (13, 13, 29))
    calls = {"infonce mean": lambda: fused_tau.infonce(q, k, queue, tau=0.2),
             "infonce sum": lambda: fused_tau.infonce(q, k, tau=0.2, reduction="sum"),
             "nt_xent": lambda: fused_tau.nt_xent(q, k, tau=0.5),
             "clip_loss": lambda: fused_tau.clip_loss(q, k, tau=0.2)}
    for name, call in calls.items():
        events.clear()
        with Ops():
            out = call()
        launches = [e for e in events if isinstance(e, tuple)]
        combine = "_clip_combine_kernel" if name == "clip_loss" else "_tile_combine_kernel"
        assert [kernel for kernel, _ in launches] == ["_tile_fwd_kernel", combine], (name, launches)
        after = events[events.index(launches[-1]) + 1:]
        assert set(after) <= views, (name, after)
        assert out.dtype == dtype and out.shape == ()
