"""Few long rows split across programs (kernels/row_engine.py ``row_splits``): every split path of the
row kernels gives what one program a row gives, and the split is chosen from the rows, the columns and
the SM count.

Rows are streamed in blocks of 16 (odd C, so split boundaries and the last block are partial); the
split runs take one block a split and as many splits as the row has blocks, the unsplit runs forbid
splitting.  The unsplit kernels are checked against float64 references by the other test files."""
import pytest
import torch

from fused_tau import cross_entropy, log_softmax, logsumexp, softmax
from fused_tau.sampling import gumbel_softmax, sample

pytest.importorskip("triton")


@pytest.fixture
def split(monkeypatch):
    """Call ``split(on)`` to allow (on) or forbid row splits; the triton backend, blocks of 16."""
    import fused_tau.kernels.row_engine as row_engine
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setenv("FUSED_TAU_BACKEND", "triton")
    monkeypatch.setattr(row_engine, "MAX_BLOCK", 16)
    monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 64)

    def set_split(on):
        monkeypatch.setattr(row_engine, "MIN_BLOCKS_PER_SPLIT", 1 if on else 1 << 30)

    return set_split


def both(split, fn):
    split(True)
    ours = fn()
    split(False)
    return ours, fn()


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_plan(monkeypatch):
    import fused_tau.kernels.row_engine as row_engine
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 132)
    cpu = torch.device("cpu")
    assert row_engine.row_splits(64, 256000, 4096, cpu) == (4, 65536)  # 63 blocks: 16, 16, 16, 15
    assert row_engine.row_splits(8192, 32000, 4096, cpu)[0] == 1  # the rows fill the SMs
    assert row_engine.row_splits(4, 4096 * 7, 4096, cpu)[0] == 1  # under 2 · MIN_BLOCKS_PER_SPLIT blocks
    splits, span = row_engine.row_splits(3, 100000, 4096, cpu)
    assert span % 4096 == 0 and (splits - 1) * span < 100000 <= splits * span


@pytest.mark.parametrize("C", [37, 100])
def test_softmax_family(split, device, C):
    """softmax, log_softmax, τ·logsumexp and their gradients (τ's too), rows with ±inf and NaN,
    a per-group τ along a class dimension that is not the last."""
    x = torch.randn(3, C, device=device) * 3
    x[1, 5] = float("inf")
    x[2, :] = float("-inf")
    x[2, C - 1] = 0.5
    x = torch.cat([x, torch.full((1, C), float("-inf"), device=device)])
    nan_row = torch.randn(1, C, device=device)
    nan_row[0, C // 2] = float("nan")
    x = torch.cat([x, nan_row])
    w = torch.randn(x.shape, device=device)

    def run(fn, **kw):
        xs = x.clone().requires_grad_(True)
        tau = torch.tensor(0.7, device=device, requires_grad=True)
        y = fn(xs, tau=tau, **kw)
        gy = w if y.dim() == 2 else w[:, 0]
        dx, dtau = torch.autograd.grad((torch.where(y.isfinite(), y, 0.0) * gy).sum(), (xs, tau), allow_unused=True)
        return y.detach(), dx, dtau

    for fn, kw in ((softmax, dict(dim=-1)), (log_softmax, dict(dim=-1)), (logsumexp, dict(dim=-1))):
        for a, b in zip(*both(split, lambda: run(fn, **kw))):
            close(a, b)
    # class dimension 1 of (A, C, B), one τ per a
    x3 = torch.randn(2, C, 3, device=device)
    taus = torch.tensor([0.3, 2.0], device=device)
    close(*both(split, lambda: softmax(x3, dim=1, tau=taus)))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax(split, device, hard):
    """The noise is a function of (seed, row, column): a split row draws the same sample, forward and
    (straight-through) backward; rows with no finite logit, and ties, take the first index."""
    C = 53
    x = torch.randn(4, C, device=device)
    x[3] = float("-inf")

    def run():
        xs = x.clone().requires_grad_(True)
        y = gumbel_softmax(xs, 0.5, hard=hard, generator=torch.Generator(device=device).manual_seed(3))
        (dx,) = torch.autograd.grad((torch.nan_to_num(y) * torch.arange(C, device=device)).sum(), xs)
        return y.detach(), dx

    (y1, d1), (y2, d2) = both(split, run)
    if hard:
        assert torch.equal(y1, y2) and y1[3, 0] == 1
    close(y1, y2)
    close(d1, d2)


def test_sample(split, device):
    """Split rows draw what unsplit rows draw (the noise and the comparison keys are the same); the
    first +inf, the first index of a row without a finite logit, -1 for a row with a NaN (the caller
    raises), τ = 0 and greedy rows are argmax."""
    import fused_tau._ops as ops

    C = 71
    x = torch.randn(8, C, device=device)
    x[1, [20, 60]] = float("inf")
    x[2] = float("-inf")
    x[3, 40:] = x[3, :31]  # equal logits across a split boundary, different noise
    taus = torch.tensor([0.5, 1.0, 1.0, 2.0, 0.0, 1e-3, 30.0, 1.0], device=device)
    gen = lambda: torch.Generator(device=device).manual_seed(11)  # noqa: E731
    a, b = both(split, lambda: sample(x, tau=taus, generator=gen()))
    assert torch.equal(a, b)
    assert a[1] == 20 and a[2] == 0 and a[4] == x[4].argmax()
    a, b = both(split, lambda: sample(x, tau=0.0))
    assert torch.equal(a, b) and torch.equal(a[3:], x[3:].argmax(-1))
    x[5, 50] = float("nan")
    seed = torch.tensor([5], device=device)
    tau = torch.ones(1, device=device)
    for greedy in (False, True):
        (a, ok_a), (b, ok_b) = both(split, lambda: ops.sample("triton", x, tau, seed, greedy))
        assert torch.equal(a, b) and a[5] == -1 and ok_a.item() == 0 and ok_b.item() == 0
        ok_a.fill_(1), ok_b.fill_(1)  # the kept verdict, for the draws that follow (sampling.sample does this)


@pytest.mark.parametrize("C", [37, 100])
@pytest.mark.parametrize("kind", ["index", "smoothing", "probs"])
def test_cross_entropy(split, device, C, kind):
    """Loss and gradients (τ's too) of split rows: class indices with ignore_index and class weights,
    label smoothing, probability targets; rows with a +inf logit, no finite logit (a masked target
    costs +inf) and a NaN."""
    x = torch.randn(5, C, device=device) * 4
    x[1, 7] = float("inf")
    x[2, : C - 3] = float("-inf")
    x[3, C // 2] = float("nan")
    weight = torch.rand(C, device=device) + 0.5
    if kind == "probs":
        target = torch.softmax(torch.randn(5, C, device=device), -1)
        kw = dict(label_smoothing=0.1)
    else:
        target = torch.tensor([3, C - 1, C - 2, 0, -100], device=device)
        kw = dict(weight=weight, ignore_index=-100, label_smoothing=0.2 if kind == "smoothing" else 0.0)

    def run(reduction):
        xs = x.clone().requires_grad_(True)
        tau = torch.tensor(0.6, device=device, requires_grad=True)
        loss = cross_entropy(xs, target, tau=tau, reduction=reduction, **kw)
        scale = torch.arange(1.0, loss.numel() + 1, device=device).view(loss.shape)
        dx, dtau = torch.autograd.grad((torch.nan_to_num(loss, posinf=0.0) * scale).sum(), (xs, tau))
        return loss.detach(), dx, dtau

    for reduction in ("none", "sum"):
        for a, b in zip(*both(split, lambda: run(reduction))):
            close(a, b)


def test_split_paths_are_taken(split, device, monkeypatch):
    """The tests above take the split paths: the launchers plan three splits of 16 columns (softmax,
    cross-entropy, τ·logsumexp and softmax forward and backward), sample three of its 64-column groups,
    cross-entropy's forward alone five of its streamed 8-column blocks."""
    import fused_tau.kernels.row_ce as row_ce
    import fused_tau.kernels.row_engine as row_engine
    import fused_tau.kernels.row_sample as row_sample
    import fused_tau.kernels.row_softmax as row_softmax

    plans = []

    def recorded(*args):
        plans.append(row_engine.row_splits(*args))
        return plans[-1]

    for module in (row_softmax, row_sample, row_ce):
        monkeypatch.setattr(module, "row_splits", recorded)
    split(True)
    x = torch.randn(3, 37, device=device, requires_grad=True)
    (softmax(x, tau=1.0) * torch.arange(37.0, device=device)).sum().backward()
    sample(torch.randn(3, 150, device=device), tau=1.0)  # three groups of four 16-column blocks
    cross_entropy(x, torch.tensor([0, 5, 36], device=device), tau=1.0).backward()
    logsumexp(x, tau=1.0).sum().backward()
    # softmax forward and backward, sample, cross_entropy's forward + backward (its planner, the split
    # forward's and the backward's), τ·logsumexp forward and backward
    assert plans == [(3, 16)] * 2 + [(3, 64)] + [(3, 16), (5, 8)] + [(3, 16)] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "smoothing", "probs"])
@pytest.mark.parametrize("max_block", [16, 64])
def test_cross_entropy_split_rows_against_float64(split, device, monkeypatch, dtype, reduction, kind, max_block):
    """Split rows in one launch (each row's last program combines its partials, the last row's program
    reduces the losses, forms the mean's denominator and checks the targets): loss, dx and dτ against the
    float64 composition, under a non-unit incoming gradient; ignore_index, class weights, smoothing,
    probability targets; blocks of 16 over C = 53 (of 64 over C = 301: the forward streams a split row
    with smoothing or probabilities in blocks of 16, a quarter of the planned block), so the splits'
    last blocks are partial."""
    import fused_tau.kernels.row_engine as row_engine

    from fused_tau import reference

    from .compare import Fixed, check_against_reference

    split(True)
    monkeypatch.setattr(row_engine, "MAX_BLOCK", max_block)
    C = 53 if max_block == 16 else 301
    x = torch.randn(6, C, device=device) * 3
    weight = torch.rand(C, device=device) + 0.5
    if kind == "probs":
        target, opts = torch.softmax(torch.randn(6, C, device=device), -1).to(dtype), dict(label_smoothing=0.1)
    else:
        target = torch.tensor([3, C - 1, -100, 0, 17, C // 2], device=device)
        opts = dict(ignore_index=-100, label_smoothing=0.2 if kind == "smoothing" else 0.0)
    tau = torch.tensor(0.6, device=device, requires_grad=True)
    check_against_reference(lambda x, t, w, tau: cross_entropy(x, t, w, tau=tau, reduction=reduction, **opts),
                            lambda x, t, w, tau: reference.cross_entropy(x, t, w, tau=tau, reduction=reduction,
                                                                         **opts),
                            [x, Fixed(target), Fixed(weight)], dtype=dtype, tau=tau, tau_scale=4.0)


def test_cross_entropy_split_rows_are_deterministic(split, device):
    """The tickets elect which program combines, never the order of the sums: two runs give the same
    bits (loss, dx, dτ), and the tickets are back to 0 after each launch."""
    import fused_tau.kernels.row_engine as row_engine

    split(True)
    x = torch.randn(5, 101, device=device) * 5
    y = torch.tensor([0, 100, 7, -100, 50], device=device)
    w = torch.rand(101, device=device) + 0.5

    def run():
        xs = x.clone().requires_grad_()
        tau = torch.tensor(0.3, device=device, requires_grad=True)
        loss = cross_entropy(xs, y, w, tau=tau, label_smoothing=0.1)
        (loss * 0.37).backward()
        return loss.detach(), xs.grad, tau.grad

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert all(int(t.abs().sum()) == 0 for t in row_engine._TICKETS.values())  # host-ok: CPU test


def _recorded_launches(monkeypatch, module, names, launched=None):
    """Records (kernel name, grid) of each launch of ``names`` in ``module`` (into ``launched``, if given)."""
    launched = [] if launched is None else launched

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            launched.append((self.fn.fn.__name__, tuple(grid)))
            return self.fn[grid]

    for name in names:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return launched


def test_cross_entropy_split_forward_is_one_launch(split, device, monkeypatch):
    """A split row's forward with reduction 'mean' or 'sum' is one launch (was four: the targets' pass,
    the split programs, a combine a row, the loss's sum); its backward one more; a bad target still
    raises (the same launch's verdict)."""
    import fused_tau.kernels.row_ce as row_ce
    import fused_tau.kernels.row_ce_reduce as row_ce_reduce

    launched = _recorded_launches(monkeypatch, row_ce, ("_ce_fwd_kernel", "_ce_bwd_kernel", "_ce_grad_rescale_kernel"))
    _recorded_launches(monkeypatch, row_ce_reduce, ("_ce_reduce_kernel",), launched)
    split(True)
    x = torch.randn(3, 37, device=device)
    y = torch.tensor([0, 36, -100], device=device)
    for reduction in ("mean", "sum"):
        cross_entropy(x, y, tau=0.5, reduction=reduction)
        assert launched == [("_ce_fwd_kernel", (3, 5))]  # splits of the forward's streamed 8-column blocks
        launched.clear()
        xs = x.clone().requires_grad_()
        cross_entropy(xs, y, tau=0.5, reduction=reduction).backward()
        assert launched == [("_ce_fwd_kernel", (3, 5)), ("_ce_bwd_kernel", (3, 3))]
        launched.clear()
    with pytest.raises(IndexError):
        cross_entropy(x, torch.tensor([0, 37, 1], device=device), tau=0.5)


def test_sample_split_is_one_launch(split, device, monkeypatch):
    """A split row's draw is one launch (was two: the splits, a combine a row), and so is its argmax (τ = 0);
    the draws equal the unsplit ones (test_sample) and two runs give the same draws."""
    import fused_tau.kernels.row_sample as row_sample

    launched = _recorded_launches(monkeypatch, row_sample, ("_sample_kernel", "_argmax_kernel"))
    split(True)
    x = torch.randn(3, 150, device=device)  # 150 columns: 3 groups of four 16-column blocks
    gen = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    a = sample(x, tau=0.7, generator=gen())
    assert launched == [("_sample_kernel", (3, 3))]
    assert torch.equal(a, sample(x, tau=0.7, generator=gen()))
    launched.clear()
    assert torch.equal(sample(x, tau=0.0), x.argmax(-1))
    assert launched == [("_argmax_kernel", (3, 10))]
    launched.clear()
    x = torch.randn(3, 128, device=device)  # two whole groups: loads without a mask, no ragged group
    x[1, 70] = float("nan")
    a = sample(x[::2], tau=0.7, generator=gen())
    assert launched == [("_sample_kernel", (2, 2))]
    split(False)
    assert torch.equal(a, sample(x[::2], tau=0.7, generator=gen()))
    with pytest.raises(ValueError, match="NaN"):
        sample(x, tau=0.7, generator=gen())


def test_logsumexp_split_is_one_launch(split, device, monkeypatch):
    """τ·logsumexp of split rows is one launch (was two: the splits, a combine a row): each row's last
    program reduces its partials; the value and gradients (τ's too) equal the unsplit ones
    (test_softmax_family), and two runs give the same bits."""
    import fused_tau.kernels.row_softmax as row_softmax

    launched = _recorded_launches(monkeypatch, row_softmax, ("_softmax_fwd_kernel",))
    split(True)
    x = torch.randn(3, 37, device=device) * 3
    tau = torch.tensor(0.4, device=device)
    a = logsumexp(x, tau=tau)
    assert launched == [("_softmax_fwd_kernel", (3, 3))]
    assert torch.equal(a, logsumexp(x, tau=tau))
